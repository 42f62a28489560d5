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


ANN_EXACT_BELOW = 20_000  # brute force below this many vectors; FAISS IVF above (benchmarks/scale.py)


def ivf_index(unit: np.ndarray, nprobe: int = 16):
    """A FAISS inverted-file index (inner product) over unit rows: 4*sqrt(n) lists trained on a sample,
    ``nprobe`` searched per query. Needs faiss-cpu (the ray extra)."""
    try:
        import faiss
    except ImportError:
        from .errors import FoldernetError

        raise FoldernetError(f"searching {len(unit)} vectors uses an approximate index, which needs the ray extra: "
                             "pip install 'foldernet[ray]'") from None
    n, d = unit.shape
    nlist = max(1, int(4 * np.sqrt(n)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(np.ascontiguousarray(unit[rng.choice(n, min(n, 40 * nlist), replace=False)], np.float32))
    index.add(np.ascontiguousarray(unit, np.float32))
    index.nprobe = nprobe
    return index


def similar_pairs(unit: np.ndarray, min_cosine: float, k: int = 10, exact_below: int = ANN_EXACT_BELOW,
                  block: int = 2048) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for every pair of unit vectors at cosine >= ``min_cosine``. Exact
    (blocked matrix products) for small sets; for large ones an inverted-file index (FAISS IVF, 4*sqrt(n)
    lists, 16 probed) finds each vector's ``k`` nearest, which catches duplicates (a handful per item)
    without the n^2 comparisons: 1M vectors take minutes on two cores instead of days."""
    unit = np.ascontiguousarray(unit, np.float32)
    n = len(unit)
    found: dict[tuple[int, int], float] = {}
    if n <= exact_below:
        for start in range(0, n, block):
            sims = unit[start:start + block] @ unit.T
            sims[np.arange(sims.shape[0])[:, None] + start >= np.arange(n)[None, :]] = -1
            ri, ci = np.nonzero(sims >= min_cosine)
            for a, b, c in zip((ri + start).tolist(), ci.tolist(), sims[ri, ci].tolist()):
                found[(a, b)] = c
    else:
        index = ivf_index(unit)
        for start in range(0, n, 65536):
            sims, idx = index.search(unit[start:start + 65536], k + 1)
            a = np.arange(start, start + len(idx))[:, None].repeat(idx.shape[1], 1)
            keep = (idx >= 0) & (idx != a) & (sims >= min_cosine)
            lo, hi = np.minimum(a[keep], idx[keep]), np.maximum(a[keep], idx[keep])
            for x, y, c in zip(lo.tolist(), hi.tolist(), sims[keep].tolist()):
                found[(x, y)] = c
    return [(a, b, c) for (a, b), c in sorted(found.items())]


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
