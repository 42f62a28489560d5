"""Predict from an exported ``model.onnx`` with only onnxruntime, NumPy and Pillow (no torch).

Labels, preprocessing and the "not sure" threshold travel in the ONNX file's metadata, and the
pixels are computed by the same Pillow/NumPy code as training, so answers match the bundle's.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Batch, Predictor
from .errors import FoldernetError
from .calibration import scaled_logits, softmax
from .modality import decode_error, source_pixels
from .preprocess import Preprocess, mean_per_input


class ExportedClassifier(Predictor):
    """What every exported model file shares: labels, preprocessing, temperature and the "not sure"
    rule from its ``foldernet`` metadata, Pillow/NumPy preprocessing, and batching. Subclasses load
    the file and give ``run(batch) -> {output name: array}``."""

    path: Path
    batch_size = 32

    def _read_metadata(self, raw: str | None, fix: str) -> None:
        if raw is None:
            raise FoldernetError(f"{self.path} has no foldernet metadata (labels, preprocessing); export it with "
                                 "`foldernet export`")
        try:
            info = json.loads(raw)
            labels, pre = list(info["labels"]), Preprocess.from_dict(info["preprocess"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FoldernetError(f"the model at {self.path} is damaged: its foldernet metadata is unreadable "
                                 f"({type(exc).__name__}); {fix}") from None
        self.metadata = info
        self.labels: list[str] = labels
        self.preprocess = pre
        self.temperature = float(info.get("temperature", 1.0))
        self.logit_norm = bool(info.get("logit_norm", False))
        self.audio = None
        if info.get("audio"):
            from .audio import AudioConfig

            self.audio = AudioConfig.from_dict(info["audio"])
        self.threshold = info.get("threshold")
        self.similarity_threshold = info.get("similarity_threshold")
        bundle_dir = self.path.parent.parent / "model"  # RUN/export/model.onnx -> RUN/model (similar index)
        self.index_dir = bundle_dir if bundle_dir.is_dir() else None

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def pixels(self, source) -> np.ndarray:
        """(k, 3, S, S): one row for an image, one per window for audio."""
        return source_pixels(source, self.preprocess, self.audio)

    def forward(self, pixel_list: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per input (k windows each): probabilities from the mean logits, and the mean features."""
        rows = np.concatenate(pixel_list)
        parts = [self.run(rows[i:i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
        out = {k: mean_per_input(np.concatenate([p[k] for p in parts]), [len(p) for p in pixel_list])
               for k in parts[0]}
        # averaging logits (not probabilities) matches the bundle, which averages embeddings
        probs = softmax(scaled_logits(out["logits"], self.temperature, self.logit_norm)) if "logits" in out \
            else out["probabilities"]
        return probs, out.get("features")

    def predict_batch(self, sources: Sequence, progress: bool = False):
        def load(src):
            try:
                return self.pixels(src), None
            except Exception as exc:  # noqa: BLE001 - a bad input is reported, never fatal
                return None, decode_error(exc, self.audio)

        n = len(sources)
        probs = np.zeros((n, len(self.labels)), np.float32)
        feats = None
        ok = np.zeros(n, bool)
        errors: dict[int, str] = {}
        with ThreadPoolExecutor(max_workers=2) as pool:
            loaded = list(pool.map(load, sources))
        for i, (_, err) in enumerate(loaded):
            if err:
                errors[i] = err
        good = [i for i, (pix, _) in enumerate(loaded) if pix is not None]
        for start in range(0, len(good), self.batch_size):
            idx = good[start:start + self.batch_size]
            p, f = self.forward([loaded[i][0] for i in idx])
            probs[idx] = p
            if f is not None:
                if feats is None:
                    feats = np.zeros((n, f.shape[1]), np.float32)
                feats[idx] = f
            ok[idx] = True
        return Batch(probs, feats, ok, errors)


class OnnxClassifier(ExportedClassifier):
    """Same API as :class:`foldernet.bundle.Classifier`, backed by one ONNX file."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, batch_size: int = 32):
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            cands = [path / "export" / "model.onnx", path / "model.onnx"]
            path = next((c for c in cands if c.is_file()), cands[0])
        if not path.is_file():
            raise FoldernetError(f"no ONNX model at {path}: run `foldernet export RUN` first")
        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
        except Exception as exc:  # noqa: BLE001 - truncated or corrupted: ONNX Runtime raises its own types
            raise FoldernetError(f"the ONNX model at {path} is damaged: it does not load ({type(exc).__name__}: "
                                 f"{str(exc)[:160]}); export it again with `foldernet export RUN --force`") from None
        self._read_metadata(meta.get("foldernet"), "export it again")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.batch_size = batch_size

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.output_names, outs))
