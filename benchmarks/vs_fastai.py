"""foldernet vs fastai on ../shared/datasets/clothing (train -> validation), same weights, same split,
same image size (224), same 2-core CPU.

fastai: ``vision_learner(dls, "tf_efficientnet_lite0", pretrained=False)`` with the same embedded
ImageNet weights loaded into its body, ``fine_tune(N)`` (1 frozen epoch + N unfrozen), its default
augmentation. foldernet: ``head`` (cached frozen features + linear head) and ``finetune``.
Prints a table and JSON lines with wall time and validation accuracy / macro-F1 for each.
Needs ``pip install fastai``; skips cleanly without it or without the dataset.

    python benchmarks/vs_fastai.py [--fastai-epochs 1] [--finetune-epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402


def run_fastai(data: Path, epochs: int, workers: int) -> dict:
    import torch
    from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Normalize, Resize,
                                   aug_transforms, get_image_files, parent_label, vision_learner)
    from sklearn.metrics import f1_score

    from foldernet.models import EMBEDDED_WEIGHTS, _adapt_state, _embedded_weight_file, load_state_file

    torch.set_num_threads(os.cpu_count() or 1)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=GrandparentSplitter(train_name="train", valid_name="validation"),
                      item_tfms=Resize(224), batch_tfms=[*aug_transforms(), Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    dls = block.dataloaders(data, bs=32, num_workers=workers)
    learn = vision_learner(dls, "tf_efficientnet_lite0", pretrained=False)
    body = learn.model[0].model  # fastai's TimmBody wraps the timm model
    state = _adapt_state(body, load_state_file(_embedded_weight_file("tf_efficientnet_lite0")))
    missing, unexpected = body.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.startswith("classifier")], missing
    assert EMBEDDED_WEIGHTS
    t = time.perf_counter()
    learn.fine_tune(epochs)
    train_s = time.perf_counter() - t
    probs, targets = learn.get_preds()
    pred = probs.argmax(1).numpy()
    y = targets.numpy()
    return {"tool": f"fastai fine_tune({epochs})", "wall_s": round(train_s, 1),
            "val_accuracy": round(float(np.mean(pred == y)), 4),
            "val_macro_f1": round(float(f1_score(y, pred, average="macro")), 4), "n_val": int(len(y))}


def run_foldernet(data: Path, out: Path, mode: str, epochs: int | None) -> dict:
    import foldernet

    t = time.perf_counter()
    r = foldernet.train(data, out=out, mode=mode, epochs=epochs, progress=False, force=True)
    wall = time.perf_counter() - t
    m = r.metrics["splits"]["val"]
    return {"tool": f"foldernet {mode}" + (f" ({epochs} epochs)" if mode == "finetune" else ""),
            "wall_s": round(wall, 1), "val_accuracy": round(m["accuracy"], 4), "val_macro_f1": round(m["macro_f1"], 4),
            "n_val": m["n"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fastai-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-fastai", action="store_true")
    args = ap.parse_args()
    data = dataset("clothing")
    if data is None:
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-vs-fastai-") as tmp:
        os.environ["FOLDERNET_CACHE"] = str(Path(tmp) / "cache")  # cold: extraction and export are timed
        if not args.skip_fastai:
            try:
                import fastai  # noqa: F401
            except ImportError:
                print("fastai not installed (pip install fastai): its row is skipped", file=sys.stderr)
            else:
                rows.append(run_fastai(data, args.fastai_epochs, args.workers))
        rows.insert(0, run_foldernet(data, Path(tmp) / "head", "head", None))
        rows.insert(1, run_foldernet(data, Path(tmp) / "ft", "finetune", args.finetune_epochs))
    fa = next((r for r in rows if r["tool"].startswith("fastai")), None)
    if fa:
        for r in rows:
            r["time_vs_fastai"] = round(r["wall_s"] / fa["wall_s"], 3)
            r["acc_vs_fastai_points"] = round(100 * (r["val_accuracy"] - fa["val_accuracy"]), 2)
    head = rows[0]
    for r in rows[1:2]:
        r["gain_over_head_points"] = round(100 * (r["val_accuracy"] - head["val_accuracy"]), 2)
    print_table(rows, ["tool", "wall_s", "val_accuracy", "val_macro_f1", "n_val", "time_vs_fastai",
                       "acc_vs_fastai_points", "gain_over_head_points"], "vs_fastai")
    return 0


if __name__ == "__main__":
    sys.exit(main())
