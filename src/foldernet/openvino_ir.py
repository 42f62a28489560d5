"""OpenVINO IR: the export for servers with Intel CPUs (``foldernet export RUN --format openvino``).

Why a second server format: on CPUs with AMX or AVX512-BF16 (Xeon Sapphire Rapids and later) the
OpenVINO runtime runs a network in bf16 by default and its int8 kernels use AMX. Measured on such a
CPU (2 cores, lite0, 224 px, batch 32; benchmarks/export_formats.py on demo, hymenoptera, clothing): bf16
1.9-2.2x ONNX Runtime's fp32 but agreeing with fp32 on only 98.8 % of clothing's held-out images, so
foldernet does not run it; the int8 the export keeps 1.5-2.5x (ONNX Runtime's own: 1.5-2.0x); f32
0.83-0.95x ONNX Runtime's fp32.

The IR is a folder ``model.openvino/`` (``model.xml`` + ``model.bin``, weights kept fp32), converted
from the export's fp32 ONNX graph, with the same ``foldernet`` metadata in its rt_info. The parity
check runs it in f32 (``INFERENCE_PRECISION_HINT=f32``), exact like ONNX. The runtime's own default
precision on the exporting CPU is measured too and reported beside it, because that is what a plain
``core.compile_model(path)`` gives a user there (an IR cannot pin its precision). int8: the export's
own QDQ plans (equalised, then distilled if needed), converted; OpenVINO runs each QDQ pair as int8.
Optional extra: ``pip install 'foldernet[openvino]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import FoldernetError
from .mobile import require
from .onnx_predictor import ExportedClassifier

EXTRA = "openvino"
XML = "model.xml"
FIX = "export it again with `foldernet export RUN --format openvino --force`"


def _ov(what: str | None = None):
    return require("openvino", "openvino", what, extra=EXTRA)


def save_ir(onnx_path: Path, folder: Path, meta: dict) -> Path:
    """The ONNX graph at ``onnx_path`` as an IR folder with foldernet's metadata (weights stay fp32:
    OpenVINO's default would halve them to fp16, which the parity check would then have to forgive)."""
    ov = _ov()
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(meta, ensure_ascii=False), ["foldernet"])
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(folder / XML), compress_to_fp16=False)
    return folder


def runtime_precision() -> str:
    """What OpenVINO computes in on this CPU when not told: ``bf16`` with AMX/AVX512-BF16, else ``f32``."""
    return _ov().Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


class OpenVINOClassifier(ExportedClassifier):
    """Same API as the bundle and :class:`OnnxClassifier`, backed by an OpenVINO IR folder (or its
    ``model.xml``) on the CPU. ``precision``: ``f32`` (what the parity check ran; the default) or
    ``default`` (the runtime's own choice on this CPU, see :func:`runtime_precision`)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "f32"):
        ov = _ov("running an OpenVINO model")
        path = Path(path)
        self.path = path.parent if path.suffix == ".xml" else path
        xml = self.path / XML
        if not xml.is_file():
            raise FoldernetError(f"no OpenVINO model at {self.path}: run `foldernet export RUN --format openvino` "
                                 "first")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            core = ov.Core()
            model = core.read_model(str(xml))
            meta = model.get_rt_info(["foldernet"]).astype(str) if model.has_rt_info(["foldernet"]) else None
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - a damaged IR raises the runtime's own error types
            # the runtime's message opens with where in its sources it failed; its last line says what
            why = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
            raise FoldernetError(f"the OpenVINO model at {self.path} is damaged: it does not load ({why[0][:160]}); "
                                 f"{FIX}") from None
        self._read_metadata(meta, FIX)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.output_names = [o.get_any_name() for o in self.outputs]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
        # the request reuses its output buffers: copy before the next batch overwrites them
        return {name: np.array(result[o]) for name, o in zip(self.output_names, self.outputs)}
