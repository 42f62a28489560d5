"""What kind of input a model reads: images or sounds. Each modality owns what differs between
them (file extensions, the cheap header check, how bytes become model input, how the encoder's
preprocessing is set up, what training and audit say about it), so the other stages ask the
modality instead of branching on the kind. New kinds register in ``MODALITIES``."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import FoldernetError
from .preprocess import Preprocess


class Modality:
    kind: str = ""
    extensions: frozenset[str] = frozenset()

    def owns(self, path: str | Path) -> bool:
        return Path(path).suffix.lower() in self.extensions

    def check_header(self, path: Path) -> str | None:
        """A reason the file cannot be read, from a cheap look at its header; None when it can."""
        raise NotImplementedError

    def prepare(self, data_config: dict, img_size: int | None, options: dict | None, paths: list,
                crop_pct: float | None = None):
        """(Preprocess, audio settings or None) for a backbone on data of this kind; ``crop_pct``: the
        centre crop's share of an image's short side (None: ``IMAGE_CROP_PCT``)."""
        raise NotImplementedError

    def skip_reason(self, fingerprint: dict) -> str | None:
        """Why training should leave an input out (e.g. a placeholder image), or None."""
        return None

    def training_note(self, backbone: str, mode: str, spectrogram_stats: bool) -> str | None:
        """Advice printed before training (measured recipes for this kind of data), or None."""
        return None

    def supports_spectrogram_stats(self, mode: str) -> bool:
        return False

    supports_flip = False  # is a mirror image the same thing? (a photo: yes; a spectrogram reversed in time: no)
    # --mode top caches the backbone's inner activations per input; a clip's windows are averaged only
    # after the backbone, so sound would need them per window
    supports_top_mode = False

    def file_findings(self, rel: str, fp: dict) -> list[tuple[str, dict]]:
        """Audit findings about one readable input from its fingerprint: (kind, entry) pairs."""
        return []

    def dataset_findings(self, fps: list[dict], settings) -> list[tuple[str, dict]]:
        """Audit findings about the dataset as a whole (``settings``: the encoder's audio settings)."""
        return []


TINY_MIN_SIDE = 32        # pixels: an image smaller on a side is too small to learn from
MAX_ASPECT = 5.0          # a longer image is a banner, a strip or a screenshot
SILENT_DBFS = -60.0       # a clip quieter than this (RMS) is silence
CLIPPED_FRACTION = 0.01   # more samples than this at full scale: distorted
TOO_SHORT_SECONDS = 0.1
# The centre crop keeps the whole short side of an image (as fastai's Resize and Ultralytics do). timm
# evaluates ImageNet models with a crop of 0.875, which on clothing's 3:4 portrait photos kept two thirds
# of each garment's length (hems, collars) and 7/8 of its width (sleeves): the head scored 87.4 % there,
# 89.4 % with the whole short side, and --mode top 91.0 % -> 92.6 % (3 seeds); hymenoptera's
# subject-centred photos lost 0.7 points (1 image in 153), hence --crop-pct.
IMAGE_CROP_PCT = 1.0


class ImageModality(Modality):
    kind = "image"
    supports_flip = True
    supports_top_mode = True

    def __init__(self):
        from .data import IMAGE_EXTENSIONS

        self.extensions = frozenset(IMAGE_EXTENSIONS)

    def check_header(self, path: Path) -> str | None:
        from .data import check_image_header

        return check_image_header(path)

    def prepare(self, data_config: dict, img_size: int | None, options: dict | None, paths: list,
                crop_pct: float | None = None):
        if data_config.get("audio"):
            raise FoldernetError("this backbone was trained on sound (spectrograms) and cannot read images: "
                                 "use an image backbone such as tf_efficientnet_lite0")
        return _preprocess(data_config, img_size, IMAGE_CROP_PCT if crop_pct is None else crop_pct), None

    def skip_reason(self, fingerprint: dict) -> str | None:
        from .fingerprint import is_low_information

        if fingerprint and fingerprint.get("kind") is None and is_low_information(fingerprint):
            return (f"looks like a placeholder or blank image ({fingerprint['colours']} colours, one covers "
                    f"{fingerprint['dominant']:.0%}); pass --keep-placeholders to use it")
        return None


    def file_findings(self, rel: str, fp: dict) -> list[tuple[str, dict]]:
        from .fingerprint import is_low_information

        w, h = fp["w"], fp["h"]
        out = []
        if min(w, h) < TINY_MIN_SIDE:
            out.append(("tiny", {"path": rel, "reason": f"{w}x{h} px (< {TINY_MIN_SIDE} on a side)"}))
        if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
            out.append(("extreme_aspect", {"path": rel, "reason": f"{w}x{h} (aspect > {MAX_ASPECT:g}:1)"}))
        if is_low_information(fp):
            out.append(("low_information", {"path": rel, "reason": f"{fp['colours']} colours, one covers "
                                            f"{fp['dominant']:.0%}: a placeholder or blank image?"}))
        return out


class AudioModality(Modality):
    kind = "audio"

    def __init__(self):
        from .audio import AUDIO_EXTENSIONS

        self.extensions = frozenset(AUDIO_EXTENSIONS)

    def check_header(self, path: Path) -> str | None:
        from .audio import check_audio_header

        return check_audio_header(path)

    def prepare(self, data_config: dict, img_size: int | None, options: dict | None, paths: list,
                crop_pct: float | None = None):
        """Spectrograms are rendered at the input size, so audio crops nothing; a backbone trained on
        spectrograms (musicnn) fixes how they are made, and a setting that contradicts it is refused."""
        from .audio import config_for

        if crop_pct is not None and crop_pct != 1.0:
            raise FoldernetError(f"--crop-pct {crop_pct:g} is for images: a sound's spectrogram is rendered at the "
                                 "input size and never cropped; drop that setting")

        needs = data_config.get("audio") or {}
        chosen = {k: v for k, v in (options or {}).items() if v is not None}
        for key, value in chosen.items():
            if key in needs and key != "window_seconds" and value != needs[key]:
                raise FoldernetError(f"this backbone needs audio {key.replace('_', ' ')} {needs[key]} (it was "
                                     f"trained so), not {value}: drop that setting")
        cfg = config_for(list(paths or []), {**needs, **chosen})
        return _preprocess(data_config, img_size, 1.0), cfg

    def supports_spectrogram_stats(self, mode: str) -> bool:
        return mode == "head"

    def file_findings(self, rel: str, fp: dict) -> list[tuple[str, dict]]:
        out = []
        if fp["seconds"] < TOO_SHORT_SECONDS:
            out.append(("too_short", {"path": rel, "reason": f"{fp['seconds']:.3f} s long (< {TOO_SHORT_SECONDS} s)"}))
        if fp["rms_dbfs"] < SILENT_DBFS:
            out.append(("silent", {"path": rel, "reason": f"RMS {fp['rms_dbfs']:.1f} dBFS (< {SILENT_DBFS:g})"}))
        if fp["clipped"] > CLIPPED_FRACTION:
            out.append(("clipped", {"path": rel, "reason": f"{fp['clipped']:.1%} of samples at full scale"}))
        return out

    def dataset_findings(self, fps: list[dict], settings) -> list[tuple[str, dict]]:
        from collections import Counter

        rates = Counter(fp["sample_rate"] for fp in fps if fp and "sample_rate" in fp)
        if len(rates) < 2:
            return []
        return [("mixed_sample_rates", {"path": "(dataset)", "reason": ", ".join(
            f"{n} files at {r} Hz" for r, n in rates.most_common()) + "; all are resampled to "
            f"{settings.sample_rate} Hz, but a rate that follows the label is a shortcut the model can learn"})]

    def training_note(self, backbone: str, mode: str, spectrogram_stats: bool) -> str | None:
        if mode != "head":
            return None
        hints = ["for speech, `--backbone scratch --img-size 64` did far better on unseen speakers"]
        if not backbone.startswith("musicnn"):
            hints.append("for music and instruments, the audio-pretrained `--backbone musicnn_mtt` (weights: "
                         "`pip install --no-deps musicnn`) beat ImageNet features on unseen instruments")
        if not spectrogram_stats:
            hints.append("for clips of one sound each (instrument notes), `--spectrogram-stats` added points "
                         "on unseen instruments")
        return (f"note: audio with {backbone} features + head. " + "; ".join(hints).capitalize()
                + " (benchmarks/audio.py).")


MODALITIES: dict[str, Modality] = {}


def register(m: Modality) -> Modality:
    MODALITIES[m.kind] = m
    return m


register(ImageModality())
register(AudioModality())


def modality(kind: str) -> Modality:
    """The modality of a dataset or bundle kind ('image', 'audio'); a mixed dataset reads as images
    with its sounds refused one by one."""
    return MODALITIES.get(kind) or MODALITIES["image"]


def modality_of(path: str | Path) -> Modality | None:
    """The modality whose extension the file has, or None."""
    return next((m for m in MODALITIES.values() if m.owns(path)), None)


def media_extensions() -> frozenset[str]:
    return frozenset().union(*(m.extensions for m in MODALITIES.values()))


def _preprocess(data_config: dict, img_size: int | None, crop_pct: float) -> Preprocess:
    """The backbone's eval transform at ``img_size`` (None: its own) with ``crop_pct`` of the short side kept."""
    pre = Preprocess.from_timm(data_config)
    return replace(pre, size=int(img_size or pre.size), crop_pct=float(crop_pct))


def for_dataset(data_config: dict, kind: str = "image", img_size: int | None = None, audio: dict | None = None,
                paths: list | None = None):
    """(Preprocess, AudioConfig or None) for a backbone and a dataset kind."""
    return modality(kind).prepare(data_config, img_size, audio, list(paths or []))


def expand_inputs(inputs) -> list:
    """Files, folders (recursively, the image and sound files in them, sorted) and raw bytes -> a flat
    list. A missing path, or a folder with nothing foldernet reads, is an error that names it."""
    media = media_extensions()
    if isinstance(inputs, (str, os.PathLike, bytes, bytearray)):
        inputs = [inputs]
    out: list = []
    for src in inputs:
        if isinstance(src, (bytes, bytearray)):
            out.append(bytes(src))
            continue
        p = Path(src).expanduser()
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in media),
                           key=lambda f: f.as_posix())
            if not found:
                raise FoldernetError(f"no image or sound files in {p} (foldernet reads "
                                     f"{', '.join(sorted(media))})")
            out.extend(found)
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise FoldernetError(f"input not found: {p}")
    if not out:
        raise FoldernetError("no inputs given")
    return out


# ----------------------------------------------------------------------------- bytes -> model input

def read_source(source) -> tuple[bytes, str]:
    """(bytes, name hint) of a path or raw bytes; the hint is empty for bytes."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), ""
    return Path(source).read_bytes(), str(source)


def source_name(source) -> str:
    """How an input is named in messages: its path, or '<upload>' for raw bytes."""
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def decode_error(exc: Exception, audio_cfg=None) -> str:
    """A one-line reason for a file that could not be decoded by a model of images (or, with
    ``audio_cfg``, of sounds); never a Python object's repr (Pillow names in-memory files
    '<_io.BytesIO object at 0x...>': the row already names the file)."""
    import re

    if isinstance(exc, FoldernetError):
        return str(exc)
    what = MODALITIES["audio" if audio_cfg is not None else "image"].kind
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))[:120].strip()
    return f"cannot decode {what} ({type(exc).__name__}{': ' + text if text else ''})"


def looks_like_image(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:  # noqa: BLE001 - anything Pillow does not recognise
        return False


def decode_windows(data: bytes, pre: Preprocess, audio_cfg=None, hint: str = "", view: int = 0,
                   content_hash: str | None = None) -> tuple[np.ndarray, dict]:
    """Any input -> ((k, 3, S, S) pixels, fingerprint). An image model reads images (k = 1); a sound
    model (one with audio settings) reads sounds, one spectrogram image per window, and refuses images.
    ``view`` > 0 gives an augmented view (``preprocess.augmented_view``; for sound, masked bands), drawn
    from ``content_hash`` and the view number so that it is the same every time."""
    from .fingerprint import fingerprint
    from .preprocess import augmented_view, masked_spectrogram, view_rng

    rng = view_rng(content_hash or "0", view) if view else None
    if audio_cfg is not None:
        from .audio import clip_images

        if looks_like_image(data) and not MODALITIES["audio"].owns(hint):
            raise FoldernetError("this is an image, and the model classifies sounds")
        images, facts = clip_images(data, audio_cfg, size=pre.size)
        fp = fingerprint(images[0])
        fp.update(facts)
        pixels = np.stack([pre(im) for im in images])
        if rng is not None:
            pixels = np.stack([masked_spectrogram(p, rng) for p in pixels])
        return pixels, fp
    if MODALITIES["audio"].owns(hint) and not looks_like_image(data):
        raise FoldernetError("this is a sound file, and the model classifies images")
    from .data import open_image

    img = open_image(data, draft_size=pre.resize_size)
    resized = pre.resize(img)  # the fingerprint works from the resized image: no second pass over the full one
    fp = fingerprint(resized, original_size=img.size)
    if rng is not None:
        return pre.normalize(augmented_view(resized, pre, view, rng))[None], fp
    return pre(resized, resized=True)[None], fp


def source_pixels(source, pre: Preprocess, audio_cfg=None) -> np.ndarray:
    """(k, 3, S, S) pixels of a path or bytes: one row for an image, one per window for audio."""
    data, hint = read_source(source)
    return decode_windows(data, pre, audio_cfg, hint)[0]
