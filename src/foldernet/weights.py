"""Reading weight files safely (no unpickling of arbitrary objects) and loading them strictly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FoldernetError

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def load_strict(model: nn.Module, state: dict, where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = str(exc).splitlines()
        raise FoldernetError(f"weights in {where} do not fit the model: {' '.join(msg[:4])[:600]}") from exc
