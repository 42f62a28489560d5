"""Train: prepare data -> build encoder -> features (cached) -> split and leakage gate -> head
(-> fine-tune) -> calibrate -> score -> write the run. ``train()`` reads as that sequence; each stage
is a function over typed values, and every option arrives checked in a ``TrainSpec``."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.text import Text

from .bundle import BundleConfig, save_bundle
from .calibration import (K_NEIGHBOURS, NOT_SURE_QUANTILE, choose_thresholds, crossfit_operating_point,
                          fit_temperature, not_sure_mask, operating_point, scaled_logits)
from .data import Dataset, scan
from .dedup import LEAKAGE_TOLERANCE, check_leakage
from .encoder import Encoder
from .errors import FoldernetError
from .evaluate import plot_confusion_matrix, read_label_map, score_split
from .head import LinearHead, class_weights, imbalance_ratio, network
from .io import atomic_write_bytes, atomic_write_csv, check_data_dir, staged_dir
from .modality import modality
from .progress import console
from .similar import knn_similarity, save_index, unit_rows
from .spec import TrainSpec
from .split import apply_grouping, resolve_splits, split_counts, write_splits_csv

log = logging.getLogger("foldernet")
# --budget in top mode: seconds kept after the tuning for calibration, scoring and writing the bundle
FIXED_AFTER_TOP_S = 8.0


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    timings: dict
    config: dict          # the bundle's config.json (BundleConfig.to_dict())
    skipped: list = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@dataclass
class Rows:
    """Which feature rows are usable and where each goes: ``y`` (label index per item) and a
    boolean mask per split."""

    labels: list[str]
    y: np.ndarray
    sel: dict[str, np.ndarray]

    def x(self, vectors: np.ndarray, split: str) -> np.ndarray | None:
        return vectors[self.sel[split]] if self.sel[split].any() else None

    def counts(self, split: str) -> dict[str, int]:
        ys = self.y[self.sel[split]]
        return {c: int((ys == i).sum()) for i, c in enumerate(self.labels)}


def train(data: str | os.PathLike, out: str | os.PathLike = "runs/train", spec: TrainSpec | None = None,
          **options) -> TrainResult:
    """Train a classifier on ``data`` (class folders) and write a run with its bundle in ``out/model``.

    Options are those of ``foldernet train`` (``params.TRAIN``; ``foldernet train --help``), checked
    before any work starts; or pass a ``TrainSpec``. See ARCHITECTURE.md for the stages."""
    spec = spec.with_options(**options) if spec is not None else TrainSpec.from_options(**options)
    data = check_data_dir(data)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 writes the run
    final_out = Path(out)
    if rank > 0:
        out = Path(out).parent / f".{Path(out).name}.rank{rank}"
        spec = spec.with_options(resume=False, force=True)
    with staged_dir(out, kind="run", force=spec.run.force, partial=spec.model.mode == "finetune",
                    resume=spec.finetune.resume, inputs=[data], keep=spec.finetune.keep_checkpoint) as tmp:
        ds, label_map = prepare_data(data, spec)
        spec, plan = plan_run(ds, spec, verbose=rank == 0)
        timings["scan"] = time.perf_counter() - t0
        t = time.perf_counter()
        encoder = build_encoder(ds, spec, verbose=rank == 0)
        timings["load_backbone"] = time.perf_counter() - t
        feats, skipped, view0 = extract_features(encoder, ds, spec)
        timings["features"] = feats.seconds
        leaks = split_and_check(ds, feats, spec, data)
        rows = label_rows(ds, feats.ok)
        feats.vectors = encoder.fit_standardisation(feats.vectors, rows.sel["train"])
        weights, balance = balance_weights(rows, spec)
        t = time.perf_counter()
        if plan and spec.model.mode == "head":
            spec = keep_within_budget(spec, plan, time.perf_counter() - t0, feats, rows)
        views = extract_views(encoder, ds, rows, spec) if spec.model.mode == "head" else Views()
        timings["views"] = time.perf_counter() - t
        t = time.perf_counter()
        head = fit_head(feats.vectors, rows, spec, weights, bank=views.bank) if encoder.pretrained else None
        timings["train_head"] = time.perf_counter() - t
        head_history = head.history if head is not None else []
        top_info = None
        if spec.model.mode == "top":
            t = time.perf_counter()
            deadline = t0 + plan["budget_s"] - FIXED_AFTER_TOP_S if plan else None
            encoder, head, views, top_info = top_stage(encoder, head, ds, rows, spec, weights, feats, view0, deadline)
            view0 = None  # the activations (hundreds of MB on a few thousand images) are not needed again
            timings["top"] = time.perf_counter() - t
        if spec.model.mode == "finetune":
            t = time.perf_counter()
            encoder, head = finetune_stage(encoder, head, ds, rows, spec, weights, tmp)
            timings["finetune"] = time.perf_counter() - t
            t = time.perf_counter()
            feats.vectors = encoder.extractor(spec.model.engine, spec.run.use_cache)(
                [it.path for it in ds.items], desc="features (fine-tuned)", progress=spec.run.progress).vectors
            views = extract_views(encoder, ds, rows, spec)  # the mirror images for --tta, through the tuned network
            timings["features_finetuned"] = time.perf_counter() - t
        t = time.perf_counter()
        encoder, tta = choose_tta(encoder, head, feats, ds, rows, spec, views)
        head.logit_norm = trained_with_label_smoothing(spec, head, top_info)
        thresholds = calibrate(head, feats.vectors, rows, spec.head.min_precision)
        heads, fit_rows, refit = refit_head(head, feats.vectors, rows, spec, weights, verbose=rank == 0,
                                            bank=views.bank)
        metrics, pred_rows = score(heads, feats.vectors, rows, fit_rows, thresholds, label_map, ds)
        timings["evaluate"] = time.perf_counter() - t
        metrics.update({"history": head.history if spec.model.mode == "head" else heads["test"].history, "tta": tta,
                        **({"views": views.info} if views.info else {}), **({"plan": plan} if plan else {}),
                        "features": {"computed": feats.n_computed, "cached": feats.n_cached},
                        "skipped": skipped, **({"refit": refit} if refit else {}),
                        **({"head_history": head_history} if spec.model.mode != "head" else {}),
                        **({"top": top_info} if top_info else {})})
        facts = {"label_map": label_map, "leaks": leaks, "balance": balance, "refit": refit}
        config = bundle_config(spec, encoder, ds, rows, heads["test"], thresholds, facts, metrics)
        timings["total"] = time.perf_counter() - t0
        metrics["timings"] = timings
        if plan:
            plan["spent_s"] = round(timings["total"], 1)
        write_run(tmp, encoder, heads["test"], config, metrics, ds, (feats.vectors, fit_rows), pred_rows,
                  title=final_out.name, report=spec.run.report)
    if rank > 0:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # the rank's own scratch folder, named by us above
    return TrainResult(run_dir=final_out, metrics=metrics, timings=timings, config=config.to_dict(), skipped=skipped)


# ---------------------------------------------------------------------------------------- the stages

def prepare_data(data: Path, spec: TrainSpec) -> tuple[Dataset, dict | None]:
    """Scan the class folders (the labels), read the coarse label map."""
    ds = scan(data, label_regex=spec.split.label_regex)
    for w in ds.warnings:
        console.print(Text("warning: ", style="yellow") + Text(w))
    if len(ds.classes) < 2:
        raise FoldernetError(f"{data}: need at least 2 classes with examples, found {len(ds.classes)} "
                             f"({', '.join(ds.classes) or 'none'})")
    label_map = read_label_map(spec.split.label_map_file, ds.classes) if spec.split.label_map_file else None
    return ds, label_map


def plan_run(ds: Dataset, spec: TrainSpec, verbose: bool = True) -> tuple[TrainSpec, dict | None]:
    """``--budget``: measure this machine on the data and choose backbones, views and test-time flip
    that fit (plan.py); the spec that carries them out, and what was measured and chosen."""
    if not spec.model.budget:
        return spec, None
    from .plan import choose

    if spec.model.mode != "head" or spec.model.weights is not None or spec.model.backbone == "scratch":
        raise FoldernetError("train --budget plans head-mode runs on the embedded backbones; drop --budget to use "
                             "--mode finetune, --weights or --backbone scratch")
    n = len(ds.items)
    if ds.predefined_split:
        n_held = sum(1 for it in ds.items if it.split in ("val", "test"))
    else:
        n_held = int(round(n * (spec.split.val + spec.split.test)))
    console.print(f"planning for a budget of {spec.model.budget}: timing this machine on {min(n, 48)} of your "
                  "files...", markup=False)
    chosen, facts = choose(spec.model.budget, [it.path for it in ds.items], n - n_held, n_held, ds.kind,
                           min_precision=spec.head.min_precision)
    if verbose:
        for row in facts["candidates"]:
            same = (row["backbone"], row["views"], row["mode"]) == (chosen.backbone, chosen.views, chosen.mode)
            what = f"{row['backbone']}{', --mode top' if row['mode'] == 'top' else ''}, {row['views']} view(s), " \
                   f"flip {row['tta']}"
            cost = f"about {row['estimate_s']:.0f} s" if row["estimate_s"] is not None else row["skipped"]
            console.print(f" {'->' if same else '  '} {what}: {cost}", markup=False)
        note = "" if facts["fits"] else " (the cheapest plan; even it may exceed the budget)"
        console.print(f"plan: {chosen.describe()}; estimate {chosen.estimate_s:.0f} s of "
                      f"{facts['budget_s']:.0f} s{note}", markup=False)
    top = {"mode": "top", "epochs": chosen.epochs} if chosen.mode == "top" else {}
    return spec.with_options(backbone=chosen.backbone, views=chosen.views, tta=chosen.tta, **top), facts


def keep_within_budget(spec: TrainSpec, plan: dict, elapsed: float, feats, rows: Rows) -> TrainSpec:
    """Before the extra views: if their cost, measured from this run's own feature pass, would take the
    run past its budget, drop them (and say so)."""
    n_views = (int(rows.sel["train"].sum()) * (spec.head.views - 1)
               + (int((rows.sel["val"] | rows.sel["test"]).sum()) if spec.model.tta != "off" else 0))
    if not n_views or feats.n_computed == 0:
        return spec
    cost = feats.seconds / max(1, feats.n_computed) * n_views
    if elapsed + cost + 5 <= plan["budget_s"]:
        return spec
    console.print(f"budget: the extra views would take about {cost:.0f} s more (features ran at "
                  f"{feats.n_computed / max(feats.seconds, 1e-9):.0f} files/s after {elapsed:.0f} s); "
                  "training on plain features only", markup=False)
    plan["dropped_views"] = True
    return spec.with_options(views=1, tta="off")


def build_encoder(ds: Dataset, spec: TrainSpec, verbose: bool = True) -> Encoder:
    m = spec.model
    kind = modality(ds.kind)
    stats = m.spectrogram_stats and kind.supports_spectrogram_stats(m.mode)
    if m.spectrogram_stats and not stats and verbose:
        console.print("note: --spectrogram-stats applies to audio in head mode only; ignored here")
    encoder = Encoder.build(m.backbone, ds.kind, weights=m.weights, img_size=m.img_size, crop_pct=m.crop_pct,
                            audio=spec.audio.overrides(), paths=[it.path for it in ds.items], spectrogram_stats=stats)
    if m.mode == "top":
        if not kind.supports_top_mode:
            raise FoldernetError(f"train --mode top is for images, not {ds.kind} (a clip's windows are averaged "
                                 "after the backbone); use --mode head or --mode finetune")
        from .top import check_splittable

        check_splittable(encoder.model, spec.finetune.top_stages, encoder.name)
    note = kind.training_note(encoder.name, m.mode, stats)
    if note and verbose:
        console.print(note)
    return encoder


def extract_features(encoder: Encoder, ds: Dataset, spec: TrainSpec):
    """Features of every item (cached by content); unreadable items, and those the modality says to
    leave out (placeholder images), are marked not ok and listed with the reason. Returns (features,
    skipped, view0): in top mode the same pass also yields the trunk's activations (``view0``)."""
    view0 = None
    paths = [it.path for it in ds.items]
    if spec.model.mode == "top":
        from .top import first_pass

        feats, view0 = first_pass(encoder, spec.finetune.top_stages, paths, spec.model.engine, spec.run.progress)
    else:
        feats = encoder.extractor(spec.model.engine, spec.run.use_cache)(
            paths, desc="extract features", progress=spec.run.progress)
    skipped = list(ds.skipped) + [(ds.items[i].relpath, r) for i, r in sorted(feats.errors.items())]
    if not spec.split.keep_placeholders:
        kind = modality(ds.kind)
        for i, fp in enumerate(feats.fingerprints):
            reason = kind.skip_reason(fp) if feats.ok[i] and fp else None
            if reason:
                feats.ok[i] = False
                skipped.append((ds.items[i].relpath, reason))
    for rel, reason in skipped:
        console.print(Text("skipped ", style="yellow") + Text(f"{rel}: {reason}"))
    return feats, skipped, view0


def split_and_check(ds: Dataset, feats, spec: TrainSpec, data: Path) -> list[tuple[str, str]]:
    """Assign splits (grouping first when foldernet makes them), then stop if too many held-out
    items duplicate training items: their scores would be inflated."""
    s = spec.split
    if not (s.splits or (ds.root / "splits.csv").is_file()):
        apply_grouping(ds, s.group_by, features=feats)
    resolve_splits(ds, s.splits, s.val, s.test, s.seed)
    if ds.splits_source:
        console.print(f"using splits from {ds.splits_source}", markup=False)
    leaks = check_leakage(ds, feats)
    n_held = sum(1 for it, k in zip(ds.items, feats.ok) if k and it.split != "train")
    if leaks and not s.allow_leakage and len(leaks) > LEAKAGE_TOLERANCE * max(1, n_held):
        shown = "\n  ".join(f"{a} duplicates {b}" for a, b in leaks[:20])
        more = f"\n  ... and {len(leaks) - 20} more" if len(leaks) > 20 else ""
        raise FoldernetError(
            f"{len(leaks)} of {n_held} validation/test images are exact or near duplicates of training "
            f"images, so their scores would be inflated:\n  {shown}{more}\n"
            f"Fix: `foldernet split {data} --group-by near-duplicates` (keeps duplicates on one side), "
            f"or `foldernet audit {data} --fix` (quarantines them), or pass --allow-leakage.")
    if leaks:
        console.print(f"note: {len(leaks)} held-out image(s) duplicate training images (within tolerance)")
    return leaks


def label_rows(ds: Dataset, ok: np.ndarray) -> Rows:
    labels = ds.classes
    index = {c: i for i, c in enumerate(labels)}
    y = np.array([index[it.label] for it in ds.items])
    split = np.array([it.split for it in ds.items])
    rows = Rows(labels, y, {s: ok & (split == s) for s in ("train", "val", "test")})
    if not rows.sel["train"].any():
        raise FoldernetError("no readable training examples after the split; add examples to train/")
    missing = [c for c, n in rows.counts("train").items() if n == 0]
    if missing:
        raise FoldernetError(f"classes with no training example: {', '.join(missing)}. Add examples or remove them.")
    return rows


def balance_weights(rows: Rows, spec: TrainSpec) -> tuple[np.ndarray | None, dict]:
    """Class weights for the loss when asked, or (auto) when the largest class is over 3x the smallest."""
    setting = spec.head.balance
    ratio = imbalance_ratio(rows.counts("train"))
    use = setting in ("weights", "sampler") or (setting == "auto" and ratio > 3)
    weights = class_weights(rows.y[rows.sel["train"]], len(rows.labels)) if use else None
    if use:
        console.print(f"class imbalance ratio {ratio:.1f}: using class-weighted loss")
    return weights, {"setting": setting, "imbalance_ratio": ratio,
                     "class_weights": weights.tolist() if weights is not None else None}


@dataclass
class Views:
    """Augmented views of items (``--views``, ``--tta``): ``bank`` is [(item indices, vectors)] of the
    extra training views; ``mirror`` maps an item index to the features of its mirror image."""

    bank: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    mirror: dict[int, np.ndarray] = field(default_factory=dict)
    info: dict | None = None


def extract_views(encoder: Encoder, ds: Dataset, rows: Rows, spec: TrainSpec) -> Views:
    """Features of augmented views, once and cached: with ``--views K`` the head trains on K views of
    each training item (the mirror image first, then random crops, rotations and colour changes;
    masked bands for sound); with ``--tta`` the mirror images of held-out items. Both come from one
    pass of the mirror view."""
    k, tta = spec.head.views, spec.model.tta
    kind = modality(ds.kind)
    if k <= 1 and tta == "off":
        return Views()
    standardised = any(hasattr(part, "fit_standardisation") for part in encoder.model.modules())
    if spec.model.mode != "head" or not encoder.pretrained or standardised:
        if k > 1:
            console.print("note: --views applies in head mode to pretrained backbones without standardised "
                          "features; ignored here")
        k = 1
    train = np.flatnonzero(rows.sel["train"])
    held = np.flatnonzero(rows.sel["val"] | rows.sel["test"])
    wanted: dict[int, np.ndarray] = {}
    if kind.supports_flip:
        mirror_of = [train] if k >= 2 else []
        if tta != "off":
            mirror_of.append(held)
        if mirror_of:
            wanted[1] = np.concatenate(mirror_of)
        wanted.update({v: train for v in range(2, k)})
    else:
        wanted.update({v: train for v in range(2, k + 1)})  # a mirrored sound is not the same sound
    out = Views(info={"views": k, "seconds": {}} if k > 1 else None)
    train_set = set(train.tolist())
    for v, idx in wanted.items():
        t = time.perf_counter()
        f = encoder.extractor(spec.model.engine, spec.run.use_cache, view=v)(
            [ds.items[i].path for i in idx], desc=f"features (view {v + 1})", progress=spec.run.progress)
        idx, vecs = idx[f.ok], f.vectors[f.ok]
        if v == 1:
            out.mirror = dict(zip(idx.tolist(), vecs))
        in_train = np.array([i in train_set for i in idx.tolist()], bool)
        if k > 1 and in_train.any():
            out.bank.append((idx[in_train], vecs[in_train]))
        if out.info is not None:
            out.info["seconds"][str(v + 1)] = round(time.perf_counter() - t, 2)
    if k > 1:
        console.print(f"feature bank: the head trains on {k} views of each of {len(train)} training items", markup=False)
    return out


def fit_head(vectors: np.ndarray, rows: Rows, spec: TrainSpec, weights: np.ndarray | None,
             fit_rows: np.ndarray | None = None, epochs: int | None = None,
             bank: list[tuple[np.ndarray, np.ndarray]] = ()) -> LinearHead:
    """The linear head on the training rows and their ``bank`` views, early-stopped on val (or, for a
    refit, on ``fit_rows`` for a fixed number of ``epochs``)."""
    val = None
    if fit_rows is None:
        fit_rows = rows.sel["train"]
        if rows.sel["val"].any():
            val = (rows.x(vectors, "val"), rows.y[rows.sel["val"]])
    x, y = [vectors[fit_rows]], [rows.y[fit_rows]]
    for idx, vecs in bank:
        keep = fit_rows[idx]
        x.append(vecs[keep])
        y.append(rows.y[idx[keep]])
    return LinearHead.fit(np.concatenate(x), np.concatenate(y), val, len(rows.labels), spec.head,
                          class_weights=weights, seed=spec.split.seed, max_epochs=epochs, progress=spec.run.progress)


def finetune_stage(encoder: Encoder, head: LinearHead | None, ds: Dataset, rows: Rows, spec: TrainSpec,
                   weights: np.ndarray | None, run_dir: Path) -> tuple[Encoder, LinearHead]:
    """The whole network, from the head trained on frozen features (see finetune.py)."""
    from .finetune import FinetuneConfig, finetune

    ft = spec.finetune
    balance = "sampler" if spec.head.balance == "sampler" else "weights" if weights is not None else "off"
    cfg = FinetuneConfig(epochs=ft.epochs, lr=ft.finetune_lr, batch_size=ft.batch_size, augment=ft.augment,
                         patience=ft.patience, balance=balance,
                         class_weights=weights.tolist() if weights is not None else None, seed=spec.split.seed,
                         workers=ft.workers, audio=encoder.audio, resume=ft.resume, pretrained=encoder.pretrained,
                         low_res_epochs=ft.low_res_epochs,
                         progress=spec.run.progress)
    net = network(encoder.model, head, len(rows.labels), encoder.num_features)

    def part(split: str):
        idx = np.flatnonzero(rows.sel[split])
        return [ds.items[i].path for i in idx], rows.y[idx]

    net, history = finetune(net, part("train"), part("val"), encoder.preprocess, cfg, run_dir / "checkpoint")
    tuned = LinearHead.from_torch(net.head)
    tuned.history = history
    return encoder.with_model(net.backbone), tuned


def trained_with_label_smoothing(spec: TrainSpec, head: LinearHead, top_info: dict | None) -> bool:
    """Whether the head that answers was trained with label smoothing: top and finetune train with it, but
    keep the head trained on frozen features (without it) when no epoch beats that on validation. Such a
    head ranks its answers better on unit-normalised logits (calibration.unit_logits)."""
    if spec.model.mode == "top":
        return bool(top_info and top_info.get("kept_epoch", 0) >= 1)
    if spec.model.mode == "finetune":
        return any(row.get("best", False) for row in head.history)
    return False


def top_stage(encoder: Encoder, head: LinearHead, ds: Dataset, rows: Rows, spec: TrainSpec,
              weights: np.ndarray | None, feats, view0: np.ndarray | None = None, deadline: float | None = None
              ) -> tuple[Encoder, LinearHead, Views, dict]:
    """The backbone's last stages and the head, on cached activations of the frozen stages (top.py);
    then every item's features (and, for --tta, the held-out mirror images) through the tuned network,
    from the same cache."""
    from .top import train_top

    acts0 = None  # the usable items' trunk activations from the first pass (a copy only when some files failed)
    if view0 is not None:
        acts0 = (np.flatnonzero(feats.ok), view0 if feats.ok.all() else view0[feats.ok])
    result = train_top(encoder, head, [it.path for it in ds.items], np.flatnonzero(rows.sel["train"]),
                       np.flatnonzero(rows.sel["val"]), rows.y, views=spec.head.views,
                       stages=spec.finetune.top_stages, epochs=spec.finetune.epochs, lr=spec.finetune.finetune_lr,
                       class_weights=weights, mirror_held=spec.model.tta != "off" and modality(ds.kind).supports_flip,
                       engine=spec.model.engine, seed=spec.split.seed, progress=spec.run.progress,
                       view0=acts0, deadline=deadline)
    idx, vectors = result.vectors[0]
    usable = feats.ok[idx]
    feats.vectors[idx[usable]] = vectors[usable]
    held = rows.sel["val"] | rows.sel["test"]
    mirror = {int(i): v for i, v in zip(*result.vectors.get(1, ((), ()))) if held[i]}
    return encoder, result.head, Views(mirror=mirror), result.info


def choose_tta(encoder: Encoder, head: LinearHead, feats, ds: Dataset, rows: Rows, spec: TrainSpec, views: Views):
    """``--tta flip|auto``: features of the held-out items averaged with those of their mirror images
    (``views.mirror``). With auto it is kept only when it lowers the head's validation loss. Training
    rows keep their plain features (the head learned from them; the similar-example index holds them).
    The saved encoder then averages every input with its mirror, in its ONNX graph too. Returns (the
    encoder to save, what was measured and chosen)."""
    if spec.model.tta == "off":
        return encoder, None
    if not modality(ds.kind).supports_flip:
        console.print(f"note: --tta flip applies to images, not to {ds.kind}; ignored here")
        return encoder, None
    held = np.flatnonzero(rows.sel["val"] | rows.sel["test"])
    if any(i not in views.mirror for i in held.tolist()):
        console.print("note: some held-out files could not be read a second time; --tta ignored")
        return encoder, None
    vectors = feats.vectors.copy()
    for i in held.tolist():
        vectors[i] = 0.5 * (feats.vectors[i] + views.mirror[i])
    info = {"asked": spec.model.tta}
    x_val = rows.x(feats.vectors, "val")
    if x_val is not None:
        y_val = rows.y[rows.sel["val"]]
        nll = {name: float(-np.mean(np.log(head.proba(x, calibrated=False)[np.arange(len(y_val)), y_val] + 1e-12)))
               for name, x in (("plain", x_val), ("flip", rows.x(vectors, "val")))}
        info.update(val_loss_plain=round(nll["plain"], 5), val_loss_flip=round(nll["flip"], 5))
    use = spec.model.tta == "flip" or info.get("val_loss_flip", np.inf) < info.get("val_loss_plain", -np.inf)
    info["used"] = bool(use)
    console.print(f"test-time flip: {'on' if use else 'off'}" + (
        f" (validation loss {info['val_loss_plain']:.4f} plain, {info['val_loss_flip']:.4f} with flip)"
        if "val_loss_plain" in info else ""), markup=False)
    if not use:
        return encoder, info
    feats.vectors = vectors
    return encoder.with_tta(), info


@dataclass
class Thresholds:
    """The open-set rule fitted on val: not sure below ``confidence`` or below ``similarity`` to the
    nearest training examples (see calibration.py)."""

    confidence: float | None = None
    similarity: float | None = None
    operating_point: dict | None = None   # --min-precision: what was asked and what val says it gives


def calibrate(head: LinearHead, vectors: np.ndarray, rows: Rows, min_precision: float | None = None) -> Thresholds:
    """Temperature scaling and the "not sure" thresholds, both on the validation split. With
    ``min_precision`` the confidence threshold rises to where the answers kept reach it on val (and
    how that holds on unseen images is estimated by cross-fitting two halves of val)."""
    x_val = rows.x(vectors, "val")
    if x_val is None:
        if min_precision is not None:
            console.print("note: --min-precision needs a validation split; ignored here")
        return Thresholds()
    y_val = rows.y[rows.sel["val"]]
    head.temperature = fit_temperature(scaled_logits(head.logits(x_val), 1.0, head.logit_norm), y_val)
    sims = knn_similarity(unit_rows(vectors[rows.sel["train"]]), x_val, K_NEIGHBOURS)
    probs = head.proba(x_val)
    thresholds = Thresholds(*choose_thresholds(probs, y_val, sims))
    if min_precision is None:
        return thresholds
    point = operating_point(probs, y_val, min_precision)
    facts = {"min_precision": min_precision, **crossfit_operating_point(probs, y_val, min_precision)}
    if point is None:
        console.print(f"note: no confidence threshold reaches precision {min_precision} on val; the default "
                      "'not sure' rule stays")
        thresholds.operating_point = {**facts, "threshold": None}
        return thresholds
    thresholds.confidence = max(point, thresholds.confidence or 0.0)
    kept = probs.max(1) >= thresholds.confidence
    thresholds.operating_point = {**facts, "threshold": thresholds.confidence, "val_coverage": round(float(kept.mean()), 4),
                                  "val_precision": round(float((probs.argmax(1) == y_val)[kept].mean()), 4)}
    console.print(f"operating point: answer when confidence >= {thresholds.confidence:.4f}; on val that answers "
                  f"{kept.mean():.1%} at precision {thresholds.operating_point['val_precision']:.1%} (cross-fitted: "
                  f"{facts['crossfit_coverage']} at {facts['crossfit_precision']})", markup=False)
    return thresholds


def refit_head(head: LinearHead, vectors: np.ndarray, rows: Rows, spec: TrainSpec, weights: np.ndarray | None,
               verbose: bool = True, bank: list = ()) -> tuple[dict[str, LinearHead], np.ndarray, dict | None]:
    """``--refit``: once early stopping has chosen the epochs on val, train the head again on train +
    val for that many. Val is still scored on the head that never saw it; test on the refitted one.
    Returns (head per split, the rows the final head learned from, what was done)."""
    heads = {"val": head, "test": head}
    applies = spec.model.mode == "head" and rows.sel["val"].any() and head.history
    if not spec.head.refit or not applies:
        if spec.head.refit and verbose:
            console.print("note: --refit applies in head mode with a validation split; ignored here")
        return heads, rows.sel["train"], None
    fit_rows = rows.sel["train"] | rows.sel["val"]
    epochs = head.best_epoch()
    weights_all = class_weights(rows.y[fit_rows], len(rows.labels)) if weights is not None else None
    refitted = fit_head(vectors, rows, spec, weights_all, fit_rows=fit_rows, epochs=epochs, bank=bank)
    refitted.temperature, refitted.logit_norm = head.temperature, head.logit_norm
    heads["test"] = refitted
    # "similar" and the distance rule then search train + val, while the similarity threshold was chosen on
    # val against train alone: held-out inputs look a little more familiar than it assumed
    info = {"epochs": epochs, "rows": int(fit_rows.sum()), "history": refitted.history,
            "note": "after early stopping chose the epochs on val, the head was retrained on train + val; "
                    "temperature, thresholds and the val figures come from the head trained on train alone"}
    console.print(f"refit: head retrained on train + val ({info['rows']} examples) for {epochs} epochs, the "
                  "number early stopping chose on val", markup=False)
    return heads, fit_rows, info


def score(heads: dict[str, LinearHead], vectors: np.ndarray, rows: Rows, fit_rows: np.ndarray,
          thresholds: Thresholds, label_map: dict | None, ds: Dataset) -> tuple[dict, list[dict]]:
    """Metrics of val and test, and one prediction row per held-out item."""
    metrics: dict = {"splits": {}, "coarse": {}}
    pred_rows: list[dict] = []
    index = unit_rows(vectors[fit_rows])
    for s in ("val", "test"):
        x = rows.x(vectors, s)
        if x is None:
            continue
        head, ys = heads[s], rows.y[rows.sel[s]]
        probs, raw = head.proba(x), head.proba(x, calibrated=False)
        unsure = None
        if thresholds.confidence is not None:
            unsure = not_sure_mask(probs, knn_similarity(index, x, K_NEIGHBOURS), thresholds.confidence,
                                   thresholds.similarity)
        m = score_split(probs, ys, rows.labels, raw=raw, not_sure=unsure, label_map=label_map)
        coarse = m.pop("coarse", None)
        metrics["splits"][s] = m
        if coarse:
            metrics["coarse"][s] = coarse
        order = np.argsort(-probs, axis=1)[:, :3]
        for r, i in enumerate(np.flatnonzero(rows.sel[s])):
            pred_rows.append({"path": ds.items[i].relpath, "split": s, "label": rows.labels[ys[r]],
                              "predicted": rows.labels[order[r, 0]],
                              "confidence": round(float(probs[r, order[r, 0]]), 6),
                              "confidence_uncalibrated": round(float(raw[r].max()), 6),
                              "p_true": round(float(probs[r, ys[r]]), 6),
                              "top3": "|".join(rows.labels[j] for j in order[r])})
    split = "test" if "test" in metrics["splits"] else "val" if "val" in metrics["splits"] else None
    metrics["reported_split"] = split
    return metrics, pred_rows


def bundle_config(spec: TrainSpec, encoder: Encoder, ds: Dataset, rows: Rows, head: LinearHead,
                  thresholds: Thresholds, facts: dict, metrics: dict) -> BundleConfig:
    """What the bundle records: the model's input contract, calibration, and ``facts`` found on the way
    (label_map, leaks, balance, refit)."""
    label_map, leaks, balance, refit = facts["label_map"], facts["leaks"], facts["balance"], facts["refit"]
    split = metrics["reported_split"]
    summary = {k: v for k, v in (metrics["splits"].get(split) or {}).items()
               if k in ("n", "accuracy", "macro_f1", "top3", "top5")}
    ok_items = [it for it, k in zip(ds.items, rows.sel["train"] | rows.sel["val"] | rows.sel["test"]) if k]
    training = {"max_epochs": spec.head.max_epochs, "epochs_run": len(metrics["history"]),
                "patience": spec.head.patience, "lr": spec.head.head_lr}
    if spec.model.mode == "finetune":
        from .finetune import LAYER_DECAY, FinetuneConfig

        ft = spec.finetune
        training["finetune"] = {"epochs": ft.epochs, "lr": ft.finetune_lr, "augment": ft.augment,
                                "batch_size": ft.batch_size, "layer_decay": LAYER_DECAY,
                                "label_smoothing": FinetuneConfig.label_smoothing, "patience": ft.patience,
                                "low_res_epochs": ft.low_res_epochs}
    if spec.model.mode == "top":
        from .top import TOP_BATCH, TOP_LABEL_SMOOTHING

        ft = spec.finetune
        training["top"] = {"stages": ft.top_stages, "views": spec.head.views, "epochs": ft.epochs,
                           "lr": ft.finetune_lr, "batch_size": TOP_BATCH, "label_smoothing": TOP_LABEL_SMOOTHING,
                           "kept_epoch": metrics["top"]["kept_epoch"]}
    return BundleConfig(
        backbone=encoder.name, weights_source=encoder.backbone.weights_source, mode=spec.model.mode,
        labels=list(rows.labels), num_features=encoder.num_features, preprocess=encoder.preprocess,
        kind=ds.kind, audio=encoder.audio, spectrogram_stats=encoder.spectrogram_stats, tta=encoder.tta, refit=(
            {k: v for k, v in refit.items() if k != "history"} if refit else None),
        temperature=head.temperature, logit_norm=head.logit_norm, threshold=thresholds.confidence,
        similarity_threshold=thresholds.similarity,
        operating_point=thresholds.operating_point,
        threshold_rule=f"not sure when the calibrated top-1 confidence < threshold or the mean cosine similarity "
                       f"to the {K_NEIGHBOURS} nearest training images < similarity_threshold; each is the "
                       f"{NOT_SURE_QUANTILE / 2:.2%} quantile of that score over correctly classified validation "
                       "images",
        label_map=label_map, seed=spec.split.seed, group_by=spec.split.group_by,
        leakage={"held_out_duplicates": len(leaks), "allowed": spec.split.allow_leakage,
                 "examples": [list(p) for p in leaks[:20]]},
        balance=balance,
        data={"root": ds.root.as_posix(), "predefined_split": ds.predefined_split,
              "counts": split_counts(ok_items, rows.labels), "skipped": len(metrics["skipped"])},
        training=training, engine=spec.model.engine, metrics={"split": split, **summary},
        spec=spec.to_dict(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), platform=platform.platform())


def write_run(run: Path, encoder: Encoder, head: LinearHead, config: BundleConfig, metrics: dict, ds: Dataset,
              index: tuple[np.ndarray, np.ndarray], pred_rows: list[dict], title: str, report: bool = True) -> None:
    """The bundle (weights, config, metrics, splits, the similar-example ``index``: all vectors and
    the rows it holds) and the run's CSVs, curves and report, all into the staging folder."""
    vectors, fit_rows = index
    skipped = metrics["skipped"]
    split = metrics["reported_split"]
    if split:
        plot_confusion_matrix(metrics["splits"][split], run / "confusion_matrix.png",
                              title=f"{ds.root.name}: {split} split")
    save_bundle(run / "model", encoder.model, head, config, metrics)
    write_splits_csv(ds.items, run / "model" / "splits.csv")
    idx = np.flatnonzero(fit_rows)
    save_index(run / "model", vectors[idx], [ds.items[i].relpath for i in idx], [ds.items[i].label for i in idx])
    if pred_rows:
        atomic_write_csv(run / "predictions.csv", list(pred_rows[0]), pred_rows)
    history = metrics["history"]
    atomic_write_csv(run / "history.csv", sorted({k for row in history for k in row},
                                                  key=lambda k: (k != "epoch", k)), history)
    write_curves(history, run)
    if report:
        from .report import write_report

        write_report(run, data_root=ds.root, title=title)
    if skipped:
        atomic_write_csv(run / "skipped.csv", ["path", "reason"], skipped)


def write_curves(history: list[dict], run: Path) -> None:
    """Training curves as PNG and, when tensorboard is installed, as TensorBoard event files."""
    from .report import curves_png

    png = curves_png(history)
    if png:
        atomic_write_bytes(run / "curves.png", png)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for row in history:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
    writer.close()
