"""How good is it really: top-1/top-k, macro-F1, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .calibration import (K_NEIGHBOURS, NOT_SURE_QUANTILE, choose_threshold, choose_thresholds,  # noqa: F401
                          ece_if_calibrated, expected_calibration_error, not_sure_mask, reliability_bins, risk_coverage)
from .errors import FoldernetError


def topk_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1))) if len(y) else float("nan")


def compute_metrics(probs: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    """Metrics of one labelled set as plain JSON-able values."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    if len(y) == 0:
        return {"n": 0}
    n_classes = len(labels)
    pred = probs.argmax(axis=1)
    idx = list(range(n_classes))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    present = s > 0  # macro averages over classes that occur in this set
    out = {
        "n": int(len(y)),
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(f1_score(y, pred, labels=[i for i in idx if present[i]], average="macro",
                                   zero_division=0)),
        "balanced_accuracy": float(np.mean(r[present])) if present.any() else float("nan"),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(s[i])} for i in idx},
        "confusion_matrix": confusion_matrix(y, pred, labels=idx).tolist(),
        "labels": list(labels),
    }
    for k in (3, 5):
        if n_classes > k:
            out[f"top{k}"] = topk_accuracy(probs, y, k)
    eps = 1e-12
    out["log_loss"] = float(-np.mean(np.log(probs[np.arange(len(y)), y] + eps)))
    return out


def most_confused(metrics: dict, n: int = 5) -> list[tuple[str, str, int]]:
    cm = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    pairs = [(labels[i], labels[j], int(cm[i, j])) for i in range(len(labels)) for j in range(len(labels))
             if i != j and cm[i, j] > 0]
    return sorted(pairs, key=lambda t: -t[2])[:n]


def plot_confusion_matrix(metrics: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Counts and row-normalised side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_bytes

    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    labels = metrics["labels"]
    n = len(labels)
    size = max(5.0, 0.45 * n + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    for ax, mat, name, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised (recall)", "{:.2f}")):
        ax.imshow(mat, cmap="Blues", vmin=0)
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        if n <= 25:
            hi = mat.max() or 1
            for i in range(n):
                for j in range(n):
                    if mat[i, j]:
                        ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if mat[i, j] > hi / 2 else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def metrics_table(metrics: dict, title: str):
    """A rich table: per-class precision/recall/F1/support, then the summary lines."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for label, m in metrics["per_class"].items():
        if m["support"] or m["precision"]:
            t.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    summary = f"accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}"
    for k in (3, 5):
        if f"top{k}" in metrics:
            summary += f"   top-{k} {metrics[f'top{k}']:.4f}"
    t.caption = summary + f"   (n={metrics['n']})"
    return t


def evaluate(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None,
             progress: bool = True) -> dict:
    """Evaluate a trained bundle on another labelled folder (e.g. a separate field test set).

    Class folders are matched to the bundle's labels by name; unknown classes are an error.
    Writes ``metrics.json`` and ``confusion_matrix.png`` into ``out`` when given.
    """
    from .bundle import load
    from .data import scan
    from .io import atomic_write_json

    model = load(run)
    ds = scan(data)
    unknown = sorted(set(ds.classes) - set(model.labels))
    if unknown:
        raise FoldernetError(f"{data} has classes the model does not know: {', '.join(unknown)}. "
                             f"Known: {', '.join(model.labels)}. Rename or remove those folders.")
    index = {c: i for i, c in enumerate(model.labels)}
    probs, feats, ok, errors = model.predict_batch([it.path for it in ds.items], progress=progress)
    y = np.array([index[it.label] for it in ds.items])
    unsure = None
    if model.threshold is not None and ok.any():
        unsure = model.not_sure(probs[ok], feats[ok] if feats is not None else None)
    metrics = score_split(probs[ok], y[ok], model.labels, not_sure=unsure, label_map=model.config.label_map)
    metrics["skipped"] = [(ds.items[i].relpath, r) for i, r in errors.items()] + list(ds.skipped)
    if out is not None:
        out = Path(out)
        atomic_write_json(out / "metrics.json", metrics)
        plot_confusion_matrix(metrics, out / "confusion_matrix.png", title=f"{Path(data).name}")
    return metrics


def score_split(probs: np.ndarray, y: np.ndarray, labels: list[str], raw: np.ndarray | None = None,
                not_sure: np.ndarray | None = None, label_map: dict[str, str] | None = None) -> dict:
    """Everything measured on one labelled set: metrics, calibration (ECE and reliability, also of the
    uncalibrated ``raw`` probabilities when given), the "not sure" rate and the accuracy on the rest,
    and the coarse-label metrics (under "coarse") when there is a label map."""
    m = compute_metrics(probs, y, labels)
    if not len(y):
        return m
    correct = probs.argmax(1) == y
    m["risk_coverage"] = risk_coverage(probs, y)
    m["ece"] = expected_calibration_error(probs.max(1), correct)
    m["ece_if_calibrated"] = ece_if_calibrated(probs.max(1))
    m["reliability"] = reliability_bins(probs.max(1), correct)
    if raw is not None:
        m["ece_uncalibrated"] = expected_calibration_error(raw.max(1), raw.argmax(1) == y)
        m["reliability_uncalibrated"] = reliability_bins(raw.max(1), raw.argmax(1) == y)
    if not_sure is not None:
        sure = ~not_sure
        m["not_sure_rate"] = float(1 - sure.mean())
        m["accuracy_when_sure"] = float(correct[sure].mean()) if sure.any() else float("nan")
    if label_map:
        cp, coarse = coarse_probs(probs, labels, label_map)
        m["coarse"] = compute_metrics(cp, np.array([coarse.index(label_map[labels[v]]) for v in y]), coarse)
    return m


def read_label_map(path: str | os.PathLike, labels: list[str]) -> dict[str, str]:
    """A CSV of fine,coarse (header optional); every fine label must be mapped."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FoldernetError(f"label map not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["fine", "coarse"]:
        rows = rows[1:]
    mapping = {r[0].strip(): r[1].strip() for r in rows if len(r) >= 2}
    missing = [c for c in labels if c not in mapping]
    if missing:
        raise FoldernetError(f"{path} maps no coarse label for: {', '.join(missing)} (expected lines fine,coarse)")
    return {c: mapping[c] for c in labels}


def coarse_probs(probs: np.ndarray, labels: list[str], label_map: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """Sum fine probabilities into their coarse groups."""
    coarse = sorted(set(label_map.values()))
    m = np.zeros((len(labels), len(coarse)), np.float32)
    for i, c in enumerate(labels):
        m[i, coarse.index(label_map[c])] = 1
    return probs @ m, coarse
