"""Every option of every command, declared once: type, range or choices, default and help.

The CLI and the Python API both pass what they were given through ``check(command, values)``
before any work starts (scikit-learn's ``_parameter_constraints``, Ultralytics' one merge step), so
a bad value gets the same one-line message from both, naming the option and what it accepts, and
an unknown option name is refused rather than ignored.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FoldernetError


@dataclass(frozen=True)
class Param:
    """One option: ``kind`` is int, float, str, bool or Path; ``low``/``high`` bound numbers
    (inclusive unless ``*_open``); ``choices`` lists the allowed strings; ``optional`` admits None."""

    name: str
    kind: type
    default: Any = None
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    section: str = "run"      # where a train option lives in the TrainSpec
    exists: bool = False      # a Path that must exist when given

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What the option accepts, in words: 'a whole number from 1 to 10000'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind in (int, float):
            noun = "a whole number" if self.kind is int else "a number"
            lo = None if self.low is None else ("above " if self.low_open else ">= ") + _num(self.low)
            hi = None if self.high is None else ("below " if self.high_open else "<= ") + _num(self.high)
            if lo and hi and not self.low_open and not self.high_open:
                return f"{noun} from {_num(self.low)} to {_num(self.high)}"
            return " ".join([noun] + [" and ".join(p for p in (lo, hi) if p)]).strip()
        if self.kind is Path:
            return "an existing path" if self.exists else "a path"
        return "text"

    def check(self, value: Any, command: str) -> Any:
        """The value, converted to ``kind``; a FoldernetError that names the option otherwise."""
        if value is None:
            if self.optional or self.default is None:
                return None
            raise self._error(value, command)
        try:
            value = self._convert(value)
        except (TypeError, ValueError):
            raise self._error(value, command) from None
        if self.choices and value not in self.choices:
            raise self._error(value, command)
        if self.kind in (int, float):
            if isinstance(value, float) and not math.isfinite(value):
                raise self._error(value, command)
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                raise self._error(value, command)
            if self.high is not None and (value >= self.high if self.high_open else value > self.high):
                raise self._error(value, command)
        if self.kind is Path and self.exists and not value.expanduser().exists():
            raise FoldernetError(f"{command} {self.flag}: {value} does not exist")
        return value

    def _convert(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if self.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if self.kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if self.kind is Path:
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError(value)
            return Path(value)
        if not isinstance(value, str):
            raise TypeError(value)
        return value

    def _error(self, value: Any, command: str) -> FoldernetError:
        return FoldernetError(f"{command} {self.flag} must be {self.allowed()} (got {value!r})")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# audit findings that `audit --fix` may move (one copy of a duplicate stays; label conflicts never move)
FIXABLE = ("unreadable", "wrong_type", "tiny", "low_information", "exact_duplicate", "leakage", "too_short")


def _p(*args, **kw) -> Param:
    return Param(*args, **kw)


# ----------------------------------------------------------------------------------------- the table

BACKBONE_HELP = ("any timm model name; several joined by + (lite0+lite2: an ensemble of the embedded "
                 "EfficientNet-Lite0/1/2, one head on their features); scratch (small CNN from random weights); for sound also musicnn_mtt or "
                 "musicnn_msd (audio-pretrained; pip install --no-deps musicnn). `foldernet backbones` lists them")

TRAIN = [
    # what data, and how it is split
    _p("val", float, 0.15, "validation fraction (when DATA has no split folders)", 0, 1, high_open=True,
       section="split"),
    _p("test", float, 0.15, "test fraction (when DATA has no split folders)", 0, 1, high_open=True, section="split"),
    _p("seed", int, 0, "random seed for splits and training", 0, 2**32 - 1, section="split"),
    _p("splits", Path, None, "splits.csv to reuse (default: DATA/splits.csv if present)", optional=True,
       exists=True, section="split"),
    _p("label_regex", str, None, "label from a regex group on the relative path", optional=True, section="split"),
    _p("group_by", str, None, "near-duplicates | regex:PATTERN | csv:FILE (each group kept on one side)",
       optional=True, section="split"),
    _p("allow_leakage", bool, False, "train even if val/test duplicate training images", section="split"),
    _p("keep_placeholders", bool, False, "train on flat placeholder-like images", section="split"),
    _p("label_map_file", Path, None, "CSV fine,coarse: also evaluate and report coarse labels", optional=True,
       exists=True, section="split"),
    # the encoder
    _p("backbone", str, "tf_efficientnet_lite0", BACKBONE_HELP, section="model"),
    _p("weights", Path, None, "local weights file for the backbone (.safetensors or a state_dict)", optional=True,
       exists=True, section="model"),
    _p("mode", str, "head", "head: frozen backbone + linear head (fast); top: then also the backbone's last "
       "stages, trained on their cached inputs (--top-stages; images, EfficientNet-family backbones; ~5x the "
       "head's time); finetune: then the whole network with progressive unfreezing (slowest)",
       choices=("head", "top", "finetune"), section="model"),
    _p("img_size", int, None, "input size in pixels (default: the backbone's)", 16, 1024, optional=True,
       section="model"),
    _p("crop_pct", float, None, "images: the share of each image's short side the centre crop keeps, as timm's "
       "crop_pct (default 1.0: all of it; timm's ImageNet evaluation crop is 0.875, which cut the hems and sleeves "
       "off clothing's portrait photos and cost ~2 points there)", 0.5, 1.0, optional=True, section="model"),
    _p("engine", str, "onnx", "feature extraction: onnx (fast CPU path) or torch", choices=("onnx", "torch"),
       section="model"),
    _p("tta", str, "off", "test-time augmentation for images: flip averages each input with its mirror image "
       "(twice the compute per prediction); auto keeps it when it lowers the validation loss",
       choices=("off", "flip", "auto"), section="model"),
    _p("budget", str, None, "time for the whole run, e.g. 90s, 5m, 1h: foldernet measures this machine and picks the "
       "backbones, feature-bank views, test-time flip and, from 1,000 training images, whether to tune the "
       "top stages (--mode top) that fit (shown before it starts); overrides --backbone, --views, --tta and "
       "--epochs", optional=True, section="model"),
    _p("spectrogram_stats", bool, False, "audio, head mode: append spectrogram statistics per time segment "
       "(band levels, MFCCs, envelope); for clips of one sound event each, such as instrument notes",
       section="model"),
    # the linear head
    _p("max_epochs", int, 200, "head: the most epochs early stopping may use", 1, 100_000, section="head"),
    _p("patience", int, 15, "head: epochs without a better validation loss before stopping", 1, 10_000,
       section="head"),
    _p("head_lr", float, 1e-3, "head learning rate (AdamW)", 0, 10, low_open=True, section="head"),
    _p("balance", str, "auto", "class imbalance: auto (weights above ratio 3) | off | weights | sampler",
       choices=("auto", "off", "weights", "sampler"), section="head"),
    _p("min_precision", float, None, "'not sure' below the confidence at which the answers kept are right this "
       "often on val (e.g. 0.98): answer less, but be right more; the operating point is kept in the bundle",
       0, 1, low_open=True, high_open=True, optional=True, section="head"),
    _p("views", int, None, "head and top modes: train on this many views of each training item (1: the item "
       "itself; 2: also its mirror image; more: also random crops, small rotations and colour changes; for "
       "sound, masked time and frequency bands); each view's features are cached (default 1; 3 in top mode)",
       1, 64, optional=True, section="head"),
    _p("refit", bool, False, "head mode: once early stopping has chosen the epochs on val, train the head again "
       "on train + val (val figures stay those of the head that never saw val)", section="head"),
    # fine-tuning (mode finetune, or backbone scratch)
    _p("epochs", int, None, "finetune: epochs (default 6; 20 for --backbone scratch; 5 in top mode); head mode: the same as "
       "--max-epochs", 1, 100_000, optional=True, section="finetune"),
    _p("finetune_lr", float, None, "fine-tuning learning rate of the top layer (default 1e-4 pretrained, 3e-3 "
       "scratch, 3e-4 for the stages of --mode top)", 0, 10, low_open=True, optional=True, section="finetune"),
    _p("batch_size", int, 32, "fine-tuning batch size", 1, 4096, section="finetune"),
    _p("augment", str, "light", "fine-tuning augmentation", choices=("none", "light", "strong"),
       section="finetune"),
    _p("top_stages", int, 2, "mode top: how many of the backbone's last stages train (lite0 has 7; 2 measured "
       "best per second on clothing)", 1, 64, section="finetune"),
    _p("low_res_epochs", int, 0, "fine-tuning: train the first N epochs on images at 3/4 of the input size "
       "(cheaper steps), the rest at full size (images with --augment light or strong; "
       "ignored for sound)", 0, 100_000,
       section="finetune"),
    _p("workers", int, 0, "fine-tuning data-loader processes", 0, 64, section="finetune"),
    _p("resume", bool, False, "continue an interrupted fine-tuning run", section="finetune"),
    _p("keep_checkpoint", bool, False, "keep the fine-tuning checkpoint (optimizer state) in the finished run",
       section="finetune"),
    # audio
    _p("window_seconds", float, None, "audio: window length in seconds (default 1 s, shorter when most clips "
       "are; a clip's windows are averaged)", 0.1, 300, optional=True, section="audio"),
    _p("sample_rate", int, None, "audio: resample to this rate (default 16000, or the data's lower rate)",
       4000, 192_000, optional=True, section="audio"),
    _p("n_mels", int, None, "audio: mel bands (default 128; 64 below 16 kHz)", 16, 256, optional=True,
       section="audio"),
    # the run
    _p("force", bool, False, "replace an existing run folder that foldernet wrote", section="run"),
    _p("use_cache", bool, True, "read and write the feature cache", section="run"),
    _p("progress", bool, True, "show progress bars", section="run"),
    _p("report", bool, True, "write report.html", section="run"),
]

BATCH = [
    _p("engine", str, "local", "local: this process; ray: Ray Data tasks and actors (pip install 'foldernet[ray]')",
       choices=("local", "ray")),
    _p("address", str, None, "Ray cluster to join (ray://host:10001 or auto); default: Ray on this machine",
       optional=True),
    _p("chunk_rows", int, 1024, "files per Parquet part, the unit a restarted job resumes from", 1, 10_000_000),
    _p("force", bool, False, "replace --out results of another job that foldernet wrote"),
]
PREDICT = [
    _p("top_k", int, 5, "how many labels to list per input", 1, 10_000),
    _p("similar", int, 0, "also list this many most similar training examples", 0, 1000),
    _p("batch_size", int, 256, "inputs decoded per chunk", 1, 100_000),
] + BATCH
EMBED = list(BATCH)
DUPLICATES = [
    _p("min_cosine", float, 0.95, "embedding cosine at or above which two files are near duplicates", 0, 1,
       low_open=True),
    _p("k", int, 10, "neighbours searched per file (the approximate index, above 20,000 files)", 1, 1000),
]
SIMILAR = [_p("k", int, 5, "how many neighbours", 1, 1000)]
SPLIT = [p for p in TRAIN if p.name in ("val", "test", "seed", "label_regex", "group_by")] + [
    _p("folds", int, 0, "write N cross-validation splits (0: one splits.csv)", 0, 100),
]
AUDIT = [p for p in TRAIN if p.name in ("val", "test", "seed", "splits", "label_regex", "weights", "progress")] + [
    _p("backbone", str, "tf_efficientnet_lite0", "backbone whose embeddings find near duplicates and label errors"),
    _p("group_regex", str, None, "group from a regex group on the relative path", optional=True),
    _p("fix_kinds", str, None, "which findings --fix moves (comma-separated)", optional=True),
    _p("force", bool, False, "replace an existing audit folder that foldernet wrote"),
    _p("find_label_errors", bool, True, "search for likely label errors"),
]
COLLECT = [
    _p("workers", int, 8, "parallel downloads", 1, 64),
    _p("timeout", float, 20.0, "seconds per request", 0, 600, low_open=True),
    _p("retries", int, 3, "retries for timeouts, 429 and 5xx (exponential backoff)", 0, 20),
    _p("max_mb", float, 20.0, "largest file to accept (MB)", 0, 10_000, low_open=True),
]
FRAMES = [
    _p("every", float, 0.5, "seconds between saved frames", 0, 3600, low_open=True),
    _p("max_frames", int, None, "at most this many frames per video", 1, 1_000_000, optional=True),
]
EXPORT = [
    _p("format", str, "onnx", "onnx (servers); openvino (servers with Intel CPUs; pip install "
       "'foldernet[openvino]'); tflite or coreml (phones; pip install 'foldernet[mobile]')",
       choices=("onnx", "openvino", "tflite", "coreml")),
    _p("int8", bool, False, "also try static int8 quantisation (kept only if it agrees and is faster)"),
    _p("prefer_size", bool, False, "keep int8 when it agrees but is not faster"),
    _p("int8_distill", str, "auto", "when no int8 plan agrees: auto (tune the weights for int8 for a minute or "
       "a few, then try again), never, or always (skip the untuned plans)", choices=("auto", "never", "always")),
    _p("force", bool, False, "replace an existing export that foldernet wrote"),
]
SERVE = [
    _p("host", str, "127.0.0.1", "address to bind (127.0.0.1: this machine only)"),
    _p("port", int, 8000, "port to listen on", 1, 65535),
    _p("max_upload_mb", float, 10.0, "largest accepted upload (MB)", 0, 1024, low_open=True),
    _p("api_key", str, None, "key clients send as X-API-Key (or Bearer); required off loopback", optional=True),
    _p("explorer", bool, False, "serve the training examples (dataset explorer, similar-example images)"),
    _p("insecure_no_auth", bool, False, "bind off loopback without an API key (anyone who reaches it may use it)"),
]
COMPARE = [p for p in TRAIN if p.name in ("epochs", "img_size")] + [
    _p("force", bool, False, "replace an existing comparison folder that foldernet wrote"),
]
DEMO = [
    _p("per_class", int, 50, "images per digit class", 5, 180),
    _p("force", bool, False, "replace an existing demo folder that foldernet wrote"),
]

SUGGEST = [
    _p("n", int, 100, "how many files to suggest", 1, 1_000_000),
    _p("strategy", str, "default", "default: uncertain and unlike each other; margin or entropy: the most "
       "uncertain; diverse: the most unlike each other", choices=("default", "margin", "entropy", "diverse")),
    _p("force", bool, False, "replace an existing suggest folder that foldernet wrote"),
]
AUTOLABEL = [
    _p("min_confidence", float, 0.98, "copy only files the model is at least this sure of (calibrated), and "
       "not 'not sure'", 0, 1, low_open=True),
]

TABLES: dict[str, list[Param]] = {
    "train": TRAIN, "predict": PREDICT, "similar": SIMILAR, "split": SPLIT, "audit": AUDIT, "collect": COLLECT,
    "frames": FRAMES, "export": EXPORT, "serve": SERVE, "compare": COMPARE, "demo": DEMO, "suggest": SUGGEST,
    "autolabel": AUTOLABEL, "embed": EMBED, "duplicates": DUPLICATES,
}


def table(command: str) -> dict[str, Param]:
    return {p.name: p for p in TABLES[command]}


def param(command: str, name: str) -> Param:
    return table(command)[name]


def check(command: str, values: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """Validate ``values`` against the command's table: unknown names refused, each value converted
    and range-checked, cross-option rules applied. Returns every option, defaults filled in (only the
    given ones with ``partial``)."""
    params = table(command)
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise FoldernetError(f"{command}: unknown option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; known: {', '.join(sorted(params))}")
    out = {} if partial else {name: p.default for name, p in params.items()}
    for name, value in values.items():
        out[name] = params[name].check(value, command)
    _cross_checks(command, out)
    return out


def _cross_checks(command: str, v: dict[str, Any]) -> None:
    if "val" in v and "test" in v and v["val"] is not None and v["test"] is not None and v["val"] + v["test"] >= 1:
        raise FoldernetError(f"{command} --val + --test must leave images for training: {v['val']} + {v['test']} "
                             ">= 1")
    for name in ("label_regex", "group_regex"):
        if v.get(name):
            _compile(v[name], command, "--" + name.replace("_", "-"))
    if v.get("group_by"):
        check_group_by(v["group_by"], command)
    if command == "audit" and v.get("fix_kinds"):
        bad = [k for k in split_list(v["fix_kinds"]) if k not in FIXABLE]
        if bad:
            raise FoldernetError(f"audit --fix-kinds: unknown kind {', '.join(bad)}; choose from {', '.join(FIXABLE)}")
    if v.get("budget") is not None:
        parse_duration(v["budget"], f"{command} --budget")
    if v.get("backbone") and "+" in v["backbone"]:
        from .models import check_ensemble

        check_ensemble(v["backbone"], v.get("weights"), command)
    if v.get("mode") == "top" and v.get("backbone") and "+" in v["backbone"]:
        raise FoldernetError(f"{command} --mode top tunes one backbone's last stages, not an ensemble "
                             f"({v['backbone']}); use one backbone, or --mode head for the ensemble")
    epochs = v.get("epochs") or (20 if v.get("backbone") == "scratch" else 6)  # finetune.py's defaults
    if v.get("low_res_epochs") and v["low_res_epochs"] >= epochs:
        raise FoldernetError(f"{command} --low-res-epochs {v['low_res_epochs']} must be smaller than --epochs "
                             f"({epochs}): the last epochs train at full size")
    if command == "split" and v.get("folds") in (1, 2):
        raise FoldernetError(f"split --folds must be 0 (one splits.csv) or at least 3 (got {v['folds']})")


def parse_duration(text: str, what: str = "--budget") -> float:
    """'90s', '5m', '1.5h', or a bare number of seconds -> seconds (at least 1)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise FoldernetError(f"{what} must be a duration such as 90s, 5m or 1h (got {text!r})")
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(2) or "s"]
    return max(1.0, float(m.group(1)) * unit)


def _compile(pattern: str, command: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise FoldernetError(f"{command} {flag}: {pattern!r} is not a valid regular expression ({exc})") from None


def check_group_by(group_by: str, command: str = "train") -> None:
    if group_by == "near-duplicates":
        return
    kind, _, arg = group_by.partition(":")
    if kind == "regex" and arg:
        _compile(arg, command, "--group-by regex:")
        return
    if kind == "csv" and arg:
        if not Path(arg).expanduser().is_file():
            raise FoldernetError(f"{command} --group-by csv:{arg}: no such file")
        return
    raise FoldernetError(f"{command} --group-by must be near-duplicates, regex:PATTERN or csv:FILE (got {group_by!r})")


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
