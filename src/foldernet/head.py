"""The linear head: the one place that trains it on cached features, computes its logits, and turns
it into a torch module (for fine-tuning, and for the exported backbone + head graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibration import scaled_logits, softmax
from .progress import progress_bar


@dataclass
class LinearHead:
    """``weight`` (C, D) and ``bias`` (C,) of a softmax classifier on D-dim features, with the
    calibration ``temperature`` (applied to unit-normalised logits with ``logit_norm``, see
    calibration.unit_logits); ``history`` is the per-epoch record of the last ``fit``."""

    weight: np.ndarray
    bias: np.ndarray
    temperature: float = 1.0
    history: list[dict] = field(default_factory=list)
    logit_norm: bool = False

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def proba(self, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
        if not calibrated:
            return softmax(self.logits(x))
        return softmax(scaled_logits(self.logits(x), self.temperature, self.logit_norm))

    @classmethod
    def fit(cls, x_train: np.ndarray, y_train: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None, n_classes: int,
            spec=None, class_weights: np.ndarray | None = None, seed: int = 0, max_epochs: int | None = None,
            progress: bool = True) -> "LinearHead":
        """AdamW on the features (settings from ``spec``, a ``spec.HeadSpec``); keeps the epoch with the
        best validation loss (the training loss without ``val``); ``max_epochs`` overrides the spec's (a
        refit trains exactly that many). Features are cached, so this takes seconds for thousands."""
        import torch
        from torch import nn

        from .spec import HeadSpec

        spec = spec or HeadSpec()
        x_val, y_val = val if val is not None else (None, None)
        max_epochs, patience, lr = max_epochs or spec.max_epochs, spec.patience, spec.head_lr
        weight_decay, batch_size = spec.weight_decay, spec.batch_size

        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        xt = torch.from_numpy(x_train)
        yt = torch.from_numpy(y_train).long()
        head = nn.Linear(xt.shape[1], n_classes)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        w = torch.from_numpy(class_weights).float() if class_weights is not None else None
        loss_fn = nn.CrossEntropyLoss(weight=w)
        have_val = x_val is not None and len(x_val) > 0
        xv = torch.from_numpy(x_val) if have_val else None
        yv = torch.from_numpy(y_val).long() if have_val else None
        best = (float("inf"), None)
        history: list[dict] = []
        stale = 0
        with progress_bar(max_epochs, "train head", progress) as bar:
            for epoch in range(max_epochs):
                head.train()
                perm = torch.randperm(len(xt), generator=g)
                total = 0.0
                for i in range(0, len(xt), batch_size):
                    idx = perm[i:i + batch_size]
                    opt.zero_grad()
                    loss = loss_fn(head(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                row = {"epoch": epoch + 1, "train_loss": total / len(xt)}
                with torch.no_grad():
                    head.eval()
                    row["train_acc"] = float((head(xt).argmax(1) == yt).float().mean())
                    if have_val:
                        out = head(xv)
                        row["val_loss"] = float(nn.functional.cross_entropy(out, yv))
                        row["val_acc"] = float((out.argmax(1) == yv).float().mean())
                history.append(row)
                score = row.get("val_loss", row["train_loss"])
                if score < best[0] - 1e-5:
                    best = (score, {k: v.clone() for k, v in head.state_dict().items()})
                    stale = 0
                else:
                    stale += 1
                bar.advance(1)
                bar.update(info=f"val_acc {row.get('val_acc', float('nan')):.3f}")
                if have_val and stale >= patience:
                    bar.update(total=epoch + 1, completed=epoch + 1)  # the bar ends where early stopping did
                    break
        state = best[1] or head.state_dict()
        return cls(state["weight"].numpy().copy(), state["bias"].numpy().copy(), history=history)

    def best_epoch(self) -> int:
        """The epoch ``fit`` kept: the first with the lowest validation loss (1-based)."""
        losses = [row["val_loss"] for row in self.history if "val_loss" in row]
        if not losses:
            raise ValueError("no validation loss in the history: early stopping chose no epoch")
        return int(np.argmin(losses)) + 1

    def torch_module(self):
        """An ``nn.Linear`` holding these weights."""
        import torch
        from torch import nn

        layer = nn.Linear(self.dim, self.n_classes)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(self.weight, np.float32)))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(self.bias, np.float32)))
        return layer

    @classmethod
    def from_torch(cls, layer, temperature: float = 1.0) -> "LinearHead":
        return cls(layer.weight.detach().cpu().numpy().copy(), layer.bias.detach().cpu().numpy().copy(), temperature)


def network(backbone, head: LinearHead | None, n_classes: int, dim: int, with_outputs: bool = False):
    """backbone + linear head as one ``nn.Module``: logits for fine-tuning; with ``with_outputs``
    (export) ``(softmax(logits / T), features, logits)`` (logits unit-normalised first when the head
    says so) so the ONNX graph answers like the bundle."""
    import torch
    from torch import nn

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = head.torch_module() if head is not None else nn.Linear(dim, n_classes)
            temperature = head.temperature if head is not None else 1.0
            self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature), persistent=False)
            self.logit_norm = bool(head is not None and head.logit_norm)

        def forward(self, x):
            f = self.backbone(x)
            logits = self.head(f)
            if not with_outputs:
                return logits
            z = logits / logits.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.logit_norm else logits
            return torch.softmax(z * self.inv_temperature, dim=-1), f, logits

    return Network()


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights, mean 1, for a class-weighted loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    counts[counts == 0] = 1
    w = len(y) / (n_classes * counts)
    return (w / w.mean()).astype(np.float32)


def imbalance_ratio(counts: dict[str, int]) -> float:
    """Largest over smallest non-empty class."""
    vals = [v for v in counts.values() if v > 0]
    return max(vals) / min(vals) if vals else 1.0
