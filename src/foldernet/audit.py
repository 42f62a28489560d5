"""``foldernet audit DATA``: what is wrong with this data before a model learns it.

Finds unreadable files, content that does not match its extension, tiny and extreme-aspect
images, flat placeholder-like images, files of an unusual type for their class, exact duplicates
(content hash), near duplicates (see below), duplicates that carry different labels (conflicts),
duplicates that sit in different splits (leakage), class imbalance, and likely label errors.

Near duplicates: two images are near duplicates when their 256-bit perceptual hashes (each
compared against the other's mirror image too, so flips are caught) differ in
- at most ``NEAR_DUP_MAX_BITS`` (32) bits AND their backbone embeddings have cosine similarity of at
  least ``NEAR_DUP_MIN_COSINE`` (0.75), or
- at most ``NEAR_DUP_STRONG_BITS`` (12) bits AND cosine at least ``NEAR_DUP_STRONG_MIN_COSINE`` (0.5).
Measured on hymenoptera, clothing and digits: copies that were flipped, resized to 70 % and
re-compressed at JPEG quality 60 differ by 0-14 bits with cosine >= 0.79 (small 160 px crops: 2-4
bits, cosine down to 0.71); genuinely different photos differ by >= 34 bits (hymenoptera) or, when
the hash alone is close (plain product shots on white), have cosine <= 0.70. Flat, textureless
images (sky) are the hard case: their hashes are unstable, so only the embedding can pair them.
The comparison is vectorised in blocks (no Python loop over pairs).

Likely label errors: out-of-fold predicted probabilities of a logistic regression on the cached
embeddings (5-fold), flagged by cleanlab's confident learning plus any example whose given label
gets <= 0.2 while another class gets >= 0.8; ranked by the given label's probability. Seconds for
thousands of images.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .data import Dataset, scan, thumbnail_data_uri
from .dedup import (NEAR_DUP_MAX_BITS, NEAR_DUP_MIN_COSINE, NEAR_DUP_STRONG_BITS,  # noqa: F401
                    NEAR_DUP_STRONG_MIN_COSINE, clusters, near_duplicate_pairs)
from .modality import MAX_ASPECT, TINY_MIN_SIDE, media_extensions, modality, modality_of
from .errors import FoldernetError
from .head import imbalance_ratio
from .params import FIXABLE
from .io import atomic_write_json, atomic_write_text, staged_dir
from .progress import console

CONFIDENT_OTHER_MAX_GIVEN = 0.2      # label issue: out-of-fold p(given label) at most this...
CONFIDENT_OTHER_MIN_SUGGESTED = 0.8  # ...while another class gets at least this
EXTENSION_FORMATS = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".gif": {"GIF"},
                     ".bmp": {"BMP", "DIB"}, ".webp": {"WEBP"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"}}


def out_of_fold_probs(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, folds: int = 5) -> np.ndarray | None:
    """Out-of-fold class probabilities from a logistic regression on embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import normalize

    counts = np.bincount(y, minlength=n_classes)
    folds = int(min(folds, counts[counts > 0].min()))
    if folds < 2 or (counts > 0).sum() < 2:
        return None
    xn = normalize(x)
    probs = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(xn, y):
        clf = LogisticRegression(C=10.0, max_iter=300)
        clf.fit(xn[tr], y[tr])
        probs[np.ix_(te, clf.classes_)] = clf.predict_proba(xn[te])
    return probs


def label_issues(x: np.ndarray, y: np.ndarray, labels: list[str], seed: int = 0) -> list[dict]:
    from cleanlab.filter import find_label_issues

    probs = out_of_fold_probs(x, y, len(labels), seed)
    if probs is None:
        return []
    present = np.flatnonzero(np.bincount(y, minlength=len(labels)) > 0)
    remap = {c: i for i, c in enumerate(present)}
    yy = np.array([remap[v] for v in y])
    pp = probs[:, present]
    pp = pp / np.maximum(pp.sum(1, keepdims=True), 1e-12)
    flagged = set(find_label_issues(yy, pp, return_indices_ranked_by="self_confidence").tolist())
    # cleanlab's per-class thresholds are relative to how confident the model is on each class; with
    # overconfident embeddings a confidently-other example can fall below them, so add those too.
    given_p = pp[np.arange(len(yy)), yy]
    flagged |= set(np.flatnonzero((given_p <= CONFIDENT_OTHER_MAX_GIVEN) &
                                  (pp.max(1) >= CONFIDENT_OTHER_MIN_SUGGESTED)).tolist())
    out = []
    for i in sorted(flagged, key=lambda k: given_p[k]):
        out.append({"index": int(i), "given": labels[y[i]], "suggested": labels[present[int(pp[i].argmax())]],
                    "given_prob": round(float(pp[i, yy[i]]), 4), "suggested_prob": round(float(pp[i].max()), 4)})
    return out


def _file_format(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format
    except Exception:  # noqa: BLE001 - unreadable files are reported elsewhere
        return None


def audit(data: str | os.PathLike, out: str | os.PathLike | None = None, **options) -> dict:
    """Audit a class-folder dataset; write ``audit.json`` and ``audit.html`` to ``out`` when given.
    Options: those of ``foldernet audit`` (``params.AUDIT``), checked before any work."""
    from concurrent.futures import ThreadPoolExecutor

    from .encoder import Encoder
    from .io import check_data_dir, check_new_output
    from .params import check
    from .split import resolve_splits

    o = check("audit", options)
    data = check_data_dir(data)
    t0 = time.perf_counter()
    if out is not None:
        check_new_output(out, o["force"], "audit", [data])
    ds = scan(data, label_regex=o["label_regex"], group_regex=o["group_regex"])
    resolve_splits(ds, o["splits"], o["val"], o["test"], o["seed"])
    items = ds.items
    encoder = Encoder.build(o["backbone"], ds.kind, weights=o["weights"], paths=[it.path for it in items])
    bb, audio_cfg, seed, find_label_errors = encoder.backbone, encoder.audio, o["seed"], o["find_label_errors"]
    feats = encoder.extractor()([it.path for it in items], desc="audit: features", progress=o["progress"])
    fps = [fp if feats.ok[i] else None for i, fp in enumerate(feats.fingerprints)]

    findings: dict[str, list[dict]] = defaultdict(list)
    for rel, reason in ds.skipped:
        if Path(rel).suffix.lower() in media_extensions() or "image" in reason:
            findings["unreadable"].append({"path": rel, "reason": reason})
    for i, reason in sorted(feats.errors.items()):
        findings["unreadable"].append({"path": items[i].relpath, "reason": reason})

    with ThreadPoolExecutor(8) as pool:
        formats = list(pool.map(_file_format, [it.path for it in items]))
    by_class_format: dict[str, Counter] = defaultdict(Counter)
    for it, fmt in zip(items, formats):
        if fmt:
            by_class_format[it.label][fmt] += 1
    for i, (it, fmt, fp) in enumerate(zip(items, formats, fps)):
        ext = it.path.suffix.lower()
        if fmt and fmt not in EXTENSION_FORMATS.get(ext, {fmt}):
            findings["wrong_type"].append({"path": it.relpath, "reason": f"{ext} file holds {fmt} data"})
        if fp is None:
            continue
        kind = modality_of(it.path) or modality(ds.kind)
        for finding, entry in kind.file_findings(it.relpath, fp):
            findings[finding].append(entry)
        if kind.kind != "image":
            continue
        counts = by_class_format[it.label]
        total = sum(counts.values())
        major, n_major = counts.most_common(1)[0] if counts else (None, 0)
        if fmt and fmt != major and total >= 20 and n_major / total >= 0.9:
            findings["unusual_type"].append({"path": it.relpath, "reason": f"a {fmt} among {n_major} {major} files "
                                             f"of class '{it.label}': a scraped placeholder?"})

    for finding, entry in modality(ds.kind).dataset_findings([fp for fp in fps if fp], audio_cfg):
        findings[finding].append(entry)
    # exact duplicates
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(feats.hashes):
        if h and feats.ok[i]:
            groups[h].append(i)
    exact_pairs = []
    for members in groups.values():
        if len(members) > 1:
            labels_in = sorted({items[i].label for i in members})
            findings["exact_duplicate"].append({"paths": [items[i].relpath for i in members], "labels": labels_in})
            exact_pairs += [(members[0], j) for j in members[1:]]
    # near duplicates
    near = [p for p in near_duplicate_pairs(feats.vectors, fps) if feats.hashes[p[0]] != feats.hashes[p[1]]]
    for i, j, bits, cos in near:
        findings["near_duplicate"].append({"paths": [items[i].relpath, items[j].relpath], "hash_bits": bits,
                                           "cosine": round(cos, 4), "labels": sorted({items[i].label, items[j].label})})
    all_pairs = [(i, j) for i, j in exact_pairs] + [(i, j) for i, j, _, _ in near]
    for i, j in all_pairs:
        if items[i].label != items[j].label:
            findings["conflict"].append({"paths": [items[i].relpath, items[j].relpath],
                                         "labels": [items[i].label, items[j].label]})
        if items[i].split != items[j].split:
            a, b = (i, j) if items[i].split == "train" else (j, i)
            findings["leakage"].append({"path": items[b].relpath, "split": items[b].split,
                                        "duplicate_of": items[a].relpath, "duplicate_split": items[a].split,
                                        "labels": sorted({items[a].label, items[b].label})})

    counts = ds.counts()
    imbalance = imbalance_ratio(counts)

    if find_label_errors and len(ds.classes) > 1:
        ok_idx = np.flatnonzero(feats.ok)
        index = {c: k for k, c in enumerate(ds.classes)}
        y = np.array([index[items[i].label] for i in ok_idx])
        for issue in label_issues(feats.vectors[ok_idx], y, ds.classes, seed):
            i = ok_idx[issue.pop("index")]
            findings["label_issue"].append({"path": items[i].relpath, **issue})

    report = {
        "data": ds.root.as_posix(), "images": len(items), "classes": ds.classes, "class_counts": counts,
        "imbalance_ratio": round(imbalance, 3), "splits_source": ds.splits_source or
        ("folders" if ds.predefined_split else "hashed"),
        "split_counts": {s: sum(1 for it in items if it.split == s) for s in ("train", "val", "test")},
        "thresholds": {"near_duplicate_max_hash_bits": NEAR_DUP_MAX_BITS, "near_duplicate_min_cosine":
                       NEAR_DUP_MIN_COSINE, "near_duplicate_strong_bits": NEAR_DUP_STRONG_BITS,
                       "near_duplicate_strong_min_cosine": NEAR_DUP_STRONG_MIN_COSINE, "tiny_min_side": TINY_MIN_SIDE, "max_aspect": MAX_ASPECT},
        "backbone": bb.name, "findings": {k: v for k, v in findings.items()},
        "summary": {k: len(v) for k, v in findings.items()}, "warnings": ds.warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        with staged_dir(out, force=o["force"], kind="audit", inputs=[data]) as tmp:
            atomic_write_json(tmp / "audit.json", report)
            atomic_write_text(tmp / "audit.html", render_html(report, ds))
    return report


def label_conflicts(report: dict) -> list[list[str]]:
    """Groups of duplicate files filed under different labels: ``--fix`` moves none of them, since
    only a person can tell which label is right."""
    groups = [f["paths"] for f in report["findings"].get("exact_duplicate", []) if len(f["labels"]) > 1]
    groups += [f["paths"] for f in report["findings"].get("conflict", [])]
    return [list(g) for g in dict.fromkeys(tuple(sorted(g)) for g in groups)]


def files_to_fix(report: dict, kinds: tuple[str, ...] = FIXABLE) -> dict[str, str]:
    """relpath -> reason for every file ``--fix`` would move. Of duplicates with one label, the first
    copy stays and only the extra copies move; duplicates that carry different labels never move
    (``label_conflicts`` lists them for a person to decide)."""
    in_conflict = {p for group in label_conflicts(report) for p in group}
    moves: dict[str, str] = {}
    for finding in kinds:
        for f in report["findings"].get(finding, []):
            if finding == "exact_duplicate":
                if len(f["labels"]) == 1:
                    for p in f["paths"][1:]:
                        moves.setdefault(p, f"exact duplicate of {f['paths'][0]}")
            elif finding == "leakage":
                if len(f.get("labels", [])) > 1 or f["path"] in in_conflict:
                    continue
                moves.setdefault(f["path"], f"duplicate of {f['duplicate_of']} in {f['duplicate_split']}")
            else:
                moves.setdefault(f["path"], f"{finding}: {f.get('reason', '')}".strip(": "))
    return moves


def quarantine(data: str | os.PathLike, moves: dict[str, str], dest: str | os.PathLike | None = None) -> Path:
    """Move files out of the dataset into ``dest`` (default DATA.quarantine), keeping their relative
    paths, and record every move in ``manifest.json`` so ``restore`` can put them back. Nothing is deleted."""
    root = Path(data).resolve()
    dest = Path(dest) if dest else root.parent / f"{root.name}.quarantine"
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else \
        {"data": root.as_posix(), "moved": []}
    for rel, reason in sorted(moves.items()):
        src = root / rel
        if not src.exists():
            continue
        target = dest / "files" / rel
        n = 1
        while target.exists():
            target = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(target))
        manifest["moved"].append({"path": rel, "stored": target.relative_to(dest).as_posix(), "reason": reason})
        atomic_write_json(manifest_path, manifest)  # after every move: a crash never loses track of a file
    return manifest_path


def restore(manifest: str | os.PathLike) -> int:
    """Undo what a manifest records: quarantined files go back where they came from (never over a
    file that is there now); an autolabel manifest's copies are removed (only those still byte-identical
    to what was copied). Returns how many files were restored or removed."""
    from .io import read_json

    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / "manifest.json"
    info = read_json(manifest)
    if not isinstance(info, dict) or not ({"moved", "copied"} & set(info)) or "data" not in info:
        raise FoldernetError(f"{manifest} is not a foldernet manifest (from audit --fix or autolabel)")
    if info.get("kind") in ("autolabel", "label"):
        from .grow import undo_autolabel

        removed, kept = undo_autolabel(info)
        for line in kept:
            console.print(f"not removed: {line}", markup=False)
        info["copied"] = [e for e in info["copied"] if (Path(info["data"]) / e["path"]).is_file()]
        atomic_write_json(manifest, info)
        return removed
    root, base = Path(info["data"]), manifest.parent
    restored, remaining = 0, []
    for entry in info["moved"]:
        src, dst = (base / entry["stored"]).resolve(), (root / entry["path"]).resolve()
        # a manifest only ever moves files between the dataset and its quarantine folder
        if not dst.is_relative_to(root.resolve()) or not (src.is_relative_to(base.resolve())
                                                          or src.is_relative_to(root.resolve())):
            remaining.append(entry)
            console.print(f"not restored (outside the dataset and its quarantine): {entry['path']}", markup=False)
            continue
        if not src.exists():
            continue
        if dst.exists():
            remaining.append(entry)
            console.print(f"not restored (a file is already there): {dst}", markup=False)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        restored += 1
    info["moved"] = remaining
    atomic_write_json(manifest, info)
    return restored


# ------------------------------------------------------------------------------------------ HTML

TITLES = {"unreadable": "Unreadable files", "wrong_type": "Content does not match the extension",
          "tiny": "Tiny images", "extreme_aspect": "Extreme aspect ratio", "low_information":
          "Flat, placeholder-like images", "unusual_type": "Unusual file type for the class",
          "exact_duplicate": "Exact duplicates", "near_duplicate": "Near duplicates", "conflict":
          "Duplicates with different labels", "leakage": "Leakage: duplicates across splits",
          "label_issue": "Likely label errors", "silent": "Silent audio", "clipped": "Clipped audio",
          "too_short": "Audio too short", "mixed_sample_rates": "Mixed sample rates"}


def render_html(report: dict, ds: Dataset, max_thumbs: int = 400) -> str:
    """One self-contained page: summary, class counts, then each finding with thumbnails."""
    root = ds.root
    budget = [max_thumbs]

    def thumb(rel: str) -> str:
        if budget[0] <= 0:
            return f"<figure><figcaption>{html.escape(rel)}</figcaption></figure>"
        budget[0] -= 1
        uri = thumbnail_data_uri(root / rel, 112)
        img = f'<img src="{uri}" alt="">' if uri else '<div class="noimg">no preview</div>'
        return f"<figure>{img}<figcaption>{html.escape(rel)}</figcaption></figure>"

    parts = [f"<h1>Audit of {html.escape(report['data'])}</h1>",
             f"<p>{report['images']} images, {len(report['classes'])} classes, imbalance ratio "
             f"{report['imbalance_ratio']:.2f}, splits from {html.escape(str(report['splits_source']))} "
             f"(train {report['split_counts']['train']}, val {report['split_counts']['val']}, test "
             f"{report['split_counts']['test']}); {report['seconds']} s.</p>"]
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td class=n>{n}</td><td><div class=bar style='width:"
                   f"{100 * n / max(report['class_counts'].values() or [1]):.0f}%'></div></td></tr>"
                   for c, n in report["class_counts"].items())
    parts.append(f"<h2>Classes</h2><table>{rows}</table>")
    summary = "".join(f"<li><a href='#{k}'>{TITLES.get(k, k)}</a>: {v}</li>" for k, v in report["summary"].items())
    parts.append(f"<h2>Findings</h2><ul>{summary or '<li>nothing found</li>'}</ul>")
    for kind, entries in report["findings"].items():
        parts.append(f"<h2 id='{kind}'>{TITLES.get(kind, kind)} ({len(entries)})</h2><div class=grid>")
        for e in entries[:100]:
            if "paths" in e:
                figs = "".join(thumb(p) for p in e["paths"][:4])
                extra = ", ".join(f"{k}: {html.escape(str(v))}" for k, v in e.items() if k != "paths")
                parts.append(f"<div class=group>{figs}<p>{extra}</p></div>")
            else:
                extra = ", ".join(f"{k}: {html.escape(str(v))}" for k, v in e.items() if k != "path")
                parts.append(f"<div class=group>{thumb(e['path'])}<p>{extra}</p></div>")
        if len(entries) > 100:
            parts.append(f"<p>... and {len(entries) - 100} more in audit.json</p>")
        parts.append("</div>")
    style = ("body{font-family:system-ui,sans-serif;margin:20px;color:#1d232b} table{border-collapse:collapse}"
             "td{padding:2px 8px} td.n{text-align:right} .bar{background:#457b9d;height:12px;min-width:2px;width:0}"
             "table td:last-child{width:300px} .grid{display:flex;flex-wrap:wrap;gap:10px}"
             ".group{border:1px solid #ddd;border-radius:8px;padding:6px;max-width:520px;display:flex;flex-wrap:wrap;gap:6px}"
             ".group p{flex-basis:100%;margin:2px;font-size:12px} figure{margin:0;width:116px}"
             "figure img{width:112px;height:112px;object-fit:cover;border-radius:4px}"
             "figcaption{font-size:10px;word-break:break-all} .noimg{width:112px;height:112px;background:#eee;"
             "display:flex;align-items:center;justify-content:center;font-size:11px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>foldernet audit</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
