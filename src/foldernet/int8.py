"""Static int8 for ONNX Runtime, and what makes a network agree with itself in int8.

Post-training quantisation rounds every weight and activation to 8 bits; on a small head that
separates close classes, that flips a few answers in a hundred. Three remedies, in the order
``export --int8`` uses them: equalisation (every activation that feeds a depthwise conv is rescaled
per channel so that one per-tensor scale fits all its channels, the depthwise conv undoing the scale:
the same function in fp32, rounded better in int8); plans that keep the first blocks (where per-tensor
scales lose the most) in fp32; and, when no plan agrees, a short distillation: the network is tuned
for a few dozen steps to reproduce its own fp32 logits while int8 rounding is simulated in its forward
pass (weights per output channel, activations per tensor with the ranges ONNX Runtime's calibration
will find), so the int8 file made from the tuned weights answers like the original. The head (a
linear layer on the pooled features) and the outputs stay fp32 in every plan: they cost nothing and
carry the margins between classes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from .progress import console, progress_bar

INT8_MIN_AGREEMENT = 0.99

# Plans tried in order, fastest first: how many leading blocks stay in fp32 (the stem, then blocks.0.0,
# blocks.1.0, ...). The early layers see the raw signal through few channels and per-tensor activation
# scales lose the most there (benchmarks/int8_sensitivity.py, demo digits, 142 held-out answers: quantised
# alone, the stem flipped 7, stage 1 10, each later stage 0-2); they are also high-resolution, so keeping
# them fp32 costs the most. Counted in blocks, not stages: lite0's stage 1 is two blocks, and keeping only
# the first in fp32 agreed as well as both (a demo bundle, 2026-12-07, equalised, 66 validation / 76 test flipped,
# speed at b32 vs fp32): all int8 2 / 1, 2.18x; stem + blocks.0.0 fp32 4 / 2, 2.07x; + blocks.1.0 1 / 0,
# 1.82x; + blocks.1.1 (stages 0-1 whole, the plan before) 1 / 0, 1.68x.
INT8_PLANS = (0, 2, 3, 4)
INT8_SELECT_AGREEMENT = 0.995


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, batches: list[np.ndarray], name: str):
        self.it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def block_of(weight_name: str, blocks: bool = True) -> str:
    """The network block a weight belongs to, from its module path: ``backbone.conv_stem``,
    ``backbone.blocks.1.0`` (EfficientNet's stage 1, its first block), ``backbone.layer1.0`` (ResNet),
    ``head``... The int8 plans keep leading blocks in fp32, so they are the unit: a stage is too coarse
    (lite0's stage 1 is two blocks, and where its first one is kept in fp32 the second need not be).
    ``blocks=False`` gives the stage (``backbone.blocks.1``), as the sensitivity benchmark reports."""
    key = []
    parts = weight_name.split(".")[:-1] or [weight_name]
    for i, part in enumerate(parts):
        key.append(part)
        # an ensemble's member index (``backbone.members.1.blocks.0.0``) is not a stage: go on
        if any(ch.isdigit() for ch in part) and not (i and parts[i - 1] == "members"):
            if blocks and i + 1 < len(parts) and parts[i + 1].isdigit():  # the block within the stage
                key.append(parts[i + 1])
            break
    return ".".join(key)


def _graph(model_path: Path):
    import onnx

    return onnx.load(str(model_path), load_external_data=False).graph


def block_groups(model_path: Path, blocks: bool = True) -> list[list[str]]:
    """Names of the Conv/Gemm nodes of an ONNX graph's backbone, grouped by block (by stage with
    ``blocks=False``), in graph order."""
    graph = _graph(model_path)
    head = set(head_nodes(graph))
    groups: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.name not in head:
            groups.setdefault(block_of(node.input[1], blocks), []).append(node.name)
    return list(groups.values())


def head_nodes(graph, features: str = "features") -> list[str]:
    """Names of the nodes of an ONNX graph from the one that writes the ``features`` output to the
    model's outputs: the head, the temperature and the softmax, which stay fp32 in every int8 plan (a
    quantised softmax output moves in steps of 1/255, a quantised logit moves the answer)."""
    tainted = {features}
    names = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if features in node.output or tainted & set(node.input):
            names.append(node.name)
            tainted.update(node.output)
    return names


def plan_name(k: int, distilled: bool = False) -> str:
    name = "all layers int8" if k == 0 else f"first {k} blocks fp32 (stem included)"
    return name + (", distilled" if distilled else "")


def prepared(fp32: Path, work: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference, BN folding), falling back to the file as is."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # a fresh folder of its own, so the file it writes (and quantize_int8 later deletes) is never one
    # that already stood beside the model
    prep = Path(tempfile.mkdtemp(prefix=".prep.", dir=work)) / (fp32.stem + ".prep.onnx")
    try:
        quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        return prep
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
        shutil.rmtree(prep.parent, ignore_errors=True)
        return fp32


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, keep_fp32: list[str] | tuple = (),
                  prepared_path: Path | None = None, calibration: str = "MinMax") -> Path:
    """Static int8 (QDQ, per-channel weights, activations calibrated on ``calib`` by ONNX Runtime's
    ``calibration`` method: MinMax, as the export uses, or Percentile or Entropy); the head and the
    nodes named in ``keep_fp32`` stay fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = prepared_path or prepared(fp32, out.parent)
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    try:
        quantize_static(str(src), str(out), _Calibration(batches, "input"), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[calibration],
                        nodes_to_exclude=list(keep_fp32) + head_nodes(_graph(src)))
    finally:
        if prepared_path is None and src != fp32:
            shutil.rmtree(src.parent, ignore_errors=True)  # the temporary folder prepared() made
    return out


# Equalisation, measured with lite0 (all layers int8, MinMax): the demo digits' 142 held-out answers
# flipped 8 times before, 5 after (benchmarks/int8_sensitivity.py); hymenoptera's 153, 2 before, 0 after,
# so its export now keeps all-int8 (2.15x fp32) without distillation. The fp32 answers are unchanged.
EQUALISE_MAX_SCALE = 32.0


def _observe(net, calib: np.ndarray, modules: list, record, inputs: bool = False) -> None:
    """Run the calibration rows through ``net`` (batches of 32, no gradients) with ``record(k, output)``
    called on every output of ``modules[k]`` (its input, with ``inputs``): how equalisation and
    distillation read activation ranges."""
    import torch

    def hook(k: int, inp, out) -> None:  # returns nothing: a forward hook's return value replaces the output
        record(k, (inp[0] if inputs else out).detach())

    hooks = [m.register_forward_hook(lambda _mod, inp, out, k=k: hook(k, inp, out)) for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for i in range(0, len(calib), 32):
                net(torch.from_numpy(np.ascontiguousarray(calib[i:i + 32], np.float32)))
    finally:
        for h in hooks:
            h.remove()


def equalise_pairs(net) -> list[tuple]:
    """(batch norm with a ReLU/ReLU6, the depthwise conv that reads its output) in every EfficientNet/
    MobileNet-style trunk of ``net``: the stem's activation and the first depthwise conv, and in each
    inverted residual block the expansion's activation and its depthwise conv."""
    from torch import nn

    def relu_bn(bn) -> bool:
        act = getattr(bn, "act", None)
        return isinstance(bn, nn.BatchNorm2d) and bn.affine and isinstance(act, (nn.ReLU, nn.ReLU6))

    def depthwise(conv, channels: int) -> bool:
        return isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels == channels

    pairs = []
    for trunk in net.modules():
        blocks = [b for stage in getattr(trunk, "blocks", ()) if isinstance(stage, nn.Sequential) for b in stage]
        if not blocks or not hasattr(trunk, "conv_stem"):
            continue
        first = blocks[0]
        if relu_bn(getattr(trunk, "bn1", None)) and not hasattr(first, "conv_pwl") and \
                depthwise(getattr(first, "conv_dw", None), trunk.bn1.num_features):
            pairs.append((trunk.bn1, first.conv_dw))
        for b in blocks:
            if hasattr(b, "conv_pwl") and relu_bn(getattr(b, "bn1", None)) and \
                    depthwise(getattr(b, "conv_dw", None), b.bn1.num_features):
                pairs.append((b.bn1, b.conv_dw))
    return pairs


def equalise(module, calib: np.ndarray):
    """A copy of ``module`` that computes the same function but rounds better in int8: each activation
    that feeds a depthwise conv is quantised with one scale for all its channels, so a channel whose
    values stay small keeps only a few of the 256 levels. Each such channel is multiplied (through its
    batch norm) by ``max over channels / its own max`` on ``calib``, capped, and the depthwise conv
    divides by the same factor: ReLU and ReLU6 commute with a positive scale below the clip, and the
    depthwise weights are quantised per channel, so nothing is lost there (cross-layer equalisation,
    Nagel et al. 2019, on the pairs where it is exact). Returns the copy and how many pairs it scaled."""
    import copy

    import torch

    net = copy.deepcopy(module).eval()
    pairs = equalise_pairs(net)
    if not pairs:
        return net, {"pairs": 0}
    highs = [torch.zeros(bn.num_features) for bn, _ in pairs]

    def record(k, out):
        highs[k] = torch.maximum(highs[k], out.amax((0, 2, 3)))

    _observe(net, calib, [bn for bn, _ in pairs], record)
    scales = []
    with torch.no_grad():
        for (bn, conv), high in zip(pairs, highs):
            s = (high.max() / high.clamp_min(1e-6)).clamp(1.0, EQUALISE_MAX_SCALE)
            bn.weight.mul_(s)
            bn.bias.mul_(s)
            conv.weight.div_(s.view(-1, 1, 1, 1))
            scales.append(float(s.median()))
    return net, {"pairs": len(pairs), "median_scale": round(float(np.median(scales)), 3)}


# Distillation: measured on the clothing bundle (lite0, 341 validation images): post-training int8
# flipped 6 answers with the first two stages in fp32, 2 after 60 steps of this (lr 3e-6, batch 32,
# 512 training images); a higher rate drifts from the teacher, more steps did not help.
DISTILL_STEPS = 60
DISTILL_LR = 3e-6
DISTILL_BATCH = 32


def _fake_quant_weight(weight):
    """Symmetric int8 per output channel, as ONNX Runtime quantises Conv weights (scales from the
    current weights, so the rounding follows them as they move; gradients pass straight through)."""
    import torch

    flat = weight.detach().abs().reshape(weight.shape[0], -1).amax(1).clamp_min(1e-8)
    scale = (flat / 127.0).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


def _activation_points(backbone):
    """The modules whose outputs ONNX Runtime quantises: every batch norm (after folding, a Conv's
    output, with its activation fused) and every residual sum."""
    from torch import nn

    return [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d) or getattr(m, "has_skip", False)]


class _SimulatedInt8:
    """Inside ``with``, ``net`` (the export network) computes as its int8 file will: the input and every
    activation point rounded to 8 bits per tensor with the ranges ONNX Runtime's MinMax calibration
    finds on ``calib`` (always including 0), Conv weights to 8 bits per output channel (from the current
    weights, so the rounding follows them as they move; gradients pass straight through). On exit the
    float weights stay, the rounding goes."""

    def __init__(self, net, calib: np.ndarray):
        self.net, self.points = net, _activation_points(net.backbone)
        self.ranges = {id(m): [0.0, 0.0] for m in self.points}

        def record(k, out):
            r = self.ranges[id(self.points[k])]
            r[0], r[1] = min(r[0], float(out.min())), max(r[1], float(out.max()))

        _observe(net, calib, self.points, record)
        self.input_range = min(0.0, float(calib.min())), max(0.0, float(calib.max()))

    @staticmethod
    def _fake_quant(out, lo: float, hi: float):
        import torch

        scale = max(hi - lo, 1e-8) / 255.0
        return torch.fake_quantize_per_tensor_affine(out, scale, int(round(-lo / scale)), 0, 255)

    def __enter__(self):
        from torch import nn
        from torch.nn.utils import parametrize

        class FakeQuant(nn.Module):
            def forward(self, w):
                return _fake_quant_weight(w)

        self.convs = [m for m in self.net.backbone.modules() if isinstance(m, nn.Conv2d)]
        for m in self.convs:
            parametrize.register_parametrization(m, "weight", FakeQuant())
        self.hooks = [m.register_forward_hook(lambda mod, _inp, out: self._fake_quant(out, *self.ranges[id(mod)]))
                      for m in self.points]
        self.hooks.append(self.net.backbone.register_forward_pre_hook(
            lambda _mod, args: (self._fake_quant(args[0], *self.input_range),)))
        return self

    def __exit__(self, *exc):
        from torch.nn.utils import parametrize

        for h in self.hooks:
            h.remove()
        for m in self.convs:  # keep the float weights, drop the simulated rounding
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return False


def distill(module, pixels: np.ndarray, calib: np.ndarray, steps: int = DISTILL_STEPS, lr: float = DISTILL_LR,
            batch: int = DISTILL_BATCH, seed: int = 0, progress: bool = True):
    """A copy of ``module`` (the export network: (probabilities, features, logits)) tuned so that its
    int8 rounding changes its answers as little as possible: ``steps`` Adam steps minimising the KL
    divergence from the original's logits on ``pixels`` (preprocessed training rows), with int8
    rounding of the backbone simulated; batch norm statistics stay frozen. ``calib`` gives the
    activation ranges, as ONNX Runtime's MinMax calibration will see them. Returns the copy and what
    the tuning did (the simulated int8 model's KL divergence from the original, before and after)."""
    import copy

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    teacher = module.eval()
    student = copy.deepcopy(module).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(pixels, np.float32))
    with torch.no_grad():
        target = torch.cat([teacher(x_all[i:i + 64])[2] for i in range(0, len(x_all), 64)])
    rng = np.random.default_rng(seed)
    probe = torch.from_numpy(rng.choice(len(x_all), min(256, len(x_all)), replace=False))

    def divergence() -> float:
        """KL of the int8-simulated student from the original on a fixed sample of the rows."""
        with torch.no_grad():
            logits = torch.cat([student(x_all[probe[i:i + 64]])[2] for i in range(0, len(probe), 64)])
            return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target[probe], -1), log_target=True,
                                  reduction="batchmean"))

    with _SimulatedInt8(student, calib):
        for p in student.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        before = divergence()
        with progress_bar(steps, "int8 distillation", enabled=progress) as bar:
            for _ in range(steps):
                idx = torch.from_numpy(rng.choice(len(x_all), min(batch, len(x_all)), replace=False))
                logits = student(x_all[idx])[2]
                loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target[idx], -1), log_target=True,
                                reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(info=f"KL {loss.item():.4f}")
                bar.advance()
        after = divergence()
    for p in student.parameters():
        p.requires_grad_(False)
    console.print(f"int8 distillation: {steps} steps on {len(x_all)} training rows; simulated int8 KL from the "
                  f"original {before:.5f} -> {after:.5f}")
    return student.eval(), {"steps": steps, "rows": len(x_all), "kl_before": round(before, 6),
                            "kl_after": round(after, 6)}
