"""Image -> normalised array, in Pillow and NumPy only, so that training, the bundle, the ONNX
predictor and the web server all compute the same pixels byte for byte (no torch needed)."""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import FoldernetError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform: resize the short side to ``size / crop_pct``, centre crop ``size``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel."""

    size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_timm(cls, data_config: dict) -> "Preprocess":
        _, h, w = data_config.get("input_size", (3, 224, 224))
        return cls(size=int(h), crop_pct=float(data_config.get("crop_pct", 0.875)),
                   interpolation=str(data_config.get("interpolation", "bicubic")),
                   mean=tuple(float(x) for x in data_config["mean"]),
                   std=tuple(float(x) for x in data_config["std"]))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(size=int(d["size"]), crop_pct=float(d["crop_pct"]), interpolation=d["interpolation"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.size / self.crop_pct))

    def resize(self, img: Image.Image) -> Image.Image:
        """Short side to ``resize_size`` (timm's Resize)."""
        w, h = img.size
        short = self.resize_size
        if w <= h:
            nw, nh = short, max(1, int(short * h / w))
        else:
            nw, nh = max(1, int(short * w / h)), short
        return img.resize((nw, nh), _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC))

    def crop(self, img: Image.Image) -> Image.Image:
        """Centre crop ``size`` (timm's CenterCrop) of an image already resized."""
        nw, nh = img.size
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    def resize_crop(self, img: Image.Image) -> Image.Image:
        return self.crop(self.resize(img))

    def __call__(self, img: Image.Image, resized: bool = False) -> np.ndarray:
        """RGB PIL image (already ``resize``d when ``resized``) -> float32 array (3, size, size)."""
        if resized:
            return self.normalize(self.crop(img))
        return self.normalize(self.resize_crop(img))

    def normalize(self, img: Image.Image) -> np.ndarray:
        # one fused multiply-add per pixel: (x / 255 - mean) / std == x * scale + offset
        scale = 1.0 / (255.0 * np.asarray(self.std, np.float32))
        offset = -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        out = np.empty(arr.shape, np.float32)
        np.multiply(arr, scale[:, None, None], out=out)
        out += offset[:, None, None]
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def for_dataset(data_config: dict, kind: str = "image", img_size: int | None = None, audio: dict | None = None,
                paths: list | None = None):
    """(Preprocess, AudioConfig or None) for a backbone and a dataset kind: every stage sets up the
    same way. Spectrograms are rendered at the input size, so audio crops nothing."""
    from dataclasses import replace

    pre = Preprocess.from_timm(data_config)
    if img_size:
        pre = replace(pre, size=int(img_size))
    needs = data_config.get("audio") or {}  # a backbone trained on spectrograms fixes how they are made
    if kind == "image":
        if needs:
            raise FoldernetError("this backbone was trained on sound (spectrograms) and cannot read images: "
                                 "use an image backbone such as tf_efficientnet_lite0")
        return pre, None
    from .audio import config_for

    chosen = {k: v for k, v in (audio or {}).items() if v is not None}
    for key, value in chosen.items():
        if key in needs and key != "window_seconds" and value != needs[key]:
            raise FoldernetError(f"this backbone needs audio {key.replace('_', ' ')} {needs[key]} (it was trained "
                                 f"so), not {value}: drop that setting")
    cfg = config_for(list(paths or []), {**needs, **chosen})  # checked and completed there
    return replace(pre, crop_pct=1.0), cfg


def read_source(source) -> tuple[bytes, str]:
    """(bytes, name hint) of a path or raw bytes; the hint is empty for bytes."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), ""
    return Path(source).read_bytes(), str(source)


def source_pixels(source, pre: "Preprocess", audio_cfg=None) -> np.ndarray:
    """(k, 3, S, S) pixels of a path or bytes: one row for an image, one per window for audio."""
    data, hint = read_source(source)
    return decode_windows(data, pre, audio_cfg, hint)[0]


def mean_per_input(rows: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Rows of all inputs' windows stacked -> the mean row of each input (a clip's windows -> one)."""
    bounds = np.cumsum([0] + list(lengths))
    return np.stack([rows[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])


def decode_windows(data: bytes, pre: Preprocess, audio_cfg=None, hint: str = "") -> tuple[np.ndarray, dict]:
    """Any input -> ((k, 3, S, S) pixels, fingerprint). Images give k = 1; audio (when the model has
    an audio config, judged by content) gives one spectrogram image per window."""
    from .data import open_image
    from .fingerprint import fingerprint

    if audio_cfg is not None and (hint.lower().endswith(AUDIO_SUFFIXES) or not looks_like_image(data)):
        from .audio import clip_images

        images, facts = clip_images(data, audio_cfg, size=pre.size)
        fp = fingerprint(images[0])
        fp.update(facts)
        return np.stack([pre(im) for im in images]), fp
    img = open_image(data, draft_size=pre.resize_size)
    resized = pre.resize(img)  # the fingerprint works from the resized image: no second pass over the full one
    return pre(resized, resized=True)[None], fingerprint(resized, original_size=img.size)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif")


def looks_like_image(data: bytes) -> bool:
    import io

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:  # noqa: BLE001 - anything Pillow does not recognise
        return False
