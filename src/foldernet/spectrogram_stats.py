"""Classic spectrogram statistics appended to an embedding, and the standardisation that feature
blocks of different scales (ImageNet's, musicnn's, these statistics) share."""

from __future__ import annotations

import numpy as np


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


def add_spectrogram_stats(backbone, size: int):
    """The backbone with classic audio statistics of its input spectrogram appended to its embedding.

    ImageNet features see a spectrogram as texture; the statistics an audio classifier has always
    used see its time course and spectral envelope: per time segment, the mean level of 64 bands, the
    mean and spread of 20 cepstral coefficients (MFCC-like), the loudness envelope and the spectral
    flux. Training standardises them (``fit_standardisation``, buffers saved with the model) to half
    unit scale, so neither block swamps the other in the head or in similar-example search. They
    help on instrument notes of unseen instruments (benchmarks/RESULTS.md).
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
