"""Open set on ../shared/datasets/clothing: train on 8 classes, hold 2 out entirely.

The rule (see foldernet.evaluate): 'not sure' when the calibrated confidence is low or the image
is far from its nearest training images; thresholds are fitted on the known classes' validation
split, the same images the drop is measured on (the clothing set keeps its test split elsewhere).

Reports (1) the share of the held-out classes' images that come back 'not sure' (target >= 50 %)
and (2) how much accuracy on the 8 known classes' validation images drops because of the
threshold, counting a 'not sure' answer as not correct (target <= 3 points).

    python benchmarks/open_set.py [--unknown skirt,hat]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unknown", default="", help="two classes to hold out (default: the two smallest)")
    args = ap.parse_args()
    src = dataset("clothing")
    if src is None:
        return 0
    import foldernet

    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    counts = {c: len(list((src / "train" / c).iterdir())) for c in classes}
    unknown = args.unknown.split(",") if args.unknown else sorted(classes, key=lambda c: counts[c])[:2]
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-openset-") as tmp:
        data = Path(tmp) / "known"
        for split in ("train", "validation"):
            for c in classes:
                if c not in unknown:
                    (data / split).mkdir(parents=True, exist_ok=True)
                    os.symlink(src / split / c, data / split / c)
        result = foldernet.train(data, out=Path(tmp) / "run", progress=False)
        model = foldernet.load(result.run_dir)
        t = model.threshold
        known_files = [p for c in classes if c not in unknown for p in sorted((src / "validation" / c).iterdir())]
        known_y = np.array([model.labels.index(p.parent.name) for p in known_files])
        probs, feats, ok, _ = model.predict_batch(known_files)
        sure = ~model.not_sure(probs, feats)
        right = probs.argmax(1) == known_y
        acc = float(np.mean(right[ok]))
        acc_sure = float(np.mean((right & sure)[ok]))
        unk_files = [p for c in unknown for split in ("train", "validation") for p in sorted((src / split / c).iterdir())]
        uprobs, ufeats, uok, _ = model.predict_batch(unk_files)
        not_sure = float(np.mean(model.not_sure(uprobs, ufeats)[uok]))
        conf_only = float(np.mean(uprobs[uok].max(1) < t))
        rows.append({"unknown_classes": "+".join(unknown), "threshold": round(t, 4),
                     "similarity_threshold": round(model.similarity_threshold, 4),
                     "unknown_not_sure_confidence_only": round(conf_only, 4),
                     "unknown_not_sure": round(not_sure, 4), "unknown_target": ">= 0.50",
                     "known_val_accuracy": round(acc, 4), "known_accuracy_counting_not_sure_as_wrong": round(acc_sure, 4),
                     "known_drop_points": round(100 * (acc - acc_sure), 2), "drop_target": "<= 3",
                     "unknown_images": int(uok.sum()), "known_images": int(ok.sum())})
    print_table(rows, list(rows[0]), "open_set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
