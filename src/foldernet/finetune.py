"""Training the whole network: fine-tuning with progressive unfreezing, or from scratch.

- starts from the head trained on cached features (so the first epochs do not wreck the backbone);
- stage 1 trains the top half of the layers, stage 2 all of them, with layer-wise learning-rate
  decay (timm's ``param_groups_layer_decay``: lower layers learn more slowly) and the head at 3x;
- learning rates suited to Adam on a pretrained net with frozen BatchNorm (1e-4 at the top):
  measured on digits, 5e-4 wrecked the pretrained features within a few steps;
- the head-only model is the baseline: an epoch is kept only if it beats it on validation;
- AdamW, linear warm-up then cosine decay, label smoothing, BatchNorm statistics frozen for
  pretrained backbones (small CPU batches make them noisy);
- augmentation presets from torchvision v2, applied to training images only;
- early stopping on validation macro-F1, best epoch kept;
- a checkpoint every epoch (atomic), with optimizer, scheduler and RNG state, so a run killed at
  any moment resumes and ends where an uninterrupted run with the same seed would;
- data-parallel when started with ``torchrun`` (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import open_image
from .io import atomic_write_bytes, atomic_write_json
from .preprocess import Preprocess
from .progress import console, progress_bar

log = logging.getLogger("foldernet")
AUGMENT_PRESETS = ("none", "light", "strong")
# Progressive resizing (fastai's and timm's trick): early epochs on smaller crops cost about the
# square of the scale per step, and EfficientNets pool globally, so the same weights run at any size.
LOW_RES_SCALE = 0.75
LAYER_DECAY = 0.85


@dataclass
class FinetuneConfig:
    epochs: int = 6
    lr: float = 1e-4             # top backbone layer; lower layers less (layer decay), the head head_lr_mult x
    head_lr_mult: float = 3.0
    batch_size: int = 32
    augment: str = "light"
    label_smoothing: float = 0.1
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    stage1_frac: float = 0.5     # share of epochs with only the top half of the layers unfrozen
    patience: int = 4
    balance: str = "off"         # off | weights | sampler
    freeze_bn: bool = True
    workers: int = 0
    seed: int = 0
    class_weights: list | None = None
    audio: object = None         # an audio.AudioConfig: spectrogram windows, SpecAugment, clip mixing
    resume: bool = False         # continue from the checkpoint folder
    pretrained: bool = True      # False: random weights (no stage 1, BatchNorm trains)
    low_res_epochs: int = 0      # the first N epochs on crops at LOW_RES_SCALE of the input size (images)
    progress: bool = True
    extra: dict = field(default_factory=dict)


def build_transform(pre: Preprocess, augment: str, train: bool, size: int | None = None):
    """torchvision v2 pipeline for training images (crops of ``size``, default the input size);
    evaluation uses foldernet's own preprocessing."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    if not train or augment == "none":
        return lambda img: torch.from_numpy(pre(img))
    steps = [T.RandomResizedCrop(size or pre.size, scale=(0.6 if augment == "light" else 0.35, 1.0),
                                 interpolation=InterpolationMode.BICUBIC, antialias=True),
             T.RandomHorizontalFlip()]
    if augment == "strong":
        steps += [T.ColorJitter(0.3, 0.3, 0.3, 0.05), T.RandomRotation(10)]
    steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


def spec_augment(x, masks: int, max_frac: float = 0.15):
    """SpecAugment (Park et al. 2019): zero ``masks`` random time bands and frequency bands of a
    (3, H, W) spectrogram tensor. The mean pixel stands in for silence after normalisation."""
    import torch

    x = x.clone()
    fill = float(x.min())
    _, h, w = x.shape
    for _ in range(masks):
        t = int(torch.randint(0, max(1, int(w * max_frac)) + 1, ()).item())
        t0 = int(torch.randint(0, max(1, w - t) + 1, ()).item())
        x[:, :, t0:t0 + t] = fill
        f = int(torch.randint(0, max(1, int(h * max_frac)) + 1, ()).item())
        f0 = int(torch.randint(0, max(1, h - f) + 1, ()).item())
        x[:, f0:f0 + f, :] = fill
    return x


class FolderDataset:
    """(image, label) pairs decoded on demand; unreadable files were already dropped by extraction.
    For audio: training draws a random window, stretches it in frequency and time and shifts it
    (``warp_spectrogram``), with ``strong`` mixes in another training clip at low gain (keeping this
    clip's label), and applies SpecAugment, in dB relative to the clip's loudest bin as predict sees it;
    evaluation gives every window, rendered as predict renders them, and averages their logits (it used
    to take the middle window alone, which for a 4 s note in 3 s windows missed the onset)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform, draft: int, audio=None,
                 augment: str = "none", pre: Preprocess | None = None, train: bool = False):
        self.paths, self.labels, self.transform, self.draft = paths, labels, transform, draft
        self.audio, self.augment, self.pre, self.train = audio, augment, pre, train

    def __len__(self) -> int:
        return len(self.paths)

    def _audio_item(self, i: int):
        import torch

        from .audio import clip_images, read_audio, resample, spectrogram_image, warp_spectrogram, window_mels

        cfg = self.audio
        if not self.train:  # every window, rendered exactly as predict renders them (their logits averaged)
            images, _ = clip_images(self.paths[i], cfg, self.pre.size)
            return torch.from_numpy(np.stack([self.pre(img) for img in images])), int(self.labels[i])
        clip = read_audio(self.paths[i])
        x = resample(clip.samples, clip.sample_rate, cfg.sample_rate)
        if self.train and self.augment == "strong" and len(self.paths) > 1 and torch.rand(()) < 0.5:
            j = int(torch.randint(0, len(self.paths), ()).item())
            other = read_audio(self.paths[j])
            y = resample(other.samples, other.sample_rate, cfg.sample_rate)[:len(x)]
            x = x.copy()
            x[:len(y)] += float(torch.empty(()).uniform_(0.1, 0.3)) * y
        mels = window_mels(x, cfg)
        db = mels[int(torch.randint(0, len(mels), ()).item())]
        augmenting = self.augment != "none"
        if augmenting:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())  # follows torch's seed: resumable runs repeat
            db = warp_spectrogram(db, np.random.default_rng(seed), cfg.top_db)
        t = torch.from_numpy(self.pre(spectrogram_image(db, cfg, self.pre.size)))
        if augmenting:
            t = spec_augment(t, 1 if self.augment == "light" else 2)
        return t, int(self.labels[i])

    def __getitem__(self, i: int):
        if self.audio is not None:
            return self._audio_item(i)
        img = open_image(self.paths[i], draft_size=self.draft)
        w, h = img.size
        if min(w, h) > 2 * self.draft:  # cheap pre-shrink before random crops of large photos
            s = self.draft * 1.5 / min(w, h)
            img = img.resize((max(1, int(w * s)), max(1, int(h * s))))
        return self.transform(img), int(self.labels[i])


def param_groups(net, weight_decay: float):
    """Layer-wise decayed learning rates for timm backbones; one group for anything else."""
    groups = None
    if hasattr(net.backbone, "group_matcher"):
        try:
            from timm.optim import param_groups_layer_decay

            groups = param_groups_layer_decay(net.backbone, weight_decay=weight_decay, layer_decay=LAYER_DECAY)
        except Exception:  # noqa: BLE001 - fall back to one group
            groups = None
    if groups is None:
        groups = [{"params": list(net.backbone.parameters()), "lr_scale": 1.0, "weight_decay": weight_decay}]
    groups.append({"params": list(net.head.parameters()), "lr_scale": 1.0, "weight_decay": weight_decay,
                   "is_head": True})
    return groups


def _set_stage(groups, stage: int) -> None:
    """Stage 1: only groups at or above the median learning-rate scale train; stage 2: all."""
    scales = sorted(g["lr_scale"] for g in groups)
    cut = scales[len(scales) // 2] if stage == 1 else -1.0
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(g["lr_scale"] >= cut)


def _dist():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer(net, cfg: FinetuneConfig, n_train: int, world: int):
    """AdamW over layer-decayed groups (the head at ``head_lr_mult``), linear warm-up, cosine decay."""
    import torch

    groups = param_groups(net, cfg.weight_decay)
    opt = torch.optim.AdamW([{"params": g["params"],
                              "lr": cfg.lr * (cfg.head_lr_mult if g.get("is_head") else g["lr_scale"]),
                              "weight_decay": g.get("weight_decay", cfg.weight_decay)} for g in groups], lr=cfg.lr)
    total = max(1, math.ceil(n_train / (cfg.batch_size * world))) * cfg.epochs
    warm = max(1, int(cfg.warmup_frac * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return groups, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _channels_last(x):
    """A batch of images in the memory layout the network was put in (see ``finetune``)."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _validate(net, val_ds, y_val: np.ndarray, batch_size: int) -> tuple[float, float, float]:
    """(accuracy, macro-F1, loss) on the validation clips or images, scored as predict scores them."""
    import torch
    from sklearn.metrics import f1_score
    from torch import nn

    if not len(val_ds):
        return (float("nan"),) * 3
    net.eval()
    preds, losses = [], []
    with torch.inference_mode():
        for i in range(0, len(val_ds), batch_size):
            # an image is one input; a sound is all its windows, whose logits are averaged as in predict
            items = [val_ds[j][0] for j in range(i, min(i + batch_size, len(val_ds)))]
            items = [x if x.dim() == 4 else x[None] for x in items]
            out = torch.cat([net(_channels_last(chunk)) for chunk in torch.cat(items).split(batch_size)])
            logits = torch.stack([part.mean(0) for part in out.split([len(x) for x in items])])
            ys = torch.from_numpy(y_val[i:i + len(items)]).long()
            losses.append(float(nn.functional.cross_entropy(logits, ys)) * len(items))
            preds.append(logits.argmax(1).numpy())
    pred = np.concatenate(preds)
    return float(np.mean(pred == y_val)), float(f1_score(y_val, pred, average="macro")), sum(losses) / len(val_ds)


def _sampler(cfg: FinetuneConfig, train_ds, y_train: np.ndarray, n_classes: int, epoch: int, rank: int, world: int):
    """Order (and balance) of one epoch: depends on (seed, epoch) only, so a resumed run repeats it."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    if cfg.balance == "sampler":
        counts = np.bincount(y_train, minlength=n_classes).astype(float)
        return torch.utils.data.WeightedRandomSampler(1.0 / counts[y_train], len(y_train), replacement=True,
                                                      generator=g)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return sampler
    return torch.utils.data.RandomSampler(train_ds, generator=g)


def train_epoch(model, batches, n_batches: int, opt, sched, loss_fn, title: str, show: bool,
                freeze_bn: bool = True) -> float:
    """One pass over ``batches`` of (inputs, labels); the mean loss. BatchNorm statistics stay frozen
    with ``freeze_bn`` (a pretrained backbone). Shared by fine-tuning and ``--mode top``."""
    from torch import nn

    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    total_loss, seen = 0.0, 0
    with progress_bar(n_batches, title, show) as bar:
        for xs, ys in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(_channels_last(xs)), ys)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(xs)
            seen += len(xs)
            bar.advance(1)
            bar.update(info=f"loss {total_loss / seen:.3f}")
    return total_loss / max(1, seen)


class _Checkpoint:
    """``last.safetensors`` + ``optim.pt`` + ``state.json`` after every epoch, ``best.safetensors`` for
    the best so far; every file written atomically, so a kill at any moment can resume."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.state_file = folder, folder / "state.json"

    def restore(self, net, opt, sched) -> dict | None:
        import torch
        from safetensors.torch import load_file

        if not self.state_file.exists():
            return None
        state = json.loads(self.state_file.read_text())
        net.load_state_dict(load_file(str(self.folder / "last.safetensors")))
        saved = torch.load(self.folder / "optim.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        return state

    def save_weights(self, net, name: str) -> None:
        from safetensors.torch import save

        atomic_write_bytes(self.folder / name, save({k: v.detach().contiguous() for k, v in net.state_dict().items()}))

    def save_epoch(self, net, opt, sched, improved: bool) -> None:
        import io

        import torch

        if improved:
            self.save_weights(net, "best.safetensors")
        self.save_weights(net, "last.safetensors")
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
        atomic_write_bytes(self.folder / "optim.pt", buf.getvalue())

    def save_state(self, **state) -> None:
        atomic_write_json(self.state_file, state)

    def load_best(self, net) -> None:
        from safetensors.torch import load_file

        if (self.folder / "best.safetensors").exists():
            net.load_state_dict(load_file(str(self.folder / "best.safetensors")))


def finetune(net, train: tuple[list[Path], np.ndarray], val: tuple[list[Path], np.ndarray], pre: Preprocess,
             cfg: FinetuneConfig, ckpt_dir: Path):
    """Train the whole network ``net`` (backbone + head, ``head.network``) on (paths, labels) pairs;
    returns (the best network, history). Checkpoints in ``ckpt_dir`` (see ``_Checkpoint``)."""
    import torch
    from torch import nn

    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    (train_paths, y_train), (val_paths, y_val) = train, val
    # channels-last: same numbers, and a lite0 training step at batch 32 on 2 cores took 0.76x the time
    net.to(memory_format=torch.channels_last)
    groups, opt, sched = _optimizer(net, cfg, len(train_paths), world)
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights and cfg.balance == "weights" \
        else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    train_ds = FolderDataset(train_paths, y_train, build_transform(pre, cfg.augment, True), pre.resize_size,
                             cfg.audio, cfg.augment, pre, train=True)
    val_ds = FolderDataset(val_paths, y_val, build_transform(pre, "none", False), pre.resize_size,
                           cfg.audio, "none", pre, train=False)
    ckpt = _Checkpoint(ckpt_dir)
    history: list[dict] = []
    start_epoch, best_f1, stale = 0, -1.0, 0
    state = ckpt.restore(net, opt, sched) if cfg.resume else None
    if state:
        start_epoch, best_f1, stale, history = state["epoch"], state["best_f1"], state["stale"], state["history"]
        if rank == 0:
            console.print(f"resuming after epoch {start_epoch} (best val macro-F1 {best_f1:.4f})")
    model, model_stage = net, None
    stage1_epochs = int(round(cfg.stage1_frac * cfg.epochs)) if cfg.pretrained else 0
    if start_epoch == 0 and cfg.pretrained and len(val_ds) and rank == 0:
        # the head-only model is the baseline: fine-tuning keeps it unless an epoch beats it
        _, best_f1, _ = _validate(net, val_ds, y_val, cfg.batch_size)
        ckpt.save_weights(net, "best.safetensors")
        console.print(f"before fine-tuning: val macro-F1 {best_f1:.4f}")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stage = 1 if epoch < stage1_epochs else 2
        _set_stage(groups, stage)
        if world > 1 and model_stage != stage:  # DDP tracks the parameters that train: rewrap per stage
            model, model_stage = nn.parallel.DistributedDataParallel(net), stage
        size = pre.size
        if cfg.audio is None and cfg.augment != "none":  # sizes follow the epoch alone: resumable runs repeat
            if epoch < cfg.low_res_epochs:
                size = max(32, int(round(pre.size * LOW_RES_SCALE / 8)) * 8)
            train_ds.transform = build_transform(pre, cfg.augment, True, size)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # augmentation and order depend on (seed, epoch) only
        loader = torch.utils.data.DataLoader(
            train_ds, batch_size=cfg.batch_size, num_workers=cfg.workers, drop_last=False,
            sampler=_sampler(cfg, train_ds, y_train, net.head.out_features, epoch, rank, world))
        train_loss = train_epoch(model, loader, len(loader), opt, sched, loss_fn,
                                 f"epoch {epoch + 1}/{cfg.epochs} (stage {stage})", cfg.progress and rank == 0,
                                 freeze_bn=cfg.freeze_bn and cfg.pretrained)
        acc, f1, vloss = _validate(net, val_ds, y_val, cfg.batch_size)
        improved = not len(val_ds) or f1 > best_f1 + 1e-6
        history.append({"epoch": len(history) + 1, "stage": stage, "train_size": size,
                        "train_loss": train_loss, "val_loss": vloss,
                        "val_acc": acc, "val_macro_f1": f1, "lr": opt.param_groups[-1]["lr"],
                        "seconds": round(time.perf_counter() - t0, 2), "best": bool(improved)})
        if rank == 0:
            console.print(f"epoch {epoch + 1}: train loss {train_loss:.4f}  val acc {acc:.4f}  "
                          f"val macro-F1 {f1:.4f}" + ("  (best)" if improved else ""))
            ckpt.save_epoch(net, opt, sched, improved)
        best_f1, stale = ((f1 if len(val_ds) else best_f1), 0) if improved else (best_f1, stale + 1)
        if rank == 0:
            ckpt.save_state(epoch=epoch + 1, best_f1=best_f1, stale=stale, history=history)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if stale >= cfg.patience:
            if rank == 0:
                console.print(f"early stop: no val macro-F1 gain for {cfg.patience} epochs")
            break
    ckpt.load_best(net)
    net.to(memory_format=torch.contiguous_format)
    net.eval()
    return net, history
