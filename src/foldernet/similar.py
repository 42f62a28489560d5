"""Similar examples: the bundle keeps the training images' embeddings (unit length, float16) with
their paths and labels, so a prediction can show the nearest training images: the painting
recognizer's "did you mean one of these?" when it is unsure or the painting is not in its database.

Exact search is one matrix product; above ``exact_below`` training images (and with faiss-cpu, in
the ray extra) an approximate inverted-file index answers the same ``SimilarIndex.search``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes, atomic_write_json

INDEX_FILE = "index.safetensors"
INDEX_META = "index.json"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (cosine similarity is then a dot product)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def save_index(model_dir: str | os.PathLike, vectors: np.ndarray, paths: list[str], labels: list[str]) -> None:
    from safetensors.numpy import save

    model_dir = Path(model_dir)
    atomic_write_bytes(model_dir / INDEX_FILE, save({"embeddings": unit_rows(vectors).astype(np.float16)}))
    atomic_write_json(model_dir / INDEX_META, {"paths": paths, "labels": labels})


def knn_similarity(unit_index: np.ndarray, vectors: np.ndarray, k: int = 5, block: int = 1024) -> np.ndarray:
    """Mean of the top-``k`` cosine similarities of each vector against unit-length ``unit_index`` rows."""
    q = unit_rows(np.atleast_2d(vectors).astype(np.float32))
    k = max(1, min(k, len(unit_index)))
    out = np.empty(len(q), np.float32)
    for i in range(0, len(q), block):
        sims = q[i:i + block] @ unit_index.T
        out[i:i + block] = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
    return out


@dataclass
class Neighbour:
    path: str
    label: str
    similarity: float
    index: int = -1  # row in the index (the server addresses training images by it, never by path)


class SimilarIndex:
    exact_below = 20_000  # dedup.ANN_EXACT_BELOW; an instance may lower it

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors.numpy import load_file

        from .errors import FoldernetError

        model_dir = Path(model_dir)

        def damaged(what: str) -> FoldernetError:
            return FoldernetError(f"the bundle at {model_dir} is damaged: {what}; retrain or restore it")

        try:
            self.embeddings = load_file(str(model_dir / INDEX_FILE))["embeddings"].astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupted: safetensors raises several types
            raise damaged(f"{INDEX_FILE} cannot be read ({type(exc).__name__})") from None
        try:
            meta = json.loads((model_dir / INDEX_META).read_text(encoding="utf-8"))
            self.paths, self.labels = list(meta["paths"]), list(meta["labels"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise damaged(f"{INDEX_META} cannot be read ({type(exc).__name__})") from None
        if self.embeddings.ndim != 2 or not (len(self.embeddings) == len(self.paths) == len(self.labels)):
            raise damaged(f"{INDEX_FILE} holds {len(self.embeddings)} rows for {len(self.paths)} paths")

    @staticmethod
    def exists(model_dir: str | os.PathLike) -> bool:
        return (Path(model_dir) / INDEX_FILE).is_file()

    _ann = None

    def _approximate(self):
        """The FAISS index when the training set is large and faiss is installed, else None (exact)."""
        if len(self.embeddings) <= self.exact_below:
            return None
        if self._ann is None:
            try:
                import faiss  # noqa: F401
            except ImportError:
                self._ann = False
            else:
                from .dedup import ivf_index

                self._ann = ivf_index(self.embeddings)
        return self._ann or None

    def knn_similarity(self, vectors: np.ndarray, k: int = 5) -> np.ndarray:
        """Mean cosine similarity to the ``k`` nearest training images: low means unlike anything seen."""
        ann = self._approximate()
        if ann is None:
            return knn_similarity(self.embeddings, vectors, k)
        sims, _ = ann.search(unit_rows(np.atleast_2d(vectors).astype(np.float32)), max(1, k))
        return np.where(sims > -1e30, sims, np.nan).astype(np.float32).mean(1)

    def search(self, vectors: np.ndarray, k: int = 5) -> list[list[Neighbour]]:
        q = unit_rows(np.atleast_2d(vectors).astype(np.float32))
        k = min(k, len(self.embeddings))
        ann = self._approximate()
        if ann is None:
            sims = q @ self.embeddings.T
            top = np.argsort(-sims, axis=1)[:, :k]
            scores = np.take_along_axis(sims, top, axis=1)
        else:
            scores, top = ann.search(q, k)
        return [[Neighbour(self.paths[j], self.labels[j], float(s), int(j)) for j, s in zip(row, srow) if j >= 0]
                for row, srow in zip(top, scores)]
