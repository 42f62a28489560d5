"""Bounded fuzzing of the image and audio loaders, of POST /predict, of every CLI option, and of
every file of a bundle.

Mutational: valid seed files (JPEG, PNG, GIF, WebP, TIFF, BMP, WAV, FLAC) get bit flips, byte
insertions, truncations, header splices and length-field corruption; every mutant goes through
``decode_windows`` (image and audio paths) and through ``POST /predict`` on an in-process server.
A loader may refuse an input with an exception; a failure is a crash of another kind (MemoryError,
RecursionError, a hang past the time budget) or a 5xx from the server.

CLI options: each option of each command (params.TABLES) gets random values of its type and beyond
(negative, zero, huge, NaN, text, unknown choices) through the real CLI in-process; bundle files: each
file of a trained bundle (and its ONNX and OpenVINO exports) is truncated or has bytes flipped, then the
bundle is loaded, asked to predict and to find similar examples, and served. A failure is a traceback:
any exception other than foldernet's own one-line error.

    python benchmarks/fuzz.py [--seconds 60]   (each of the three parts gets that long)
"""

from __future__ import annotations

import argparse
import importlib.util
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


def option_values(p, rng: np.random.Generator) -> list[str]:
    """Random command-line values for one option, of its type and well outside its range."""
    if p.kind is bool:
        return []
    pool = ["-1", "0", "1", "-5", "1e309", "nan", "inf", "-inf", "99999999999", "abc", "", " ", "0.5", "-0.0",
            "\x00", "💥", "3.7", str(int(rng.integers(-10**6, 10**6))), f"{rng.normal() * 10:.3f}"]
    if p.choices:
        pool += list(p.choices) + [p.choices[0].upper(), "banana"]
    return [pool[int(i)] for i in rng.integers(0, len(pool), 3)]


def fuzz_options(seconds: float, run: Path, rng: np.random.Generator) -> dict:
    """Every option of every command with random values, through the CLI (in-process)."""
    import warnings

    from typer.testing import CliRunner

    from foldernet.cli import app
    from foldernet.errors import FoldernetError
    from foldernet.params import TABLES

    missing = str(run.parent / "does-not-exist")
    positional = {"train": [missing], "predict": [str(run), missing], "similar": [str(run), missing],
                  "split": [missing], "audit": [missing], "collect": [missing, "--out", missing],
                  "frames": [missing, "--out", missing], "export": [missing], "serve": [missing],
                  "compare": [missing], "demo": ["--out", missing], "suggest": [str(run), missing],
                  "autolabel": [str(run), missing, "--out", missing], "embed": [str(run), missing, "--out", missing],
                  "duplicates": [missing, "--out", missing]}
    runner = CliRunner()
    tried = tracebacks = 0
    examples: list[str] = []
    deadline = time.time() + seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while time.time() < deadline:
            for command, params in TABLES.items():
                for p in params:
                    for value in option_values(p, rng):
                        args = [command, *positional[command], p.flag, value]
                        result = runner.invoke(app, args)
                        tried += 1
                        exc = result.exception
                        if exc is not None and not isinstance(exc, (FoldernetError, SystemExit)):
                            tracebacks += 1
                            examples.append(f"{command} {p.flag} {value!r}: {type(exc).__name__}: {str(exc)[:60]}")
                if time.time() > deadline:
                    break
    return {"part": "cli options", "seconds": seconds, "tried": tried, "tracebacks": tracebacks,
            "examples": "; ".join(examples[:5])}


def damage(path: Path, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 or len(data) < 2:
        path.write_bytes(bytes(data[:int(rng.integers(0, max(1, len(data))))]))
    else:
        for _ in range(int(rng.integers(1, 32))):
            i = int(rng.integers(0, len(data)))
            data[i] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))


def fuzz_bundle(seconds: float, run: Path, image: Path, rng: np.random.Generator) -> dict:
    """Truncate or flip bytes in one file of a copy of the bundle, then load, predict, search, serve."""
    import shutil
    import warnings

    from fastapi.testclient import TestClient

    import foldernet
    from foldernet.errors import FoldernetError
    from foldernet.onnx_predictor import OnnxClassifier
    from foldernet.serve import create_app

    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts
                   and p.suffix in (".json", ".safetensors", ".txt", ".csv", ".onnx", ".xml", ".bin"))
    tried = tracebacks = refused = 0
    examples: list[str] = []
    deadline = time.time() + seconds
    with tempfile.TemporaryDirectory(prefix="foldernet-bundle-fuzz-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while time.time() < deadline:
            rel = files[int(rng.integers(0, len(files)))]
            copy = Path(tmp) / f"run{tried}"
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tensorboard"))
            damage(copy / rel, rng)
            tried += 1
            steps = [lambda: foldernet.load(copy, engine="torch").predict(image, similar=2),
                     lambda: foldernet.load(copy, engine="torch").similar(image, k=2),
                     lambda: TestClient(create_app(copy), base_url="http://127.0.0.1").get("/info")]
            if (copy / "export" / "model.onnx").exists():
                steps.append(lambda: OnnxClassifier(copy).predict(image))
            if (copy / "export" / "model.openvino").is_dir():
                steps.append(lambda: foldernet.load(copy / "export" / "model.openvino").predict(image))
            for step in steps:
                try:
                    step()
                except FoldernetError:
                    refused += 1
                except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
                    tracebacks += 1
                    seen = f"{rel}: {type(exc).__name__}: {str(exc)[:60]}"
                    if not any(e.split(":")[:2] == seen.split(":")[:2] for e in examples):
                        examples.append(seen)
            shutil.rmtree(copy, ignore_errors=True)
    return {"part": "bundle files", "seconds": seconds, "tried": tried, "tracebacks": tracebacks,
            "refused_with_a_message": refused, "examples": "; ".join(examples[:5])}


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
        run, images = demo_bundle(Path(tmp), export=True)
        if importlib.util.find_spec("openvino"):  # its IR's files are fuzzed too
            import foldernet

            foldernet.export(run, format="openvino")
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
            image = images[0]
            opts = fuzz_options(args.seconds, Path(run), rng)
            bundle = fuzz_bundle(args.seconds, Path(run), image, rng)
    row = {"part": "inputs", "seconds": args.seconds, "tried": tried, "tracebacks": failures + server_5xx,
           "loader_refusals": refused, "server_requests": tried // 4, "server_5xx": server_5xx,
           "examples": "; ".join(examples[:5])}
    rows = [row, opts, bundle]
    cols = ["part", "seconds", "tried", "tracebacks", "examples"]
    print_table(rows, cols, "fuzz")
    return 0 if all(r["tracebacks"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
