"""The encoder: a backbone together with how inputs are prepared for it (preprocessing, and for
sound the spectrogram settings). Train, audit, split and the bundle all build it here, so every
stage turns a file into the same feature vector."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .models import DEFAULT_BACKBONE, Backbone, create_backbone, state_digest
from .modality import modality
from .preprocess import Preprocess


@dataclass
class Encoder:
    backbone: Backbone
    preprocess: Preprocess
    audio: object = None               # audio.AudioConfig for a model of sounds
    spectrogram_stats: bool = False
    tta: str | None = None             # "flip": features averaged over the input and its mirror image

    @classmethod
    def build(cls, name: str = DEFAULT_BACKBONE, kind: str = "image", weights: str | os.PathLike | None = None,
              img_size: int | None = None, audio: dict | None = None, paths: Sequence = (),
              spectrogram_stats: bool = False, pretrained: bool = True, crop_pct: float | None = None) -> "Encoder":
        """The backbone ``name`` set up for inputs of ``kind`` (image or audio); ``paths`` (a sample of
        the data) let audio settings follow the data's sample rates and clip lengths."""
        bb = create_backbone(name, weights=weights, pretrained=pretrained)
        pre, audio_cfg = modality(kind).prepare(bb.data_config, img_size, audio, list(paths), crop_pct=crop_pct)
        enc = cls(bb, pre, audio_cfg)
        if spectrogram_stats:
            enc = enc.with_spectrogram_stats()
        return enc

    @property
    def name(self) -> str:
        return self.backbone.name

    @property
    def model(self):
        return self.backbone.model

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    @property
    def pretrained(self) -> bool:
        return self.backbone.weights_source != "random init"

    def with_spectrogram_stats(self) -> "Encoder":
        from .spectrogram_stats import add_spectrogram_stats

        return replace(self, backbone=add_spectrogram_stats(self.backbone, self.preprocess.size),
                       spectrogram_stats=True)

    def with_tta(self) -> "Encoder":
        """Features averaged over the input and its left-right mirror. The head is linear, so this is
        the same as averaging the logits of both views; it is part of the model (and of its ONNX graph),
        so predict, serve and the export all do it without knowing."""
        import torch
        from torch import nn

        class FlipAveraged(nn.Module):
            def __init__(self, net: nn.Module):
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 0.5 * (self.net(x) + self.net(torch.flip(x, dims=[3])))

        return replace(self, backbone=replace(self.backbone, model=FlipAveraged(self.model).eval()), tta="flip")

    def with_model(self, model) -> "Encoder":
        """The same encoder around other weights (after fine-tuning)."""
        return replace(self, backbone=replace(self.backbone, model=model.eval()))

    def extractor(self, engine: str = "onnx", use_cache: bool = True, view: int = 0):
        """Files -> feature vectors; ``view`` > 0 extracts that augmented view instead (the feature bank)."""
        from .features import FeatureExtractor

        return FeatureExtractor(self.model, self.preprocess, state_digest(self.model), self.name, engine=engine,
                                use_cache=use_cache, audio=self.audio, view=view)

    def fit_standardisation(self, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Parts whose features are standardised on the training rows (musicnn, spectrogram
        statistics) fit that now; their statistics are saved with the weights."""
        for part in self.model.modules():
            if hasattr(part, "fit_standardisation"):
                vectors = part.fit_standardisation(vectors, rows)
        return vectors
