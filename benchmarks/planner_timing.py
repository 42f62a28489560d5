"""`--budget`'s timing: how steady is the figure the plan rests on, and how well does it predict a pass?

The planner times lite0 on a sample of the user's files before any work and scales everything from
that one figure, so its noise moves a 5-minute plan across the edge between top mode and frozen
features. Each row is a fresh Python process on clothing, with its own empty cache, as a `--budget` run
starts: the rule in `plan.seconds_per_image` (the shipped one: a warm-up pass over the 48-file sample,
then the median of 3 timed passes) or the rule used until 2026-12-07 (8 files to warm up, one timed pass),
then a pass over all the dataset's files through the feature cache (what a run actually pays).
Reported: the figure, the full pass per file, and their ratio; then mean, range and spread per rule.

    python benchmarks/planner_timing.py [--runs 4] [--dataset clothing]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402

# one process: the figure by a rule, then the full pass it should predict (milliseconds per file)
CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
os.environ["FOLDERNET_CACHE"] = tempfile.mkdtemp(prefix="foldernet-timing-")
from foldernet.data import IMAGE_EXTENSIONS
from foldernet.encoder import Encoder
from foldernet.models import DEFAULT_BACKBONE
from foldernet.plan import seconds_per_image
rule, root = sys.argv[1], Path(sys.argv[2])
files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
t0 = time.perf_counter()
if rule == "shipped":
    per, _ = seconds_per_image(files)
else:  # until 2026-12-07: 8 files to warm a fresh session, one timed pass of 48
    ex = Encoder.build(DEFAULT_BACKBONE).extractor("onnx", use_cache=False)
    chosen = files[::max(1, len(files) // 48)][:48]
    ex(chosen[:8], progress=False)
    t = time.perf_counter()
    ex(chosen, progress=False)
    per = (time.perf_counter() - t) / len(chosen)
spent = time.perf_counter() - t0
ex = Encoder.build(DEFAULT_BACKBONE).extractor("onnx", use_cache=True)
t = time.perf_counter()
ex(files, progress=False)
full = (time.perf_counter() - t) / len(files)
print(json.dumps({"figure_ms": per * 1000, "full_ms": full * 1000, "measure_s": spent, "files": len(files)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4, help="fresh processes per rule")
    ap.add_argument("--dataset", default="clothing")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    root = dataset(args.dataset, f"planner timing on {args.dataset}")
    if root is None:
        return 0
    rows = []
    for i in range(args.runs):
        for rule in ("shipped", "one pass (old)"):  # alternated, so a slow minute hits both rules
            out = subprocess.run([sys.executable, "-c", CHILD, "shipped" if rule == "shipped" else "old", str(root)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            rows.append({"rule": rule, "run": i, "figure_ms": round(got["figure_ms"], 2),
                         "full_pass_ms": round(got["full_ms"], 2),
                         "full_over_figure": round(got["full_ms"] / got["figure_ms"], 3),
                         "measure_s": round(got["measure_s"], 1), "files": got["files"]})
            print(rows[-1], flush=True)
    for rule in ("shipped", "one pass (old)"):
        fig = np.array([r["figure_ms"] for r in rows if r["rule"] == rule])
        ratio = np.array([r["full_over_figure"] for r in rows if r["rule"] == rule])
        spread = f"{fig.mean():.2f} ({fig.min():.2f}-{fig.max():.2f})"
        rows.append({"rule": rule, "run": "summary", "figure_ms": spread, "full_pass_ms": "",
                     "full_over_figure": f"{ratio.mean():.3f} ({ratio.min():.3f}-{ratio.max():.3f})",
                     "measure_s": "", "files": f"cv {fig.std() / fig.mean():.3f}"})
    print_table(rows, ["rule", "run", "figure_ms", "full_pass_ms", "full_over_figure", "measure_s", "files"],
                "planner_timing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
