"""Build the hardening corpus: bad and odd inputs every command must survive (generated, never
committed). ``python tests/corpus/make_corpus.py OUT`` writes OUT/images and OUT/audio datasets
and prints what it made; ``build(OUT)`` returns {relative path: kind} for the tests.

Expected outcome per file: "good" (must be used), or "bad" (must be skipped and named with a reason).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(w=96, h=72, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming 900 M pixels, with a tiny zlib stream: a decompression bomb."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _jpeg_bomb() -> bytes:
    """A small JPEG whose frame header claims 65000 x 65000 pixels."""
    buf = io.BytesIO()
    _photo(16, 16).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def build_images(root: Path) -> dict[str, str]:
    kinds: dict[str, str] = {}

    def put(rel: str, data: bytes | Image.Image, kind: str, **save):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Image.Image):
            data.save(p, **save)
        else:
            p.write_bytes(data)
        kinds[rel] = kind

    for k in range(8):  # plenty of good images in two classes
        put(f"cats/good{k}.jpg", _photo(seed=k), "good", format="JPEG")
        put(f"dogs/good{k}.png", _photo(seed=100 + k), "good", format="PNG")
    put("cats/zero_bytes.jpg", b"", "bad")
    full = io.BytesIO()
    _photo(400, 300, 5).save(full, "JPEG")
    put("cats/truncated.jpg", full.getvalue()[:700], "bad")
    fullpng = io.BytesIO()
    _photo(200, 150, 6).save(fullpng, "PNG")
    put("dogs/truncated.png", fullpng.getvalue()[:300], "bad")
    put("dogs/bomb.png", _png_bomb(), "bad")
    put("cats/bomb.jpg", _jpeg_bomb(), "bad")
    put("cats/page.jpg", b"<!doctype html><html><body>404 Not Found</body></html>", "bad")
    put("cats/vector.jpg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "bad")
    put("dogs/notes.png", b"just some text, not a picture\n", "bad")
    put("cats/cmyk.jpg", _photo(seed=7).convert("CMYK"), "good", format="JPEG")
    put("dogs/sixteen_bit.png", Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)),
        "good", format="PNG")
    pal = _photo(seed=8).convert("P", palette=Image.Palette.ADAPTIVE)
    put("dogs/palette_alpha.png", pal, "good", format="PNG", transparency=0)
    put("cats/la.png", _photo(seed=9).convert("LA"), "good", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    put("cats/exif_rotated.jpg", _photo(120, 60, 10), "good", format="JPEG", exif=exif)
    put("dogs/one_pixel.png", Image.new("RGB", (1, 1), (200, 100, 50)), "flat", format="PNG")
    put("cats/very_wide.png", _photo(20000, 20, 11), "good", format="PNG")
    frames = [_photo(seed=20 + i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("dogs/animated.gif", buf.getvalue(), "good")
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    put("cats/multipage.tiff", buf.getvalue(), "good")
    put("dogs/photo.webp", _photo(seed=12), "good", format="WEBP")
    put("cats/日本語の名前.png", _photo(seed=13), "good", format="PNG")
    put("dogs/it's a \"quoted\" name.png", _photo(seed=14), "good", format="PNG")
    put("cats/bitmap.bmp", _photo(seed=15), "good", format="BMP")
    # a non-UTF-8 file name (Latin-1 bytes), where the file system allows it
    try:
        raw = os.path.join(os.fsencode(root / "dogs"), b"caf\xe9.png")
        _photo(seed=16).save(raw.decode(sys.getfilesystemencoding(), "surrogateescape"), "PNG")
        kinds[os.fsdecode(b"dogs/caf\xe9.png")] = "good"
    except (OSError, UnicodeError):
        pass
    (root / "cats" / "folder_named.jpg").mkdir(parents=True, exist_ok=True)
    kinds["cats/folder_named.jpg"] = "dir"
    loop = root / "dogs" / "loop"
    if not loop.exists():
        os.symlink("..", loop)
    kinds["dogs/loop"] = "loop"
    locked = root / "cats" / "locked.jpg"
    _photo(seed=17).save(locked, "JPEG")
    os.chmod(locked, 0)
    kinds["cats/locked.jpg"] = "locked"  # unreadable for a normal user; root reads it anyway
    (root / "empty_class").mkdir(exist_ok=True)
    kinds["empty_class"] = "empty class"
    put("lonely/only_one.jpg", _photo(seed=18), "good", format="JPEG")
    dup = io.BytesIO()
    _photo(seed=19).save(dup, "JPEG")
    put("cats/dup_in_two_classes.jpg", dup.getvalue(), "good")
    put("dogs/dup_in_two_classes.jpg", dup.getvalue(), "good")
    return kinds


def build_audio(root: Path, hour: bool = True) -> dict[str, str]:
    import soundfile as sf

    kinds: dict[str, str] = {}
    rng = np.random.default_rng(0)

    def tone(f, sr=16000, seconds=0.8):
        t = np.arange(int(sr * seconds)) / sr
        return (0.4 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)

    for cls, base in (("low", 220), ("high", 2500)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(6):
            sf.write(root / cls / f"good{k}.wav", tone(base * (1 + 0.1 * k)), 16000)
            kinds[f"{cls}/good{k}.wav"] = "good"
    sf.write(root / "low" / "silent.wav", np.zeros(16000, np.float32), 16000)
    kinds["low/silent.wav"] = "good"
    sf.write(root / "low" / "clipped.wav", np.clip(4 * tone(300), -1, 1), 16000)
    kinds["low/clipped.wav"] = "good"
    sf.write(root / "high" / "tiny.wav", tone(3000, seconds=0.01), 16000)
    kinds["high/tiny.wav"] = "good"
    if hour:
        sf.write(root / "low" / "one_hour.wav", np.zeros(8000 * 3600, np.float32), 8000, subtype="PCM_U8")
        kinds["low/one_hour.wav"] = "good"
    sf.write(root / "high" / "eight_bit.wav", tone(2800), 16000, subtype="PCM_U8")
    kinds["high/eight_bit.wav"] = "good"
    sf.write(root / "high" / "six_channels.wav", np.stack([tone(2600)] * 6, axis=1), 16000)
    kinds["high/six_channels.wav"] = "good"
    (root / "low" / "corrupt_header.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt \x00\x00garbage")
    kinds["low/corrupt_header.wav"] = "bad"
    buf = io.BytesIO()
    sf.write(buf, tone(250), 16000, format="MP3")
    (root / "low" / "mp3_named.wav").write_bytes(buf.getvalue())
    kinds["low/mp3_named.wav"] = "good"
    (root / "high" / "empty.wav").write_bytes(b"")
    kinds["high/empty.wav"] = "bad"
    return kinds


def build(out: str | os.PathLike, hour: bool = True) -> dict[str, dict[str, str]]:
    out = Path(out)
    return {"images": build_images(out / "images"), "audio": build_audio(out / "audio", hour=hour)}


if __name__ == "__main__":
    made = build(sys.argv[1] if len(sys.argv) > 1 else "corpus-out")
    for part, kinds in made.items():
        print(part, len(kinds), "entries:", ", ".join(f"{k} ({v})" for k, v in kinds.items()))
