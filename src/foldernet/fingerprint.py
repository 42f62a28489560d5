"""Cheap per-image facts computed while the image is decoded anyway, cached by content hash:
size, a 256-bit perceptual hash of the image and of its mirror image, and how flat it is.

The perceptual hash (imagehash's pHash, hash_size 16) survives resizing and JPEG re-compression;
comparing against the mirror hash as well makes it survive horizontal flips. Flatness (few
colours, one dominating) is what scraped placeholders ("image not found") look like.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

HASH_SIZE = 16  # 256-bit pHash
# A placeholder/blank image: at most this many distinct colours (5 bits per channel, 64 px thumbnail)
# and one colour covering at least this fraction. Measured: real photos >= 31 colours with the
# dominant colour <= 0.84; 8x8 digits <= 0.65; hymenoptera's "image not found" GIF 32 colours at 0.88.
LOW_INFO_MAX_COLOURS = 64
LOW_INFO_MIN_DOMINANT = 0.75


def fingerprint(img: Image.Image, original_size: tuple[int, int] | None = None) -> dict:
    """Facts of an image; ``original_size`` when ``img`` is a resized copy of the file's pixels."""
    import imagehash

    w, h = original_size or img.size
    small = img.copy()
    small.thumbnail((128, 128))
    gray = small.convert("L")
    ph = imagehash.phash(gray, hash_size=HASH_SIZE)
    phm = imagehash.phash(ImageOps.mirror(gray), hash_size=HASH_SIZE)
    thumb = small.copy()
    thumb.thumbnail((64, 64))
    q = np.asarray(thumb.convert("RGB")) >> 3
    codes = (q[..., 0].astype(np.int32) << 10) | (q[..., 1].astype(np.int32) << 5) | q[..., 2]
    _, counts = np.unique(codes, return_counts=True)
    return {"w": w, "h": h, "phash": str(ph), "phash_mirror": str(phm), "colours": int(len(counts)),
            "dominant": round(float(counts.max() / codes.size), 4)}


def is_low_information(fp: dict) -> bool:
    return fp["colours"] <= LOW_INFO_MAX_COLOURS and fp["dominant"] >= LOW_INFO_MIN_DOMINANT


def hash_matrix(fps: list[dict | None], key: str = "phash") -> np.ndarray:
    """(N, 4) uint64 words of each 256-bit hash (zeros where missing)."""
    out = np.zeros((len(fps), HASH_SIZE * HASH_SIZE // 64), np.uint64)
    for i, fp in enumerate(fps):
        if fp:
            out[i] = np.frombuffer(bytes.fromhex(fp[key]), dtype=">u8").astype(np.uint64)
    return out
