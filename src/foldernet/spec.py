"""The training spec: every choice `train` makes, typed, validated once, and resolved to the values
actually used (defaults that depend on the mode or the backbone are decided here, not in the CLI).

``TrainSpec.from_options(**options)`` is the one door for the CLI and the Python API: options are the
flat names of ``params.TRAIN`` (the CLI's flags without ``--``); each lands in its section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import FoldernetError
from .params import check, table


@dataclass(frozen=True)
class SplitSpec:
    """Which files, and where each goes."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    splits: Path | None = None
    label_regex: str | None = None
    group_by: str | None = None
    allow_leakage: bool = False
    keep_placeholders: bool = False
    label_map_file: Path | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The encoder: which backbone, its weights, how inputs are sized, how features are computed."""

    backbone: str = "tf_efficientnet_lite0"
    weights: Path | None = None
    mode: str = "head"
    img_size: int | None = None
    crop_pct: float | None = None     # images: None is modality.IMAGE_CROP_PCT
    engine: str = "onnx"
    tta: str = "off"
    budget: str | None = None
    spectrogram_stats: bool = False

    @property
    def pretrained(self) -> bool:
        """Only the scratch CNN without a weights file starts from random weights."""
        return not (self.backbone == "scratch" and self.weights is None)


@dataclass(frozen=True)
class HeadSpec:
    """The linear head on frozen features: AdamW, early stopping on the validation loss."""

    max_epochs: int = 200
    patience: int = 15
    head_lr: float = 1e-3
    balance: str = "auto"
    min_precision: float | None = None
    views: int | None = None         # resolved: 1, or 3 in top mode
    refit: bool = False
    weight_decay: float = 1e-4
    batch_size: int = 64


@dataclass(frozen=True)
class FinetuneSpec:
    """Training the whole network (mode finetune, or the scratch CNN); see finetune.py."""

    epochs: int | None = None
    finetune_lr: float | None = None
    batch_size: int = 32
    augment: str = "light"
    workers: int = 0
    resume: bool = False
    keep_checkpoint: bool = False
    patience: int | None = None
    low_res_epochs: int = 0
    top_stages: int = 2


@dataclass(frozen=True)
class AudioSpec:
    """Audio settings the user chose; the rest are derived from the data (audio.config_for)."""

    window_seconds: float | None = None
    sample_rate: int | None = None
    n_mels: int | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RunSpec:
    force: bool = False
    use_cache: bool = True
    progress: bool = True
    report: bool = True


SECTIONS = {"split": SplitSpec, "model": ModelSpec, "head": HeadSpec, "finetune": FinetuneSpec,
            "audio": AudioSpec, "run": RunSpec}


@dataclass(frozen=True)
class TrainSpec:
    split: SplitSpec = field(default_factory=SplitSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    head: HeadSpec = field(default_factory=HeadSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    audio: AudioSpec = field(default_factory=AudioSpec)
    run: RunSpec = field(default_factory=RunSpec)

    @classmethod
    def from_options(cls, **options: Any) -> "TrainSpec":
        """Validate flat options (unknown names refused) and resolve them into a spec.

        Two conveniences are resolved here, the same for CLI and API: ``lr`` is the learning rate of
        the stage the mode trains last (the head's in head mode, fine-tuning's otherwise), and in head
        mode ``epochs`` caps the head's epochs (``max_epochs``). ``audio={...}`` is accepted as the
        three audio options."""
        options = dict(options)
        audio = options.pop("audio", None) or {}
        if not isinstance(audio, dict):
            raise FoldernetError(f"train audio= must be a dict of window_seconds, sample_rate, n_mels (got {audio!r})")
        for key, value in audio.items():
            options.setdefault(key, value)
        lr = options.pop("lr", None)
        values = check("train", options)
        if values["backbone"] == "scratch":
            values["mode"] = "finetune"  # nothing pretrained to freeze: train end to end
        if lr is not None:
            key = "head_lr" if values["mode"] == "head" else "finetune_lr"
            if options.get(key) is not None and options[key] != lr:
                raise FoldernetError(f"train: --lr and --{key.replace('_', '-')} disagree; give one")
            values[key] = replace(table("train")[key], name="lr").check(lr, "train")
        if values["mode"] == "head" and values["epochs"] is not None:
            if "max_epochs" in options and options["max_epochs"] != values["epochs"]:
                raise FoldernetError("train: in head mode --epochs is the head's --max-epochs; give one")
            values["max_epochs"], values["epochs"] = values["epochs"], None
        params = table("train")
        parts = {name: {} for name in SECTIONS}
        for name, value in values.items():
            parts[params[name].section][name] = value
        spec = cls(**{name: SECTIONS[name](**parts[name]) for name in SECTIONS})
        return spec.resolved()

    def resolved(self) -> "TrainSpec":
        """Fill the defaults that depend on other choices: pretrained weights want gentle, few steps;
        random ones need larger and more."""
        ft = self.finetune
        pretrained = self.model.pretrained
        if self.model.mode == "finetune":
            ft = replace(ft, epochs=ft.epochs or (6 if pretrained else 20),
                         finetune_lr=ft.finetune_lr or (1e-4 if pretrained else 3e-3),
                         patience=ft.patience or (4 if pretrained else 8))
        elif self.model.mode == "top":
            ft = replace(ft, epochs=ft.epochs or 5, finetune_lr=ft.finetune_lr or 3e-4)
        head = replace(self.head, views=self.head.views or (3 if self.model.mode == "top" else 1))
        from .models import canonical_name

        model = self.model
        if model.backbone != "scratch":
            model = replace(model, backbone=canonical_name(model.backbone))
        return replace(self, finetune=ft, model=model, head=head)

    def with_options(self, **options: Any) -> "TrainSpec":
        """This spec with some options changed (validated like ``from_options``)."""
        return TrainSpec.from_options(**{**self.options(), **options})

    def options(self) -> dict[str, Any]:
        """The flat options this spec was built from (round-trips through ``from_options``)."""
        params = table("train")
        out: dict[str, Any] = {}
        for section in SECTIONS:
            for f in fields(getattr(self, section)):
                # a name can live in two sections (head and finetune patience): the table says whose it is
                if f.name in params and params[f.name].section == section:
                    out[f.name] = getattr(getattr(self, section), f.name)
        if self.model.mode == "head":
            out["epochs"] = None
        return out

    def to_dict(self) -> dict:
        """JSON-ready, for the run's config and report."""
        return {name: {k: (v.as_posix() if isinstance(v, Path) else v) for k, v in asdict(getattr(self, name)).items()}
                for name in SECTIONS}
