"""`--min-precision`: how much of clothing's validation split a model answers at a precision asked for,
and whether that holds on images that did not choose the threshold.

Clothing's own train/validation split (the race's, `vs_fastai.py`), seeds 0..n-1, each mode run cold
with `--min-precision P`: the default head, `--mode top`, the lite0+lite1+lite2 ensemble, or `--budget 5m`
(``MODES``).
Reported per run, from the bundle's operating point: the threshold, the share of validation answered
and its precision there (where the threshold was chosen), and the cross-fitted figures (20 random
halvings of validation, each threshold chosen on one half and scored on the other), which are the ones
a user should expect on new images; with accuracy and ECE (and the ECE a perfectly calibrated model
would show on these images by chance).

    python benchmarks/operating_point.py [--modes head,top,ensemble,budget] [--seeds 3] [--min-precision 0.98]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402
from vs_fastai import materialise  # noqa: E402


# what each row trains: the default head, --mode top, the frozen lite0+lite1+lite2 ensemble with a
# mirror view and test-time flip (the richest frozen plan of --budget), and --budget 5m (which, asked for a
# precision, plans the frozen ensembles only)
MODES = {"head": {}, "top": {"mode": "top"}, "ensemble": {"backbone": "lite0+lite1+lite2", "views": 2, "tta": "auto"},
         "budget": {"budget": "5m"}}


def parse_modes(text: str) -> list[str]:
    """``--modes``: comma-separated names of MODES, checked before anything trains."""
    modes = text.split(",")
    for mode in modes:
        if mode not in MODES:
            raise argparse.ArgumentTypeError(f"{mode!r} is not one of {', '.join(MODES)}")
    return modes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="head,top", type=parse_modes, help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--min-precision", type=float, default=0.98)
    args = ap.parse_args()
    import foldernet

    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-operating-") as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            data = materialise("clothing", seed, tmp / "data")
            if data is None:
                return 0
            for mode in args.modes:
                os.environ["FOLDERNET_CACHE"] = str(tmp / f"cache-{seed}-{mode}")  # cold
                t = time.perf_counter()
                r = foldernet.train(data, out=tmp / "run", progress=False, force=True, seed=seed, report=False,
                                    min_precision=args.min_precision, **MODES[mode])
                m = r.metrics["splits"]["val"]
                point = r.config.get("operating_point") or {}
                backbone = r.config["backbone"].replace("tf_efficientnet_", "")  # what --budget chose
                rows.append({"mode": mode, "seed": seed, "backbone": backbone,
                             "wall_s": round(time.perf_counter() - t, 1),
                             "accuracy": round(m["accuracy"], 4), "ece": round(m["ece"], 4),
                             "ece_if_calibrated": m["ece_if_calibrated"]["mean"],
                             "min_precision": args.min_precision, "threshold": point.get("threshold"),
                             "val_coverage": point.get("val_coverage"), "val_precision": point.get("val_precision"),
                             "crossfit_coverage": point.get("crossfit_coverage"),
                             "crossfit_precision": point.get("crossfit_precision")})
                print(rows[-1], flush=True)
    if rows:
        print_table(rows, ["mode", "seed", "backbone", "wall_s", "accuracy", "ece", "ece_if_calibrated",
                           "min_precision", "threshold", "val_coverage", "val_precision", "crossfit_coverage",
                           "crossfit_precision"], "operating_point")
    return 0


if __name__ == "__main__":
    sys.exit(main())
