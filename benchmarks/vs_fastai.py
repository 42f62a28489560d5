"""A fair race: foldernet against fastai run the way fastai's docs teach, on the same data, split,
backbone, ImageNet weights and 2-core CPU, over several seeds, reporting mean and spread.

fastai (docs: "Computer vision intro", ``vision_learner`` + ``fine_tune``): ``ImageDataLoaders.from_folder``
with ``item_tfms=Resize(224)`` and ``batch_tfms=aug_transforms()``, ``vision_learner(dls,
"tf_efficientnet_lite0")`` with foldernet's embedded ImageNet weights loaded into its body (this
machine cannot reach the hub), ``lr_find()`` and then ``fine_tune(3, base_lr=<the valley>)``.

foldernet: the default ``foldernet train`` (nothing set), and ``--budget`` equal to fastai's mean wall
time on that dataset; with ``--top`` also ``--mode top`` (the last two stages tuned on cached
activations). All start cold: foldernet's feature and ONNX caches are empty for every run.

Datasets (``../shared/datasets``):
- hymenoptera: its own train/val split, seeds 0..n-1 (fastai's seed sets its order, augmentation and init);
- clothing: its own train/validation split, seeds 0..n-1;
- clothing-30: the few-shot case, 30 training images per class drawn per seed from clothing's train,
  scored on clothing's validation split.

Wall time is from the first line of each tool's recipe to its predictions on the held-out split.
Prints a table per run, a summary (mean +- std), JSON lines, and records both in RESULTS.md.

    python benchmarks/vs_fastai.py [--datasets hymenoptera,clothing-30,clothing] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402

FASTAI_EPOCHS = 3
IMAGE_TYPES = {".jpg", ".jpeg", ".png"}


def materialise(name: str, seed: int, root: Path) -> Path | None:
    """The dataset for one run as a folder of symlinks ``train/<class>`` and ``val/<class>``, read by
    both tools: the same files in the same split."""
    source = {"hymenoptera": ("hymenoptera", "val"), "clothing": ("clothing", "validation"),
              "clothing-30": ("clothing", "validation")}[name]
    data = dataset(source[0], name)
    if data is None:
        return None
    out = root / f"{name}-{seed}"
    rng = random.Random(seed)
    for split, src in (("train", "train"), ("val", source[1])):
        for cls in sorted(p.name for p in (data / src).iterdir() if p.is_dir()):
            files = sorted(f for f in (data / src / cls).iterdir() if f.suffix.lower() in IMAGE_TYPES)
            if name == "clothing-30" and split == "train":
                files = sorted(rng.sample(files, min(30, len(files))))
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                (out / split / cls / f.name).symlink_to(f)
    return out


def run_fastai(data: Path, seed: int, workers: int) -> dict:
    import torch
    from fastai.vision.all import ImageDataLoaders, Normalize, Resize, aug_transforms, set_seed, vision_learner
    from sklearn.metrics import f1_score

    from foldernet.models import _adapt_state, _embedded_weight_file, load_state_file

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=Resize(224), bs=32,
                                       batch_tfms=[*aug_transforms(), Normalize.from_stats([0.5] * 3, [0.5] * 3)],
                                       num_workers=workers, seed=seed)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False)
    body = learn.model[0].model  # fastai's TimmBody wraps the timm model
    state = _adapt_state(body, load_state_file(_embedded_weight_file("tf_efficientnet_lite0")))
    missing, _ = body.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.startswith("classifier")], missing
    learn.freeze()  # vision_learner freezes the body when pretrained; the weights were loaded by hand
    with learn.no_bar(), learn.no_logging():
        lr = float(learn.lr_find(show_plot=False).valley)
        learn.fine_tune(FASTAI_EPOCHS, base_lr=lr)
        probs, targets = learn.get_preds()
    wall = time.perf_counter() - t
    pred, y = probs.argmax(1).numpy(), targets.numpy()
    return {"tool": f"fastai fine_tune({FASTAI_EPOCHS})", "wall_s": round(wall, 1), "lr": round(lr, 6),
            "accuracy": round(float(np.mean(pred == y)), 4),
            "macro_f1": round(float(f1_score(y, pred, average="macro")), 4), "n_val": int(len(y))}


def run_foldernet(data: Path, out: Path, seed: int, label: str, **options) -> dict:
    import foldernet

    t = time.perf_counter()
    r = foldernet.train(data, out=out, progress=False, force=True, seed=seed, report=False, **options)
    wall = time.perf_counter() - t
    m = r.metrics["splits"]["val"]
    return {"tool": label, "wall_s": round(wall, 1), "accuracy": round(m["accuracy"], 4),
            "macro_f1": round(m["macro_f1"], 4), "n_val": m["n"], "ece": round(m["ece"], 4),
            "ece_if_calibrated": m["ece_if_calibrated"]["mean"], "backbone": r.config["backbone"],
            "plan": json.dumps(r.metrics.get("plan", {}).get("chosen", ""))}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread per (dataset, tool), and each tool against fastai on the same dataset."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["tool"]) for r in rows):
        rs = [r for r in rows if (r["dataset"], r["tool"]) == key]
        agg = {"dataset": key[0], "tool": key[1], "runs": len(rs)}
        for m in ("accuracy", "macro_f1", "wall_s"):
            vals = [r[m] for r in rs]
            agg[m] = round(statistics.mean(vals), 4 if m != "wall_s" else 1)
            agg[m + "_sd"] = round(statistics.stdev(vals), 4 if m != "wall_s" else 1) if len(vals) > 1 else 0.0
        out.append(agg)
    for agg in out:
        fa = next((a for a in out if a["dataset"] == agg["dataset"] and a["tool"].startswith("fastai")), None)
        if fa and agg is not fa:
            agg["points_vs_fastai"] = round(100 * (agg["accuracy"] - fa["accuracy"]), 2)
            agg["time_vs_fastai"] = round(agg["wall_s"] / fa["wall_s"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="hymenoptera,clothing-30,clothing")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seeds-of", default="", help="fewer seeds for some datasets, e.g. clothing=1 (its fastai run "
                                                   "takes ~25 min each here)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-fastai", action="store_true")
    ap.add_argument("--reuse", default=None, help="a log of an earlier run: its JSON rows (same dataset, seed and "
                                                  "tool) are taken instead of running again")
    ap.add_argument("--top", action="store_true", help="also race `foldernet train --mode top` (the last two "
                                                        "stages tuned on cached activations), cold, per seed")
    ap.add_argument("--budget", default=None, help="foldernet --budget for the budget row (default: fastai's mean "
                                                   "wall time on the dataset)")
    args = ap.parse_args()
    try:
        import fastai  # noqa: F401
    except ImportError:
        if not args.skip_fastai:
            print("fastai not installed (pip install fastai): its rows are skipped, except those --reuse has",
                  file=sys.stderr)
            args.skip_fastai = True
    rows: list[dict] = []
    earlier = {}
    if args.reuse:
        for line in Path(args.reuse).read_text(encoding="utf-8").splitlines():
            if line.startswith('{"dataset"'):
                row = json.loads(line)
                earlier[(row["dataset"], row["seed"], row["tool"])] = row

    def run(key, fn):
        row = earlier.get(key) or {"dataset": key[0], "seed": key[1], **fn()}
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory(prefix="foldernet-race-") as tmp:
        tmp = Path(tmp)
        seeds_of = {k: int(v) for k, v in (item.split("=") for item in args.seeds_of.split(",") if item)}
        for name in args.datasets.split(","):
            runs = []
            n_seeds = seeds_of.get(name, args.seeds)
            for seed in range(n_seeds):
                data = materialise(name, seed, tmp / "data")
                if data is None:
                    break
                fastai_key = (name, seed, f"fastai fine_tune({FASTAI_EPOCHS})")
                if not args.skip_fastai or fastai_key in earlier:
                    runs.append(run(fastai_key, lambda: run_fastai(data, seed, args.workers)))
                os.environ["FOLDERNET_CACHE"] = str(tmp / f"cache-{name}-{seed}-default")  # cold
                runs.append(run((name, seed, "foldernet train (default)"),
                                lambda: run_foldernet(data, tmp / "run", seed, "foldernet train (default)")))
                if args.top:
                    os.environ["FOLDERNET_CACHE"] = str(tmp / f"cache-{name}-{seed}-top")  # cold
                    runs.append(run((name, seed, "foldernet --mode top"),
                                    lambda: run_foldernet(data, tmp / "run", seed, "foldernet --mode top", mode="top")))
            fastai_s = [r["wall_s"] for r in runs if r["tool"].startswith("fastai")]
            budget = args.budget or (f"{int(statistics.mean(fastai_s))}s" if fastai_s else None)
            for seed in range(n_seeds if budget else 0):
                data = tmp / "data" / f"{name}-{seed}"
                os.environ["FOLDERNET_CACHE"] = str(tmp / f"cache-{name}-{seed}-budget")
                runs.append(run((name, seed, f"foldernet --budget {budget}"),
                                lambda: run_foldernet(data, tmp / "run", seed, f"foldernet --budget {budget}",
                                                      budget=budget)))
            rows += runs
    if not rows:
        return 0
    print_table(rows, ["dataset", "seed", "tool", "wall_s", "accuracy", "macro_f1", "n_val", "ece", "ece_if_calibrated",
                       "backbone", "plan"],
                "vs_fastai runs")
    print_table(summarise(rows), ["dataset", "tool", "runs", "accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd",
                                  "wall_s", "wall_s_sd", "points_vs_fastai", "time_vs_fastai"], "vs_fastai")
    return 0


if __name__ == "__main__":
    sys.exit(main())
