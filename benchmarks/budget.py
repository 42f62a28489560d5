"""`--budget`: does a user who names only the minutes get the best model they allow, inside them?

Clothing's own train/validation split (the race's, `vs_fastai.py`; `--dataset` picks hymenoptera or
clothing-30 instead), seeds 0..n-1, each run cold (its own empty cache, so the ONNX exports and every
feature are paid for) with `--budget B` and nothing else. Reported per run: the plan chosen (and its
estimate), the wall time end to end, whether top mode stopped early for the budget, and validation
accuracy. The issue's target: >= 92 % within 5 minutes.

    python benchmarks/budget.py [--budget 5m] [--seeds 3] [--dataset clothing]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dataset", default="clothing", choices=("hymenoptera", "clothing", "clothing-30"))
    args = ap.parse_args()
    import foldernet
    from foldernet.errors import FoldernetError
    from foldernet.params import parse_duration

    try:
        budget_s = parse_duration(args.budget)  # a bad --budget stops here, before any data is laid out
    except FoldernetError as exc:
        ap.error(str(exc))
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-budget-") as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            data = materialise(args.dataset, seed, tmp / "data")
            if data is None:
                return 0
            os.environ["FOLDERNET_CACHE"] = str(tmp / f"cache-{seed}")  # cold
            t = time.perf_counter()
            r = foldernet.train(data, out=tmp / "run", progress=False, force=True, seed=seed, report=False,
                                budget=args.budget)
            wall = time.perf_counter() - t
            plan, top = r.metrics["plan"], r.metrics.get("top") or {}
            chosen = plan["chosen"]
            what = chosen["backbone"].replace("tf_efficientnet_", "")
            if chosen["mode"] == "top":  # the schedule's epochs, and how many the estimate covered
                what += f" top views {chosen['views']} epochs {chosen['epochs']} " \
                        f"({chosen.get('planned_epochs')} planned)"
            else:
                what += f" views {chosen['views']}"
            rows.append({"dataset": args.dataset, "seed": seed, "budget_s": budget_s, "plan": what,
                         "estimate_s": chosen["estimate_s"], "measure_s": plan["measure_s"],
                         "top_epochs_run": top.get("stopped_for_budget") or (chosen["epochs"] if top else ""),
                         "wall_s": round(wall, 1), "within": wall <= budget_s,
                         "accuracy": round(r.metrics["splits"]["val"]["accuracy"], 4)})
            print(rows[-1], flush=True)
    if rows:
        print_table(rows, ["dataset", "seed", "budget_s", "plan", "estimate_s", "measure_s", "top_epochs_run",
                           "wall_s", "within", "accuracy"], "budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
