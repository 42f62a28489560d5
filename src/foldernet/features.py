"""Backbone features, fast and only once.

Two things make the frozen-backbone path quick on a CPU:
- the backbone runs in ONNX Runtime from a static-shape export whose TF-style "same" padding is
  folded into the convolutions (5x faster than torch eager for EfficientNet-Lite here), cached on
  disk by weight digest; torch eager is the fallback when export or parity fails;
- features are cached on disk in SQLite keyed by file content hash + backbone weights +
  preprocessing, so a second run on the same data skips extraction entirely.
Decoding runs in threads (Pillow releases the GIL) in a bounded window ahead of the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sqlite3
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .modality import decode_error, decode_windows, read_source, source_pixels
from .preprocess import Preprocess, mean_per_input
from .progress import progress_bar

log = logging.getLogger("foldernet")
# Part of every feature-cache key: bump it whenever decoding, preprocessing or spectrogram code
# changes what pixels a file turns into, so stale features are never reused.
PIPELINE_VERSION = 3


def cache_dir() -> Path:
    """Where exports and features are cached: $FOLDERNET_CACHE, else $XDG_CACHE_HOME/foldernet."""
    env = os.environ.get("FOLDERNET_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foldernet"
    base.mkdir(parents=True, exist_ok=True)
    return base


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# ---------------------------------------------------------------- engines: (B,3,S,S) float32 -> (B,D)

class TorchEngine:
    name = "torch"

    def __init__(self, model):
        import torch

        self.model = model.eval()
        self._torch = torch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(batch)).float().numpy()


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def export_onnx(model, size: int, path: str | os.PathLike, dynamic_batch: bool = True,
                output_names: Sequence[str] = ("output",)) -> Path:
    """Export with torch's dynamo exporter at a static image size: its optimiser folds the constant
    Pad ops of TF-style 'same' padding into Conv pads. Written atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, size, size)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), tmp, dynamo=True, input_names=["input"],
                              output_names=list(output_names), dynamic_shapes=shapes, external_data=False,
                              verbose=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def make_engine(model, size: int, digest: str, prefer: str = "onnx") -> TorchEngine | OnnxEngine:
    """The fastest engine that gives the same numbers as the torch model (checked on a random batch)."""
    if prefer == "onnx":
        try:
            path = cache_dir() / "onnx" / f"{digest}-{size}.onnx"
            if not path.exists():
                log.info("exporting backbone to ONNX for fast CPU inference (once per model)...")
                export_onnx(model, size, path)
            engine = OnnxEngine(path)
            x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
            ref = TorchEngine(model)(x)
            diff = float(np.abs(engine(x) - ref).max())
            # float32 rounding grows with the features' scale, and standardised features (audio) magnify
            # it up to 10x; a broken export (padding, layout) is off by far more
            if diff < 5e-3 + 1e-4 * float(np.abs(ref).max()):
                return engine
            log.warning("ONNX export disagrees with torch (max diff %.2g); using torch", diff)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to torch
            log.warning("ONNX Runtime path unavailable (%s: %s); using torch eager", type(exc).__name__,
                        str(exc)[:200])
    return TorchEngine(model)


# ---------------------------------------------------------------- the cache

class FeatureCache:
    """SQLite table (model_key, content_hash) -> float32 vector. One file, safe to interrupt."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else cache_dir() / "features.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS features (model_key TEXT, content_hash TEXT, vec BLOB, "
                        "PRIMARY KEY (model_key, content_hash))")
        self.db.execute("CREATE TABLE IF NOT EXISTS fingerprints (content_hash TEXT PRIMARY KEY, fp TEXT)")
        self.lock = threading.Lock()

    def keys(self, model_key: str) -> set[str]:
        with self.lock:
            rows = self.db.execute("SELECT content_hash FROM features WHERE model_key=?", (model_key,))
            return {r[0] for r in rows}

    def _select(self, sql: str, prefix: list, hashes: Sequence[str]) -> list[tuple]:
        """Rows of ``sql`` (ending in ``content_hash IN ({})``) for ``hashes``, 500 at a time."""
        rows: list[tuple] = []
        with self.lock:
            for i in range(0, len(hashes), 500):
                chunk = list(hashes[i:i + 500])
                rows += self.db.execute(sql.format(",".join("?" * len(chunk))), [*prefix, *chunk]).fetchall()
        return rows

    def get_many(self, model_key: str, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        rows = self._select("SELECT content_hash, vec FROM features WHERE model_key=? AND content_hash IN ({})",
                            [model_key], hashes)
        return {h: np.frombuffer(blob, dtype=np.float32) for h, blob in rows}

    def put_many(self, model_key: str, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                                [(model_key, h, np.asarray(v, np.float32).tobytes()) for h, v in pairs])

    def get_fingerprints(self, hashes: Sequence[str]) -> dict[str, dict]:
        rows = self._select("SELECT content_hash, fp FROM fingerprints WHERE content_hash IN ({})", [], hashes)
        return {h: json.loads(fp) for h, fp in rows}

    def put_fingerprints(self, pairs: Iterable[tuple[str, dict]]) -> None:
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)",
                                [(h, json.dumps(fp)) for h, fp in pairs])

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------- extraction

@dataclass
class Features:
    vectors: np.ndarray            # (N, D) float32; rows of failed files are zero
    ok: np.ndarray                 # (N,) bool
    errors: dict[int, str] = field(default_factory=dict)   # index -> reason
    hashes: list[str | None] = field(default_factory=list)
    fingerprints: list[dict | None] = field(default_factory=list)
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0


class FeatureExtractor:
    """Backbone + preprocessing + cache: paths (or bytes) in, feature vectors out."""

    def __init__(self, model, preprocess: Preprocess, digest: str, backbone_name: str,
                 engine: str = "onnx", use_cache: bool = True, batch_size: int = 32,
                 workers: int | None = None, audio=None, view: int = 0):
        from .preprocess import AUGMENT_VERSION

        self.preprocess = preprocess
        self.view = view    # 0: the file as predict sees it; 1, 2, ...: augmented views (the feature bank)
        self.digest = digest
        self.audio = audio  # an audio.AudioConfig when the model classifies sounds
        self.model_key = hashlib.blake2b(
            json.dumps([backbone_name, digest, preprocess.to_dict(), audio.to_dict() if audio else None,
                        PIPELINE_VERSION] + ([view, AUGMENT_VERSION] if view else [])
                       ).encode(), digest_size=12).hexdigest()
        self.engine = make_engine(model, preprocess.size, digest, prefer=engine)
        self.cache = FeatureCache() if use_cache else None
        self.batch_size = batch_size
        self.workers = workers or min(4, (os.cpu_count() or 1) + 1)
        self.dim: int | None = None

    def pixels(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """Preprocessed pixels (k, 3, S, S) of one input (k windows for audio, 1 for an image),
        exactly as extraction computes them."""
        return source_pixels(source, self.preprocess, self.audio)

    def _load(self, source, known: set[str]) -> tuple[str | None, np.ndarray | None, dict | None, str | None]:
        """Read, hash, and (unless cached) decode one input: (hash, pixels, fingerprint, error)."""
        try:
            data, hint = read_source(source)
        except OSError as exc:
            return None, None, None, f"cannot read file: {exc.strerror or exc}"
        if not data:
            return None, None, None, "empty file (0 bytes)"
        h = content_hash(data)
        if h in known:
            return h, None, None, None
        try:
            pix, fp = decode_windows(data, self.preprocess, self.audio, hint, view=self.view, content_hash=h)
            return h, pix, fp, None
        except Exception as exc:  # noqa: BLE001 - a bad file is reported, never fatal
            return h, None, None, decode_error(exc, self.audio)

    def __call__(self, sources: Sequence, desc: str = "features", progress: bool = True) -> Features:
        import time

        start = time.perf_counter()
        n = len(sources)
        known = self.cache.keys(self.model_key) if self.cache else set()
        vectors: list[np.ndarray | None] = [None] * n
        hashes: list[str | None] = [None] * n
        errors: dict[int, str] = {}
        fps: list[dict | None] = [None] * n
        pending: list[tuple[int, str, np.ndarray]] = []
        cached_idx: list[int] = []
        computed = 0

        def flush() -> None:
            nonlocal computed
            if not pending:
                return
            rows = np.concatenate([p for _, _, p in pending])
            flat = np.concatenate([self.engine(rows[j:j + self.batch_size]) for j in range(0, len(rows), self.batch_size)])
            out = mean_per_input(flat, [len(p) for _, _, p in pending])  # a clip's windows -> one embedding
            for (i, _, _), v in zip(pending, out):
                vectors[i] = v
            if self.cache:
                self.cache.put_many(self.model_key, [(h, v) for (_, h, _), v in zip(pending, out)])
                self.cache.put_fingerprints([(h, fps[i]) for i, h, _ in pending if fps[i]])
            computed += len(pending)
            pending.clear()

        window = max(2 * self.batch_size, 4 * self.workers)
        with ThreadPoolExecutor(max_workers=self.workers) as pool, progress_bar(n, desc, progress) as bar:
            queue: deque = deque()
            it = iter(enumerate(sources))
            for i, src in it:
                queue.append((i, pool.submit(self._load, src, known)))
                if len(queue) >= window:
                    break
            while queue:
                i, fut = queue.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    queue.append((nxt[0], pool.submit(self._load, nxt[1], known)))
                h, pix, fp, err = fut.result()
                hashes[i] = h
                fps[i] = fp
                if err:
                    errors[i] = err
                elif pix is None:
                    cached_idx.append(i)
                else:
                    pending.append((i, h, pix))
                    if sum(len(p) for _, _, p in pending) >= self.batch_size:
                        flush()
                bar.advance(1)
            flush()
        if cached_idx and self.cache:
            got = self.cache.get_many(self.model_key, list({hashes[i] for i in cached_idx}))
            got_fp = self.cache.get_fingerprints(list({hashes[i] for i in cached_idx}))
            for i in cached_idx:
                vectors[i] = got[hashes[i]]
                fps[i] = got_fp.get(hashes[i])
        dim = next((v.shape[0] for v in vectors if v is not None), self.dim or 0)
        self.dim = dim
        mat = np.zeros((n, dim), np.float32)
        ok = np.zeros(n, bool)
        for i, v in enumerate(vectors):
            if v is not None:
                mat[i] = v
                ok[i] = True
        return Features(vectors=mat, ok=ok, errors=errors, hashes=hashes, fingerprints=fps, n_cached=len(cached_idx),
                        n_computed=computed, seconds=time.perf_counter() - start)

