"""``foldernet demo``: a real dataset that ships inside a dependency (scikit-learn's handwritten
digits), written as class folders of PNGs, then the whole pipeline on it, offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | os.PathLike, per_class: int = 50, size: int = 64, seed: int = 0) -> Path:
    """Write ``per_class`` images of each digit 0-9 as ``out/<digit>/<n>.png`` (upscaled from 8x8)."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for d in range(10):
        idx = np.flatnonzero(digits.target == d)
        idx = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        folder = out / f"{d}_{names[d]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            img = Image.fromarray(255 - pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
            img.save(folder / f"{i:04d}.png")
    return out
