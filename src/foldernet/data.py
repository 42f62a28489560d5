"""Finding labelled files in folders and turning any odd image into the RGB pixels a model expects.

Layouts understood (class names are folder names, any Unicode):
  DATA/<class>/<files>                      -> foldernet makes a stable split
  DATA/{train,val,test}/<class>/<files>     -> the given split is respected
    (``valid`` / ``validation`` count as val; files may sit in sub-folders of a class folder)
Bad files are never fatal: they are skipped and listed with a reason.
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import FoldernetError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
# Refuse images over this many pixels (decompression bombs); Pillow's own guard is a warning only.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class Item:
    """One labelled file. ``relpath`` is POSIX style relative to the data root, so splits and bundles
    written on one OS read the same on another."""

    path: Path
    relpath: str
    label: str
    split: str | None = None
    group: str | None = None


@dataclass
class Dataset:
    root: Path
    items: list[Item]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    warnings: list[str] = field(default_factory=list)
    predefined_split: bool = False
    kind: str = "image"  # "image", "audio" (or "mixed": both kinds of file)
    splits_source: str | None = None  # a splits.csv the split came from, if any

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for it in self.items:
            out[it.label] += 1
        return out


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _walk_files(folder: Path, skipped: list, root: Path) -> list[Path]:
    """All files below ``folder`` (following no symlink loops), sorted for determinism."""
    out: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def on_error(err: OSError) -> None:
        skipped.append((_rel(Path(err.filename or folder), root), f"cannot read folder: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
        except OSError:
            continue
        if key in seen_dirs:  # symlink loop
            skipped.append((_rel(Path(dirpath), root), "folder visited twice (symlink loop); skipped"))
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for d in dirnames:
            if Path(d).suffix.lower() in IMAGE_EXTENSIONS:
                skipped.append((_rel(Path(dirpath) / d, root), "is a folder named like an image; "
                                "its contents are scanned as part of the class"))
        for name in sorted(filenames):
            if not _is_hidden(name):
                out.append(Path(dirpath) / name)
    return out


def regex_key(pattern: re.Pattern, relpath: str) -> str | None:
    """What a label or group regex takes from a relative path: its first group (the whole match when
    it has none), or None when it does not match."""
    m = pattern.search(relpath)
    return (m.group(1) if m.groups() else m.group(0)) if m else None


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = path
    return _nfc(rel.as_posix())


def check_image_header(path: Path) -> str | None:
    """Cheap check that a file is an image Pillow can open; returns a reason when it is not."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    return f"too many pixels ({w}x{h}); possible decompression bomb"
                if w < 1 or h < 1:
                    return f"image has no pixels ({w}x{h})"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "too many pixels; possible decompression bomb"
    except PermissionError:
        return "permission denied: make the file readable"
    except IsADirectoryError:
        return "is a folder, not a file"
    except Exception as exc:  # noqa: BLE001 - any undecodable file is reported, never fatal
        return f"not a readable image ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _candidates(root: Path, label_regex: str | None, skipped: list, warn: list):
    """Every file under ``root`` with its label (its class folder, or ``label_regex`` on its path) and
    split (from train/val/test folders): ([(file, label, split)], [(class, split, folder)], predefined)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    split_dirs = {p: SPLIT_ALIASES[p.name.lower()] for p in subdirs if p.name.lower() in SPLIT_ALIASES}
    predefined = bool(split_dirs) and label_regex is None
    if predefined and len(split_dirs) != len(subdirs):
        others = [p.name for p in subdirs if p not in split_dirs]
        warn.append(f"ignored folders beside the split folders: {', '.join(others)}")

    candidates: list[tuple[Path, str, str | None]] = []  # (file, label, split)
    class_dirs: list[tuple[str, str | None, Path]] = []
    if label_regex:
        pattern = re.compile(label_regex)
        for f in _walk_files(root, skipped, root):
            label = regex_key(pattern, _rel(f, root))
            if label is None:
                skipped.append((_rel(f, root), f"label regex {label_regex!r} does not match the path"))
                continue
            candidates.append((f, _nfc(label), None))
    else:
        for sdir in (split_dirs if predefined else [root]):
            split = split_dirs.get(sdir) if predefined else None
            for cdir in sorted(p for p in sdir.iterdir() if not _is_hidden(p.name)):
                if not cdir.is_dir():
                    if cdir.suffix.lower() in IMAGE_EXTENSIONS:
                        skipped.append((_rel(cdir, root), "image outside any class folder; move it into "
                                        "DATA/<class>/"))
                    continue
                class_dirs.append((_nfc(cdir.name), split, cdir))
                for f in _walk_files(cdir, skipped, root):
                    candidates.append((f, _nfc(cdir.name), split))
    return candidates, class_dirs, predefined


def scan(root: str | os.PathLike, check: bool = True, label_regex: str | None = None,
         group_regex: str | None = None) -> Dataset:
    """List labelled image files under ``root``; check each header; report what was skipped and why.

    ``label_regex``/``group_regex``: a regex with one group, matched against the relative path,
    for flat folders whose labels live in file names.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FoldernetError(f"data folder not found: {root}. Expected DATA/<class>/<image files>.")
    root = root.resolve()
    skipped: list[tuple[str, str]] = []
    warn: list[str] = []
    candidates, class_dirs, predefined = _candidates(root, label_regex, skipped, warn)

    from .audio import AUDIO_EXTENSIONS, check_audio_header

    items: list[Item] = []
    to_check: list[tuple[Path, str, str | None]] = []
    for f, label, split in candidates:
        if f.is_dir():
            skipped.append((_rel(f, root), "is a folder, not a file"))
        elif f.suffix.lower() not in IMAGE_EXTENSIONS | AUDIO_EXTENSIONS:
            skipped.append((_rel(f, root), f"not a file type foldernet reads ({f.suffix or 'no extension'}); "
                            f"supported: {', '.join(sorted(IMAGE_EXTENSIONS | AUDIO_EXTENSIONS))}"))
        else:
            to_check.append((f, label, split))

    def check_file(f: Path) -> str | None:
        return check_audio_header(f) if f.suffix.lower() in AUDIO_EXTENSIONS else check_image_header(f)

    reasons = _map_threads(check_file, [f for f, _, _ in to_check]) if check else [None] * len(to_check)
    gpat = re.compile(group_regex) if group_regex else None
    for (f, label, split), reason in zip(to_check, reasons):
        rel = _rel(f, root)
        if reason:
            skipped.append((rel, reason))
            continue
        group = regex_key(gpat, rel) if gpat is not None else None
        items.append(Item(path=f, relpath=rel, label=label, split=split, group=group))

    classes = sorted({label for _, label, _ in candidates} | {c for c, _, _ in class_dirs})
    counts = {c: 0 for c in classes}
    for it in items:
        counts[it.label] += 1
    for c in classes:
        if counts[c] == 0:
            warn.append(f"class '{c}' has no usable images: it is left out. Add images or remove the folder.")
        elif counts[c] == 1:
            warn.append(f"class '{c}' has only 1 image: it cannot be both trained on and evaluated; "
                        f"add more (at least 10 per class is a sensible minimum).")
    classes = [c for c in classes if counts[c] > 0]
    n_audio = sum(1 for it in items if it.path.suffix.lower() in AUDIO_EXTENSIONS)
    kind = "audio" if items and n_audio == len(items) else "mixed" if n_audio else "image"
    if kind == "mixed":
        warn.append(f"{n_audio} audio and {len(items) - n_audio} image files in one dataset: the model will see "
                    "spectrograms and photos side by side; keep one kind per dataset")
    if not items:
        raise FoldernetError(f"no usable images found under {root}. Expected DATA/<class>/<image files> "
                             f"with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}."
                             + (f" {len(skipped)} file(s) were skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
                                if skipped else ""))
    return Dataset(root=root, items=items, classes=classes, skipped=skipped, warnings=warn,
                   predefined_split=predefined, kind=kind)


def _map_threads(fn, xs: list) -> list:
    if len(xs) < 64:
        return [fn(x) for x in xs]
    with ThreadPoolExecutor(max_workers=8) as pool:  # header checks wait on I/O, not CPU
        return list(pool.map(fn, xs, chunksize=32))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, 16-bit and float scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def open_image(source: str | os.PathLike | bytes, draft_size: int | None = None) -> Image.Image:
    """Decode a file or bytes to an upright RGB image. ``draft_size`` lets JPEG decode at a reduced
    scale that is still at least that many pixels on the short side (much faster for big photos)."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(stream)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if draft_size and img.format == "JPEG":
            w, h = img.size
            scale = draft_size / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def thumbnail_jpeg(path: str | os.PathLike, size: int = 120, quality: int = 80) -> bytes | None:
    """A small JPEG of an image for pages and reports; None when the file cannot be read."""
    try:
        img = open_image(path, draft_size=size)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a moved or unreadable file just has no thumbnail
        return None


def thumbnail_data_uri(path: str | os.PathLike, size: int = 120) -> str:
    """The thumbnail as a data: URI (empty string when unreadable), for self-contained HTML."""
    import base64

    data = thumbnail_jpeg(path, size)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode() if data else ""
