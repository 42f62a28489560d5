"""The command line: ``foldernet VERB ARGS [--options]``, one grammar for every stage."""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from .errors import FoldernetError
from .progress import console, stdout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="foldernet: folders of labelled examples -> a classifier you can trust and ship.")


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("foldernet")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_path=False, show_time=False))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_train_result(result) -> None:
    from .evaluate import metrics_table, most_confused

    m = result.metrics
    split = m.get("reported_split")
    if split:
        stdout.print(metrics_table(m["splits"][split], f"{split} split ({m['splits'][split]['n']} images)"))
        pairs = most_confused(m["splits"][split], 3)
        if pairs:
            stdout.print("most confused: " + "; ".join(f"{a} -> {b} ({n})" for a, b, n in pairs))
    t = result.timings
    stdout.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    stdout.print(f"model bundle: {result.model_dir}")
    if (result.run_dir / "confusion_matrix.png").exists():
        stdout.print(f"confusion matrix: {result.run_dir / 'confusion_matrix.png'}")
    if result.skipped:
        stdout.print(f"skipped {len(result.skipped)} file(s): see {result.run_dir / 'skipped.csv'}")


@app.command()
def train(
    data: Path = typer.Argument(..., help="DATA/<class>/<images> or DATA/{train,val,test}/<class>/<images>"),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="run folder to create"),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="any timm model name; scratch; for sound also "
                                 "musicnn_mtt or musicnn_msd (audio-pretrained; pip install --no-deps musicnn)"),
    weights: Optional[Path] = typer.Option(None, help="local weights file (.safetensors or state_dict)"),
    mode: str = typer.Option("head", help="head: frozen backbone + linear head (fast); finetune: then the whole "
                             "network with progressive unfreezing"),
    val: float = typer.Option(0.15, help="validation fraction (when DATA has no split folders)"),
    test: float = typer.Option(0.15, help="test fraction (when DATA has no split folders)"),
    seed: int = typer.Option(0),
    balance: str = typer.Option("auto", help="auto | off | weights | sampler"),
    epochs: Optional[int] = typer.Option(None, help="finetune: epochs (default 6; 20 for --backbone scratch); head: max epochs (default 200)"),
    augment: str = typer.Option("light", help="training augmentation for finetune: none | light | strong"),
    img_size: Optional[int] = typer.Option(None, help="input size (default: the backbone's)"),
    batch_size: int = typer.Option(32, help="finetune batch size"),
    lr: Optional[float] = typer.Option(None, help="finetune learning rate (default 1e-4 pretrained, 3e-3 scratch)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted finetune run"),
    splits: Optional[Path] = typer.Option(None, help="splits.csv to reuse (default: DATA/splits.csv if present)"),
    label_regex: Optional[str] = typer.Option(None, help="label from a regex group on the relative path"),
    group_by: Optional[str] = typer.Option(None, help="near-duplicates | regex:PATTERN | csv:FILE (kept on one side)"),
    group_regex: Optional[str] = typer.Option(None, help="shorthand for --group-by regex:PATTERN"),
    allow_leakage: bool = typer.Option(False, "--allow-leakage", help="train even if val/test duplicate train images"),
    keep_placeholders: bool = typer.Option(False, "--keep-placeholders", help="train on flat placeholder-like images"),
    label_map: Optional[Path] = typer.Option(None, help="CSV fine,coarse: also evaluate and report coarse labels"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the feature cache"),
    engine: str = typer.Option("onnx", help="onnx (fast CPU path) or torch"),
    window: Optional[float] = typer.Option(None, help="audio: window length in seconds (default: 1 s, shorter "
                                           "when most clips are; a clip's windows are averaged)"),
    sample_rate: Optional[int] = typer.Option(None, help="audio: resample to this rate (default 16000, or the "
                                              "data's lower rate)"),
    n_mels: Optional[int] = typer.Option(None, help="audio: mel bands (default 128; 64 below 16 kHz)"),
    spectrogram_stats: bool = typer.Option(False, help="audio, head mode: append spectrogram "
                                           "statistics per time segment (band levels, MFCCs, envelope); for clips of "
                                           "one sound event each, such as instrument notes"),
    refit: bool = typer.Option(False, "--refit", help="head mode: once early stopping has chosen the epochs on "
                               "val, train the head again on train + val (the final model learns from more "
                               "examples; val figures stay those of the head that never saw val)"),
    force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
) -> None:
    """Train a classifier and write a model bundle to OUT/model."""
    from .train import train as _train

    result = _train(data, out, backbone=backbone, weights=weights, mode=mode, val=val, test=test, seed=seed,
                    balance=balance, max_epochs=epochs if (epochs and mode == "head") else 200, force=force,
                    epochs=epochs if mode != "head" or backbone == "scratch" else None, augment=augment,
                    img_size=img_size, batch_size=batch_size, resume=resume, finetune_lr=lr, splits=splits, engine=engine,
                    use_cache=not no_cache, label_regex=label_regex,
                    group_by=group_by or (f"regex:{group_regex}" if group_regex else None),
                    allow_leakage=allow_leakage, keep_placeholders=keep_placeholders, label_map_file=label_map,
                    spectrogram_stats=spectrogram_stats, refit=refit,
                    audio={"window_seconds": window, "sample_rate": sample_rate, "n_mels": n_mels})
    _print_train_result(result)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    data: Path = typer.Argument(..., help="labelled folder: DATA/<class>/<images>"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for metrics.json and confusion_matrix.png"),
) -> None:
    """Evaluate a model on another labelled folder, e.g. a separate field test set."""
    from .evaluate import evaluate as _evaluate
    from .evaluate import metrics_table, most_confused

    m = _evaluate(run, data, out=out)
    stdout.print(metrics_table(m, f"{data} ({m['n']} images)"))
    pairs = most_confused(m, 3)
    if pairs:
        stdout.print("most confused: " + "; ".join(f"{a} -> {b} ({n})" for a, b, n in pairs))
    for rel, reason in m["skipped"]:
        console.print(Text("skipped ", style="yellow") + Text(f"{rel}: {reason}"))


def _topk_columns(k: int) -> list[str]:
    return [c for i in range(1, k + 1) for c in (f"label{i}", f"prob{i}")]


def _topk_cells(top: list[tuple[str, float]]) -> list[str]:
    return [c for lab, prob in top for c in (lab, f"{prob:.6f}")]


def _warn_unreadable(n: int) -> None:
    if n:
        console.print(f"[yellow]{n} input(s) could not be read; they are listed with the reason[/]")


@app.command()
def predict(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    inputs: List[Path] = typer.Argument(..., help="image files and/or folders"),
    top_k: int = typer.Option(5, "--top-k", "-k", help="how many labels to list per input"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write a CSV instead of printing"),
    similar: int = typer.Option(0, "--similar", help="also list this many most similar training images"),
    timeline: bool = typer.Option(False, "--timeline", help="audio: answer every window of each recording "
                                  "(start-end seconds) instead of their average: what sounds when"),
) -> None:
    """Top-k labels with probabilities for each image (label_image style), or a CSV."""
    from .bundle import load
    from .io import atomic_write_text

    model = load(run)
    if timeline:
        return _predict_timeline(model, inputs, top_k, csv_out)
    preds = model.iter_predict(inputs, top_k=top_k, progress=csv_out is not None, similar=similar)
    n_bad = 0
    if csv_out is not None:
        k = max(1, min(top_k, len(model.labels)))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path"] + _topk_columns(k) + ["not_sure", "error"]
                   + (["similar"] if similar else []))
        count = 0
        for p in preds:
            count += 1
            n_bad += p.error is not None
            cells = _topk_cells(p.top)
            w.writerow([p.source] + cells + [""] * (2 * k - len(cells)) + [int(p.not_sure), p.error or ""]
                       + (["|".join(f"{n.path}:{n.similarity:.3f}" for n in p.similar)] if similar else []))
        atomic_write_text(csv_out, buf.getvalue())
        stdout.print(f"wrote {count} predictions to {csv_out}")
    else:
        for p in preds:
            stdout.print(p.source + ("  (not sure)" if p.not_sure else ""))
            if p.error:
                n_bad += 1
                stdout.print(f"  skipped: {p.error}")
            for label, prob in p.top:
                stdout.print(f"  {label} {prob:.4f}")
            for n in p.similar:
                stdout.print(f"  similar: {n.path} ({n.label}) {n.similarity:.3f}")
    _warn_unreadable(n_bad)


def _predict_timeline(model, inputs: list[Path], top_k: int, csv_out: Path | None) -> None:
    """`predict --timeline`: one row per window of each recording, printed or as a CSV."""
    from .bundle import expand_inputs
    from .io import atomic_write_text

    if model.audio is None:
        raise FoldernetError("--timeline needs a model trained on audio; this one classifies images")
    k = max(1, min(top_k, len(model.labels)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "start_s", "end_s"] + _topk_columns(k) + ["not_sure"])
    rows = n_bad = 0
    for src in expand_inputs(inputs):
        try:
            segments = model.timeline(src, top_k=k)
        except FoldernetError as exc:  # skip and report, as predict does: one bad file stops nothing
            n_bad += 1
            stdout.print(f"{src}\n  skipped: {exc}")
            continue
        rows += len(segments)
        if csv_out is None:
            stdout.print(f"{src} ({len(segments)} windows)")
        for s in segments:
            w.writerow([src, f"{s.start:.3f}", f"{s.end:.3f}"] + _topk_cells(s.top) + [int(s.not_sure)])
            if csv_out is None:
                rest = ", ".join(f"{lab} {prob:.2f}" for lab, prob in s.top[1:])
                stdout.print(f"  {s.start:7.2f}-{s.end:7.2f} s  {s.label} {s.confidence:.4f}"
                             + (" (not sure)" if s.not_sure else "") + (f"  [{rest}]" if rest else ""))
    if csv_out is not None:
        atomic_write_text(csv_out, buf.getvalue())
        stdout.print(f"wrote {rows} windows to {csv_out}")
    _warn_unreadable(n_bad)


@app.command()
def split(
    data: Path = typer.Argument(..., help="DATA/<class>/<images>"),
    val: float = typer.Option(0.15), test: float = typer.Option(0.15), seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write splits.csv (default DATA/splits.csv)"),
    group_by: Optional[str] = typer.Option(None, help="near-duplicates | regex:PATTERN | csv:FILE"),
    group_regex: Optional[str] = typer.Option(None, help="shorthand for --group-by regex:PATTERN"),
    label_regex: Optional[str] = typer.Option(None, help="label from a regex group on the relative path"),
    folds: int = typer.Option(0, help="write N cross-validation splits over the groups into --out (a folder, "
                                      "default ./folds) instead of one splits.csv"),
) -> None:
    """Write a stratified, seeded, stable, grouped splits.csv that `train` then uses."""
    from .split import split_counts, split_dataset, split_folds

    group_by = group_by or (f"regex:{group_regex}" if group_regex else None)
    if folds:
        made = split_folds(data, folds, out or Path("folds"), seed=seed, group_by=group_by, label_regex=label_regex)
        for k, (groups, path) in enumerate(made, 1):
            shown = ", ".join(groups[:6]) + (f" and {len(groups) - 6} more" if len(groups) > 6 else "")
            stdout.print(f"fold {k}: tests {shown}  ->  {path}", markup=False)
        stdout.print(f"train each with: foldernet train {data} --splits {made[0][1]} (and so on), then compare "
                     "the test accuracies", markup=False)
        return
    ds = split_dataset(data, val=val, test=test, seed=seed, out=out, label_regex=label_regex, group_by=group_by)
    counts = split_counts(ds.items, ds.classes)
    for s, c in counts.items():
        stdout.print(f"{s:5s} {sum(c.values()):6d}  " + "  ".join(f"{k}:{v}" for k, v in c.items()))
    stdout.print(f"wrote {out or Path(data) / 'splits.csv'}")


@app.command()
def audit(
    data: Path = typer.Argument(..., help="DATA/<class>/<images> (or with train/val/test folders)"),
    out: Path = typer.Option(Path("audit"), "--out", "-o", help="folder for audit.json and audit.html"),
    fix: bool = typer.Option(False, "--fix", help="move flagged files to DATA.quarantine (restorable)"),
    fix_kinds: str = typer.Option(",".join(("unreadable", "wrong_type", "tiny", "low_information", "exact_duplicate",
                                            "leakage")), help="which findings --fix moves"),
    splits: Optional[Path] = typer.Option(None, help="splits.csv to check for leakage (default DATA/splits.csv)"),
    no_label_issues: bool = typer.Option(False, "--no-label-issues", help="skip the label-error search"),
    label_regex: Optional[str] = typer.Option(None, help="label from a regex group on the relative path"),
    force: bool = typer.Option(False, "--force", help="replace an existing audit folder"),
) -> None:
    """Find unreadable, tiny, placeholder, duplicate, leaked and likely mislabelled files."""
    from rich.table import Table

    from .audit import TITLES, audit as _audit, files_to_fix, quarantine

    report = _audit(data, out=out, splits=splits, find_label_errors=not no_label_issues, force=force,
                    label_regex=label_regex)
    t = Table(title=f"audit of {data}: {report['images']} images, {len(report['classes'])} classes, "
                    f"imbalance ratio {report['imbalance_ratio']:.2f}")
    t.add_column("finding")
    t.add_column("count", justify="right")
    t.add_column("examples")
    for kind, entries in report["findings"].items():
        ex = "; ".join(e.get("path") or " = ".join(e["paths"][:2]) for e in entries[:2])
        t.add_row(TITLES.get(kind, kind), str(len(entries)), ex)
    if not report["findings"]:
        t.add_row("nothing found", "0", "")
    stdout.print(t)
    stdout.print(f"report: {out / 'audit.html'}  data: {out / 'audit.json'}")
    if fix:
        moves = files_to_fix(report, tuple(k.strip() for k in fix_kinds.split(",") if k.strip()))
        if not moves:
            stdout.print("--fix: nothing to move")
            return
        manifest = quarantine(data, moves)
        stdout.print(f"--fix: moved {len(moves)} file(s) out of {data}; undo with: foldernet restore {manifest}")


@app.command()
def restore(manifest: Path = typer.Argument(..., help="a quarantine manifest.json (or its folder)")) -> None:
    """Put files that `audit --fix` quarantined back where they were."""
    from .audit import restore as _restore

    stdout.print(f"restored {_restore(manifest)} file(s)")


@app.command()
def collect(
    url_list: Path = typer.Argument(..., help="CSV with columns url,label (and optionally group)"),
    out: Path = typer.Option(..., "--out", "-o", help="DATA folder to fill: DATA/<label>/<hash>.<ext>"),
    workers: int = typer.Option(8, help="parallel downloads"),
    timeout: float = typer.Option(20.0, help="seconds per request"),
    retries: int = typer.Option(3, help="retries for timeouts, 429 and 5xx (exponential backoff)"),
    max_mb: float = typer.Option(20.0, help="largest file to accept"),
) -> None:
    """Download a URL list into class folders: checked, deduplicated, resumable, every row logged."""
    from .collect import collect as _collect

    r = _collect(url_list, out, workers=workers, timeout=timeout, retries=retries, max_mb=max_mb)
    stdout.print(f"{r['rows']} rows ({r['skipped_as_done']} already done): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items())))
    stdout.print(f"log: {r['log']}")


@app.command()
def frames(
    videos: List[Path] = typer.Argument(..., help="video files"),
    out: Path = typer.Option(..., "--out", "-o", help="class folder to write frames into: DATA/<label>"),
    every: float = typer.Option(0.5, help="seconds between saved frames"),
    max_frames: Optional[int] = typer.Option(None, help="at most this many frames per video"),
) -> None:
    """Save video frames as images; each frame's group is its video, so splits keep videos whole."""
    from .collect import extract_frames

    r = extract_frames(videos, out, every=every, max_frames=max_frames)
    for v, n in r["frames"].items():
        stdout.print(f"{v}: {n} frames")
    stdout.print(f"groups: {r['groups']} (train and split use it to keep each video on one side)")


@app.command()
def report(
    run: Path = typer.Argument(..., help="run folder"),
    data: Optional[Path] = typer.Option(None, help="the training data folder, if it moved (for thumbnails)"),
) -> None:
    """(Re)write RUN/report.html: metrics, confusion matrix, curves, calibration, mistakes, data checks."""
    from .bundle import find_model_dir
    from .report import write_report

    path = write_report(find_model_dir(run).parent, data_root=data)
    stdout.print(f"report: {path}")


@app.command()
def similar(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    images: List[Path] = typer.Argument(..., help="image files or folders"),
    k: int = typer.Option(5, "-k", help="how many neighbours"),
) -> None:
    """The most similar training images of each input, with labels and cosine similarity."""
    from .bundle import expand_inputs, load

    model = load(run)
    sources = expand_inputs(images)
    for src, hits in zip(sources, model.similar(sources, k=k)):
        stdout.print(str(src))
        if not hits:
            stdout.print("  skipped: unreadable image")
        for n in hits:
            stdout.print(f"  {n.similarity:.4f}  {n.label}  {n.path}")


@app.command()
def compare(
    data: Path = typer.Argument(..., help="DATA/<class>/<images>"),
    backbones: str = typer.Option("tf_efficientnet_lite0,scratch", help="comma-separated timm names (or scratch)"),
    modes: str = typer.Option("head", help="comma-separated: head, finetune"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o"),
    epochs: Optional[int] = typer.Option(None, help="finetune/scratch epochs"),
    img_size: Optional[int] = typer.Option(None, help="input size for every model"),
    force: bool = typer.Option(False, "--force", help="replace an existing comparison folder"),
) -> None:
    """Train several backbones/modes on the same split; write a leaderboard (Markdown, CSV, PNG)."""
    from .compare import compare as _compare

    rows = _compare(data, out, [b.strip() for b in backbones.split(",") if b.strip()],
                    [m.strip() for m in modes.split(",") if m.strip()], force=force, epochs=epochs, img_size=img_size)
    stdout.print((out / "leaderboard.md").read_text(encoding="utf-8"))
    stdout.print(f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'leaderboard.png'}")
    if not any("accuracy" in r for r in rows):
        raise FoldernetError("no model could be trained; see the messages above")


@app.command()
def demo(
    out: Path = typer.Option(Path("foldernet-demo"), "--out", "-o", help="folder for the demo data and run"),
    per_class: int = typer.Option(50, help="images per digit class"),
    force: bool = typer.Option(False, "--force", help="replace an existing demo folder"),
) -> None:
    """Offline, ~1 minute: write real handwritten digits as class folders, train, evaluate, predict."""
    from .bundle import load
    from .demo import write_digits
    from .io import check_new_output
    from .train import train as _train

    check_new_output(out, force)
    data = write_digits(out / "data", per_class=per_class)
    stdout.print(f"1/3 wrote {sum(1 for _ in data.rglob('*.png'))} digit images to {data}")
    result = _train(data, out / "run", force=True)
    stdout.print("2/3 trained and evaluated")
    _print_train_result(result)
    model = load(result.run_dir)
    rows = [line.split(",") for line in (result.model_dir / "splits.csv").read_text(encoding="utf-8").splitlines()[1:]]
    firsts = {}
    for path, label, split_name, _ in rows:
        if split_name == "test":
            firsts.setdefault(label, data / path)
    test_files = list(firsts.values())[::3][:3]
    stdout.print("3/3 predictions for three test images:")
    for p in model.predict(test_files, top_k=3):
        stdout.print(p.source)
        for label, prob in p.top:
            stdout.print(f"  {label} {prob:.4f}")
    stdout.print(f"\nNext: foldernet predict {result.run_dir} YOUR_IMAGE.png   |   "
              f"foldernet evaluate {result.run_dir} OTHER_LABELLED_FOLDER")


@app.command()
def export(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    fmt: str = typer.Option("onnx", "--format", help="onnx"),
    int8: bool = typer.Option(False, "--int8", help="also try static int8 quantisation (kept only if it earns it)"),
    prefer_size: bool = typer.Option(False, "--prefer-size", help="keep int8 when it agrees but is not faster"),
    data: Optional[Path] = typer.Option(None, help="the training data folder, if it moved since training"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="export folder (default RUN/export)"),
    force: bool = typer.Option(False, "--force", help="replace an existing export"),
) -> None:
    """Export to one ONNX file, checked against the PyTorch model on the held-out split."""
    from .export import export as _export

    if fmt != "onnx":
        raise FoldernetError(f"--format {fmt} is not supported; use onnx")
    report = _export(run, out=out, int8=int8, prefer_size=prefer_size, data=data, force=force)
    fp = report["fp32"]
    stdout.print(f"fp32: {fp['path']} ({fp['size_mb']} MB), top-1 agreement {fp['top1_agreement']:.4f} on "
                 f"{report['n']} held-out {report['inputs']}, max probability difference {fp['max_prob_diff']:.2e}")
    if "int8" in report:
        q = report["int8"]
        stdout.print(f"int8: agreement {q['top1_agreement']:.4f}, {q['img_per_s']} vs fp32 {q['fp32_img_per_s']} img/s, "
                     f"{q['size_mb']} vs {q['fp32_size_mb']} MB: {q['reason']}")


@app.command()
def serve(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000),
    max_upload_mb: float = typer.Option(10.0, help="largest accepted upload"),
) -> None:
    """Web page with upload and a confidence bar chart, plus a JSON API (/predict, /health, /labels, /docs)."""
    from .serve import Limits
    from .serve import serve as _serve

    stdout.print(f"serving {run} on http://{host}:{port}  (API docs: http://{host}:{port}/docs)")
    _serve(run, host=host, port=port, limits=Limits(max_bytes=int(max_upload_mb * 1024 * 1024)))


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # odd file names print escaped, never crash the command
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    _setup_logging(os.environ.get("FOLDERNET_DEBUG") == "1")
    try:
        app()
    except FoldernetError as exc:
        console.print(Text("error: ", style="bold red") + Text(str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
