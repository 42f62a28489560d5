"""The model bundle: the one thing on disk that every later stage reads.

RUN/model/
  config.json        backbone, weights source, preprocessing, labels, version, metrics summary
  model.safetensors  backbone.* and head.* tensors (no pickle anywhere in loading)
  metrics.json       full evaluation of val/test
  splits.csv         which file went where
  labels.txt         one label a line, for label_image habits
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import __version__
from .errors import FoldernetError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .preprocess import Preprocess, mean_per_input, softmax

BUNDLE_FORMAT = 1


def save_bundle(model_dir: str | os.PathLike, backbone_model, head_weight: np.ndarray, head_bias: np.ndarray,
                config: dict, metrics: dict | None = None) -> Path:
    """Write a bundle folder (each file atomically). ``config`` must hold backbone, labels, preprocess."""
    from safetensors.torch import save

    import torch

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone_model.state_dict().items()}
    tensors["head.weight"] = torch.from_numpy(np.ascontiguousarray(head_weight, np.float32))
    tensors["head.bias"] = torch.from_numpy(np.ascontiguousarray(head_bias, np.float32))
    atomic_write_bytes(model_dir / "model.safetensors", save(tensors, metadata={"format": "foldernet"}))
    config = {"format": BUNDLE_FORMAT, "foldernet_version": __version__, **config}
    atomic_write_json(model_dir / "config.json", config)
    atomic_write_text(model_dir / "labels.txt", "\n".join(config["labels"]) + "\n")
    if metrics is not None:
        atomic_write_json(model_dir / "metrics.json", metrics)
    return model_dir


def find_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    for cand in (path, path / "model"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FoldernetError(f"no model bundle at {path}: expected {path}/model/config.json and model.safetensors. "
                         "Train one with `foldernet train DATA --out RUN`.")


@dataclass
class Prediction:
    """Top-k answer for one input. ``error`` is set (and ``top`` empty) when the input was unreadable."""

    source: str
    top: list[tuple[str, float]]
    error: str | None = None
    not_sure: bool = False
    similar: list = field(default_factory=list)  # nearest training images (similar.Neighbour)

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
    ``threshold`` and ``predict_batch(sources) -> (probs, features, ok, errors)``."""

    labels: list[str]
    threshold: float | None = None
    audio = None  # AudioConfig for a model of sounds
    similarity_threshold: float | None = None
    index_dir: Path | None = None
    _index = None

    def predict_batch(self, sources: Sequence, progress: bool = False):
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

    def similar(self, inputs, k: int = 5) -> list[list]:
        """The ``k`` nearest training images of each input (path, label, cosine similarity)."""
        if self.index is None:
            raise FoldernetError("this model has no similar-example index (train with foldernet >= 0.1)")
        sources = expand_inputs(inputs)
        _, feats, ok, errors = self.predict_batch(sources)
        hits = self.index.search(feats, k)
        return [h if ok[i] else [] for i, h in enumerate(hits)]

    def predict(self, inputs: str | os.PathLike | bytes | Iterable, top_k: int = 5, batch_size: int = 256,
                progress: bool = False, similar: int = 0) -> list[Prediction]:
        return list(self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, progress=progress,
                                      similar=similar))

    def iter_predict(self, inputs, top_k: int = 5, batch_size: int = 256, progress: bool = False,
                     similar: int = 0) -> Iterator[Prediction]:
        """Stream predictions chunk by chunk, so a folder of 10,000 images never sits in memory.
        A top-1 confidence under the bundle's threshold marks the answer ``not_sure`` (top-k still listed);
        ``similar=K`` adds the K nearest training images."""
        sources = expand_inputs(inputs)
        k = max(1, min(top_k, len(self.labels)))
        index = self.index if (similar > 0 or self.similarity_threshold is not None) else None
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            probs, feats, ok, errors = self.predict_batch(chunk, progress=progress and len(sources) > batch_size)
            have = index is not None and feats is not None
            neighbours = index.search(feats, similar) if have and similar > 0 else None
            unsure = self.not_sure(probs, feats)
            for i, src in enumerate(chunk):
                name = "<bytes>" if isinstance(src, (bytes, bytearray)) else str(src)
                if not ok[i]:
                    yield Prediction(name, [], errors.get(i, "unreadable"))
                    continue
                order = np.argsort(-probs[i])[:k]
                top = [(self.labels[j], float(probs[i, j])) for j in order]
                yield Prediction(name, top, None, bool(unsure[i]), neighbours[i] if neighbours else [])

    def timeline(self, source: str | os.PathLike | bytes, top_k: int = 3, batch_size: int = 32) -> list[Segment]:
        """What sounds when: every window of one recording answered on its own (``predict`` averages
        them into one answer), with start and end in seconds. Windows overlap by half."""
        from .audio import timeline_images

        if self.audio is None:
            raise FoldernetError("a timeline needs a model trained on audio; this one classifies images")
        name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
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

    def not_sure(self, probs: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
        """The open-set rule of the bundle (see ``evaluate.NOT_SURE_QUANTILE``) for a batch."""
        from .evaluate import K_NEIGHBOURS, not_sure_mask

        sims = None
        if self.similarity_threshold is not None and feats is not None and self.index is not None:
            sims = self.index.knn_similarity(feats, K_NEIGHBOURS)
        return not_sure_mask(probs, sims, self.threshold, self.similarity_threshold)


class Classifier(Predictor):
    """A loaded bundle: ``predict`` files, folders or bytes; ``predict_proba`` for arrays."""

    def __init__(self, model_dir: Path, engine: str = "onnx", use_cache: bool = True):
        from safetensors.torch import load_file

        from .models import add_spectrogram_stats, create_backbone, state_digest

        self.model_dir = model_dir
        self.config = read_json(model_dir / "config.json")
        if self.config.get("format", 0) > BUNDLE_FORMAT:
            raise FoldernetError(f"{model_dir} was written by a newer foldernet "
                                 f"({self.config.get('foldernet_version')}); upgrade foldernet to load it")
        self.labels: list[str] = list(self.config["labels"])
        self.preprocess = Preprocess.from_dict(self.config["preprocess"])
        tensors = load_file(str(model_dir / "model.safetensors"))
        backbone = create_backbone(self.config["backbone"], pretrained=False)
        if self.config.get("spectrogram_stats"):
            backbone = add_spectrogram_stats(backbone, self.preprocess.size)
        state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        try:
            backbone.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FoldernetError(f"{model_dir}/model.safetensors does not fit backbone "
                                 f"{self.config['backbone']}: {str(exc)[:300]}") from exc
        self.backbone = backbone.model.eval()
        self.head_weight = tensors["head.weight"].numpy()
        self.head_bias = tensors["head.bias"].numpy()
        self.temperature = float(self.config.get("temperature", 1.0))
        self.audio = None
        if self.config.get("audio"):
            from .audio import AudioConfig

            self.audio = AudioConfig.from_dict(self.config["audio"])
        self.threshold = self.config.get("threshold")
        self.similarity_threshold = self.config.get("similarity_threshold")
        self.index_dir = model_dir
        self._engine_pref = engine
        self._use_cache = use_cache
        self._extractor = None
        self._digest = state_digest(self.backbone)

    @property
    def extractor(self):
        if self._extractor is None:
            from .features import FeatureExtractor

            self._extractor = FeatureExtractor(self.backbone, self.preprocess, self._digest, self.config["backbone"],
                                               engine=self._engine_pref, use_cache=self._use_cache,
                                               audio=self.audio)
        return self._extractor

    def proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        return softmax((feats @ self.head_weight.T + self.head_bias) / self.temperature)

    def forward(self, pixel_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per input (k windows each): probabilities and the mean embedding."""
        feats = mean_per_input(self.extractor.engine(np.concatenate(pixel_list)), [len(p) for p in pixel_list])
        return self.proba_from_features(feats), feats

    def predict_batch(self, sources: Sequence, progress: bool = False):
        f = self.extractor(list(sources), desc="predict", progress=progress)
        return self.proba_from_features(f.vectors), f.vectors, f.ok, f.errors


def expand_inputs(inputs) -> list:
    """Files, folders (recursively, image files only, sorted) and raw bytes -> a flat list."""
    from .audio import AUDIO_EXTENSIONS
    from .data import IMAGE_EXTENSIONS

    media = IMAGE_EXTENSIONS | AUDIO_EXTENSIONS

    if isinstance(inputs, (str, os.PathLike, bytes, bytearray)):
        inputs = [inputs]
    out: list = []
    for src in inputs:
        if isinstance(src, (bytes, bytearray)):
            out.append(bytes(src))
            continue
        p = Path(src).expanduser()
        if p.is_dir():
            out.extend(sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in media),
                              key=lambda f: f.as_posix()))
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise FoldernetError(f"input not found: {p}")
    return out


def load(path: str | os.PathLike, engine: str = "onnx", use_cache: bool = True) -> Classifier:
    """Load a bundle from ``RUN`` or ``RUN/model``."""
    return Classifier(find_model_dir(path), engine=engine, use_cache=use_cache)


def bundle_summary(path: str | os.PathLike) -> dict:
    return json.loads((find_model_dir(path) / "config.json").read_text(encoding="utf-8"))
