"""Image -> normalised array, in Pillow and NumPy only, so that training, the bundle, the ONNX
predictor and the web server all compute the same pixels byte for byte (no torch needed)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


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


def mean_per_input(rows: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Rows of all inputs' windows stacked -> the mean row of each input (a clip's windows -> one)."""
    bounds = np.cumsum([0] + list(lengths))
    return np.stack([rows[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])


# Part of the feature-cache key of augmented views: bump it whenever ``augmented_view`` changes.
AUGMENT_VERSION = 1


def view_rng(content_hash: str, view: int) -> np.random.Generator:
    """The random numbers of one augmented view of one file: fixed by its content and the view number,
    so a view's features can be cached and a rerun draws the same augmentations."""
    return np.random.default_rng([int(content_hash[:16], 16), view, AUGMENT_VERSION])


def augmented_view(img: Image.Image, pre: Preprocess, view: int, rng: np.random.Generator) -> Image.Image:
    """View ``view`` of an image, as a ``pre.size`` square ready for ``pre.normalize``: 1 is the mirror
    image; 2 and above are a random resized crop (40-100 % of the area, aspect 3/4-4/3), a mirror half the
    time, a small rotation and a colour jitter (timm/torchvision training-style, in Pillow)."""
    from PIL import ImageEnhance

    if view == 1:
        return pre.resize_crop(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.4, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    resample = _RESAMPLE.get(pre.interpolation, Image.Resampling.BICUBIC)
    out = img.crop((left, top, left + cw, top + ch)).resize((pre.size, pre.size), resample)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-10, 10)
    out = out.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=tuple(int(255 * m) for m in pre.mean))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(rng.uniform(0.8, 1.2))
    return out


def masked_spectrogram(pixels: np.ndarray, rng: np.random.Generator, masks: int = 1,
                       max_frac: float = 0.15) -> np.ndarray:
    """SpecAugment on a normalised (3, H, W) spectrogram image: ``masks`` random time and frequency
    bands set to the image's minimum (silence). The sound counterpart of ``augmented_view``."""
    out = pixels.copy()
    fill = float(out.min())
    _, h, w = out.shape
    for _ in range(masks):
        t = int(rng.integers(0, max(1, int(w * max_frac)) + 1))
        t0 = int(rng.integers(0, max(1, w - t) + 1))
        out[:, :, t0:t0 + t] = fill
        f = int(rng.integers(0, max(1, int(h * max_frac)) + 1))
        f0 = int(rng.integers(0, max(1, h - f) + 1))
        out[:, f0:f0 + f, :] = fill
    return out
