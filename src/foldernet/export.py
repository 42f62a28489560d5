"""Export a bundle to one ONNX file (backbone + head + temperature), checked against the original.

The parity check runs on the bundle's held-out split: the fp32 export must give the same top-1 as
the PyTorch model on every image, or the export fails loudly. An int8 model (static quantisation,
calibrated on training images) is written only when it agrees on >= 99 % and is faster here, or
when the user asks for the smaller file; the numbers land in ``parity.json`` either way.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from . import __version__
from .bundle import find_model_dir, load
from .errors import FoldernetError
from .io import MARKER, atomic_write_bytes, atomic_write_json, marker_kind, write_marker
from .progress import console

INT8_MIN_AGREEMENT = 0.99


def _full_model(clf):
    """backbone -> linear head -> softmax(logits / T), plus the features for similarity search."""
    from .head import network

    return network(clf.backbone, clf.head, clf.head.n_classes, clf.head.dim, with_outputs=True).eval()


def held_out_files(model_dir: Path, data: str | os.PathLike | None, split: str = "test",
                   limit: int | None = None) -> list[Path]:
    """Paths of a split of the bundle's data (``data`` overrides the root recorded at training time)."""
    from .bundle import BundleConfig

    root = Path(data) if data else Path(BundleConfig.read(model_dir).data.get("root", ""))
    with open(model_dir / "splits.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    wanted = [r for r in rows if r["split"] == split] or [r for r in rows if r["split"] == "val"]
    paths = [root / r["path"] for r in wanted]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FoldernetError(f"no held-out images found under {root} for the parity check; pass --data DATA "
                             "(the folder the model was trained on)")
    return paths[:limit] if limit else paths


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float(np.mean(a.argmax(1) == b.argmax(1))), float(np.abs(a - b).max())


def _throughput(predictor, pixels: np.ndarray, repeats: int = 3) -> float:
    predictor.run(pixels)
    t = time.perf_counter()
    for _ in range(repeats):
        predictor.run(pixels)
    return len(pixels) * repeats / (time.perf_counter() - t)


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, batches: list[np.ndarray], name: str):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = out.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        src = prep
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
        src = fp32
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    quantize_static(str(src), str(out), _Calibration(batches, "input"), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    if prep.exists():
        prep.unlink()
    return out


def export(run: str | os.PathLike, out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
           parity_limit: int | None = None, **options) -> dict:
    """Write ``RUN/export/model.onnx`` (+ ``model.int8.onnx`` when it earns its place) and ``parity.json``.
    Options: those of ``foldernet export`` (format, int8, prefer_size, force), checked first."""
    from .params import check

    o = check("export", options)
    int8, prefer_size, force = o["int8"], o["prefer_size"], o["force"]
    import onnx

    from .features import export_onnx
    from .onnx_predictor import OnnxClassifier

    model_dir = find_model_dir(run)
    out = Path(out) if out else model_dir.parent / "export"
    target = out / "model.onnx"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and marker_kind(out) != "export")):
        raise FoldernetError(f"--out {out} holds files foldernet did not write as an export (no {MARKER} marker); "
                             "choose a new or empty folder")
    if target.exists() and not force:
        raise FoldernetError(f"{target} already exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None:
        write_marker(out, "export")
    clf = load(model_dir, engine="torch", use_cache=False)
    files = held_out_files(model_dir, data, limit=parity_limit)

    t = time.perf_counter()
    tmp = out / ".model.export.onnx"
    export_onnx(_full_model(clf), clf.preprocess.size, tmp, output_names=["probabilities", "features", "logits"])
    proto = onnx.load(str(tmp))
    meta = {"labels": clf.labels, "preprocess": clf.preprocess.to_dict(), "temperature": clf.temperature,
            "threshold": clf.config.threshold, "similarity_threshold": clf.config.similarity_threshold,
            "backbone": clf.config.backbone, "audio": clf.audio.to_dict() if clf.audio is not None else None,
            "foldernet_version": __version__}
    del proto.metadata_props[:]
    proto.metadata_props.add(key="foldernet", value=json.dumps(meta, ensure_ascii=False))
    proto.producer_name = "foldernet"
    atomic_write_bytes(tmp, proto.SerializeToString())
    export_s = time.perf_counter() - t

    what = "clips" if clf.audio is not None else "images"
    console.print(f"parity check on {len(files)} held-out {what} (PyTorch eager vs ONNX Runtime)...")
    ref, ok_ref, _ = clf.predict_proba(files, progress=True)
    onnx_clf = OnnxClassifier(tmp)
    got, ok_got, _ = onnx_clf.predict_proba(files)
    both = ok_ref & ok_got
    if not both.any():
        tmp.unlink()
        raise FoldernetError(f"the parity check could not read any held-out file (e.g. {files[0]}); nothing exported")
    agree, max_diff = _agreement(ref[both], got[both])
    report: dict = {"n": int(both.sum()), "inputs": what, "split_files_from": str(files[0].parent.parent),
                    "fp32": {"top1_agreement": agree, "max_prob_diff": max_diff, "export_seconds": export_s}}
    if agree < 1.0:
        tmp.unlink()
        atomic_write_json(out / "parity.json", report)
        raise FoldernetError(f"ONNX export disagrees with PyTorch on {(1 - agree) * 100:.2f}% of held-out {what} "
                             f"(max probability difference {max_diff:.3g}); not written. Details: {out}/parity.json")
    os.replace(tmp, target)
    report["fp32"]["path"] = target.name
    report["fp32"]["size_mb"] = round(target.stat().st_size / 1e6, 2)

    if int8:
        report["int8"] = _try_int8(onnx_clf, target, model_dir, data, files, ref[both], both, prefer_size)
    atomic_write_json(out / "parity.json", report)
    return report


def _try_int8(fp32_clf, target: Path, model_dir: Path, data, files, ref, both, prefer_size: bool) -> dict:
    from .onnx_predictor import OnnxClassifier

    calib_files = held_out_files(model_dir, data, split="train", limit=64)
    calib = np.concatenate([fp32_clf.pixels(p) for p in calib_files])
    path8 = target.with_name("model.int8.onnx")
    quantize_int8(target, path8, calib)
    clf8 = OnnxClassifier(path8)
    got8, ok8, _ = clf8.predict_proba(files)
    agree8, diff8 = _agreement(ref, got8[both])
    bench = np.concatenate([fp32_clf.pixels(p) for p in files[:32]])[:32]
    speed32 = _throughput(fp32_clf, bench)
    speed8 = _throughput(clf8, bench)
    size32, size8 = target.stat().st_size / 1e6, path8.stat().st_size / 1e6
    faster = speed8 > speed32
    keep = agree8 >= INT8_MIN_AGREEMENT and (faster or prefer_size)
    reason = ("kept: " + ("faster" if faster else "smaller, as asked")) if keep else (
        f"not kept: top-1 agreement {agree8:.4f} < {INT8_MIN_AGREEMENT}" if agree8 < INT8_MIN_AGREEMENT else
        f"not kept: slower than fp32 here ({speed8:.1f} vs {speed32:.1f} img/s); pass --prefer-size to keep "
        f"the {size8:.1f} MB file anyway")
    if not keep:
        path8.unlink()
    console.print(f"int8: {reason}")
    return {"top1_agreement": agree8, "max_prob_diff": diff8, "img_per_s": round(speed8, 1),
            "fp32_img_per_s": round(speed32, 1), "size_mb": round(size8, 2), "fp32_size_mb": round(size32, 2),
            "kept": keep, "reason": reason, "path": path8.name if keep else None}
