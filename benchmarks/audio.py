"""Audio acceptance on this 2-core CPU.

(1) NSynth-like notes rendered by ../shared/datasets/nsynth-like/render.py from FluidR3_GM
    (needs `apt-get install fluidsynth fluid-soundfont-gm` and `pip install mido`), split grouped by
    General MIDI program, so test instruments are never heard in training: family accuracy
    (target >= 75 %; the NSynth seed reached 72 % on unseen instruments).
    FluidR3 reuses samples across some programs (e.g. the two acoustic pianos), so some held-out notes
    are near duplicates of training notes even across instruments; the leakage gate reports them and
    this benchmark proceeds with --allow-leakage, printing how many there were.
(2) ../shared/datasets/spoken-digits, label and speaker from the file name, split by speaker, so test
    speakers are never heard: accuracy (target >= 85 %).

Prints a table and JSON lines with accuracy, macro-F1 and wall time; skips a part whose data or
tools are missing.

Each part runs the recipe that measured best here (RECIPES; speech: the scratch CNN on 64 px
spectrograms with frequency/time warping, 20 epochs; instrument notes: ImageNet features + head);
--backbone/--mode/--epochs/--img-size override it.

    python benchmarks/audio.py [--parts nsynth,digits] [--backbone NAME|scratch] [--mode head|finetune]
                               [--epochs N] [--img-size N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATASETS, dataset, print_table  # noqa: E402


def soundfont() -> Path | None:
    for cand in ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/soundfonts/FluidR3_GM.sf2"):
        if Path(cand).exists():
            return Path(cand)
    return None


RECIPES = {
    "nsynth": {"backbone": "tf_efficientnet_lite0", "mode": "head", "epochs": None, "img_size": None},
    "digits": {"backbone": "scratch", "mode": "finetune", "epochs": 20, "img_size": 64},
}


def recipe(part: str, args) -> dict:
    r = dict(RECIPES[part])
    for k in r:
        if getattr(args, k) is not None:
            r[k] = getattr(args, k)
    return r


def run(name: str, data: Path, out: Path, mode: str, epochs: int | None, img_size: int | None = None,
        backbone: str = "tf_efficientnet_lite0", **kw) -> dict:
    import foldernet

    t = time.perf_counter()
    r = foldernet.train(data, out=out, mode=mode, epochs=epochs if mode == "finetune" else None, progress=False,
                        force=True, img_size=img_size, backbone=backbone, **kw)
    wall = time.perf_counter() - t
    m = r.metrics["splits"]["test"]
    return {"task": name, "mode": mode, "backbone": backbone, "test_n": m["n"], "accuracy": round(m["accuracy"], 4),
            "held_out_near_duplicates_of_train": r.config["leakage"]["held_out_duplicates"],
            "macro_f1": round(m["macro_f1"], 4), "val_accuracy": round(r.metrics["splits"]["val"]["accuracy"], 4),
            "wall_s": round(wall, 1), "classes": len(r.config["labels"])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="nsynth,digits")
    ap.add_argument("--mode", default=None, help="head | finetune (default: the part's recipe)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None, help="input size (smaller = faster fine-tuning)")
    ap.add_argument("--backbone", default=None, help="a timm name, or scratch")
    args = ap.parse_args()
    parts = args.parts.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-audio-") as tmp:
        tmp = Path(tmp)
        if "nsynth" in parts:
            sf2, render = soundfont(), DATASETS / "nsynth-like" / "render.py"
            if sf2 is None or not render.exists() or shutil.which("fluidsynth") is None:
                print("skip nsynth: needs fluidsynth, fluid-soundfont-gm and render.py", file=sys.stderr)
            else:
                notes = tmp / "nsynth"
                subprocess.run([sys.executable, str(render), str(sf2), str(notes)], check=True,
                               stdout=subprocess.DEVNULL)
                rows.append({**run("nsynth-like families, unseen instruments", notes, tmp / "run-nsynth",
                                   **recipe("nsynth", args), group_by=r"regex:_gm(\d+)-",
                                   audio={"window_seconds": 2.0}, allow_leakage=True),
                             "target": ">= 0.75"})
        if "digits" in parts:
            rec = dataset("spoken-digits/recordings", "digits")
            if rec is not None:
                rows.append({**run("spoken digits, unseen speakers", rec, tmp / "run-digits", **recipe("digits", args),
                                   label_regex=r"^(\d+)_", group_by=r"regex:^\d+_([^_]+)_"),
                             "target": ">= 0.85"})
    if rows:
        print_table(rows, ["task", "backbone", "mode", "classes", "test_n", "accuracy", "macro_f1", "val_accuracy", "wall_s",
                    "held_out_near_duplicates_of_train", "target"], "audio")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
