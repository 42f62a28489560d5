"""musicnn: an audio-pretrained backbone (``--backbone musicnn_mtt`` or ``musicnn_msd``).

ImageNet backbones see a spectrogram as a picture. musicnn (Pons & Serra, ISMIR 2019) was trained on
spectrograms of music to tag it (MagnaTagATune: guitar, piano, strings, flute, voice, synth, drums…;
or the Million Song Dataset), with filters shaped for timbre (tall, 38 and 67 mel bands) and for time
(long, up to 4 s). On instrument notes of unseen instruments its pooled features beat ImageNet's
clearly (benchmarks/RESULTS.md).

Its weights ship inside the PyPI package ``musicnn`` (ISC licence) as TensorFlow checkpoints. That
package pins TensorFlow 1 and numpy<1.17, so it installs without its dependencies
(``pip install --no-deps musicnn``) and is never imported: ``read_tf_checkpoint`` reads the
checkpoint files directly and the network is rebuilt here in PyTorch, layer for layer (checked
against TensorFlow's own output: max difference about 1e-4). ``--weights`` may name a checkpoint folder instead, or a
state_dict saved from this module.

The input is the same spectrogram image every audio backbone gets; the backbone asks the pipeline
(``data_config["audio"]``) to render it as musicnn was trained: 16 kHz, n_fft 512, hop 256, 96 mel
bands on the Slaney scale, 3 s windows. The network's ``from_image`` turns the image back into
musicnn's ``log10(10000 * power + 1)`` input (96 x 187), with the clip's loudest bin set to
``PEAK_POWER``; the same image also feeds ``--spectrogram-stats``, and the model exports to ONNX whole.
The features are musicnn's temporal max- and mean-pooling of its front- and mid-end (1,506 values),
standardised on the training clips.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np

from .errors import FoldernetError

MUSICNN_MODELS = {"musicnn_mtt": "MTT_musicnn", "musicnn_msd": "MSD_musicnn"}
N_MELS, N_FRAMES = 96, 187         # musicnn's input patch: 96 mel bands x 187 frames (3 s)
IMAGE_SIZE = 192                   # twice the mel resolution; squeezed back to 96 x 187 (bilinear)
TOP_DB = 80.0
PEAK_POWER = 10.0                  # mel power given to a clip's loudest bin (musicnn saw absolute levels)
AUDIO_SETTINGS = {"sample_rate": 16000, "n_fft": 512, "hop_length": 256, "n_mels": N_MELS, "fmin": 0.0,
                  "fmax": 8000.0, "mel_scale": "slaney", "window_seconds": 3.0, "top_db": TOP_DB}
INSTALL_HINT = ("install its weights with `pip install --no-deps musicnn` (the package pins TensorFlow 1, "
                "which foldernet does not need), or pass --weights with its checkpoint folder "
                "(e.g. .../musicnn/MTT_musicnn/)")


# ---------------------------------------------------------------- reading a TensorFlow checkpoint

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, value) of a protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _table_block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one block of a LevelDB-format table (prefix-compressed keys)."""
    if data[offset + size] != 0:
        raise ValueError("compressed checkpoint index blocks are not supported")
    block = data[offset:offset + size]
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key, entries = len(block) - 4 - 4 * n_restarts, 0, b"", []
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n_value, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + n_value]))
        pos += n_value
    return entries


_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def read_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a TensorFlow (V2 format) checkpoint: ``prefix.index`` is a sorted table of
    BundleEntryProto, each pointing into ``prefix.data-00000-of-00001``. No TensorFlow needed."""
    prefix = str(prefix)
    index_path, data_path = prefix + ".index", prefix + ".data-00000-of-00001"
    try:
        index, blob = Path(index_path).read_bytes(), Path(data_path).read_bytes()
        if len(index) < 48 or struct.unpack_from("<Q", index, len(index) - 8)[0] != 0xDB4775248B80FB57:
            raise ValueError("not a TensorFlow checkpoint index")
        footer = index[-48:]
        _, p = _varint(footer, 0)
        _, p = _varint(footer, p)
        index_offset, p = _varint(footer, p)
        index_size, _ = _varint(footer, p)
        tensors = {}
        for _, handle in _table_block(index, index_offset, index_size):
            offset, p = _varint(handle, 0)
            size, _ = _varint(handle, p)
            for key, value in _table_block(index, offset, size):
                if not key:  # the bundle header
                    continue
                entry = dict(_proto_fields(value))
                dims = [dict(_proto_fields(d)).get(1, 0) for f, d in _proto_fields(entry.get(2, b"")) if f == 2]
                dtype = _DTYPES.get(entry.get(1, 1))
                if dtype is None or entry.get(3, 0) != 0:
                    continue  # strings, resources, other shards: nothing a network layer needs
                start, n = entry.get(4, 0), entry.get(5, 0)
                tensors[key.decode()] = np.frombuffer(blob, dtype, count=n // np.dtype(dtype).itemsize,
                                                      offset=start).reshape(dims).copy()
        return tensors
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise FoldernetError(f"cannot read the TensorFlow checkpoint {prefix}: {exc}") from exc


def checkpoint_prefix(name: str) -> str:
    """Where the installed ``musicnn`` package keeps ``name``'s checkpoint (found, never imported).
    Its files are named ``.index`` and ``.data-…`` inside the folder: the prefix ends with a slash."""
    spec = importlib.util.find_spec("musicnn")
    if spec is None or not spec.submodule_search_locations:
        raise FoldernetError(f"backbone {name} needs musicnn's weights: {INSTALL_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], MUSICNN_MODELS[name], "")


# ---------------------------------------------------------------- the network

def create_musicnn_model(n_mels: int = N_MELS, filters: float = 1.6, midend: int = 64, image_size: int = IMAGE_SIZE,
                         mean: float = 0.0, std: float = 1.0):
    """musicnn's front- and mid-end with temporal pooling, fed by a spectrogram image."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    timbral, temporal = int(filters * 128), int(filters * 32)
    front = 2 * timbral + 3 * temporal

    class Musicnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_bn = nn.BatchNorm2d(1, eps=1e-3)
            self.timbral = nn.ModuleList([nn.Conv2d(1, timbral, (7, int(f * n_mels))) for f in (0.4, 0.7)])
            self.timbral_bn = nn.ModuleList([nn.BatchNorm2d(timbral, eps=1e-3) for _ in range(2)])
            self.temporal = nn.ModuleList([nn.Conv2d(1, temporal, (k, 1)) for k in (128, 64, 32)])
            self.temporal_bn = nn.ModuleList([nn.BatchNorm2d(temporal, eps=1e-3) for _ in range(3)])
            self.mid = nn.ModuleList([nn.Conv1d(front if i == 0 else midend, midend, 7, padding=3) for i in range(3)])
            self.mid_bn = nn.ModuleList([nn.BatchNorm1d(midend, eps=1e-3) for _ in range(3)])
            self.num_features = 2 * (front + 3 * midend)
            # standardisation of the pooled features, fitted on the training clips (fit_standardisation)
            self.register_buffer("features_mean", torch.zeros(self.num_features))
            self.register_buffer("features_scale", torch.ones(self.num_features))
            self.register_buffer("features_limit", torch.tensor(float("inf")))

        def fit_standardisation(self, features: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
            """The pooled maps range from about 0 to 100; a linear head did clearly worse on them as they
            are than on their z-scores (benchmarks/RESULTS.md)."""
            from .spectrogram_stats import STATS_MIN_STD, fit_standardisation

            # the floor also keeps the many near-constant maps (std ~1e-6) from magnifying rounding noise
            return fit_standardisation(self, features, fit_rows, slice(0, self.num_features), "features",
                                       STATS_MIN_STD)

        def from_image(self, x: torch.Tensor) -> torch.Tensor:
            """(B, 3, S, S) normalised spectrogram image -> (B, 187, 96) log10(10000 * power + 1)."""
            g = (x[:, :1] * std + mean).flip(2)                       # 0..1, low frequencies first
            g = F.interpolate(g, size=(n_mels, N_FRAMES), mode="bilinear", align_corners=False)[:, 0]
            power = PEAK_POWER * torch.pow(10.0, (g.clamp(0, 1) - 1.0) * (TOP_DB / 10.0))
            return torch.log10(10000.0 * power + 1.0).transpose(1, 2)

        def pooled(self, x: torch.Tensor) -> torch.Tensor:
            """(B, T, 96) musicnn input -> (B, 1506): max and mean over time of every feature map."""
            x = self.input_bn(x[:, None])                               # (B, 1, T, F)
            maps = []
            padded = F.pad(x, (0, 0, 3, 3))
            for conv, bn in zip(self.timbral, self.timbral_bn):
                maps.append(bn(F.relu(conv(padded))).amax(dim=3))      # max over frequency: (B, C, T)
            for conv, bn in zip(self.temporal, self.temporal_bn):
                k = conv.kernel_size[0]                                 # TensorFlow's 'same' padding
                maps.append(bn(F.relu(conv(F.pad(x, (0, 0, (k - 1) // 2, k // 2))))).amax(dim=3))
            h = torch.cat(maps, 1)
            mids = [h]
            for i, (conv, bn) in enumerate(zip(self.mid, self.mid_bn)):
                y = bn(F.relu(conv(mids[-1])))
                mids.append(y if i == 0 else y + mids[-1])              # residual after the first
            fmap = torch.cat(mids, 1)                                   # (B, 753, T)
            return torch.cat([fmap.amax(dim=2), fmap.mean(dim=2)], 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (self.pooled(self.from_image(x)) - self.features_mean) / self.features_scale
            return torch.minimum(torch.maximum(z, -self.features_limit), self.features_limit)

    return Musicnn().eval()


def musicnn_state(tf: dict[str, np.ndarray]) -> dict:
    """musicnn's TensorFlow variables under this module's names (layers in creation order)."""
    import torch

    def t(key):
        if key not in tf:
            raise FoldernetError(f"the checkpoint has no variable {key}: is it a musicnn checkpoint "
                                 f"(MTT_musicnn or MSD_musicnn)?")
        return torch.from_numpy(np.ascontiguousarray(tf[key]))

    n = 2 * sum(len(t(f"conv2d{k}/bias")) for k in ("", "_1", "_2", "_3", "_4", "_5", "_6", "_7"))
    state = {"features_mean": torch.zeros(n), "features_scale": torch.ones(n),
             "features_limit": torch.tensor(float("inf"))}  # not standardised yet: training does that
    bns = ["input_bn", "timbral_bn.0", "timbral_bn.1", "temporal_bn.0", "temporal_bn.1", "temporal_bn.2",
           "mid_bn.0", "mid_bn.1", "mid_bn.2"]
    for i, name in enumerate(bns):
        p = "batch_normalization" + (f"_{i}" if i else "")
        state.update({f"{name}.weight": t(p + "/gamma"), f"{name}.bias": t(p + "/beta"),
                      f"{name}.running_mean": t(p + "/moving_mean"), f"{name}.running_var": t(p + "/moving_variance"),
                      f"{name}.num_batches_tracked": torch.tensor(0)})
    for i, name in enumerate(["timbral.0", "timbral.1", "temporal.0", "temporal.1", "temporal.2"]):
        p = "conv2d" + (f"_{i}" if i else "")
        state[f"{name}.weight"] = t(p + "/kernel").permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        state[f"{name}.bias"] = t(p + "/bias")
    for i in range(3):
        p = f"conv2d_{i + 5}"
        state[f"mid.{i}.weight"] = t(p + "/kernel")[:, :, 0, :].permute(2, 1, 0).contiguous()
        state[f"mid.{i}.bias"] = t(p + "/bias")
    return state


def data_config() -> dict:
    """The image is the spectrogram in 0..1 (no ImageNet normalisation); ``audio`` is how to render it."""
    return {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bilinear", "crop_pct": 1.0,
            "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "audio": dict(AUDIO_SETTINGS)}


def create_musicnn(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True):
    """(model, weights source) for ``musicnn_mtt`` / ``musicnn_msd``."""
    from .weights import load_state_file, load_strict

    model = create_musicnn_model()
    if weights is not None:
        path = Path(weights)
        if path.is_dir() or Path(str(path) + ".index").exists():
            prefix = os.path.join(path, "") if path.is_dir() else str(path)
            load_strict(model, musicnn_state(read_tf_checkpoint(prefix)), str(path))
        else:
            load_strict(model, load_state_file(path), str(path))
        return model, f"file:{path.name}"
    if not pretrained:
        return model, "random"
    prefix = checkpoint_prefix(name)
    load_strict(model, musicnn_state(read_tf_checkpoint(prefix)), str(prefix))
    return model, f"pypi:musicnn/{MUSICNN_MODELS[name]}"
