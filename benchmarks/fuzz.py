"""Bounded fuzzing of the image and audio loaders and of POST /predict.

Mutational: valid seed files (JPEG, PNG, GIF, WebP, TIFF, BMP, WAV, FLAC) get bit flips, byte
insertions, truncations, header splices and length-field corruption; every mutant goes through
``decode_windows`` (image and audio paths) and through ``POST /predict`` on an in-process server.
A loader may refuse an input with an exception; a failure is a crash of another kind (MemoryError,
RecursionError, a hang past the time budget) or a 5xx from the server.

    python benchmarks/fuzz.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402
from _load import demo_bundle  # noqa: E402


def seeds() -> list[bytes]:
    import soundfile as sf

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    x = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    for fmt in ("WAV", "FLAC"):
        buf = io.BytesIO()
        sf.write(buf, x, 8000, format=fmt)
        out.append(buf.getvalue())
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    op = rng.integers(0, 6)
    if op == 0 and b:                       # flip a few bits
        for _ in range(rng.integers(1, 16)):
            i = rng.integers(0, len(b))
            b[i] ^= 1 << rng.integers(0, 8)
    elif op == 1:                           # truncate
        b = b[:rng.integers(0, len(b) + 1)]
    elif op == 2:                           # insert random bytes
        i = rng.integers(0, len(b) + 1)
        b[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif op == 3 and len(b) > 24:           # corrupt a 4-byte field near the header (sizes, lengths)
        i = rng.integers(4, min(64, len(b) - 4))
        b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
    elif op == 4:                           # splice another format's header onto this body
        b = bytearray(rng.bytes(8)) + b[8:]
    else:                                   # duplicate a random chunk
        if b:
            i, j = sorted(rng.integers(0, len(b), 2))
            b[j:j] = b[i:j][:4096]
    return bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore")  # Pillow warns about every corrupt TIFF/EXIF it meets
    from fastapi.testclient import TestClient

    from foldernet.audio import AudioConfig
    from foldernet.modality import decode_windows
    from foldernet.preprocess import Preprocess
    from foldernet.serve import create_app

    rng = np.random.default_rng(1)
    pool = seeds()
    pre, audio = Preprocess(size=64, crop_pct=1.0), AudioConfig()
    tried = refused = failures = server_5xx = 0
    examples: list[str] = []
    with tempfile.TemporaryDirectory(prefix="foldernet-fuzz-") as tmp:
        run, _ = demo_bundle(Path(tmp), export=False)
        with TestClient(create_app(run), base_url="http://127.0.0.1") as client:
            deadline = time.time() + args.seconds
            while time.time() < deadline:
                data = mutate(pool[rng.integers(0, len(pool))], rng)
                tried += 1
                t = time.time()
                for cfg in (None, audio):
                    try:
                        decode_windows(data, pre, cfg)
                    except (MemoryError, RecursionError, SystemError) as exc:
                        failures += 1
                        examples.append(f"{type(exc).__name__} on {len(data)} bytes")
                    except Exception:  # noqa: BLE001 - refusing bad input is the expected outcome
                        refused += 1
                if time.time() - t > 10:
                    failures += 1
                    examples.append(f"slow input: {time.time() - t:.1f}s for {len(data)} bytes")
                if tried % 4 == 0:  # the server path is slower: every 4th input
                    r = client.post("/predict", files={"file": ("f", data, "application/octet-stream")})
                    if r.status_code >= 500:
                        server_5xx += 1
                        examples.append(f"HTTP {r.status_code}: {r.text[:80]}")
    row = {"seconds": args.seconds, "inputs_tried": tried, "loader_refusals": refused, "loader_failures": failures,
           "server_requests": tried // 4, "server_5xx": server_5xx, "examples": "; ".join(examples[:5])}
    print_table([row], list(row), "fuzz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
