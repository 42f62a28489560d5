"""Exact and near duplicates: which pairs of files are the same picture (or sound), grouped into
clusters, and which held-out files duplicate training files. Audit, split and train share it.

Two inputs are near duplicates when their 256-bit perceptual hashes (each also compared with the
other's mirror image, so flips are caught) differ in at most NEAR_DUP_MAX_BITS bits and their
embeddings have cosine >= NEAR_DUP_MIN_COSINE, or in at most NEAR_DUP_STRONG_BITS bits with cosine >=
NEAR_DUP_STRONG_MIN_COSINE (the measurements behind these numbers: audit.py's docstring).
"""

from __future__ import annotations

import numpy as np

from .data import Dataset
from .fingerprint import hash_matrix

NEAR_DUP_MAX_BITS = 32        # of 256
NEAR_DUP_MIN_COSINE = 0.75
NEAR_DUP_STRONG_BITS = 12
NEAR_DUP_STRONG_MIN_COSINE = 0.5

def _popcount_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every row of a (n, 4) and b (m, 4) uint64 hash matrices -> (n, m)."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int32)


def near_duplicate_pairs(vectors: np.ndarray, fps: list[dict | None], rows: np.ndarray | None = None,
                         cols: np.ndarray | None = None, max_bits: int = NEAR_DUP_MAX_BITS,
                         min_cosine: float = NEAR_DUP_MIN_COSINE, block: int = 512) -> list[tuple[int, int, int, float]]:
    """(i, j, hash_bits, cosine) for near-duplicate pairs among ``rows`` x ``cols`` (indices; all by default).

    Embedding similarity prunes first (one matrix product per block), the perceptual hash confirms.
    """
    n = len(fps)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    cols = np.arange(n) if cols is None else np.asarray(cols)
    same = rows is cols or (len(rows) == len(cols) and np.array_equal(rows, cols))
    valid = np.array([fp is not None for fp in fps])
    rows, cols = rows[valid[rows]], cols[valid[cols]]
    if len(rows) == 0 or len(cols) == 0:
        return []
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    h, hm = hash_matrix(fps, "phash"), hash_matrix(fps, "phash_mirror")
    pairs = []
    cu = unit[cols]
    for start in range(0, len(rows), block):
        r = rows[start:start + block]
        sims = unit[r] @ cu.T
        if same:
            # each unordered pair once: keep j > i
            sims[np.asarray(r)[:, None] >= cols[None, :]] = -1
        ri, ci = np.nonzero(sims >= min(min_cosine, NEAR_DUP_STRONG_MIN_COSINE))
        if len(ri) == 0:
            continue
        a, b = r[ri], cols[ci]
        bits = np.minimum(np.bitwise_count(h[a] ^ h[b]).sum(1), np.bitwise_count(h[a] ^ hm[b]).sum(1))
        cos = sims[ri, ci]
        keep = ((bits <= max_bits) & (cos >= min_cosine)) | (bits <= NEAR_DUP_STRONG_BITS)
        pairs.extend(zip(a[keep].tolist(), b[keep].tolist(), bits[keep].tolist(), sims[ri, ci][keep].tolist()))
    return pairs


def clusters(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Connected components of the duplicate graph: a cluster id per item."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return np.arange(n)
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


LEAKAGE_TOLERANCE = 0.02  # fraction of val+test images that may duplicate train before train stops


def check_leakage(ds: Dataset, feats) -> list[tuple[str, str]]:
    """(held-out path, train path) for every val/test image with an exact or near duplicate in train."""
    ok = feats.ok
    train_idx = np.array([i for i, it in enumerate(ds.items) if ok[i] and it.split == "train"])
    held_idx = np.array([i for i, it in enumerate(ds.items) if ok[i] and it.split != "train"])
    if len(train_idx) == 0 or len(held_idx) == 0:
        return []
    found: dict[int, int] = {}
    by_hash = {feats.hashes[i]: i for i in train_idx}
    for i in held_idx:
        if feats.hashes[i] in by_hash:
            found[i] = by_hash[feats.hashes[i]]
    fps = [fp if ok[i] else None for i, fp in enumerate(feats.fingerprints)]
    for i, j, _, _ in near_duplicate_pairs(feats.vectors, fps, rows=held_idx, cols=train_idx):
        found.setdefault(i, j)
    return [(ds.items[i].relpath, ds.items[j].relpath) for i, j in sorted(found.items())]
