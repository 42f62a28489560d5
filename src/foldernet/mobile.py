"""The formats phones run: TFLite (LiteRT, Android and embedded) and Core ML (Apple).

Both come from the same PyTorch module as the ONNX export (backbone -> head -> softmax(logits / T),
plus features and logits), with the same input (preprocessed float32 NCHW pixels) and the same
``foldernet`` metadata (labels, preprocessing, temperature, "not sure" rule). TFLite files are run
here with the LiteRT interpreter and checked against PyTorch on the held-out split; Core ML models
run only on macOS, so on Linux the converted spec is checked (inputs, outputs, labels) and the
file says how to check it on a Mac. Optional extra: ``pip install 'foldernet[mobile]'``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import FoldernetError
from .onnx_predictor import ExportedClassifier

OUTPUTS = ("probabilities", "features", "logits")


def require(module: str, fmt: str, what: str | None = None, extra: str = "mobile"):
    """Import an optional converter or runtime, or stop with the one line that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FoldernetError(f"{what or '--format ' + fmt} needs the {extra} extra, which is not installed: "
                             f"pip install 'foldernet[{extra}]'") from None


@contextlib.contextmanager
def _quiet():
    """The converters print progress and warnings of their own; foldernet shows its own progress."""
    sink = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in ("absl", "litert_torch", "coremltools", "root")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# --- TFLite ---------------------------------------------------------------------------------------

def _blocks(module) -> list[str]:
    """Module names of the network's blocks in order (stem, blocks.0.0, ...), as int8.block_groups
    finds them in the ONNX graph, so both int8 paths keep the same layers in fp32."""
    import torch

    from .int8 import block_of

    seen: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
            block = block_of(name + ".weight")
            if block not in seen:
                seen.append(block)
    return seen


def _block_quantizer(base, float_blocks: list[str]):
    """litert-torch's PT2E quantizer, leaving the nodes of the named modules in float (its own
    per-module option cannot say "none", and its name filter misreads torch.export's module paths)."""

    class BlockQuantizer(base):
        def _annotate_for_static_quantization_config(self, model):
            def quantised(node) -> bool:
                paths = [v[0] for v in node.meta.get("nn_module_stack", {}).values()]
                return not any(p == s or p.startswith(s + ".") for p in paths for s in float_blocks)

            self._annotate_all_static_patterns(model, self.global_config, quantised)
            return model

    return BlockQuantizer()


def convert_tflite(module, size: int, calib: np.ndarray | None = None, fp32_blocks: int = 0) -> bytes:
    """A TFLite flatbuffer of ``module`` for one (1, 3, size, size) float input; with ``calib``,
    static int8 (PT2E, per-channel symmetric weights) calibrated on those rows, the first
    ``fp32_blocks`` blocks left in float. Inputs and outputs stay float32 either way."""
    litert_torch = require("litert_torch", "tflite")
    import torch

    example = (torch.zeros(1, 3, size, size),)
    with _quiet():
        if calib is None:
            edge = litert_torch.convert(module.eval(), example)
        else:
            from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            config = get_symmetric_quantization_config(is_per_channel=True)
            quantizer = _block_quantizer(PT2EQuantizer, _blocks(module)[:fp32_blocks]).set_global(config)
            graph = prepare_pt2e(torch.export.export(module.eval(), example).module(), quantizer)
            with torch.no_grad():
                for row in calib:
                    graph(torch.from_numpy(np.ascontiguousarray(row[None], np.float32)))
            graph = convert_pt2e(graph, fold_quantize=False)
            edge = litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(edge.model_content())


def with_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """The model with foldernet's metadata (JSON) in a named TFLite metadata buffer."""
    require("ai_edge_litert", "tflite")
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = "foldernet"
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != b"foldernet"] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(flatbuffer: bytes) -> str | None:
    """foldernet's metadata JSON from a TFLite file, or None."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == b"foldernet":
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode()
    return None


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float rows into a tensor's type: an int8 model's input takes scale and zero point."""
    if detail["dtype"] == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def _dequantize(x: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return x.astype(np.float32)
    scale, zero = detail["quantization"]
    return ((x.astype(np.float32) - zero) * scale).astype(np.float32)


class TFLiteClassifier(ExportedClassifier):
    """Same API as the bundle and :class:`OnnxClassifier`, backed by a ``.tflite`` file run in the
    LiteRT interpreter (XNNPACK on CPU), one image at a time as a phone would."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        require("ai_edge_litert", "tflite", "running a .tflite model")
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise FoldernetError(f"no TFLite model at {self.path}: run `foldernet export RUN --format tflite` first")
        raw = self.path.read_bytes()
        try:
            meta = read_metadata(raw)
            with _quiet():
                self.interpreter = Interpreter(model_content=raw, num_threads=threads or os.cpu_count() or 1)
                self.interpreter.allocate_tensors()
        except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer raises whatever the parser meets
            raise FoldernetError(f"the TFLite model at {self.path} is damaged: it does not load "
                                 f"({type(exc).__name__}); export it again with `foldernet export RUN --format "
                                 "tflite --force`") from None
        self._read_metadata(meta, "export it again with `foldernet export RUN --format tflite --force`")
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()
        # the converter names outputs ..output_<i>.. after their place in what the module returns
        order = [int(m.group(1)) if (m := re.search(r"output_(\d+)", o["name"])) else i
                 for i, o in enumerate(self.outputs)]
        self.output_names = [OUTPUTS[i] if i < len(OUTPUTS) else f"output_{i}" for i in order]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        rows = []
        for x in np.ascontiguousarray(batch, np.float32):
            self.interpreter.set_tensor(self.input["index"], _quantize(x[None], self.input))
            self.interpreter.invoke()
            rows.append([_dequantize(self.interpreter.get_tensor(o["index"])[0], o) for o in self.outputs])
        return {name: np.stack([r[i] for r in rows]) for i, name in enumerate(self.output_names)}


# --- Core ML --------------------------------------------------------------------------------------

def convert_coreml(module, size: int, meta: dict, int8: bool = False):
    """An ML Program (``.mlpackage``) with foldernet's metadata: fp16 compute (what the Neural
    Engine runs); with ``int8``, weights linearly quantised to int8 (activations stay fp16)."""
    ct = require("coremltools", "coreml")
    import torch

    example = torch.zeros(1, 3, size, size)
    with _quiet():
        program = torch.export.export(module.eval(), (example,)).run_decompositions({})
        model = ct.convert(program, inputs=[ct.TensorType(name="input", shape=tuple(example.shape))],
                           outputs=[ct.TensorType(name=n) for n in OUTPUTS], convert_to="mlprogram",
                           minimum_deployment_target=ct.target.iOS16)
        if int8:
            from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

            config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
            model = linear_quantize_weights(model, config=config)
    model.user_defined_metadata["foldernet"] = json.dumps(meta, ensure_ascii=False)
    model.short_description = (f"foldernet classifier over {len(meta['labels'])} classes: input 'input' is "
                               f"preprocessed float32 pixels (1, 3, {size}, {size}); see the foldernet metadata")
    model.input_description["input"] = "preprocessed pixels, NCHW float32 (see metadata 'preprocess')"
    model.output_description["probabilities"] = ("softmax(logits / temperature), the logits unit-normalised "
                                                    "first when metadata 'logit_norm' is true, in the order of "
                                                    "metadata 'labels'")
    model.output_description["features"] = "pooled backbone features (similar-example search)"
    model.output_description["logits"] = "head logits before temperature"
    return model


def check_coreml(path: Path, meta: dict, size: int) -> dict:
    """What can be checked without a Mac: the saved spec's input, outputs and metadata."""
    ct = require("coremltools", "coreml")
    with _quiet():
        spec = ct.utils.load_spec(str(path))
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    saved = json.loads(spec.description.metadata.userDefined.get("foldernet", "{}") or "{}")
    problems = []
    if inputs != {"input": [1, 3, size, size]}:
        problems.append(f"input is {inputs}, expected input [1, 3, {size}, {size}]")
    if outputs != list(OUTPUTS):
        problems.append(f"outputs are {outputs}, expected {list(OUTPUTS)}")
    if saved.get("labels") != meta["labels"]:
        problems.append("the labels in its metadata differ from the bundle's")
    return {"inputs": inputs, "outputs": outputs, "labels": len(saved.get("labels") or []), "problems": problems}


MAC_CHECK = ("Core ML runs only on macOS, so this file was checked here only by its spec (input, outputs, "
             "labels). On a Mac with foldernet[mobile]: foldernet export RUN --format coreml --force "
             "runs the same parity check as ONNX and TFLite (coremltools' predict on the held-out split).")


def can_run_coreml() -> bool:
    return sys.platform == "darwin"


class CoreMLClassifier(ExportedClassifier):
    """An ``.mlpackage`` run by Core ML (macOS only), for the parity check on a Mac."""

    def __init__(self, path: str | os.PathLike):
        ct = require("coremltools", "coreml", "running a Core ML model")
        self.path = Path(path)
        self.model = ct.models.MLModel(str(self.path))
        self._read_metadata(self.model.user_defined_metadata.get("foldernet"), "export it again")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.model.predict({"input": np.ascontiguousarray(x[None], np.float32)}) for x in batch]
        return {k: np.stack([np.asarray(r[k]).reshape(-1) for r in rows]) for k in OUTPUTS}
