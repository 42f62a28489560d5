"""Calibration measured on enough images to tell: clothing's ECE after temperature scaling, pooled over
a 5-fold cross-validation of all its labelled images.

One validation split of 341 images cannot show ECE <= 0.03: a perfectly calibrated model would read
~0.033 there by chance (15 bins), so every single-split figure is mostly noise. Here all of clothing's
images (its train and validation folders, 3409) are cut into 5 stratified folds; each fold is the
validation split of one run trained on the other four (the bundle fits its temperature on that fold,
as it does on any validation split), and the held-out fold's calibrated answers (the bundle's own
``predict_proba``, test-time augmentation included) are pooled: every image is scored once by a model
that never trained on it, 3409 answers, where chance ECE is ~0.01.

Reported per mode: the pooled ECE (the bundle's temperatures), the same with the temperature refitted
on one half of each fold and scored on the other (20 random halvings, averaged: no image scores the
temperature it chose), the chance ECE of a perfectly calibrated model with these confidences, and
each fold's ECE beside its chance figure.

    python benchmarks/calibration.py [--modes head,top,ensemble] [--folds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402
from operating_point import MODES, parse_modes  # noqa: E402
from vs_fastai import IMAGE_TYPES  # noqa: E402


def labelled_images(root: Path) -> tuple[list[Path], list[str]]:
    """Every image of clothing's train and validation folders, with its class."""
    files, labels = [], []
    for split in ("train", "validation"):
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_TYPES:
                    files.append(f)
                    labels.append(cls_dir.name)
    return files, labels


def fold_folder(files: list[Path], labels: list[str], held: set[int], out: Path) -> tuple[Path, list[Path]]:
    """``out/train/<class>`` and ``out/val/<class>`` of symlinks, the items ``held`` being the validation
    split; returns the folder and its validation links in path order."""
    val = []
    for i, (f, cls) in enumerate(zip(files, labels)):
        d = out / ("val" if i in held else "train") / cls
        d.mkdir(parents=True, exist_ok=True)
        link = d / f"{f.parent.parent.name}-{f.name}"
        link.symlink_to(f)
        if i in held:
            val.append(link)
    return out, sorted(val, key=str)


def crossfit_temperature(probs: np.ndarray, y: np.ndarray, repeats: int = 20, seed: int = 0) -> list[np.ndarray]:
    """Each image's top confidence when the temperature is fitted on one random half of its fold and the
    image is in the other (``repeats`` halvings). The bundle's calibrated log-probabilities are its scaled
    logits up to a per-row constant, so refitting a scalar on them refits the bundle's temperature."""
    from foldernet.calibration import fit_temperature, softmax

    logp = np.log(np.clip(probs, 1e-12, 1.0))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(repeats):
        half = rng.permutation(len(y)) < len(y) // 2
        conf = np.empty(len(y))
        for fit, test in ((half, ~half), (~half, half)):
            conf[test] = softmax(logp[test] / fit_temperature(logp[fit], y[fit])).max(1)
        out.append(conf)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="head,top,ensemble", type=parse_modes,
                    help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = dataset("clothing", "calibration")
    if root is None:
        return 0
    from sklearn.model_selection import StratifiedKFold

    import foldernet
    from foldernet.calibration import ece_if_calibrated, expected_calibration_error

    files, labels = labelled_images(root)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(files, labels))
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-calibration-") as tmp:
        tmp = Path(tmp)
        os.environ["FOLDERNET_CACHE"] = str(tmp / "cache")  # shared: each image's features are the same in every fold
        fold_data = [fold_folder(files, labels, set(held.tolist()), tmp / f"data-{k}")  # the same folds for every mode
                     for k, (_, held) in enumerate(folds)]
        for mode in args.modes:
            conf, correct, per_fold, crossfit, t0 = [], [], [], [], time.perf_counter()
            for k, (data, val) in enumerate(fold_data):
                r = foldernet.train(data, out=tmp / "run", progress=False, force=True, seed=args.seed, report=False,
                                    **MODES[mode])
                model = foldernet.load(tmp / "run")
                probs, ok, _ = model.predict_proba([str(p) for p in val])
                y = np.array([model.labels.index(p.parent.name) for p in val])
                probs, y = probs[ok], y[ok]
                c, right = probs.max(1), probs.argmax(1) == y
                conf.append(c)
                correct.append(right)
                crossfit.append(crossfit_temperature(probs, y))
                per_fold.append((expected_calibration_error(c, right), ece_if_calibrated(c)["mean"]))
                own = r.metrics["splits"]["val"]["ece"]
                print(f"{mode} fold {k}: n {len(y)}, accuracy {right.mean():.4f}, ECE {per_fold[-1][0]:.4f} "
                      f"(chance {per_fold[-1][1]:.4f}; the run's own val figure {own:.4f})", flush=True)
            conf, correct = np.concatenate(conf), np.concatenate(correct)
            chance = ece_if_calibrated(conf)
            refitted = [expected_calibration_error(np.concatenate(halving), correct) for halving in zip(*crossfit)]
            rows.append({"mode": mode, "folds": args.folds, "images": len(conf),
                         "accuracy": round(float(correct.mean()), 4),
                         "ece_pooled": round(expected_calibration_error(conf, correct), 4),
                         "ece_pooled_crossfit_t": round(statistics.mean(refitted), 4),  # pooled per halving
                         "ece_if_calibrated": chance["mean"], "ece_if_calibrated_p95": chance["p95"],
                         "fold_ece": " ".join(f"{e:.3f}" for e, _ in per_fold),
                         "fold_chance": " ".join(f"{c:.3f}" for _, c in per_fold),
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    cols = ["mode", "folds", "images", "accuracy", "ece_pooled", "ece_pooled_crossfit_t", "ece_if_calibrated",
            "ece_if_calibrated_p95", "fold_ece", "fold_chance", "wall_s"]
    print_table(rows, cols, "calibration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
