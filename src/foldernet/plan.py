"""``--budget``: the best model the minutes allow, without knowing the modes.

Before any training, foldernet times the default backbone on a sample of the user's own files (decode
+ forward, the cost that dominates a frozen-feature run), scales that to each planned graph by its
measured relative cost, adds one-off exports not yet in the cache, and picks the richest plan
whose estimate fits the budget with a margin. Plans are ordered by what they bought in accuracy per
second in the probes noted in README and ``benchmarks/vs_fastai.py``: a mirror view in the feature
bank with test-time flip first, then the ensembles lite0+lite1 and lite0+lite1+lite2, each with both,
and, on sets with at least ``TOP_MIN_TRAIN`` training images, ``--mode top`` (lite0's last two stages
tuned on cached activations): on clothing's 3,068 training images it beat every frozen plan (91.0 %
against 90.5 % for lite0+lite1+lite2, 3 seeds), on 245-300 it lost to the ensemble by 1-2.4 points.
With ``--min-precision`` top mode is not planned: the frozen ensembles answered more at a precision.
The plan is shown before work starts and recorded in the run's metrics with the estimate and the
time actually spent.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from .features import cache_dir
from .models import DEFAULT_BACKBONE, create_backbone, state_digest
from .params import parse_duration

# The costs below are multiples of seconds_per_image's figure: lite0's steady cost per file on a warm
# sample. Until 2026-12-07 the figure was one pass of a fresh ONNX session after an 8-file warm-up, which
# still ran at warm-up speed: over 11 fresh processes on clothing it read 9.6-13.9 ms (mean 10.9) where the
# steady figure read 8.1-8.9 ms (mean 8.5; benchmarks/planner_timing.py). The constants fitted on the old
# figure are re-expressed in the new one by that ratio, OLD_FIGURE: the same estimates on average, without
# the one-pass noise.
OLD_FIGURE = 1.28
# A pass over all the user's files costs a little more than the warm sample: cold reads, varied sizes,
# the cache written (clothing, 3409 files, 8 processes: 0.99-1.13x the sample's figure, mean 1.05)
FEATURE_PASS = 1.05
# The graphs --budget plans, measured whole (clothing, 3409 files, 2026-12-07, cold cache): seconds per
# pass relative to the figure, plain and mirror passes averaged (lite0 FEATURE_PASS; lite0+lite1 1.58x and
# 1.96x; lite0+lite1+lite2 3.0x and 3.75x), and the one-off export and check in figure-images (8.1, 12.0 and
# 21.3 s). Members share the decode, so an ensemble costs less than its members alone summed: the sum
# (lite0 1.0, lite1 1.45, lite2 1.95 relative to lite0, exports of 1800-5000 lite0-images each) put
# lite0+lite1+lite2 at 390 s on clothing where the run took 235 s (this table: 229 s), and lite0+lite1 at
# 222 s where it took 131 s (this table: 130 s). Only these graphs are planned (CANDIDATES).
_LITE01 = "tf_efficientnet_lite0+tf_efficientnet_lite1"
_LITE012 = "tf_efficientnet_lite0+tf_efficientnet_lite1+tf_efficientnet_lite2"
GRAPH_COST = {DEFAULT_BACKBONE: FEATURE_PASS, _LITE01: 1.77, _LITE012: 3.38}
GRAPH_EXPORT = {DEFAULT_BACKBONE: 930, _LITE01: 1380, _LITE012: 2450}
FIXED_SECONDS = 8.0   # scanning, head fits, calibration, writing the bundle and report
MARGIN = 0.8          # plan to use at most this share of the budget
# --mode top may plan on more of it: it watches the deadline between epochs and stops early rather than
# run past it (train.FIXED_AFTER_TOP_S kept for what follows), so a slow estimate costs an epoch, not the budget
TOP_MARGIN = 0.9
# --mode top, per image, relative to the old figure (11.9 ms there), measured on clothing (2 cores, 3
# seeds; each graph's one-off export included): the first pass (features and trunk) 32.5 s per 3409
# (0.8x), a further trunk view 66 s per 6136 (0.9x), a training epoch 27 s per 3068 (0.75x), the pooled
# features through the tuned top afterwards ~22 s per 6477 rows (0.28x); times OLD_FIGURE for the new one
TOP_FIRST_PASS, TOP_TRUNK_VIEW, TOP_EPOCH, TOP_FEATURES = (x * OLD_FIGURE for x in (0.8, 0.9, 0.75, 0.28))
# ...which fell short end to end: over 9 --budget 5m runs on clothing (2026-12-07, benchmarks/budget.py),
# time spent after the planner's own timing over the estimate for the epochs run was 1.05-1.32x, median
# ~1.15, and one run planned on 5 epochs was cut by the clock after 3 (90.3 %). Top plans are scaled by that.
TOP_ESTIMATE_FACTOR = 1.15
TOP_MIN_TRAIN = 1000  # below this the frozen ensembles won (hymenoptera, clothing-30); at 3068 top did
# Top mode always runs its 5-epoch schedule; it is planned when at least TOP_MIN_EPOCHS of it fit, and the
# deadline decides whether the last runs. Cut by the clock after 4 epochs, the 5-epoch schedule scored
# 92.08 / 92.67 / 92.38 % on clothing seeds 0-2; a 4-epoch schedule run to its end 91.50 / 92.08 / 91.79 %
# (benchmarks/budget.py); 3 epochs were no better than lite0+lite1 (89.2 % on seed 0), so not planned.
TOP_EPOCHS = 5
TOP_MIN_EPOCHS = 4


@dataclass(frozen=True)
class Plan:
    backbone: str
    views: int
    tta: str
    estimate_s: float = 0.0
    mode: str = "head"
    epochs: int | None = None   # top mode's epochs
    planned_epochs: int | None = None   # of those, how many the estimate covers (the deadline decides the rest)

    @property
    def budget_share(self) -> float:
        """How much of the budget this plan may be estimated to use (MARGIN; TOP_MARGIN in top mode)."""
        return TOP_MARGIN if self.mode == "top" else MARGIN

    def describe(self) -> str:
        parts = [f"backbone {self.backbone}", f"{self.views} view{'s' if self.views > 1 else ''} per training image",
                 f"test-time flip {self.tta}"]
        if self.mode == "top":
            cut = f", the clock may stop it after {self.planned_epochs}" \
                if self.planned_epochs and self.planned_epochs < (self.epochs or 0) else ""
            parts.insert(1, f"--mode top (its last 2 stages tuned, {self.epochs} epochs{cut})")
        return ", ".join(parts)


# From cheapest to richest; the richest that fits is chosen. The mirror view serves twice: as the
# second view of training items in the bank, and as test-time flip of held-out items (one pass).
CANDIDATES = (
    Plan(DEFAULT_BACKBONE, 1, "off"),
    Plan(DEFAULT_BACKBONE, 2, "auto"),
    Plan(_LITE01, 2, "auto"),
    Plan(_LITE012, 2, "auto"),
    # top mode with 2 views (the item and its mirror) when 3 do not fit: ~35-45 s less on clothing
    Plan(DEFAULT_BACKBONE, 2, "auto", mode="top", epochs=TOP_EPOCHS, planned_epochs=TOP_EPOCHS),
    Plan(DEFAULT_BACKBONE, 3, "auto", mode="top", epochs=TOP_EPOCHS, planned_epochs=TOP_EPOCHS),
)


def _exported(name: str) -> bool:
    """Is this backbone's feature graph (an ensemble's is one graph) already in the ONNX cache?"""
    bb = create_backbone(name)
    size = bb.data_config.get("input_size", (3, 224, 224))[1]
    return (cache_dir() / "onnx" / f"{state_digest(bb.model)}-{size}.onnx").exists()


def seconds_per_image(paths: list, sample: int = 48, repeats: int = 3) -> tuple[float, float]:
    """(seconds per file for lite0 features on this machine, decode included; seconds spent measuring).
    A fresh ONNX session runs slow for its first hundred or so files (one timed pass after a short
    warm-up read anywhere from 1.2x to 1.7x the steady cost here), so ``sample`` of the user's files are
    passed once to warm it, then timed ``repeats`` times; the median pass is the figure. The cache is off."""
    from .encoder import Encoder

    t0 = time.perf_counter()
    enc = Encoder.build(DEFAULT_BACKBONE)
    extractor = enc.extractor("onnx", use_cache=False)
    step = max(1, len(paths) // sample)
    chosen = list(paths[::step][:sample])
    extractor(chosen, progress=False)
    passes = []
    for _ in range(repeats):
        t = time.perf_counter()
        extractor(chosen, progress=False)
        passes.append((time.perf_counter() - t) / max(1, len(chosen)))
    return statistics.median(passes), time.perf_counter() - t0


def estimate(plan: Plan, n_items: int, n_train: int, n_held: int, per_image: float, exported: dict[str, bool],
             image: bool = True) -> float:
    """Seconds a plan should take: features of every item, the mirror view (of training items for the
    bank, of held-out items for test-time flip), further views of training items, one-off exports, and
    the fixed part."""
    total = FIXED_SECONDS
    flip = (n_train if plan.views >= 2 else 0) + (n_held if plan.tta != "off" and image else 0)
    if plan.mode == "top":  # one pass for features + trunk, the trunk's further views, epochs, features after
        views = flip + max(0, plan.views - 2) * n_train  # (of every item and the held-out mirror images)
        return total + TOP_ESTIMATE_FACTOR * per_image * (
            TOP_FIRST_PASS * n_items + TOP_TRUNK_VIEW * views
            + TOP_EPOCH * (plan.planned_epochs or plan.epochs or TOP_EPOCHS) * n_train
            + TOP_FEATURES * (n_items + (n_held if plan.tta != "off" and image else 0)))
    total += per_image * GRAPH_COST[plan.backbone] * (n_items + flip + max(0, plan.views - 2) * n_train)
    if not exported.get(plan.backbone, False):
        total += per_image * GRAPH_EXPORT[plan.backbone]
    return total


# With --min-precision the user wants the most answers at a precision, not the most right answers: there
# the frozen lite0+lite1+lite2 ensemble won (clothing at 0.98, cross-fitted, 3 seeds: 77.2 / 73.3 / 76.9 %
# answered against 73.7 / 67.7 / 72.0 % for top mode, though top was 1.5 points more accurate; its tuned
# top ranks its own mistakes higher), so top mode is not planned then (benchmarks/operating_point.py).
# --budget 5m --min-precision 0.98 on clothing then ran lite0+lite1+lite2 on seed 0 and lite0+lite1 on
# seeds 1-2: 77.2 / 79.4 / 82.0 % answered cross-fitted at 98.7-98.8 % (156-267 s).
TOP_SKIPPED_FOR_PRECISION = ("--min-precision: the frozen ensembles answer more at a precision asked for than "
                             "--mode top (clothing at 0.98: 75.8 % against 71.1 % cross-fitted)")


def choose(budget: str, paths: list, n_train: int, n_held: int, kind: str = "image",
           per_image: float | None = None, min_precision: float | None = None) -> tuple[Plan, dict]:
    """The plan for ``budget`` on these files: (plan, facts for the run's record). ``per_image``: lite0's
    seconds per file when already measured (:func:`seconds_per_image`), else measured here. With
    ``min_precision`` top mode is left out (``TOP_SKIPPED_FOR_PRECISION``)."""
    seconds = parse_duration(budget)
    per_image, measured = seconds_per_image(paths) if per_image is None else (per_image, 0.0)
    exported = {p.backbone: _exported(p.backbone) for p in CANDIDATES}
    rows = []
    chosen = None
    image = kind == "image"

    def within(plan: Plan, est: float) -> bool:
        return est + measured <= plan.budget_share * seconds

    for plan in CANDIDATES:
        if plan.mode == "top":
            if not image or n_train < TOP_MIN_TRAIN:
                rows.append({**asdict(plan), "estimate_s": None, "skipped": f"--mode top needs images and at least "
                             f"{TOP_MIN_TRAIN} training items (here {n_train} {kind} items)"})
                continue
            if min_precision is not None:
                rows.append({**asdict(plan), "estimate_s": None, "skipped": TOP_SKIPPED_FOR_PRECISION})
                continue
            # the whole schedule when it fits, else planned on its first TOP_MIN_EPOCHS epochs; when neither
            # fits, the whole schedule is the row
            tried = [(p, estimate(p, len(paths), n_train, n_held, per_image, exported, image))
                     for p in (Plan(plan.backbone, plan.views, plan.tta, mode="top", epochs=TOP_EPOCHS,
                                    planned_epochs=e) for e in range(TOP_EPOCHS, TOP_MIN_EPOCHS - 1, -1))]
            plan, est = next((t for t in tried if within(*t)), tried[0])
        else:
            est = estimate(plan, len(paths), n_train, n_held, per_image, exported, image)
        rows.append({**asdict(plan), "estimate_s": round(est, 1)})
        if within(plan, est) or chosen is None:
            chosen = Plan(plan.backbone, plan.views, plan.tta if image else "off", round(est, 1), plan.mode,
                          plan.epochs, plan.planned_epochs)
    fits = within(chosen, chosen.estimate_s)
    facts = {"budget_s": seconds, "seconds_per_image_lite0": round(per_image, 5), "measure_s": round(measured, 1),
             "exported": exported, "candidates": rows, "chosen": asdict(chosen), "fits": fits}
    return chosen, facts

