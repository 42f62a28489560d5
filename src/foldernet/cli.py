"""The command line: ``foldernet VERB ARGS [--options]``, one grammar for every stage."""

from __future__ import annotations

import csv
import inspect
import io
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from .params import FIXABLE
from .errors import FoldernetError
from .progress import console, stdout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="foldernet: folders of labelled examples -> a classifier you can trust and ship.")


def _opt(command: str, name: str, *decls: str, default=None):
    """A typer option whose help (and what it accepts) comes from the command's table in params.py;
    the value is None unless given, so defaults live in the table alone."""
    from .params import param

    p = param(command, name)
    extra = "" if p.kind in (bool, str, Path) and not p.choices else f" [{p.allowed()}]"
    if p.choices:
        extra = f" [{' | '.join(p.choices)}; default {p.default}]"
    elif p.default is not None and p.kind is not bool:
        extra += f" [default {p.default}]"
    return typer.Option(default, *decls, help=p.help + extra, show_default=False)


def _given(values: dict, drop: tuple[str, ...] = ()) -> dict:
    """The options the user gave (None and unset flags left out)."""
    return {k: v for k, v in values.items() if v is not None and v is not False and k not in drop}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        stdout.print(f"foldernet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """foldernet: folders of labelled examples -> a classifier you can trust and ship."""


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


# flags whose name differs from the option's (the API keyword); bools become --x/--no-x pairs
TRAIN_FLAGS = {"label_map_file": "--label-map", "window_seconds": "--window", "use_cache": "--cache/--no-cache"}


def _table_command(command: str, fixed: list[inspect.Parameter], flags: dict[str, str]):
    """Give a ``def f(**given)`` command the signature of its options table (params.py), so typer
    builds every flag, its help and what it accepts from the table: the CLI declares nothing twice.
    Each value is None unless given, so defaults live in the table alone."""
    from .params import TABLES

    def decorate(func):
        params = list(fixed)
        for p in TABLES[command]:
            decl = flags.get(p.name) or (f"{p.flag}/--no-{p.flag[2:]}" if p.kind is bool else p.flag)
            params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=_opt(command, p.name, decl), annotation=Optional[p.kind]))
        func.__signature__ = inspect.Signature(params)
        func.__annotations__ = {q.name: q.annotation for q in params}
        return func

    return decorate


@app.command()
@_table_command("train", [
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path, default=typer.Argument(
        ..., help="DATA/<class>/<images> or DATA/{train,val,test}/<class>/<images>")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        Path("runs/train"), "--out", "-o", help="run folder to create")),
    inspect.Parameter("lr", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float], default=typer.Option(
        None, help="learning rate of the mode's stage: the head's in head mode (default 1e-3), fine-tuning's in "
        "finetune mode (default 1e-4; 3e-3 scratch)")),
    inspect.Parameter("group_regex", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, help="shorthand for --group-by regex:PATTERN")),
], TRAIN_FLAGS)
def train(**given) -> None:
    """Train a classifier and write a model bundle to OUT/model."""
    from .train import train as _train

    data, out, group_regex = given.pop("data"), given.pop("out"), given.pop("group_regex")
    options = {k: v for k, v in given.items() if v is not None}
    if group_regex is not None:
        options["group_by"] = f"regex:{group_regex}"
    _print_train_result(_train(data, out, **options))


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
    run: Path = typer.Argument(..., help="run folder (or its model/ folder), or an exported model.onnx, "
                               "model.tflite or model.openvino"),
    inputs: List[str] = typer.Argument(..., help="image files and/or folders; with --out: one folder, glob, "
                                       ".txt/.csv/.parquet list of paths or URIs"),
    top_k: Optional[int] = _opt("predict", "top_k", "--top-k", "-k"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write a CSV instead of printing"),
    similar: Optional[int] = _opt("predict", "similar", "--similar"),
    timeline: bool = typer.Option(False, "--timeline", help="audio: answer every window of each recording "
                                  "(start-end seconds) instead of their average: what sounds when"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="a Parquet folder for large collections "
                                       "(resumable; runs the ONNX export)"),
    engine: Optional[str] = _opt("predict", "engine", "--engine"),
    address: Optional[str] = _opt("predict", "address", "--address"),
    chunk_rows: Optional[int] = _opt("predict", "chunk_rows", "--chunk-rows"),
    force: bool = _opt("predict", "force", "--force", default=False),
) -> None:
    """Top-k labels with probabilities for each image (label_image style), a CSV, or a Parquet folder."""
    from .bundle import load
    from .modality import expand_inputs
    from .io import atomic_write_text
    from .params import check

    o = check("predict", _given({"top_k": top_k, "similar": similar, "engine": engine, "address": address,
                                 "chunk_rows": chunk_rows, "force": force}))
    top_k, similar = o["top_k"], o["similar"]
    if out is not None or o["engine"] == "ray":
        return _batch_job("predict", run, inputs, out, o)
    sources = expand_inputs(inputs)  # a missing file or an empty folder: said before the model loads
    model = load(run)
    if timeline:
        return _predict_timeline(model, sources, top_k, csv_out)
    preds = model.iter_predict(sources, top_k=top_k, progress=csv_out is not None, similar=similar)
    n_bad = 0
    if csv_out is not None:
        k = min(top_k, len(model.labels))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path"] + _topk_columns(k) + ["not_sure", "not_sure_reason", "error"]
                   + (["similar"] if similar else []))
        count = 0
        for p in preds:
            count += 1
            n_bad += p.error is not None
            cells = _topk_cells(p.top)
            w.writerow([p.source] + cells + [""] * (2 * k - len(cells))
                       + [int(p.not_sure), p.not_sure_reason, p.error or ""]
                       + (["|".join(f"{n.path}:{n.similarity:.3f}" for n in p.similar)] if similar else []))
        atomic_write_text(csv_out, buf.getvalue())
        stdout.print(f"wrote {count} predictions to {csv_out}")
    else:
        for p in preds:
            stdout.print(p.source + (f"  (not sure: {p.not_sure_reason})" if p.not_sure else ""))
            if p.error:
                n_bad += 1
                stdout.print(f"  skipped: {p.error}")
            for label, prob in p.top:
                stdout.print(f"  {label} {prob:.4f}")
            for n in p.similar:
                stdout.print(f"  similar: {n.path} ({n.label}) {n.similarity:.3f}")
    _warn_unreadable(n_bad)


def _batch_job(task: str, run: Path, inputs: list[str], out: Path | None, o: dict) -> None:
    """`predict --out` / `embed`: every file of one source into a resumable Parquet folder."""
    from .scale import run_batch

    if out is None:
        raise FoldernetError(f"--engine ray writes a Parquet folder: add --out {task}.parquet")
    if len(inputs) != 1:
        raise FoldernetError(f"give one source with --out (a folder, a glob or a list file), not {len(inputs)}")
    r = run_batch(run, inputs[0], out, task=task, engine=o["engine"], address=o["address"],
                  top_k=o.get("top_k", 5), chunk_rows=o["chunk_rows"], force=o["force"])
    stdout.print(f"{r['processed']} of {r['files']} files in {r['seconds']} s ({r['files_per_s']} files/s, "
                 f"{r['engine']}); {r['unreadable']} unreadable (see the error column); results: {r['out']}")


@app.command()
def embed(
    run: Path = typer.Argument(..., help="run folder (its ONNX export is used) or an exported model.onnx"),
    source: str = typer.Argument(..., help="a folder, a glob, or a .txt/.csv/.parquet list of paths or URIs"),
    out: Path = typer.Option(..., "--out", "-o", help="the Parquet folder to write (path, embedding, error)"),
    engine: Optional[str] = _opt("embed", "engine", "--engine"),
    address: Optional[str] = _opt("embed", "address", "--address"),
    chunk_rows: Optional[int] = _opt("embed", "chunk_rows", "--chunk-rows"),
    force: bool = _opt("embed", "force", "--force", default=False),
) -> None:
    """Unit-length features (float16) of every file, to Parquet: the input of search and audit at scale."""
    from .params import check

    o = check("embed", _given({"engine": engine, "address": address, "chunk_rows": chunk_rows, "force": force}))
    _batch_job("embed", run, [source], out, o)


@app.command()
def duplicates(
    embeddings: Path = typer.Argument(..., help="the Parquet folder of `foldernet embed`"),
    out: Path = typer.Option(..., "--out", "-o", help="CSV of pairs: kind (exact|near), path_a, path_b, cosine"),
    min_cosine: Optional[float] = _opt("duplicates", "min_cosine", "--min-cosine"),
    k: Optional[int] = _opt("duplicates", "k", "-k"),
    splits: Optional[Path] = typer.Option(None, "--splits", help="a splits.csv (path,split): mark pairs that "
                                          "join train and val/test (leakage)"),
) -> None:
    """Exact and near duplicates among millions of files, from their embeddings (an approximate index)."""
    from .io import atomic_write_text
    from .params import check
    from .scale import duplicates as _duplicates, read_splits

    o = check("duplicates", _given({"min_cosine": min_cosine, "k": k}))
    if out.exists() or out.is_symlink():
        raise FoldernetError(f"--out {out} already exists; choose another file (foldernet never replaces it)")
    split_map = read_splits(splits) if splits is not None else None
    rows = _duplicates(embeddings, min_cosine=o["min_cosine"], k=o["k"], splits=split_map)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["kind", "path_a", "path_b", "cosine"] + (["splits", "leak"] if split_map
                                                                                 else []), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    n_exact = sum(r["kind"] == "exact" for r in rows)
    leaks = f", {sum(r.get('leak', False) for r in rows)} joining train and val/test" if split_map else ""
    stdout.print(f"{n_exact} exact and {len(rows) - n_exact} near duplicate pairs{leaks}: {out}")


def _predict_timeline(model, inputs: list[Path], top_k: int, csv_out: Path | None) -> None:
    """`predict --timeline`: one row per window of each recording, printed or as a CSV."""
    from .io import atomic_write_text

    if model.audio is None:
        raise FoldernetError("--timeline needs a model trained on audio; this one classifies images")
    k = min(top_k, len(model.labels))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "start_s", "end_s"] + _topk_columns(k) + ["not_sure"])
    rows = n_bad = 0
    for src in inputs:
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
    val: Optional[float] = _opt("split", "val"), test: Optional[float] = _opt("split", "test"),
    seed: Optional[int] = _opt("split", "seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write splits.csv (default DATA/splits.csv)"),
    group_by: Optional[str] = _opt("split", "group_by"),
    group_regex: Optional[str] = typer.Option(None, help="shorthand for --group-by regex:PATTERN"),
    label_regex: Optional[str] = _opt("split", "label_regex"),
    folds: Optional[int] = _opt("split", "folds"),
) -> None:
    """Write a stratified, seeded, stable, grouped splits.csv that `train` then uses."""
    from .params import check
    from .split import split_counts, split_dataset, split_folds

    group_by = f"regex:{group_regex}" if group_regex else group_by
    o = check("split", _given({"val": val, "test": test, "seed": seed, "group_by": group_by,
                               "label_regex": label_regex, "folds": folds}))
    val, test, seed, folds = o["val"], o["test"], o["seed"], o["folds"]
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
    fix_kinds: Optional[str] = typer.Option(None, help="which findings --fix moves (comma-separated; default: "
                                            "every kind a copy can safely be moved for: " + ", ".join(FIXABLE) + ")"),
    splits: Optional[Path] = _opt("audit", "splits"),
    no_label_issues: bool = typer.Option(False, "--no-label-issues", help="skip the label-error search"),
    label_regex: Optional[str] = _opt("audit", "label_regex"),
    force: bool = _opt("audit", "force", "--force", default=False),
) -> None:
    """Find unreadable, tiny, placeholder, duplicate, leaked and likely mislabelled files."""
    from rich.table import Table

    from .audit import TITLES, audit as _audit, files_to_fix, label_conflicts, quarantine
    from .params import check, split_list

    check("audit", _given({"fix_kinds": fix_kinds}))
    report = _audit(data, out=out, **_given({"splits": splits, "force": force, "label_regex": label_regex}),
                    find_label_errors=not no_label_issues)
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
        moves = files_to_fix(report, tuple(split_list(fix_kinds)) if fix_kinds else FIXABLE)
        conflicts = label_conflicts(report)
        if conflicts:
            stdout.print(f"--fix leaves {len(conflicts)} group(s) of duplicates with different labels in place; "
                         "decide which label is right, e.g.: " + " vs ".join(conflicts[0][:2]))
        if not moves:
            stdout.print("--fix: nothing to move")
            return
        manifest = quarantine(data, moves)
        stdout.print(f"--fix: moved {len(moves)} file(s) out of {data}; undo with: foldernet restore {manifest}")


@app.command()
def restore(manifest: Path = typer.Argument(..., help="a manifest from audit --fix (or its folder) or autolabel")) -> None:
    """Undo `audit --fix` (files go back) or `autolabel` (its copies are removed)."""
    from .audit import restore as _restore

    stdout.print(f"undone: {_restore(manifest)} file(s) restored or removed")


@app.command()
def collect(
    url_list: Path = typer.Argument(..., help="CSV with columns url,label (and optionally group)"),
    out: Path = typer.Option(..., "--out", "-o", help="DATA folder to fill: DATA/<label>/<hash>.<ext>"),
    workers: Optional[int] = _opt("collect", "workers"),
    timeout: Optional[float] = _opt("collect", "timeout"),
    retries: Optional[int] = _opt("collect", "retries"),
    max_mb: Optional[float] = _opt("collect", "max_mb"),
) -> None:
    """Download a URL list into class folders: checked, deduplicated, resumable, every row logged."""
    from .collect import collect as _collect

    r = _collect(url_list, out, **_given({"workers": workers, "timeout": timeout, "retries": retries,
                                          "max_mb": max_mb}))
    stdout.print(f"{r['rows']} rows ({r['skipped_as_done']} already done): "
                 + ", ".join(f"{k} {v}" for k, v in sorted(r["status"].items())))
    stdout.print(f"log: {r['log']}")


@app.command()
def frames(
    videos: List[Path] = typer.Argument(..., help="video files"),
    out: Path = typer.Option(..., "--out", "-o", help="class folder to write frames into: DATA/<label>"),
    every: Optional[float] = _opt("frames", "every"),
    max_frames: Optional[int] = _opt("frames", "max_frames"),
) -> None:
    """Save video frames as images; each frame's group is its video, so splits keep videos whole."""
    from .collect import extract_frames

    r = extract_frames(videos, out, **_given({"every": every, "max_frames": max_frames}))
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
    k: Optional[int] = _opt("similar", "k", "-k"),
) -> None:
    """The most similar training examples of each input, with labels and cosine similarity."""
    from .bundle import load
    from .modality import expand_inputs
    from .params import check

    k = check("similar", _given({"k": k}))["k"]
    sources = expand_inputs(images)
    model = load(run)
    hits_all = model.similar(sources, k=k)
    for src, hits, p in zip(sources, hits_all, model.predict(sources, top_k=1)):
        stdout.print(str(src))
        if p.error:
            stdout.print(f"  skipped: {p.error}")
        for n in hits:
            stdout.print(f"  {n.similarity:.4f}  {n.label}  {n.path}")


@app.command()
def compare(
    data: Path = typer.Argument(..., help="DATA/<class>/<images>"),
    backbones: str = typer.Option("tf_efficientnet_lite0,scratch", help="comma-separated timm names (or scratch)"),
    modes: str = typer.Option("head", help="comma-separated: head, top, finetune"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o"),
    epochs: Optional[int] = _opt("compare", "epochs"),
    img_size: Optional[int] = _opt("compare", "img_size"),
    force: bool = _opt("compare", "force", "--force", default=False),
) -> None:
    """Train several backbones/modes on the same split; write a leaderboard (Markdown, CSV, PNG)."""
    from .compare import compare as _compare

    rows = _compare(data, out, [b.strip() for b in backbones.split(",") if b.strip()],
                    [m.strip() for m in modes.split(",") if m.strip()], force=force,
                    **_given({"epochs": epochs, "img_size": img_size}))
    stdout.print((out / "leaderboard.md").read_text(encoding="utf-8"))
    stdout.print(f"leaderboard: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'leaderboard.png'}")
    if not any("accuracy" in r for r in rows):
        raise FoldernetError("no model could be trained; see the messages above")


@app.command()
def demo(
    out: Path = typer.Option(Path("foldernet-demo"), "--out", "-o", help="folder for the demo data and run"),
    per_class: Optional[int] = _opt("demo", "per_class"),
    force: bool = _opt("demo", "force", "--force", default=False),
) -> None:
    """Offline, ~1 minute: write real handwritten digits as class folders, train, evaluate, predict."""
    from .bundle import load
    from .demo import write_digits
    from .io import check_new_output, write_marker
    from .params import check
    from .train import train as _train

    per_class = check("demo", _given({"per_class": per_class}))["per_class"]
    check_new_output(out, force, "demo")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
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
    fmt: Optional[str] = _opt("export", "format", "--format"),
    int8: bool = _opt("export", "int8", "--int8", default=False),
    prefer_size: bool = _opt("export", "prefer_size", "--prefer-size", default=False),
    int8_distill: Optional[str] = _opt("export", "int8_distill", "--int8-distill"),
    data: Optional[Path] = typer.Option(None, help="the training data folder, if it moved since training"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="export folder (default RUN/export)"),
    force: bool = _opt("export", "force", "--force", default=False),
) -> None:
    """Export to ONNX (or TFLite / Core ML), checked against the PyTorch model on the held-out split."""
    from rich.table import Table

    from .bundle import find_model_dir
    from .export import export as _export, table_rows

    report = _export(run, out=out, data=data, **_given({"format": fmt, "int8": int8, "prefer_size": prefer_size,
                                                        "int8_distill": int8_distill, "force": force}))
    fp = report["fp32"]
    if fp.get("top1_agreement") is not None:
        stdout.print(f"fp32: {fp['path']} ({fp['size_mb']} MB), top-1 agreement {fp['top1_agreement']:.4f} on "
                     f"{report['n']} held-out {report['inputs']}, max probability difference {fp['max_prob_diff']:.2e}")
    if report.get("int8", {}).get("top1_agreement") is not None:
        q = report["int8"]
        stdout.print(f"int8 ({q['plan']}): agreement {q['top1_agreement']:.4f}, {q['img_per_s']} vs fp32 "
                     f"{q['fp32_img_per_s']} img/s, {q['size_mb']} vs {q['fp32_size_mb']} MB: {q['reason']}")
    folder = Path(out) if out else find_model_dir(run).parent / "export"
    table = Table(title=f"{folder}/report.md")
    rows = table_rows(folder)
    for col in ("format", "precision", "file", "size_mb", "top1_agreement", "single_ms", "img_per_s", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(*["" if v is None else (f"{v:.4f}" if k == "top1_agreement" else str(v)) for k, v in r.items()])
    stdout.print(table)


def _arg(name: str, annotation, default) -> inspect.Parameter:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if isinstance(default, typer.models.ArgumentInfo) \
        else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, annotation=annotation, default=default)


@app.command()
@_table_command("serve", [
    _arg("run", Path, typer.Argument(..., help="run folder (or its model/ folder)")),
    _arg("allow_origin", Optional[List[str]], typer.Option(None, "--allow-origin", help="a web origin allowed to call "
                                                           "the API from a browser (CORS); repeatable; default none")),
    _arg("trusted_host", Optional[List[str]], typer.Option(None, "--trusted-host", help="a Host header to accept "
                                                           "(repeatable; default: the bound address, or any on 0.0.0.0)")),
    _arg("label", Optional[List[Path]], typer.Option(None, "--label", help="unlabelled files or folders: adds a "
                                                     "labelling page at /label (keys 1-9, Enter, s, u); needs --into")),
    _arg("into", Optional[Path], typer.Option(None, "--into", help="the dataset that --label copies answers into")),
    _arg("review", Optional[Path], typer.Option(None, "--review", help="an audit folder: adds a page at /review to "
                                                "keep, relabel or quarantine its likely label errors (undo: restore)")),
], {})
def serve(**given) -> None:
    """Web page with upload and a confidence bar chart, plus a JSON API (/predict, /health, /labels, /docs)."""
    from .params import check
    from .serve import Limits, access_for
    from .serve import serve as _serve

    run, origins, hosts = given.pop("run"), given.pop("allow_origin"), given.pop("trusted_host")
    label, into, review = given.pop("label"), given.pop("into"), given.pop("review")
    o = check("serve", {k: v for k, v in given.items() if v is not None})
    access = access_for(o["host"], o["api_key"], tuple(origins or ()), o["explorer"], o["insecure_no_auth"],
                        tuple(hosts or ()))
    if bool(label) != (into is not None):
        raise FoldernetError("serve --label and --into go together: --label UNLABELLED --into DATA")
    where = f"http://{o['host']}:{o['port']}"
    extra = (f"; labelling: {where}/label" if label else "") + (f"; review: {where}/review" if review else "")
    _serve(run, host=o["host"], port=o["port"], limits=Limits(max_bytes=int(o["max_upload_mb"] * 1024 * 1024)),
           access=access, label=(list(label), into) if label else None, review=review,
           on_ready=lambda: stdout.print(f"serving {run} on {where}  (API docs: {where}/docs{extra})"))


@app.command()
def suggest(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    inputs: List[Path] = typer.Argument(..., help="unlabelled files and/or folders"),
    n: Optional[int] = _opt("suggest", "n", "-n"),
    strategy: Optional[str] = _opt("suggest", "strategy"),
    out: Path = typer.Option(Path("suggest"), "--out", "-o", help="folder for suggest.csv and suggest.html"),
    force: bool = _opt("suggest", "force", "--force", default=False),
) -> None:
    """Which unlabelled files to label next: uncertain, unlike each other, no duplicates."""
    from .bundle import load
    from .modality import expand_inputs
    from .grow import suggest as _suggest
    from .grow import write_suggestions
    from .io import check_new_output
    from .params import check

    o = check("suggest", _given({"n": n, "strategy": strategy, "force": force}))
    folders = [p for p in inputs if p.is_dir()]
    check_new_output(out, o["force"], "suggest", folders)
    model = load(run)
    result = _suggest(model, expand_inputs(inputs), n=o["n"], strategy=o["strategy"])
    write_suggestions(out, result, model.audio, force=o["force"], inputs=folders)
    for s in result.chosen[:10]:
        stdout.print(f"{s.path}  guess {s.label} {s.confidence:.2f}  ({s.why})")
    more = f" (and {len(result.chosen) - 10} more)" if len(result.chosen) > 10 else ""
    stdout.print(f"suggested {len(result.chosen)} file(s){more}; {len(result.dropped)} duplicate(s) left out, "
                 f"{len(result.skipped)} unreadable: {out / 'suggest.csv'}, {out / 'suggest.html'}")


@app.command()
def autolabel(
    run: Path = typer.Argument(..., help="run folder (or its model/ folder)"),
    inputs: List[Path] = typer.Argument(..., help="unlabelled files and/or folders (never modified)"),
    out: Path = typer.Option(..., "--out", "-o", help="the dataset to add copies to: OUT/<label>/"),
    min_confidence: Optional[float] = _opt("autolabel", "min_confidence"),
) -> None:
    """Copy the files the model is sure of into OUT/<label>/, recorded so `foldernet restore` undoes it."""
    from .bundle import load
    from .grow import autolabel as _autolabel
    from .params import check

    o = check("autolabel", _given({"min_confidence": min_confidence}))
    r = _autolabel(load(run), list(inputs), out, min_confidence=o["min_confidence"])
    stdout.print(", ".join(f"{k} {v}" for k, v in r["counts"].items()))
    if r["manifest"]:
        stdout.print(f"undo with: foldernet restore {r['manifest']}")


@app.command()
def backbones() -> None:
    """Backbones foldernet can use here: which have weights on this machine now, which need them."""
    from .models import list_backbones

    for row in list_backbones():
        stdout.print(f"{row['name']:28s} {row['status']:14s} {row['note']}")


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
