"""``--mode top``: fine-tune the backbone's last stages on their cached inputs.

Full fine-tuning pays for the whole network, forward and backward, on every image of every epoch; on
2 CPU cores that is ~260 s per epoch of clothing's 3068 training images. Most of that is spent in the
early stages, whose generic edges and textures need no tuning. Here the network is cut in two: the
frozen *trunk* (stem and first stages) runs once per view of each image through the fast ONNX path
(view 0 in the same pass that gives the frozen features, see ``first_pass``), its activations are
kept in memory (float16), and only the *top* (the last ``stages`` stages, the
final 1x1 convolution and the head) trains, for a few cheap epochs over those cached activations, one
random view per image per epoch. Batch-norm statistics stay frozen (the trunk's views are not fresh
augmentations each epoch, and small batches would only add noise), and so do the depthwise convs'
weights (their gradients cost a fifth of a step). Measured on clothing (2 cores): lite0's last two
stages train at ~25-30 s per epoch; validation accuracy 92.1-93.0 % in 264-299 s (3 seeds) against
89.2-89.7 % for lite0's head (benchmarks/vs_fastai.py, RESULTS.md). On a few hundred images the head on frozen
features already fits the training set and tuning rarely beats it; the untouched network is then kept.

Supported backbones: timm's EfficientNet family (EfficientNet, EfficientNet-Lite, MobileNetV2, MNASNet,
...), whose stages are ``model.blocks``; sound is not (a clip's windows are averaged after the
backbone, so the trunk's activations cannot be cached per clip).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from .errors import FoldernetError
from .progress import console

TOP_BATCH = 64
TOP_LABEL_SMOOTHING = 0.1
TOP_DROPOUT = 0.2       # on the pooled features, while training (EfficientNet's own classifier dropout)
HEAD_LR_FACTOR = 10.0


def check_splittable(model, stages: int, backbone: str) -> None:
    """Refuse, before any work, a backbone this mode cannot cut into trunk and top."""
    blocks = getattr(model, "blocks", None)
    parts = ("conv_stem", "bn1", "conv_head", "bn2", "forward_head")
    if blocks is None or not all(hasattr(model, p) for p in parts) or not hasattr(blocks, "__len__"):
        raise FoldernetError(f"train --mode top: backbone '{backbone}' is not of timm's EfficientNet family "
                             "(stages in model.blocks); use --mode finetune for it, or an EfficientNet/Lite/"
                             "MobileNetV2 backbone")
    if not 1 <= stages < len(blocks):
        raise FoldernetError(f"train --top-stages {stages}: '{backbone}' has {len(blocks)} stages; choose 1 to "
                             f"{len(blocks) - 1}")


def _parts(model, stages: int, size: int):
    """(trunk, top) modules sharing ``model``'s layers: the trunk returns its activations flattened
    (one row per image, as the feature extractor expects); the top takes them back."""
    import torch
    from torch import nn

    cut = len(model.blocks) - stages

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_stem, self.bn1, self.blocks = model.conv_stem, model.bn1, model.blocks[:cut]

        def unflattened(self, x):
            return self.blocks(self.bn1(self.conv_stem(x)))

        def forward(self, x):
            return self.unflattened(x).flatten(1)

    class Top(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = tuple(shape)
            self.blocks, self.conv_head, self.bn2 = model.blocks[cut:], model.conv_head, model.bn2
            self.pool = model.forward_head  # global pooling (+ dropout while training); no classifier

        def forward(self, x):
            # channels-last: a training step of lite0's last two stages took 0.7x the time on 2 cores
            x = x.reshape(x.shape[0], *self.shape).contiguous(memory_format=torch.channels_last)
            return self.pool(self.bn2(self.conv_head(self.blocks(x))))

    trunk = Trunk().eval()
    with torch.no_grad():
        shape = trunk.unflattened(torch.zeros(1, 3, size, size)).shape[1:]
    return trunk, Top(shape)


def first_pass(encoder, stages: int, paths: list, engine: str = "onnx", progress: bool = True):
    """Every item's frozen features and its trunk activations (view 0) in one pass over the files:
    one graph returns both (the pooled features, then the trunk's activations), so top mode decodes
    each file once where it used to decode it twice (features, then the trunk's pass: ~25 s of ~5 min
    on clothing's 3409 images). Returns (Features with the pooled features as ``vectors``, float16
    activations of every item, zero where a file failed)."""
    import torch
    from torch import nn

    from .features import FeatureExtractor
    from .models import state_digest

    check_splittable(encoder.model, stages, encoder.name)
    trunk, top = _parts(encoder.model, stages, encoder.preprocess.size)
    dim = int(encoder.num_features)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.first_pass_trunk, self.first_pass_top = trunk, top

        def forward(self, x):
            a = self.first_pass_trunk.unflattened(x)
            return torch.cat([self.first_pass_top(a.flatten(1)), a.flatten(1)], 1)

    both = Both().eval()
    ext = FeatureExtractor(both, encoder.preprocess, state_digest(both), f"{encoder.name}-first-pass{stages}",
                           engine=engine, use_cache=False)
    feats = ext(paths, desc="extract features (and the trunk's activations)", progress=progress)
    acts = feats.vectors[:, dim:].astype(np.float16)
    feats.vectors = np.ascontiguousarray(feats.vectors[:, :dim])
    return feats, acts


@dataclass
class TopResult:
    head: object                      # the tuned head.LinearHead; its ``history`` is the epochs'
    vectors: dict[int, tuple[np.ndarray, np.ndarray]]  # view -> (item indices, their pooled features)
    info: dict


def train_top(encoder, head, paths: list, rows_train: np.ndarray, rows_val: np.ndarray, y: np.ndarray,
              views: int, stages: int, epochs: int, lr: float, class_weights: np.ndarray | None,
              mirror_held: bool = False, engine: str = "onnx", seed: int = 0, progress: bool = True,
              view0: tuple[np.ndarray, np.ndarray] | None = None, deadline: float | None = None) -> TopResult:
    """Tune the last ``stages`` stages of ``encoder.model`` (in place) and the head, from the head
    trained on frozen features; keep the epoch with the best validation macro-F1, or the untouched
    network when no epoch beats it. ``paths``: every item; ``rows_train``/``rows_val``: indices into
    them; ``y``: every item's label. Returns the tuned head and the pooled features, through the tuned
    network, of every item (view 0) and of the held-out items' mirror images (view 1, with
    ``mirror_held``, for --tta). ``view0``: (item indices, their
    trunk activations) from ``first_pass``, so that pass over the files is not repeated. ``deadline``
    (a ``time.perf_counter()`` value, from ``--budget``): after the first epoch (which times them), no
    epoch starts that would end after it, with the pooled features still to compute."""
    import torch
    from sklearn.metrics import f1_score
    from torch import nn

    from .finetune import train_epoch
    from .head import LinearHead
    from .models import state_digest

    model = encoder.model
    check_splittable(model, stages, encoder.name)
    trunk, top = _parts(model, stages, encoder.preprocess.size)
    info: dict = {"stages": stages, "views": views, "epochs": epochs, "seconds": {}}

    # 1. the trunk's activations: view 0 (as predict sees the file) and the mirror of every item, the
    #    further augmented views of the training items; float16 halves the memory (~44 KB per view on lite0 at 224 px)
    t = time.perf_counter()
    from .features import FeatureExtractor

    digest = state_digest(trunk)
    everything = np.arange(len(paths))
    mirrored = [rows_train] if views >= 2 else []
    if mirror_held:
        mirrored.append(np.setdiff1d(everything, rows_train))
    wanted = {0: everything, **({1: np.unique(np.concatenate(mirrored))} if mirrored else {}),
              **{v: rows_train for v in range(2, views)}}
    acts: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # view -> (item indices, activations)
    if view0 is not None:
        acts[0] = view0
        del wanted[0]
    for v, idx in wanted.items():
        ext = FeatureExtractor(trunk, encoder.preprocess, digest, f"{encoder.name}-trunk{stages}", engine=engine,
                               use_cache=False, view=v)
        f = ext([paths[i] for i in idx], desc=f"trunk activations (view {v + 1})", progress=progress)
        acts[v] = (idx[f.ok], f.vectors[f.ok].astype(np.float16))
    info["seconds"]["trunk"] = round(time.perf_counter() - t, 1)
    info["activation_bytes"] = int(sum(a.nbytes for _, a in acts.values()))

    # the training pool: per training item, (view, row in that view's activations) of each of its views
    pos = {v: {int(i): r for r, i in enumerate(idx)} for v, (idx, _) in acts.items()}
    pool = [[(v, pos[v][int(i)]) for v in range(views) if int(i) in pos.get(v, {})] for i in rows_train]
    keep = np.array([bool(p) for p in pool])
    pool = [p for p in pool if p]
    y_train = torch.from_numpy(y[rows_train[keep]]).long()
    val_rows = np.array([pos[0][int(i)] for i in rows_val if int(i) in pos[0]], int)
    y_val = y[acts[0][0][val_rows]] if len(val_rows) else np.zeros(0, int)

    net = nn.Sequential(top, nn.Dropout(TOP_DROPOUT), head.torch_module())
    net.eval()
    net.to(memory_format=torch.channels_last)

    def features(view: int, rows: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for j in range(0, len(rows), 256):
                out.append(top(torch.from_numpy(acts[view][1][rows[j:j + 256]]).float()).numpy())
        return np.concatenate(out) if out else np.zeros((0, head.dim), np.float32)

    def validate() -> tuple[float, float, float]:
        if not len(val_rows):
            return float("nan"), float("nan"), float("nan")
        top.eval()
        with torch.inference_mode():
            logits = net[2](torch.from_numpy(features(0, val_rows)))
            loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y_val).long()))
        pred = logits.argmax(1).numpy()
        return float(np.mean(pred == y_val)), float(f1_score(y_val, pred, average="macro")), loss

    # 2. a few epochs over the cached activations
    torch.manual_seed(seed)
    # the depthwise convs keep their weights: their weight gradients were ~21 % of a training step
    # (lite0's 5x5 depthwise convs over 1152 channels at 7x7, 2 cores) for a few thousand parameters
    depthwise = {id(m.weight) for m in top.modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    tuned = [p for p in top.parameters() if id(p) not in depthwise]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": tuned, "lr": lr}, {"params": net[2].parameters(), "lr": lr * HEAD_LR_FACTOR}],
                            weight_decay=0.01)
    steps = (len(pool) + TOP_BATCH - 1) // TOP_BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * HEAD_LR_FACTOR], total_steps=max(1, epochs * steps),
                                                pct_start=0.15)
    weight = torch.from_numpy(np.asarray(class_weights, np.float32)) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=TOP_LABEL_SMOOTHING)
    t_val = time.perf_counter()
    acc, best_f1, vloss = validate()
    # after training, the pooled features of every item and of the held-out items' mirror images (the
    # training items' mirror images trained the top, but nothing reads their features: ~9 s on clothing)
    after = {0: np.arange(len(acts[0][0]))}
    if 1 in acts:
        after[1] = np.flatnonzero(~np.isin(acts[1][0], rows_train))
    # they cost about what validation does per row
    rows_after = sum(len(r) for r in after.values())
    after_s = (time.perf_counter() - t_val) * rows_after / max(1, len(val_rows))
    console.print(f"before tuning the top {stages} stage(s): val acc {acc:.4f}  val macro-F1 {best_f1:.4f}",
                  markup=False)
    best, best_epoch = copy.deepcopy(net.state_dict()), 0
    history: list[dict] = []
    g = torch.Generator().manual_seed(seed)
    t_train = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        if deadline is not None and epoch and t0 + (t0 - t_train) / epoch + after_s > deadline:
            console.print(f"budget: stopping after {epoch} of {epochs} top epochs (another would end past the "
                          "budget)", markup=False)
            info["stopped_for_budget"] = epoch
            break
        order = torch.randperm(len(pool), generator=g).numpy()
        pick = torch.randint(0, 1 << 30, (len(pool),), generator=g).numpy()

        def batches(order=order, pick=pick):
            for s in range(steps):
                batch = order[s * TOP_BATCH:(s + 1) * TOP_BATCH]
                chosen = [pool[i][pick[i] % len(pool[i])] for i in batch]
                yield torch.from_numpy(np.stack([acts[v][1][r] for v, r in chosen])).float(), y_train[batch]

        train_loss = train_epoch(net, batches(), steps, opt, sched, loss_fn, f"top epoch {epoch + 1}/{epochs}",
                                 progress)
        acc, f1, vloss = validate()
        improved = not len(val_rows) or f1 > best_f1 + 1e-6
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": vloss, "val_acc": acc,
                        "val_macro_f1": f1, "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - t0, 2)})
        console.print(f"top epoch {epoch + 1}: train loss {train_loss:.4f}  val acc {acc:.4f}  "
                      f"val macro-F1 {f1:.4f}" + ("  (best)" if improved else ""), markup=False)
        if improved:
            best_f1 = f1 if len(val_rows) else best_f1
            best, best_epoch = copy.deepcopy(net.state_dict()), epoch + 1
    net.load_state_dict(best)
    net.to(memory_format=torch.contiguous_format)
    net.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info["seconds"]["train"] = round(time.perf_counter() - t_train, 1)
    info["kept_epoch"] = best_epoch  # 0: no epoch beat the head on frozen features, the network is untouched

    # 3. pooled features of every item (and the held-out items' mirror images) through the tuned top: no
    #    second pass over the files
    vectors = {v: (acts[v][0][r], features(v, r)) for v, r in after.items()}
    tuned_head = LinearHead.from_torch(net[2])
    tuned_head.history = history
    return TopResult(head=tuned_head, vectors=vectors, info=info)
