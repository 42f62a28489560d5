"""Train on real folders and time each stage (scan / features / head / evaluate), cold and warm cache.

    python benchmarks/train_folders.py [--datasets hymenoptera,clothing] [--root ../shared/datasets]

Prints a table and one JSON line per dataset. Also measures the bare backbone's throughput on
preloaded tensors in the same engine, so extraction throughput can be judged against it (the
target: >= 90 %). A dataset that is absent is skipped with a note.
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
from _common import DATASETS as DEFAULT_ROOT, print_table  # noqa: E402

FLOORS = {"hymenoptera": 0.93, "clothing": 0.85}


def bare_backbone_throughput(batch: int = 32, repeats: int = 4) -> tuple[float, str]:
    """Images/s of the backbone alone on preloaded tensors, in the engine training uses."""
    from foldernet.features import make_engine
    from foldernet.models import create_backbone, state_digest

    bb = create_backbone()
    engine = make_engine(bb.model, 224, state_digest(bb.model))
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    engine(x)
    t = time.perf_counter()
    for _ in range(repeats):
        engine(x)
    return batch * repeats / (time.perf_counter() - t), engine.name


def decode_ms_per_image(data: Path, n: int = 150) -> float:
    """Single-thread cost of decode + resize + crop + normalise, the CPU work beside the model."""
    from foldernet.data import IMAGE_EXTENSIONS, open_image
    from foldernet.preprocess import Preprocess

    pre = Preprocess()
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
    blobs = [f.read_bytes() for f in files]
    t = time.perf_counter()
    for b in blobs:
        pre(open_image(b, draft_size=pre.resize_size))
    return (time.perf_counter() - t) / max(1, len(blobs)) * 1000


def run(name: str, data: Path, work: Path) -> dict:
    import foldernet

    os.environ["FOLDERNET_CACHE"] = str(work / "cache")  # cold: empty cache (the ONNX export is warmed first)
    bare, engine = bare_backbone_throughput()
    cold = foldernet.train(data, out=work / f"{name}-cold", progress=False)
    warm = foldernet.train(data, out=work / f"{name}-warm", progress=False)
    split = cold.metrics["reported_split"]
    m = cold.metrics["splits"][split]
    n_images = sum(sum(v.values()) for v in cold.config["data"]["counts"].values())
    t = cold.timings
    extract_ips = n_images / t["features"]
    # Both cores are shared by decoding and the model: the best possible pipeline throughput is
    # cores / (model core-seconds per image + decode core-seconds per image).
    cores = os.cpu_count() or 1
    dec_ms = decode_ms_per_image(data)
    ceiling = cores / (cores / bare + dec_ms / 1000)
    return {
        "dataset": name, "images": n_images, "classes": len(cold.config["labels"]), "engine": engine,
        "eval_split": split, "eval_n": m["n"], "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
        "floor": FLOORS.get(name), "passes_floor": m["accuracy"] >= FLOORS.get(name, 0),
        "cold_total_s": round(t["total"], 2), "scan_s": round(t["scan"], 2),
        "load_backbone_s": round(t["load_backbone"], 2), "features_s": round(t["features"], 2),
        "head_s": round(t["train_head"], 2), "evaluate_s": round(t["evaluate"], 2),
        "extract_img_per_s": round(extract_ips, 1), "bare_backbone_img_per_s": round(bare, 1),
        "extract_vs_bare": round(extract_ips / bare, 3), "decode_ms_per_img": round(dec_ms, 2),
        "shared_core_ceiling_img_per_s": round(ceiling, 1), "extract_vs_ceiling": round(extract_ips / ceiling, 3),
        "warm_total_s": round(warm.timings["total"], 2),
        "warm_features_s": round(warm.timings["features"], 2), "skipped": len(cold.skipped),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--datasets", default="hymenoptera,clothing")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-bench-") as tmp:
        for name in args.datasets.split(","):
            data = args.root / name
            if not data.is_dir():
                print(f"skip {name}: {data} not found", file=sys.stderr)
                continue
            rows.append(run(name, data, Path(tmp)))
    if not rows:
        print("no datasets found; nothing measured", file=sys.stderr)
        return 0
    cols = ["dataset", "images", "accuracy", "macro_f1", "floor", "cold_total_s", "scan_s", "load_backbone_s",
            "features_s", "head_s", "evaluate_s", "extract_img_per_s", "bare_backbone_img_per_s", "extract_vs_bare",
            "decode_ms_per_img", "extract_vs_ceiling", "warm_total_s"]
    print_table(rows, cols, "train_folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
