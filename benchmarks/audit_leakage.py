"""Acceptance check for the audit: leaked copies are found, different photos are not paired.

Copies 20 training images of ../shared/datasets/hymenoptera into its validation split after a
horizontal flip, a resize to 70 % and JPEG re-compression at quality 60, then audits the folder.
Also audits the untouched folder and counts near-duplicate pairs there (ideally 0), checks that the
scraped placeholder train/ants/imageNotFound.gif is reported, and that a grouped split of a flat
copy keeps every copy with its original.

    python benchmarks/audit_leakage.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402


def main() -> int:
    src = dataset("hymenoptera")
    if src is None:
        return 0
    from foldernet.audit import audit
    from foldernet.split import split_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-audit-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("FOLDERNET_CACHE", str(tmp / "cache"))
        t = time.perf_counter()
        clean = audit(src, progress=False)
        pairs = clean["findings"].get("near_duplicate", [])
        placeholder = any(e["path"] == "train/ants/imageNotFound.gif" for k in ("low_information", "unusual_type")
                          for e in clean["findings"].get(k, []))
        rows.append({"case": "hymenoptera as is", "images": clean["images"], "near_dup_pairs": len(pairs),
                     "placeholder_reported": placeholder, "seconds": round(time.perf_counter() - t, 1)})

        data = tmp / "leaky"
        shutil.copytree(src, data)
        rng = np.random.default_rng(0)
        train = sorted(p for p in (data / "train").rglob("*.jpg"))
        planted = []
        for k, f in enumerate(rng.choice(train, 20, replace=False)):
            img = ImageOps.mirror(Image.open(f).convert("RGB"))
            img = img.resize((int(img.width * 0.7), int(img.height * 0.7)))
            dst = data / "val" / f.parent.name / f"copy{k}_{f.name}"
            img.save(dst, "JPEG", quality=60)
            planted.append(dst.relative_to(data).as_posix())
        t = time.perf_counter()
        leaky = audit(data, progress=False)
        flagged = {e["path"] for e in leaky["findings"].get("leakage", [])}
        false_pairs = [e for e in leaky["findings"].get("near_duplicate", [])
                       if not any("copy" in p for p in e["paths"])]
        rows.append({"case": "20 leaked copies in val", "images": leaky["images"],
                     "leaked_found": f"{len(set(planted) & flagged)}/20", "near_dup_pairs": len(false_pairs),
                     "placeholder_reported": placeholder, "seconds": round(time.perf_counter() - t, 1)})

        flat = tmp / "flat"
        for split in ("train", "val"):
            for cls_dir in (data / split).iterdir():
                (flat / cls_dir.name).mkdir(parents=True, exist_ok=True)
                for f in cls_dir.iterdir():
                    shutil.copy(f, flat / cls_dir.name / f"{split}_{f.name}")
        ds = split_dataset(flat, group_by="near-duplicates", out=tmp / "splits.csv")
        where = {it.relpath: it.split for it in ds.items}
        together = 0
        for p in planted:
            cls, name = p.split("/")[1], p.split("/")[2]
            original = f"{cls}/train_{name.split('_', 1)[1]}"
            together += where.get(f"{cls}/val_{name}") == where.get(original)
        rows.append({"case": "grouped split of a flat copy", "images": len(ds.items),
                     "copies_with_original": f"{together}/20"})
    print_table(rows, ["case", "images", "leaked_found", "near_dup_pairs", "placeholder_reported",
                       "copies_with_original", "seconds"], "audit_leakage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
