"""``foldernet report RUN``: one self-contained HTML file (plots and thumbnails embedded, no
external resources) that says how good the model really is. ``train`` writes it automatically."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

import numpy as np

from .bundle import BundleConfig
from .data import thumbnail_data_uri
from .evaluate import most_confused
from .io import atomic_write_text

SECTIONS = ["summary", "metrics", "per-class", "confusion", "confused-pairs", "curves", "calibration",
            "misclassified", "data-checks"]


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _uri(png: bytes | None) -> str | None:
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_png(history: list[dict]) -> bytes | None:
    if not history:
        return None
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, ax, title in (("loss", a, "loss"), ("acc", b, "accuracy / macro-F1")):
        for split in ("train", "val"):
            vals = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in vals):
                ax.plot(epochs, vals, label=f"{split} {key}", marker="o" if len(epochs) < 20 else None)
        if key == "acc" and any(h.get("val_macro_f1") is not None for h in history):
            ax.plot(epochs, [h.get("val_macro_f1") for h in history], label="val macro-F1",
                    marker="o" if len(epochs) < 20 else None)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    return _png(fig)


def _ece_chance(m: dict) -> str:
    """How much ECE a perfectly calibrated model would show on this split by chance alone."""
    band = m.get("ece_if_calibrated")
    if not band:
        return ""
    return (f"; a perfectly calibrated model would show {band['mean']:.4f} on these {m.get('n', '')} items by "
            f"chance (95 % of draws below {band['p95']:.4f})")


def reliability_png(m: dict) -> bytes | None:
    if "reliability" not in m:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ece_key, name in ((axes[0], "reliability_uncalibrated", "ece_uncalibrated", "before temperature"),
                                   (axes[1], "reliability", "ece", "after temperature scaling")):
        bins = m[key]
        centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
        acc = [b["accuracy"] if b["accuracy"] is not None else 0 for b in bins]
        ax.bar(centers, acc, width=0.09, color="#457b9d", edgecolor="#1d3557", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="#e63946", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {m[ece_key]:.3f}")
        ax.legend(loc="upper left")
    return _png(fig)


def risk_coverage_png(m: dict, point: dict | None) -> bytes | None:
    """Accuracy of the answers kept vs the share answered (most confident first), with the bundle's
    operating point when --min-precision chose one."""
    curve = m.get("risk_coverage")
    if not curve:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([c["coverage"] for c in curve], [c["accuracy"] for c in curve], marker="o", color="#1d3557")
    if point and point.get("threshold") is not None and point.get("val_coverage") is not None:
        ax.axhline(point["min_precision"], ls="--", color="#e63946", label=f"asked: {point['min_precision']:.0%}")
        ax.axvline(point["val_coverage"], ls=":", color="#e63946", label=f"answered on val: {point['val_coverage']:.0%}")
        ax.legend(loc="lower left")
    ax.set_xlabel("share answered (most confident first)")
    ax.set_ylabel("accuracy of the answers")
    ax.set_title("risk-coverage")
    ax.grid(alpha=0.3)
    return _png(fig)


def _operating_point_text(point: dict | None) -> str:
    if not point:
        return ""
    if point.get("threshold") is None:
        return f"<p>--min-precision {point['min_precision']}: no threshold reached it on val; the default rule stays.</p>"
    return (f"<p>Operating point (--min-precision {point['min_precision']}): answer when the calibrated "
            f"confidence is at least {point['threshold']:.4f}. On val it answers {_pct(point['val_coverage'])} at "
            f"{_pct(point['val_precision'])}; cross-fitted on unseen halves of val: {_pct(point['crossfit_coverage'])} "
            f"at {_pct(point['crossfit_precision'])}.</p>")


def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _audio_settings(cfg: dict) -> str:
    """How the model hears: the spectrogram settings the bundle keeps (and predict reuses)."""
    a = cfg["audio"]
    return (f"{a['sample_rate']} Hz mono, {a['window_seconds']:g} s windows (half overlap), log-mel spectrogram: "
            f"{a['n_mels']} mel bands ({a.get('mel_scale', 'htk')} scale, {a['fmin']:g}-{a['fmax']:g} Hz), "
            f"n_fft {a['n_fft']}, hop {a['hop_length']}, {a['top_db']:g} dB range"
            + ("; with spectrogram statistics" if cfg.get("spectrogram_stats") else ""))


def write_report(run: str | os.PathLike, data_root: str | os.PathLike | None = None, max_gallery: int = 48,
                 title: str | None = None) -> Path:
    run = Path(run)
    title = title or run.resolve().name
    model_dir = run / "model"
    cfg = BundleConfig.read(model_dir).to_dict()
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    root = Path(data_root) if data_root else Path(cfg["data"]["root"])
    split = metrics.get("reported_split")
    m = metrics["splits"].get(split, {}) if split else {}
    e = html.escape
    parts: list[str] = []

    counts = cfg["data"]["counts"]
    sizes = {s: sum(v.values()) for s, v in counts.items()}
    t = metrics.get("timings", {})
    parts.append("<section id='summary'><h2>Summary</h2>" + _table(["", ""], [
        ["data", e(cfg["data"]["root"])],
        ["classes", f"{len(cfg['labels'])}: " + e(", ".join(cfg["labels"][:30])) + (" ..." if len(cfg["labels"]) > 30 else "")],
        ["split sizes", f"train {sizes.get('train', 0)}, val {sizes.get('val', 0)}, test {sizes.get('test', 0)}"
         + (" (from the folder layout)" if cfg["data"].get("predefined_split") else "")],
        ["backbone", f"{e(cfg['backbone'])} ({e(cfg['weights_source'])}), mode {e(cfg['mode'])}, engine {e(cfg.get('engine', ''))}"
                     + (", test-time flip (each input averaged with its mirror image)" if cfg.get("tta") else "")],
        *([["sound", _audio_settings(cfg)]] if cfg.get("audio") else []),
        *([["refit", f"head retrained on train + val ({cfg['refit']['rows']} examples) for the "
                     f"{cfg['refit']['epochs']} epochs early stopping chose on val; the val figures are those "
                     f"of the head trained on train alone, the test figures those of the refitted head"]]
          if cfg.get("refit") else []),
        ["time", ", ".join(f"{k} {v:.1f}s" for k, v in t.items())],
        ["created", e(cfg.get("created", ""))]]) + "</section>")

    if m:
        rows = [["top-1 accuracy", _pct(m["accuracy"])], ["macro-F1", f"{m['macro_f1']:.4f}"],
                ["balanced accuracy", _pct(m.get("balanced_accuracy"))]]
        for k in (3, 5):
            if f"top{k}" in m:
                rows.append([f"top-{k} accuracy", _pct(m[f"top{k}"])])
        if "ece" in m:
            rows.append(["expected calibration error", f"{m['ece_uncalibrated']:.4f} before, {m['ece']:.4f} after "
                         f"temperature scaling (T = {cfg['temperature']:.3f}"
                         + (", on unit-normalised logits" if cfg.get("logit_norm") else "") + ")" + _ece_chance(m)])
        if cfg.get("threshold") is not None:
            rows.append(["'not sure' threshold", f"{cfg['threshold']:.4f} ({e(cfg.get('threshold_rule', ''))}); "
                         f"{_pct(m.get('not_sure_rate'))} of this split is 'not sure', accuracy when sure "
                         f"{_pct(m.get('accuracy_when_sure'))}"])
        other = [s for s in metrics["splits"] if s != split]
        for s in other:
            o = metrics["splits"][s]
            rows.append([f"{s} split", f"accuracy {_pct(o['accuracy'])}, macro-F1 {o['macro_f1']:.4f} (n={o['n']})"])
        parts.append(f"<section id='metrics'><h2>Metrics on the {e(split)} split (n={m['n']})</h2>"
                     + _table(["metric", "value"], rows) + "</section>")
        pc = [[e(c), _pct(v["precision"]), _pct(v["recall"]), f"{v['f1']:.3f}", str(v["support"])]
              for c, v in m["per_class"].items()]
        parts.append("<section id='per-class'><h2>Per class</h2>"
                     + _table(["class", "precision", "recall", "F1", "support"], pc, "num") + "</section>")
        cm_png = run / "confusion_matrix.png"
        img = f"<img alt='confusion matrix' src='{_uri(cm_png.read_bytes())}'>" if cm_png.exists() else ""
        parts.append(f"<section id='confusion'><h2>Confusion matrix</h2>{img}</section>")
        pairs = most_confused(m, 10)
        parts.append("<section id='confused-pairs'><h2>Most confused pairs</h2>"
                     + (_table(["true", "predicted as", "count"], [[e(a), e(b), str(n)] for a, b, n in pairs])
                        if pairs else "<p>none</p>") + "</section>")
        for s, cm in metrics.get("coarse", {}).items():
            parts.append(f"<section id='coarse-{s}'><h2>Coarse labels ({e(s)} split)</h2>"
                         f"<p>accuracy {_pct(cm['accuracy'])}, macro-F1 {cm['macro_f1']:.4f}</p>"
                         + _table(["coarse class", "precision", "recall", "F1", "support"],
                                  [[e(c), _pct(v["precision"]), _pct(v["recall"]), f"{v['f1']:.3f}", str(v["support"])]
                                   for c, v in cm["per_class"].items()], "num") + "</section>")
    saved = run / "curves.png"  # train already drew it; draw only when it is missing
    curves = _uri(saved.read_bytes() if saved.exists() else curves_png(metrics.get("history", [])))
    parts.append("<section id='curves'><h2>Training curves</h2>"
                 + (f"<img alt='training curves' src='{curves}'>" if curves else "<p>no history</p>") + "</section>")
    rel = _uri(reliability_png(m)) if m else None
    rc = _uri(risk_coverage_png(m, cfg.get("operating_point"))) if m else None
    parts.append("<section id='calibration'><h2>Calibration (reliability diagram) and risk-coverage</h2>"
                 + (f"<img alt='reliability diagram' src='{rel}'>" if rel else "<p>no validation data</p>")
                 + (f"<img alt='risk-coverage curve' src='{rc}'>" if rc else "")
                 + _operating_point_text(cfg.get("operating_point")) + "</section>")

    gallery = []
    pred_file = run / "predictions.csv"
    if pred_file.exists():
        with open(pred_file, newline="", encoding="utf-8") as f:
            wrong = [r for r in csv.DictReader(f) if r["split"] == split and r["label"] != r["predicted"]]
        wrong.sort(key=lambda r: -float(r["confidence"]))
        for r in wrong[:max_gallery]:
            uri = thumbnail_data_uri(root / r["path"])
            img = f"<img src='{uri}' alt=''>" if uri else "<div class='noimg'>no preview</div>"
            gallery.append(f"<figure>{img}<figcaption><b>{e(r['predicted'])}</b> {_pct(float(r['confidence']))}"
                           f"<br>true: {e(r['label'])}<br><small>{e(r['path'])}</small></figcaption></figure>")
    parts.append("<section id='misclassified'><h2>Misclassified, most confident first</h2><div class='gallery'>"
                 + ("".join(gallery) or "<p>no mistakes on this split</p>") + "</div></section>")

    checks = [["skipped files", str(len(metrics.get("skipped", [])))],
              ["val/test images duplicating training images", str(cfg.get("leakage", {}).get("held_out_duplicates", 0))],
              ["class imbalance ratio (train)", f"{cfg['balance']['imbalance_ratio']:.2f}"
               + (" (class-weighted loss)" if cfg["balance"].get("class_weights") else "")]]
    audit_file = run / "audit.json"
    if audit_file.exists():
        audit = json.loads(audit_file.read_text(encoding="utf-8"))
        checks += [[f"audit: {k}", str(v)] for k, v in audit.get("summary", {}).items()]
    skipped = metrics.get("skipped", [])[:50]
    parts.append("<section id='data-checks'><h2>Data checks</h2>" + _table(["check", "result"], checks)
                 + (_table(["skipped file", "reason"], [[e(a), e(b)] for a, b in skipped]) if skipped else "")
                 + "</section>")

    style = ("body{font-family:system-ui,-apple-system,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}"
             "header{background:#1d3557;color:#fff;padding:14px 24px}main{max-width:1100px;margin:auto;padding:12px}"
             "section{background:#fff;border-radius:10px;padding:12px 18px;margin:12px 0;box-shadow:0 1px 3px #0002}"
             "table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}"
             "table.num td:not(:first-child){text-align:right}img{max-width:100%}"
             ".gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:130px;font-size:12px}"
             "figure img{width:120px;height:120px;object-fit:cover;border-radius:6px}"
             ".noimg{width:120px;height:120px;background:#eee}nav a{color:#fff;margin-right:10px;font-size:13px}")
    nav = "".join(f"<a href='#{s}'>{s}</a>" for s in SECTIONS)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>foldernet report</title>"
            f"<style>{style}</style></head><body><header><h1>foldernet report: {e(title)}</h1><nav>{nav}</nav>"
            f"</header><main>{''.join(parts)}</main></body></html>")
    return atomic_write_text(run / "report.html", page)
