"""``foldernet compare DATA --backbones a,b,c [--modes head,finetune]``: the seeds' model comparison
table, done honestly: every model trains on the same split and is scored on the same held-out
images. Writes ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.png``."""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path

from .errors import FoldernetError
from .io import atomic_write_bytes, atomic_write_csv, atomic_write_text, check_new_output, write_marker
from .progress import console


def single_image_latency_ms(run: Path, image: Path, repeats: int = 10) -> float:
    from .bundle import load

    model = load(run, use_cache=False)
    pixels = model.extractor.pixels(image)
    engine = model.extractor.engine
    engine(pixels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.proba_from_features(engine(pixels))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def compare(data: str | os.PathLike, out: str | os.PathLike, backbones: list[str], modes: list[str],
            force: bool = False, progress: bool = True, **train_kwargs) -> list[dict]:
    from .data import scan
    from .split import resolve_splits, write_splits_csv
    from .train import train

    from .io import check_data_dir
    from .spec import TrainSpec

    data = check_data_dir(data)
    TrainSpec.from_options(**train_kwargs)  # every option checked before the first model trains
    out = check_new_output(out, force, "compare", [data])
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "compare")
    ds = resolve_splits(scan(data), train_kwargs.pop("splits", None), seed=train_kwargs.get("seed", 0))
    splits = out / "splits.csv"
    write_splits_csv(ds.items, splits)  # one split for every contender
    probe = next(it.path for it in ds.items if it.split != "train")
    rows = []
    for backbone in backbones:
        for mode in (["finetune"] if backbone == "scratch" else modes):
            name = f"{backbone}-{mode}"
            console.print(f"[bold]{name}[/]")
            t = time.perf_counter()
            try:
                result = train(data, out / name, backbone=backbone, mode=mode, splits=splits, force=True,
                               progress=progress, **train_kwargs)
            except FoldernetError as exc:
                console.print(f"{name}: skipped ({exc})", markup=False)
                rows.append({"model": name, "error": str(exc).splitlines()[0]})
                continue
            seconds = time.perf_counter() - t
            split = result.metrics["reported_split"]
            m = result.metrics["splits"][split]
            rows.append({"model": name, "backbone": backbone, "mode": mode, "split": split, "n": m["n"],
                         "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                         "top3": round(m.get("top3", float("nan")), 4), "train_seconds": round(seconds, 1),
                         "model_mb": round((result.model_dir / "model.safetensors").stat().st_size / 1e6, 2),
                         "latency_ms": round(single_image_latency_ms(result.run_dir, probe), 2)})
    ranked = sorted((r for r in rows if "accuracy" in r), key=lambda r: (-r["accuracy"], -r["macro_f1"]))
    ranked += [r for r in rows if "accuracy" not in r]
    cols = ["model", "accuracy", "macro_f1", "top3", "train_seconds", "model_mb", "latency_ms", "split", "n", "error"]
    atomic_write_csv(out / "leaderboard.csv", cols, ranked)
    md = ["| " + " | ".join(cols[:-1]) + " |", "|" + "---|" * (len(cols) - 1)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols[:-1]) + " |" for r in ranked]
    atomic_write_text(out / "leaderboard.md", f"# Leaderboard: {Path(data).name}\n\n" + "\n".join(md) + "\n")
    _plot(ranked, out / "leaderboard.png")
    return ranked


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "accuracy" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(rows) + 2))
    names = [r["model"] for r in rows][::-1]
    for ax, key, title in ((axes[0], "accuracy", "accuracy"), (axes[1], "train_seconds", "train time (s)"),
                           (axes[2], "latency_ms", "single-image latency (ms)")):
        ax.barh(names, [r[key] for r in rows][::-1], color="#457b9d")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
