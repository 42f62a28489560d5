"""The seeds' baseline: a small VGG-style CNN trained from random weights (``--backbone scratch``).

Four blocks of 3x3 convolutions with BatchNorm and ReLU, max-pooling between them, global average
pooling at the end: 1.2 M parameters, quick on a CPU at 128 px. It shows what transfer learning buys.
"""

from __future__ import annotations

SCRATCH_SIZE = 128


def create_scratch_model(widths: tuple[int, ...] = (32, 64, 128, 256)):
    from torch import nn

    class ScratchCNN(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c_in = [], 3
            for i, w in enumerate(widths):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                           nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                if i < len(widths) - 1:
                    layers.append(nn.MaxPool2d(2))
                c_in = w
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.drop = nn.Dropout(0.3)  # active only in training: small data, many weights
            self.num_features = c_in
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            return self.drop(self.pool(self.features(x)).flatten(1))

    return ScratchCNN().eval()


def scratch_data_config() -> dict:
    return {"input_size": (3, SCRATCH_SIZE, SCRATCH_SIZE), "interpolation": "bilinear", "crop_pct": 1.0,
            # inputs in 0..1: silence in a spectrogram is then 0, the same value as the conv padding
            "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
