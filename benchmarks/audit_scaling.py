"""How audit time grows with the number of images: 1k -> 10k should cost <= 12x.

The pool is every real image in ../shared/datasets/clothing and hymenoptera, topped up with
procedurally generated pictures (smooth random colour fields with shapes, 400x400 JPEG) to reach
10,000. Each size is audited with a cold cache, so feature extraction is included.

    python benchmarks/audit_scaling.py [--sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATASETS, print_table  # noqa: E402


def synthetic(k: int, size: int = 400) -> Image.Image:
    rng = np.random.default_rng(k)
    field = rng.random((8, 8, 3))
    img = Image.fromarray((field * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(20, 200, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(1))


def build(root: Path, n: int, pool: list[Path]) -> None:
    for i in range(n):
        if i < len(pool):
            src = pool[i]
            dst = root / src.parent.name / f"{i}{src.suffix.lower()}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
        else:
            dst = root / f"synthetic{i % 5}" / f"{i}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            synthetic(i).save(dst, "JPEG", quality=90)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = sorted((DATASETS / "clothing").rglob("*.jpg")) + sorted((DATASETS / "hymenoptera").rglob("*.jpg"))
    if not pool:
        print(f"note: {DATASETS} not found; using generated images only", file=sys.stderr)
    rng = np.random.default_rng(0)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    from foldernet.audit import audit

    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-scaling-") as tmp:
        for n in sizes:
            root = Path(tmp) / f"n{n}"
            build(root, n, pool)
            os.environ["FOLDERNET_CACHE"] = str(Path(tmp) / f"cache{n}")  # cold for each size
            t = time.perf_counter()
            report = audit(root, progress=False)
            total = time.perf_counter() - t
            rows.append({"images": n, "seconds": round(total, 1), "img_per_s": round(n / total, 1),
                         "near_dup_pairs": len(report["findings"].get("near_duplicate", [])),
                         "label_issues": len(report["findings"].get("label_issue", []))})
            shutil.rmtree(root)
    if len(rows) > 1:
        ratio = rows[-1]["seconds"] / rows[0]["seconds"]
        growth = rows[-1]["images"] / rows[0]["images"]
        for r in rows[1:]:
            r["time_ratio_vs_first"] = round(r["seconds"] / rows[0]["seconds"], 2)
        rows[-1]["target"] = f"<= {1.2 * growth:.0f}x: {'met' if ratio <= 1.2 * growth else 'missed'}"
    print_table(rows, ["images", "seconds", "img_per_s", "near_dup_pairs", "label_issues", "time_ratio_vs_first",
                       "target"], "audit_scaling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
