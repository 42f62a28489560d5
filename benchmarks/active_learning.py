"""Simulated labelling on clothing: how many labels does each way of choosing them need?

The clothing train split is the unlabelled pool (its labels are revealed only for what is chosen),
its validation split scores every round. Start from 10 labelled images per class, add 100 per round
up to 1,500, retrain the linear head each round on cached lite0 features (seconds a round). Ways of
choosing: random, margin (the most uncertain) and foldernet's default (grow.select: uncertain and
unlike each other). Several seeds; mean and spread per round, a plot, and the labels each needs to
reach what random reaches with 1,500.

Then auto-labelling: a model trained on the train split (its own val split for calibration) labels
clothing's validation images it is sure of (>= --min-confidence and not "not sure"): how many, and
how many of those are right.

    python benchmarks/active_learning.py [--seeds 3] [--root ../shared/datasets]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATASETS, print_table  # noqa: E402

START_PER_CLASS, STEP, BUDGET = 10, 100, 1500


def features(root: Path):
    """lite0 features (cached) and labels of clothing's train and validation splits."""
    from foldernet.data import scan
    from foldernet.encoder import Encoder

    ds = scan(root)
    enc = Encoder.build(kind=ds.kind, paths=[it.path for it in ds.items])
    f = enc.extractor()([it.path for it in ds.items], desc="features")
    index = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([index[it.label] for it in ds.items])
    split = np.array([it.split for it in ds.items])
    ok = f.ok
    return (f.vectors[ok & (split == "train")], y[ok & (split == "train")],
            f.vectors[ok & (split == "val")], y[ok & (split == "val")], ds.classes)


def simulate(x, y, xv, yv, n_classes: int, strategy: str, seed: int) -> list[tuple[int, float]]:
    from foldernet.grow import select
    from foldernet.head import LinearHead
    from foldernet.spec import HeadSpec

    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(np.flatnonzero(y == c), START_PER_CLASS, replace=False)
                               for c in range(n_classes)])
    spec = HeadSpec(max_epochs=80)
    curve = []
    while True:
        head = LinearHead.fit(x[labelled], y[labelled], None, n_classes, spec, seed=seed, progress=False)
        curve.append((len(labelled), float((head.proba(xv).argmax(1) == yv).mean())))
        if len(labelled) >= BUDGET:
            return curve
        pool = np.setdiff1d(np.arange(len(y)), labelled)
        n = min(STEP, BUDGET - len(labelled))
        if strategy == "random":
            pick = rng.choice(pool, n, replace=False)
        else:
            order, _ = select(head.proba(x[pool]), x[pool], n, strategy)
            pick = pool[order]
        labelled = np.concatenate([labelled, pick])


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, acc in curve if acc >= target - 1e-9), None)


def autolabel_precision(root: Path, min_confidence: float) -> dict:
    """Train on the train split only, then label the validation images the model is sure of."""
    import csv

    import foldernet
    from foldernet.data import scan

    ds = scan(root)
    with tempfile.TemporaryDirectory(prefix="foldernet-al-") as tmp:
        splits = Path(tmp) / "splits.csv"
        rng = np.random.default_rng(0)
        with open(splits, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split"])
            for it in ds.items:
                w.writerow([it.relpath, it.label, "test" if it.split == "val" else
                            ("val" if rng.random() < 0.15 else "train")])
        run = foldernet.train(root, out=Path(tmp) / "run", splits=splits, progress=False, report=False)
        model = foldernet.load(run.run_dir)
        held = [it for it in ds.items if it.split == "val"]
        preds = model.predict([it.path for it in held])
    sure = [(p, it) for p, it in zip(preds, held) if p.error is None and not p.not_sure
            and p.confidence >= min_confidence]
    right = sum(p.label == it.label for p, it in sure)
    return {"images": len(held), "auto_labelled": len(sure), "share": round(len(sure) / len(held), 3),
            "precision": round(right / max(1, len(sure)), 4)}


def plot(curves: dict[str, np.ndarray], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, accs in curves.items():
        mean, sd = accs.mean(0), accs.std(0)
        ax.plot(ns, mean, label=name)
        ax.fill_between(ns, mean - sd, mean + sd, alpha=0.15)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("validation accuracy")
    ax.set_title("clothing: accuracy vs labels (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=DATASETS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--min-confidence", type=float, default=0.98)
    args = ap.parse_args()
    root = args.root / "clothing"
    if not root.is_dir():
        print(f"skip: {root} not found", file=sys.stderr)
        return 0
    x, y, xv, yv, classes = features(root)
    curves: dict[str, np.ndarray] = {}
    ns: list[int] = []
    for strategy in ("random", "margin", "default"):
        runs = [simulate(x, y, xv, yv, len(classes), strategy, seed) for seed in range(args.seeds)]
        ns = [n for n, _ in runs[0]]
        curves[strategy] = np.array([[acc for _, acc in r] for r in runs])
        print(f"{strategy}: " + " ".join(f"{n}:{a:.3f}" for n, a in zip(ns, curves[strategy].mean(0))),
              file=sys.stderr)
    target = float(curves["random"].mean(0)[-1])
    rows = []
    for name, accs in curves.items():
        mean = accs.mean(0)
        gap = mean - curves["random"].mean(0)
        rows.append({"strategy": name, "seeds": args.seeds, "acc_at_1500": round(float(mean[-1]), 4),
                     "sd_at_1500": round(float(accs[:, -1].std()), 4),
                     "labels_to_reach_random_1500": labels_to_reach(list(zip(ns, mean)), target),
                     "worst_gap_vs_random_pts": round(float(gap.min()) * 100, 2),
                     "acc_at_500": round(float(mean[ns.index(500)]), 4) if 500 in ns else ""})
    out = Path(__file__).parent / "results" / "active_learning.png"
    plot(curves, ns, out)
    auto = autolabel_precision(root, args.min_confidence)
    rows.append({"strategy": f"autolabel >= {args.min_confidence}", "seeds": 1,
                 "acc_at_1500": f"precision {auto['precision']}",
                 "labels_to_reach_random_1500": f"{auto['auto_labelled']} of {auto['images']} labelled"})
    print_table(rows, ["strategy", "seeds", "acc_at_500", "acc_at_1500", "sd_at_1500", "labels_to_reach_random_1500",
                       "worst_gap_vs_random_pts"], "active_learning")
    print(f"plot: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
