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
