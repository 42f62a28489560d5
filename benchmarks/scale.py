"""Large collections: in-process vs Ray Data predict on generated images, and the approximate
near-duplicate index on synthetic embeddings.

1. Predict: N images (default 20,000) made from ../shared/datasets (flips, crops, re-encodes of
   hymenoptera and clothing photos; nothing is committed), predicted by the hymenoptera model's ONNX
   export with `--engine local` and `--engine ray` (Ray started in-process on this machine). Reports
   files/s of each, Ray's share of the in-process speed (target >= 85 %) and whether every file got
   the same answer.
2. ANN: M synthetic 1280-d float16 unit embeddings (default 1,000,000; clustered like real features)
   with 1 % planted near duplicates: FAISS IVF build and query time and recall of the planted pairs,
   and the same against exact search on a 50,000 subset.

    python benchmarks/scale.py [--images 20000] [--vectors 1000000] [--skip-predict] [--skip-ann]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402


def make_images(n: int, out: Path) -> int:
    """n JPEG/PNG variants of the shared photos: flips, random crops, re-encodes at other qualities."""
    from PIL import Image

    srcs = []
    for name in ("hymenoptera", "clothing"):
        root = dataset(name, f"{name} images")
        if root is not None:
            srcs += sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not srcs:
        return 0
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    from foldernet.progress import progress_bar

    with progress_bar(n, "making images") as bar:
        for i in range(n):
            try:
                img = Image.open(srcs[i % len(srcs)]).convert("RGB")
            except OSError:
                continue
            img.thumbnail((320, 320))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            w, h = img.size
            s = rng.uniform(0.7, 1.0)
            x, y = int(rng.uniform(0, w * (1 - s))), int(rng.uniform(0, h * (1 - s)))
            img = img.crop((x, y, x + int(w * s), y + int(h * s)))
            img.save(out / f"{i:06d}.jpg", quality=int(rng.integers(60, 95)))
            bar.advance()
    return n


def bench_predict(n: int, tmp: Path) -> list[dict]:
    import foldernet
    from foldernet.scale import read_results, run_batch

    data = dataset("hymenoptera", "predict")
    if data is None or not make_images(n, tmp / "images"):
        return []
    run = foldernet.train(data, out=tmp / "run", progress=False).run_dir
    foldernet.export(run)
    rows, tables = [], {}
    for engine in ("local", "ray"):
        if engine == "ray":
            import ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        t = time.perf_counter()
        r = run_batch(run, tmp / "images", tmp / f"preds-{engine}", engine=engine)
        wall = time.perf_counter() - t
        tables[engine] = read_results(tmp / f"preds-{engine}").to_pydict()
        rows.append({"part": "predict", "engine": engine, "files": r["files"], "seconds": round(wall, 1),
                     "files_per_s": round(r["files"] / wall, 1)})
        if engine == "ray":
            ray.shutdown()
    a, b = tables["local"], tables["ray"]
    same = a["path"] == b["path"] and a["label"] == b["label"] and a["error"] == b["error"]
    diff = float(np.nanmax(np.abs(np.asarray(a["confidence"]) - np.asarray(b["confidence"]))))
    rows[1]["ray_vs_local"] = round(rows[1]["files_per_s"] / rows[0]["files_per_s"], 3)
    rows[1]["identical_predictions"] = same
    rows[1]["max_confidence_diff"] = f"{diff:.1e}"
    return rows


def synthetic(m: int, d: int = 1280, dup_frac: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, d), dtype=np.float32)
    x = np.empty((m, d), np.float16)
    for s in range(0, m, 100_000):
        k = min(100_000, m - s)
        v = rng.standard_normal((k, 64), dtype=np.float32) @ basis + 0.5 * rng.standard_normal((k, d), dtype=np.float32)
        x[s:s + k] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    n_dup = int(m * dup_frac)
    src = rng.choice(m, n_dup, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
    noise = rng.standard_normal((n_dup, d), dtype=np.float32) * (0.03 / np.sqrt(d))
    v = x[src].astype(np.float32) + noise
    x[dst] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    return x, set(zip(np.minimum(src, dst).tolist(), np.maximum(src, dst).tolist()))


def bench_ann(m: int) -> list[dict]:
    from foldernet.dedup import similar_pairs

    rows = []
    for n, exact in ((min(50_000, m), True), (min(50_000, m), False), (m, False)):
        x, planted = synthetic(n)
        t = time.perf_counter()
        pairs = similar_pairs(x.astype(np.float32), 0.95, exact_below=n if exact else 0)
        secs = time.perf_counter() - t
        found = {(a, b) for a, b, _ in pairs}
        rows.append({"part": "near duplicates", "engine": "exact" if exact else "faiss ivf", "files": n,
                     "seconds": round(secs, 1), "recall_planted": round(len(planted & found) / len(planted), 4),
                     "pairs_found": len(found)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--skip-ann", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-scale-") as tmp:
        os.environ.setdefault("FOLDERNET_CACHE", str(Path(tmp) / "cache"))
        if not args.skip_predict:
            rows += bench_predict(args.images, Path(tmp))
    if not args.skip_ann:
        rows += bench_ann(args.vectors)
    rows.append({"part": "targets", "ray_vs_local": ">= 0.85", "identical_predictions": True,
                 "recall_planted": ">= 0.99"})
    print_table(rows, ["part", "engine", "files", "seconds", "files_per_s", "ray_vs_local", "identical_predictions",
                       "max_confidence_diff", "recall_planted", "pairs_found"], "scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
