"""Grow the data: which unlabelled files are worth labelling next (``suggest``), and copying the
ones the model is sure of into the dataset (``autolabel``), every copy recorded so that
``foldernet restore`` undoes it. Both read a trained bundle and never modify their inputs.

Selection works on what a bundle already computes: calibrated probabilities (how unsure the model
is) and embeddings (how alike two files are). The default picks among the most uncertain files
greedily, each time the one that is most uncertain *and* least like anything picked so far, so a
batch is not a hundred near-identical hard cases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FoldernetError
from .io import atomic_write_json, check_outside_inputs
from .params import check

STRATEGIES = ("default", "margin", "entropy", "diverse")
NEAR_DUPLICATE_COSINE = 0.95   # embeddings this alike: the same picture, for labelling purposes
CANDIDATES_PER_PICK = 4        # default strategy: diversity is sought among the 4n most uncertain


@dataclass
class Suggestion:
    path: str
    label: str                      # the model's guess
    confidence: float
    top: list[tuple[str, float]]
    uncertainty: float              # 0 (sure) .. 1 (a coin toss between the top two)
    why: str


@dataclass
class Suggestions:
    chosen: list[Suggestion]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # unreadable: (path, reason)
    dropped: list[tuple[str, str]] = field(default_factory=list)   # duplicates: (path, of what)


def uncertainty(probs: np.ndarray, strategy: str = "margin") -> np.ndarray:
    """How much labelling each row would teach: 1 - margin between the top two (default), or the
    normalised entropy."""
    if strategy == "entropy":
        p = np.clip(probs, 1e-12, 1)
        return -(p * np.log(p)).sum(1) / np.log(probs.shape[1])
    top2 = -np.sort(-probs, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def select(probs: np.ndarray, vectors: np.ndarray, n: int, strategy: str = "default") -> tuple[list[int], list[str]]:
    """Rows to label next, in order, and why each was chosen.

    ``margin``/``entropy``: the n most uncertain. ``diverse``: greedy k-center on the embeddings (each
    pick the row least like every earlier pick). ``default``: among the ``CANDIDATES_PER_PICK * n`` most
    uncertain by margin, each pick maximises uncertainty x distance to the earlier picks."""
    n = min(n, len(probs))
    if n <= 0:
        return [], []
    u = uncertainty(probs, "entropy" if strategy == "entropy" else "margin")
    if strategy in ("margin", "entropy"):
        order = np.argsort(-u, kind="stable")[:n].tolist()
        return order, [f"{strategy}: uncertainty {u[i]:.2f}" for i in order]
    unit = _unit(vectors)
    pool = np.arange(len(probs)) if strategy == "diverse" else \
        np.argsort(-u, kind="stable")[:min(len(probs), CANDIDATES_PER_PICK * n)]
    weight = np.ones(len(pool)) if strategy == "diverse" else u[pool]
    distance = np.ones(len(pool))        # 1 - cosine to the nearest pick so far
    picked: list[int] = []
    why: list[str] = []
    for _ in range(n):
        score = weight * distance
        score[[pool.tolist().index(i) for i in picked]] = -1
        j = int(np.argmax(score))
        i = int(pool[j])
        picked.append(i)
        why.append(f"uncertainty {u[i]:.2f}, {distance[j]:.2f} from the nearest earlier pick" if strategy == "default"
                   else f"diverse: {distance[j]:.2f} from the nearest earlier pick")
        distance = np.minimum(distance, 1.0 - unit[pool] @ unit[i])
    return picked, why


def duplicates(vectors: np.ndarray, hashes: list[str | None], index_unit: np.ndarray | None,
               names: list[str]) -> dict[int, str]:
    """Rows to leave out, with the reason: exact copies (same bytes) and near copies of an earlier row,
    and near copies of a training example (``index_unit``: the bundle's unit embeddings)."""
    out: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h in first:
            out[i] = f"exact duplicate of {names[first[h]]}"
        elif h is not None:
            first[h] = i
    unit = _unit(vectors)
    if index_unit is not None and len(index_unit):
        for start in range(0, len(unit), 1024):
            best = (unit[start:start + 1024] @ index_unit.T).max(1)
            for k in np.flatnonzero(best >= NEAR_DUPLICATE_COSINE):
                out.setdefault(start + int(k), f"near duplicate of a training example (cosine {best[k]:.3f})")
    kept: list[int] = []
    for i in range(len(unit)):
        if i in out:
            continue
        if kept:
            sims = unit[kept] @ unit[i]
            j = int(np.argmax(sims))
            if sims[j] >= NEAR_DUPLICATE_COSINE:
                out[i] = f"near duplicate of {names[kept[j]]} (cosine {sims[j]:.3f})"
                continue
        kept.append(i)
    return out


def _sha256(source) -> str | None:
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return None


def suggest(model, inputs, n: int = 100, strategy: str = "default") -> Suggestions:
    """The ``n`` files of ``inputs`` most worth labelling next (see ``select``), duplicates of each
    other and of the training set left out, unreadable files listed with the reason."""
    from .modality import expand_inputs

    o = check("suggest", {"n": n, "strategy": strategy})
    sources = expand_inputs(inputs)
    batch = model.predict_batch(sources, progress=len(sources) > 256)
    names = [str(s) for s in sources]
    skipped = [(names[i], r) for i, r in sorted(batch.errors.items())]
    ok = np.flatnonzero(batch.ok)
    if not len(ok):
        return Suggestions([], skipped)
    vectors = batch.features[ok] if batch.features is not None else np.eye(len(ok), dtype=np.float32)
    index = model.index
    dropped = duplicates(vectors, [_sha256(sources[i]) for i in ok], index.embeddings if index is not None else None,
                         [names[i] for i in ok])
    keep = np.array([k for k in range(len(ok)) if k not in dropped], int)
    probs = batch.probs[ok][keep]
    order, why = select(probs, vectors[keep], o["n"], o["strategy"])
    u = uncertainty(probs)
    chosen = []
    for j, reason in zip(order, why):
        row = probs[j]
        top = [(model.labels[c], float(row[c])) for c in np.argsort(-row)[:3]]
        chosen.append(Suggestion(names[ok[keep[j]]], top[0][0], top[0][1], top, float(u[j]), reason))
    return Suggestions(chosen, skipped, [(names[ok[k]], r) for k, r in sorted(dropped.items())])


# ------------------------------------------------------------------------------------------ autolabel

def copy_into(src: Path, data: Path, label: str, manifest: dict, manifest_path: Path, **facts) -> dict | None:
    """Copy ``src`` into ``data/label/`` (never over another file: a different file of the same name
    gets the content hash in its name; the same bytes already there are not copied again) and record
    the copy in the manifest, written after every copy. Returns the entry, or None when nothing was
    copied."""
    digest = _sha256(src)
    target = data / label / src.name
    if target.exists():
        if _sha256(target) == digest:
            return None
        target = target.with_name(f"{target.stem}-{digest[:10]}{target.suffix}")
        if target.exists():
            return None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target)
    entry = {"source": str(src.resolve()), "path": target.relative_to(data).as_posix(), "sha256": digest,
             "label": label, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in facts.items()}}
    manifest["copied"].append(entry)
    atomic_write_json(manifest_path, manifest)  # after every copy: a crash never loses track of one
    return entry


def check_dataset_for(model, out: Path, folders) -> Path:
    """``out`` as a dataset this model may add to: not inside an input, not a file, and no class folder
    the model does not know (it cannot tell that class apart, so its guesses would be filed wrongly)."""
    out = check_outside_inputs(out, folders)
    if out.exists() and not out.is_dir():
        raise FoldernetError(f"--out {out} is a file; give the dataset folder (DATA/<class>/...)")
    unknown = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in model.labels) if out.is_dir() else []
    if unknown:
        raise FoldernetError(f"{out} has class folders the model does not know ({', '.join(unknown[:5])}); it "
                             "cannot tell them apart, so it will not file examples there. Train on them first.")
    return out


def _manifest(kind: str, out: Path, model, **facts) -> tuple[dict, Path]:
    path = out / ".foldernet" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    return {"kind": kind, "data": out.resolve().as_posix(), "model": str(getattr(model, "model_dir", "")),
            **facts, "copied": []}, path


def autolabel(model, inputs, out: str | os.PathLike, min_confidence: float = 0.98) -> dict:
    """Copy (never move) every input the model is sure of (calibrated confidence >= ``min_confidence``
    and not "not sure" by the bundle's open-set rule) into ``out/<label>/``, and record each copy (source,
    sha256, label, confidence) in ``out/.foldernet/autolabel-<time>.json`` so ``foldernet restore``
    can remove exactly those copies. Refuses a dataset with a class folder the model does not know:
    it cannot tell that class apart, so its guesses would be filed wrongly."""
    from .modality import expand_inputs

    o = check("autolabel", {"min_confidence": min_confidence})
    folders = [Path(s) for s in (inputs if isinstance(inputs, (list, tuple)) else [inputs])
               if isinstance(s, (str, os.PathLike)) and Path(s).is_dir()]
    out = check_dataset_for(model, Path(out), folders)
    sources = expand_inputs(inputs)
    preds = model.predict(sources, top_k=1)
    manifest, manifest_path = _manifest("autolabel", out, model, min_confidence=o["min_confidence"])
    counts = {"copied": 0, "already there": 0, "not sure": 0, "unreadable": 0}
    for src, p in zip(sources, preds):
        if p.error:
            counts["unreadable"] += 1
            continue
        if p.not_sure or p.confidence < o["min_confidence"]:
            counts["not sure"] += 1
            continue
        entry = copy_into(Path(src), out, p.label, manifest, manifest_path, confidence=p.confidence)
        counts["copied" if entry else "already there"] += 1
    return {"counts": counts, "manifest": manifest_path if counts["copied"] else None}


def undo_autolabel(manifest: dict) -> tuple[int, list[str]]:
    """Remove the copies an autolabel manifest records, each only while it still has the recorded
    bytes (then foldernet can prove it wrote it); returns (removed, kept with the reason)."""
    root = Path(manifest["data"]).resolve()
    removed, kept = 0, []
    for entry in manifest["copied"]:
        path = (root / entry["path"]).resolve()
        if not path.is_relative_to(root):
            kept.append(f"{entry['path']}: outside {root}; a manifest never points there, left alone")
            continue
        if not path.is_file():
            continue
        if _sha256(path) != entry["sha256"]:
            kept.append(f"{entry['path']}: changed since it was copied; left in place")
            continue
        path.unlink()  # proven ours: the copy autolabel wrote, byte for byte
        removed += 1
    return removed, kept


# ------------------------------------------------------------------------------------------ labelling

class LabelSession:
    """A person labelling suggested files one by one (the web page of ``serve --label``): the queue
    in suggestion order, each answer a copy into ``data/<class>/`` recorded in a manifest that
    ``foldernet restore`` undoes, and ``undo`` for the last answer. Files are addressed by index only."""

    def __init__(self, model, inputs, data: str | os.PathLike, limit: int = 1000):
        import threading

        from .modality import expand_inputs

        folders = [Path(s) for s in (inputs if isinstance(inputs, (list, tuple)) else [inputs]) if Path(s).is_dir()]
        self.data = check_dataset_for(model, Path(data), folders)
        self.labels = list(model.labels)
        result = suggest(model, expand_inputs(inputs), n=limit)
        self.items = result.chosen
        self.skipped, self.dropped = result.skipped, result.dropped
        self.manifest, self.manifest_path = _manifest("label", self.data, model)
        self.done: list[tuple[int, dict]] = []
        self.lock = threading.Lock()

    def queue(self) -> list[dict]:
        return [{"id": i, "name": Path(s.path).name, "guess": s.label, "confidence": round(s.confidence, 4),
                 "top": [[lab, round(p, 4)] for lab, p in s.top], "why": s.why} for i, s in enumerate(self.items)]

    def path(self, item: int) -> Path:
        if not 0 <= item < len(self.items):
            raise FoldernetError(f"no item {item}")
        return Path(self.items[item].path)

    def label(self, item: int, label: str) -> dict:
        if label not in self.labels:
            raise FoldernetError(f"unknown class {label!r}; the model knows {', '.join(self.labels)}")
        with self.lock:
            entry = copy_into(self.path(item), self.data, label, self.manifest, self.manifest_path, item=item)
            if entry is not None:
                self.done.append((item, entry))
        return {"item": item, "label": label, "path": entry["path"] if entry else None, "copied": entry is not None}

    def undo(self) -> dict:
        """Remove the last copy (only while it is byte-identical to what was copied)."""
        with self.lock:
            if not self.done:
                return {"undone": None}
            item, entry = self.done.pop()
            removed, kept = undo_autolabel({"data": str(self.data), "copied": [entry]})
            self.manifest["copied"] = [e for e in self.manifest["copied"] if e is not entry]
            atomic_write_json(self.manifest_path, self.manifest)
        return {"undone": item if removed else None, "note": "; ".join(kept)}


class ReviewSession:
    """A person walking through an audit's likely label errors and cross-label duplicates (the page of
    ``serve --review AUDIT_DIR``). Each decision acts on the person's word only: keep (nothing moves),
    relabel (the file moves to its new class folder in the dataset) or quarantine (it moves to
    DATA.quarantine/). Moves are recorded in a manifest that ``foldernet restore`` undoes; ``undo``
    reverses the last decision."""

    def __init__(self, audit_dir: str | os.PathLike, labels: list[str]):
        import threading

        from .io import read_json

        audit_dir = Path(audit_dir)
        report = read_json(audit_dir / "audit.json" if audit_dir.is_dir() else audit_dir)
        self.root = Path(report["data"])
        if not self.root.is_dir():
            raise FoldernetError(f"the audited data folder {self.root} is not there any more")
        self.labels = sorted(set(labels) | set(report.get("classes", [])))
        items = [{"path": e["path"], "given": e["given"], "suggested": e["suggested"],
                  "why": f"likely label error: {e['given']} {e['given_prob']:.0%}, {e['suggested']} "
                         f"{e['suggested_prob']:.0%}"} for e in report["findings"].get("label_issue", [])]
        for e in report["findings"].get("conflict", []):
            (a, b), (la, lb) = e["paths"][:2], e["labels"][:2]
            items += [{"path": a, "given": la, "suggested": lb, "other": b, "why": f"duplicate of {b} ({lb})"},
                      {"path": b, "given": lb, "suggested": la, "other": a, "why": f"duplicate of {a} ({la})"}]
        self.items = items
        quarantine = self.root.parent / f"{self.root.name}.quarantine"
        self.manifest_path = quarantine / f"review-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        self.manifest = {"kind": "review", "data": self.root.as_posix(), "moved": [], "kept": []}
        self.done: list[tuple[int, str, dict | None]] = []
        self.lock = threading.Lock()

    def queue(self) -> list[dict]:
        return [{"id": i, **{k: v for k, v in it.items() if k != "other"}, "name": Path(it["path"]).name,
                 "other_id": next((j for j, o in enumerate(self.items) if o["path"] == it.get("other")), None)}
                for i, it in enumerate(self.items)]

    def path(self, item: int) -> Path:
        if not 0 <= item < len(self.items):
            raise FoldernetError(f"no item {item}")
        path = (self.root / self.items[item]["path"]).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise FoldernetError(f"{self.items[item]['path']} is outside the audited folder; left alone")
        return path

    def _relabelled(self, rel: str, given: str, label: str) -> str:
        parts = Path(rel).parts
        if len(parts) < 2 or parts[-2] != given:
            raise FoldernetError(f"{rel} is not in a folder named {given}; relabel it by hand")
        return Path(*parts[:-2], label, parts[-1]).as_posix()

    def decide(self, item: int, decision: str, label: str | None = None) -> dict:
        """keep | relabel (to ``label``, default the suggested one) | quarantine."""
        with self.lock:
            src, it = self.path(item), self.items[item]
            if decision == "keep":
                self.manifest["kept"].append(it["path"])
                entry = None
            elif decision in ("relabel", "quarantine"):
                if not src.is_file():
                    raise FoldernetError(f"{it['path']} is not there any more")
                if decision == "relabel":
                    label = label or it["suggested"]
                    if label not in self.labels:
                        raise FoldernetError(f"unknown class {label!r}")
                    rel = self._relabelled(it["path"], it["given"], label)
                    target, reason = self.root / rel, f"relabelled {it['given']} -> {label} by a person"
                else:
                    target = self.manifest_path.parent / "files" / it["path"]
                    reason = f"quarantined by a person ({it['why']})"
                home = self.root if decision == "relabel" else self.manifest_path.parent
                if not target.resolve().is_relative_to(home.resolve()):
                    raise FoldernetError(f"{it['path']} would move outside {home}; nothing was moved")
                if target.exists():
                    raise FoldernetError(f"{target} exists already; nothing was moved")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(target))  # inside the dataset or its quarantine, on the person's word
                entry = {"path": it["path"], "stored": os.path.relpath(target, self.manifest_path.parent),
                         "reason": reason}
                self.manifest["moved"].append(entry)
            else:
                raise FoldernetError(f"decision must be keep, relabel or quarantine (got {decision!r})")
            atomic_write_json(self.manifest_path, self.manifest)
            self.done.append((item, decision, entry))
        return {"item": item, "decision": decision, "moved_to": entry["stored"] if entry else None}

    def undo(self) -> dict:
        """Reverse the last decision (a move goes back, unless a file now stands where it was)."""
        with self.lock:
            if not self.done:
                return {"undone": None}
            item, decision, entry = self.done.pop()
            if entry is None:
                self.manifest["kept"].remove(self.items[item]["path"])
            else:
                moved, home = self.manifest_path.parent / entry["stored"], self.root / entry["path"]
                if home.exists() or not moved.is_file():
                    self.done.append((item, decision, entry))
                    return {"undone": None, "note": f"{home} is occupied, or the moved file is gone"}
                shutil.move(str(moved), str(home))
                self.manifest["moved"].remove(entry)
            atomic_write_json(self.manifest_path, self.manifest)
        return {"undone": item, "decision": decision}


# ------------------------------------------------------------------------------------------ writing

def _media_html(path: str, audio_cfg) -> str:
    """A thumbnail for an image; for a sound its spectrogram and a player (small files only)."""
    import base64
    import html

    from .data import thumbnail_data_uri

    if audio_cfg is None:
        return f'<img loading="lazy" alt="" src="{thumbnail_data_uri(path, 140)}">'
    from .audio import spectrogram_png

    try:
        spec = base64.b64encode(spectrogram_png(path, audio_cfg)).decode()
    except Exception:  # noqa: BLE001 - a picture is a convenience; the row still names the file
        return f"<p>{html.escape(Path(path).name)}</p>"
    player = ""
    if Path(path).stat().st_size <= 2_000_000:
        kind = {".wav": "wav", ".mp3": "mpeg", ".ogg": "ogg", ".flac": "flac"}.get(Path(path).suffix.lower(), "wav")
        player = (f'<audio controls preload="none" src="data:audio/{kind};base64,'
                  f'{base64.b64encode(Path(path).read_bytes()).decode()}"></audio>')
    return f'<img alt="spectrogram" src="data:image/png;base64,{spec}">{player}'


def write_suggestions(out: str | os.PathLike, result: Suggestions, audio_cfg=None, force: bool = False,
                      inputs=()) -> Path:
    """``suggest.csv`` (path, guess, probabilities, why chosen; then skipped and dropped files with
    the reason) and ``suggest.html``: a contact sheet grouped by the model's guess."""
    import html

    from .io import atomic_write_csv, atomic_write_text, staged_dir

    rows = [[s.path, s.label, f"{s.confidence:.6f}", "|".join(f"{lab}:{p:.4f}" for lab, p in s.top),
             f"{s.uncertainty:.4f}", s.why, ""] for s in result.chosen]
    rows += [[p, "", "", "", "", "", f"skipped: {r}"] for p, r in result.skipped]
    rows += [[p, "", "", "", "", "", f"left out: {r}"] for p, r in result.dropped]
    groups: dict[str, list[Suggestion]] = {}
    for s in result.chosen:
        groups.setdefault(s.label, []).append(s)
    parts = []
    for label in sorted(groups):
        cards = "".join(
            f'<figure>{_media_html(s.path, audio_cfg)}<figcaption><b>{html.escape(Path(s.path).name)}</b><br>'
            f'{" · ".join(f"{html.escape(lab)} {p:.0%}" for lab, p in s.top)}<br><small>{html.escape(s.why)}</small>'
            f'</figcaption></figure>' for s in groups[label])
        parts.append(f'<section><h2>guessed {html.escape(label)} ({len(groups[label])})</h2>'
                     f'<div class="grid">{cards}</div></section>')
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>foldernet: what to label next</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:20px} .grid{display:flex;flex-wrap:wrap;gap:10px}"
            "figure{margin:0;width:180px} figure img{max-width:180px;max-height:140px} audio{width:180px}"
            "figcaption{font-size:12px}</style></head><body>"
            f"<h1>What to label next: {len(result.chosen)} files</h1><p>{len(result.skipped)} unreadable, "
            f"{len(result.dropped)} left out as duplicates (see suggest.csv).</p>" + "".join(parts) + "</body></html>")
    with staged_dir(out, force=force, kind="suggest", inputs=inputs) as tmp:
        atomic_write_csv(tmp / "suggest.csv", ["path", "guess", "confidence", "top", "uncertainty", "why", "note"],
                         rows)
        atomic_write_text(tmp / "suggest.html", page)
    return Path(out)
