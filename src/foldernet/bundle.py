"""The model bundle: the one thing on disk that every later stage reads.

RUN/model/
  config.json        backbone, weights source, preprocessing, labels, version, metrics summary
  model.safetensors  backbone.* and head.* tensors (no pickle anywhere in loading)
  metrics.json       full evaluation of val/test
  splits.csv         which file went where
  labels.txt         one label a line, for label_image habits
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from . import __version__
from .errors import FoldernetError
from .calibration import K_NEIGHBOURS, not_sure_mask, not_sure_reasons
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .modality import expand_inputs, source_name  # noqa: F401 - expand_inputs: the door callers know
from .params import check
from .progress import console
from .similar import INDEX_FILE
from .preprocess import Preprocess, mean_per_input

BUNDLE_FORMAT = 2  # 2: the training spec is recorded; 1 (foldernet 0.1 before it) still loads
MARKER_KINDS = ("run", "audit", "export", "compare", "demo")


def damaged(model_dir: Path | str, what: str) -> FoldernetError:
    return FoldernetError(f"the bundle at {model_dir} is damaged: {what}; retrain or restore it")


@dataclass
class BundleConfig:
    """``config.json``: everything a later stage needs to rebuild and trust the model. This class is
    its only reader and writer; ``read`` checks every field it relies on."""

    backbone: str
    labels: list[str]
    num_features: int
    preprocess: Preprocess
    weights_source: str = ""
    mode: str = "head"
    kind: str = "image"
    audio: object = None                  # audio.AudioConfig of a model of sounds
    spectrogram_stats: bool = False
    tta: str | None = None                # "flip": the saved backbone averages each input with its mirror
    refit: dict | None = None
    temperature: float = 1.0
    logit_norm: bool = False              # temperature applies to unit-normalised logits (calibration.unit_logits)
    threshold: float | None = None
    similarity_threshold: float | None = None
    threshold_rule: str = ""
    operating_point: dict | None = None   # --min-precision: asked, threshold, coverage and precision on val
    label_map: dict | None = None
    seed: int = 0
    group_by: str | None = None
    leakage: dict = field(default_factory=dict)
    balance: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    engine: str = "onnx"
    metrics: dict = field(default_factory=dict)
    spec: dict | None = None
    created: str = ""
    platform: str = ""
    format: int = BUNDLE_FORMAT
    foldernet_version: str = __version__

    def to_dict(self) -> dict:
        out = {"format": BUNDLE_FORMAT, "foldernet_version": __version__}
        for f in fields(self):
            if f.name in out:
                continue
            value = getattr(self, f.name)
            if f.name == "preprocess":
                value = value.to_dict()
            elif f.name == "audio":
                value = value.to_dict() if value is not None else None
            out[f.name] = value
        return out

    def write(self, model_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(model_dir) / "config.json", self.to_dict())
        atomic_write_text(Path(model_dir) / "labels.txt", "\n".join(self.labels) + "\n")

    @classmethod
    def from_dict(cls, d: dict, where: Path | str = "config.json") -> "BundleConfig":
        """Checked: a field that is missing, of the wrong type or out of range names itself."""
        if not isinstance(d, dict):
            raise damaged(where, "config.json does not hold an object")
        fmt = d.get("format", 1)
        if not isinstance(fmt, int) or fmt < 1:
            raise damaged(where, f"config.json has format {fmt!r}")
        if fmt > BUNDLE_FORMAT:
            raise FoldernetError(f"{where} was written by a newer foldernet ({d.get('foldernet_version')}, bundle "
                                 f"format {fmt}); upgrade foldernet to load it")
        for key in ("backbone", "labels", "num_features", "preprocess"):
            if key not in d:
                raise damaged(where, f"config.json has no '{key}'")
        labels = d["labels"]
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels)
                or len(set(labels)) != len(labels)):
            raise damaged(where, "config.json 'labels' must be a list of at least 2 distinct names")
        if not isinstance(d["num_features"], int) or d["num_features"] < 1:
            raise damaged(where, f"config.json 'num_features' is {d['num_features']!r}")
        try:
            pre = Preprocess.from_dict(d["preprocess"])
            if pre.size < 1 or not all(x > 0 for x in pre.std):
                raise ValueError("size or std out of range")
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(where, f"config.json 'preprocess' is not valid ({exc})") from None
        audio = None
        if d.get("audio"):
            from .audio import AudioConfig

            try:
                audio = AudioConfig.from_dict(d["audio"])
            except (TypeError, ValueError) as exc:
                raise damaged(where, f"config.json 'audio' is not valid ({exc})") from None
        temperature = d.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise damaged(where, f"config.json 'temperature' is {temperature!r}")
        if not isinstance(d.get("logit_norm", False), bool):
            raise damaged(where, f"config.json 'logit_norm' is {d.get('logit_norm')!r}")
        if d.get("tta") not in (None, "flip"):
            raise damaged(where, f"config.json 'tta' is {d.get('tta')!r}")
        for key in ("threshold", "similarity_threshold"):
            if d.get(key) is not None and not isinstance(d[key], (int, float)):
                raise damaged(where, f"config.json '{key}' is {d[key]!r}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.update(labels=list(labels), preprocess=pre, audio=audio, temperature=float(temperature),
                      format=fmt, foldernet_version=str(d.get("foldernet_version", "")))
        for key in ("leakage", "balance", "data", "training", "metrics"):
            if not isinstance(values.get(key, {}), dict):
                values[key] = {}
        return cls(**values)

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> "BundleConfig":
        model_dir = Path(model_dir)
        try:
            d = read_json(model_dir / "config.json")
        except FoldernetError as exc:
            raise damaged(model_dir, f"config.json cannot be read ({exc})") from None
        return cls.from_dict(d, model_dir)


def save_bundle(model_dir: str | os.PathLike, backbone_model, head, config: BundleConfig,
                metrics: dict | None = None) -> Path:
    """Write a bundle folder (each file atomically): weights of backbone and ``head`` (a LinearHead),
    config, labels, metrics."""
    from safetensors.torch import save

    import torch

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone_model.state_dict().items()}
    tensors["head.weight"] = torch.from_numpy(np.ascontiguousarray(head.weight, np.float32))
    tensors["head.bias"] = torch.from_numpy(np.ascontiguousarray(head.bias, np.float32))
    atomic_write_bytes(model_dir / "model.safetensors", save(tensors, metadata={"format": "foldernet"}))
    config.write(model_dir)
    if metrics is not None:
        atomic_write_json(model_dir / "metrics.json", metrics)
    return model_dir


def load_tensors(model_dir: Path) -> dict:
    """model.safetensors, with a damaged file named as such."""
    from safetensors.torch import load_file

    path = model_dir / "model.safetensors"
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated or corrupted: safetensors raises several types
        raise damaged(model_dir, f"model.safetensors cannot be read ({type(exc).__name__}: {str(exc)[:120]})") \
            from None


def find_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    for cand in (path, path / "model"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FoldernetError(f"no model bundle at {path}: expected {path}/model/config.json and model.safetensors. "
                         "Train one with `foldernet train DATA --out RUN`.")


class Batch(NamedTuple):
    """What a predictor computes for a list of inputs: calibrated probabilities (N, C), the features
    (N, D; None when the model gives none), which inputs were read, and why each other one was not."""

    probs: np.ndarray
    features: np.ndarray | None
    ok: np.ndarray
    errors: dict[int, str]


@dataclass
class Prediction:
    """Top-k answer for one input. ``error`` is set (and ``top`` empty) when the input was unreadable."""

    source: str
    top: list[tuple[str, float]]
    error: str | None = None
    not_sure: bool = False
    similar: list = field(default_factory=list)  # nearest training images (similar.Neighbour)
    not_sure_reason: str = ""                     # low confidence, far from every training example, or both

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def confidence(self) -> float | None:
        return self.top[0][1] if self.top else None


@dataclass
class Segment:
    """One window of a recording's timeline: when (seconds) and its top-k answer."""

    start: float
    end: float
    top: list[tuple[str, float]]
    not_sure: bool = False

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def confidence(self) -> float:
        return self.top[0][1]


class Predictor:
    """The API every predictor shares (torch bundle, ONNX file): subclasses give ``labels``,
    ``threshold`` and ``predict_batch(sources) -> Batch``."""

    labels: list[str]
    threshold: float | None = None
    audio = None  # AudioConfig for a model of sounds
    similarity_threshold: float | None = None
    index_dir: Path | None = None
    _index = None

    def predict_batch(self, sources: Sequence, progress: bool = False) -> Batch:
        raise NotImplementedError

    def predict_proba(self, sources: Sequence, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
        """(probs (N, C), ok mask, {index: reason}) for paths or bytes."""
        probs, _, ok, errors = self.predict_batch(sources, progress=progress)
        return probs, ok, errors

    @property
    def index(self):
        """Training-image embeddings for similar-example search, or None when the bundle has none."""
        if self._index is None and self.index_dir is not None:
            from .similar import SimilarIndex

            if SimilarIndex.exists(self.index_dir):
                self._index = SimilarIndex(self.index_dir)
        return self._index

    def _index_or_none(self, similar: int):
        """The similar-example index, or None with a warning when ``similar`` was asked for and the
        bundle has none."""
        index = self.index
        if index is None and similar > 0:
            console.print(f"[yellow]warning:[/] similar examples are unavailable: {self.index_dir or 'this model'} "
                          f"has no {INDEX_FILE}; retrain to rebuild it")
        return index

    def similar(self, inputs, k: int = 5) -> list[list]:
        """The ``k`` nearest training examples of each input (path, label, cosine similarity); an
        unreadable input gets an empty list (``predict`` says why)."""
        k = check("similar", {"k": k})["k"]
        if self.index is None:
            raise FoldernetError(f"similar examples are unavailable: {self.index_dir or 'this model'} has no "
                                 f"{INDEX_FILE}; retrain to rebuild it")
        sources = expand_inputs(inputs)
        _, feats, ok, errors = self.predict_batch(sources)
        hits = self.index.search(feats, k) if feats is not None and ok.any() else [[] for _ in sources]
        return [h if ok[i] else [] for i, h in enumerate(hits)]

    def predict(self, inputs: str | os.PathLike | bytes | Iterable, top_k: int = 5, batch_size: int = 256,
                progress: bool = False, similar: int = 0) -> list[Prediction]:
        return list(self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, progress=progress,
                                      similar=similar))

    def iter_predict(self, inputs, top_k: int = 5, batch_size: int = 256, progress: bool = False,
                     similar: int = 0) -> Iterator[Prediction]:
        """Stream predictions chunk by chunk, so a folder of 10,000 images never sits in memory. Every
        input gets a Prediction: its top-k, or the reason it was skipped. ``not_sure`` (with
        ``not_sure_reason``) follows the bundle's open-set rule; ``similar=K`` adds the K nearest
        training examples."""
        o = check("predict", {"top_k": top_k, "similar": similar, "batch_size": batch_size})
        top_k, similar, batch_size = o["top_k"], o["similar"], o["batch_size"]
        sources = expand_inputs(inputs)
        k = min(top_k, len(self.labels))
        index = self._index_or_none(similar) if (similar > 0 or self.similarity_threshold is not None) else None
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            probs, feats, ok, errors = self.predict_batch(chunk, progress=progress and len(sources) > batch_size)
            have = index is not None and feats is not None and ok.any()
            neighbours = index.search(feats, similar) if have and similar > 0 else None
            reasons = self.not_sure_reasons(probs, feats if have else None)
            for i, src in enumerate(chunk):
                name = source_name(src)
                if not ok[i]:
                    yield Prediction(name, [], errors.get(i, "unreadable"))
                    continue
                order = np.argsort(-probs[i])[:k]
                top = [(self.labels[j], float(probs[i, j])) for j in order]
                yield Prediction(name, top, None, bool(reasons[i]), neighbours[i] if neighbours else [],
                                 reasons[i])

    def suggest(self, inputs, n: int = 100, strategy: str = "default"):
        """The ``n`` unlabelled files most worth labelling next (see ``grow.suggest``)."""
        from .grow import suggest

        return suggest(self, inputs, n=n, strategy=strategy)

    def autolabel(self, inputs, out: str | os.PathLike, min_confidence: float = 0.98) -> dict:
        """Copy the files this model is sure of into ``out/<label>/``, recorded for undo (see
        ``grow.autolabel``)."""
        from .grow import autolabel

        return autolabel(self, inputs, out, min_confidence=min_confidence)

    def timeline(self, source: str | os.PathLike | bytes, top_k: int = 3, batch_size: int = 32) -> list[Segment]:
        """What sounds when: every window of one recording answered on its own (``predict`` averages
        them into one answer), with start and end in seconds. Windows overlap by half."""
        from .audio import timeline_images

        if self.audio is None:
            raise FoldernetError("a timeline needs a model trained on audio; this one classifies images")
        name = source_name(source)
        try:
            images, spans = timeline_images(source, self.audio, size=self.preprocess.size)
        except Exception as exc:  # noqa: BLE001 - name the file and the reason, as predict does
            reason = str(exc) if isinstance(exc, FoldernetError) else f"{type(exc).__name__}: {str(exc)[:120]}"
            raise FoldernetError(f"cannot read audio {name}: {reason}") from exc
        probs = np.concatenate([
            self.forward([self.preprocess(im)[None] for im in images[i:i + batch_size]])[0]
            for i in range(0, len(images), batch_size)])
        unsure = self.not_sure(probs, None)
        k = max(1, min(top_k, len(self.labels)))
        return [Segment(round(a, 3), round(b, 3),
                        [(self.labels[j], float(probs[i, j])) for j in np.argsort(-probs[i])[:k]], bool(unsure[i]))
                for i, (a, b) in enumerate(spans)]

    def _similarities(self, feats: np.ndarray | None) -> np.ndarray | None:
        if self.similarity_threshold is not None and feats is not None and self.index is not None:
            return self.index.knn_similarity(feats, K_NEIGHBOURS)
        return None

    def not_sure(self, probs: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
        """The open-set rule of the bundle (see ``calibration.NOT_SURE_QUANTILE``) for a batch."""
        return not_sure_mask(probs, self._similarities(feats), self.threshold, self.similarity_threshold)

    def not_sure_reasons(self, probs: np.ndarray, feats: np.ndarray | None) -> list[str]:
        """Why each answer is not sure ('' when it is sure)."""
        return not_sure_reasons(probs, self._similarities(feats), self.threshold, self.similarity_threshold)


class Classifier(Predictor):
    """A loaded bundle: ``predict`` files, folders or bytes; ``predict_proba`` for arrays."""

    def __init__(self, model_dir: Path, engine: str = "onnx", use_cache: bool = True):
        from .encoder import Encoder
        from .head import LinearHead
        from .models import create_backbone

        self.model_dir = model_dir
        self.config = cfg = BundleConfig.read(model_dir)
        self.labels: list[str] = list(cfg.labels)
        self.preprocess = cfg.preprocess
        tensors = load_tensors(model_dir)
        weight, bias = tensors.get("head.weight"), tensors.get("head.bias")
        if weight is None or bias is None:
            raise damaged(model_dir, "model.safetensors has no head weights")
        if tuple(weight.shape) != (len(self.labels), cfg.num_features) or tuple(bias.shape) != (len(self.labels),):
            raise damaged(model_dir, f"the head has shape {tuple(weight.shape)} but config.json lists "
                                     f"{len(self.labels)} labels and {cfg.num_features} features")
        encoder = Encoder(create_backbone(cfg.backbone, pretrained=False), cfg.preprocess, cfg.audio)
        if cfg.spectrogram_stats:
            encoder = encoder.with_spectrogram_stats()
        if cfg.tta == "flip":
            encoder = encoder.with_tta()
        state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        try:
            encoder.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise damaged(model_dir, f"model.safetensors does not fit backbone {cfg.backbone} "
                                     f"({str(exc)[:300]})") from None
        self.encoder = encoder
        self.backbone = encoder.model.eval()
        self.head = LinearHead(weight.numpy(), bias.numpy(), cfg.temperature, logit_norm=cfg.logit_norm)
        self.temperature = cfg.temperature
        self.audio = cfg.audio
        self.threshold = cfg.threshold
        self.similarity_threshold = cfg.similarity_threshold
        self.index_dir = model_dir
        self._engine_pref = engine
        self._use_cache = use_cache
        self._extractor = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = self.encoder.extractor(self._engine_pref, self._use_cache)
        return self._extractor

    def proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        return self.head.proba(feats)

    def forward(self, pixel_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per input (k windows each): probabilities and the mean embedding."""
        feats = mean_per_input(self.extractor.engine(np.concatenate(pixel_list)), [len(p) for p in pixel_list])
        return self.proba_from_features(feats), feats

    def predict_batch(self, sources: Sequence, progress: bool = False):
        f = self.extractor(list(sources), desc="predict", progress=progress)
        vectors = f.vectors if f.ok.any() else np.zeros((len(sources), self.head.dim), np.float32)
        return Batch(self.proba_from_features(vectors), vectors, f.ok, f.errors)


def load(path: str | os.PathLike, engine: str = "onnx", use_cache: bool = True) -> Predictor:
    """Load a bundle from ``RUN`` or ``RUN/model``, or an exported ``.onnx`` / ``.tflite`` file or
    OpenVINO IR (``model.openvino`` folder or its ``model.xml``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".openvino", ".xml"):
        from .openvino_ir import OpenVINOClassifier

        return OpenVINOClassifier(path)
    if suffix == ".onnx" and Path(path).is_file():
        from .onnx_predictor import OnnxClassifier

        return OnnxClassifier(path)
    if suffix == ".tflite":
        from .mobile import TFLiteClassifier

        return TFLiteClassifier(path)
    return Classifier(find_model_dir(path), engine=engine, use_cache=use_cache)


def bundle_summary(path: str | os.PathLike) -> dict:
    return BundleConfig.read(find_model_dir(path)).to_dict()
