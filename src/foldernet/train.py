"""Train: scan -> split -> features from the frozen backbone (cached) -> linear head with early
stopping on the validation split -> evaluate -> bundle. One call, one folder out."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.text import Text

from .bundle import save_bundle
from .data import Dataset, scan
from .errors import FoldernetError
from .evaluate import (K_NEIGHBOURS, NOT_SURE_QUANTILE, choose_thresholds, coarse_probs, compute_metrics,
                       expected_calibration_error, not_sure_mask, plot_confusion_matrix, read_label_map,
                       reliability_bins)
from .features import FeatureExtractor, softmax
from .io import atomic_write_bytes, atomic_write_csv, staged_dir
from .models import DEFAULT_BACKBONE, add_spectrogram_stats, create_backbone, state_digest
from .preprocess import for_dataset
from .progress import console, progress_bar
from .fingerprint import is_low_information
from .similar import knn_similarity, save_index, unit_rows
from .split import apply_grouping, resolve_splits, split_counts, write_splits_csv

log = logging.getLogger("foldernet")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    timings: dict
    config: dict
    skipped: list = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


LEAKAGE_TOLERANCE = 0.02  # fraction of val+test images that may duplicate train before train stops


def check_leakage(ds: Dataset, feats) -> list[tuple[str, str]]:
    """(held-out path, train path) for every val/test image with an exact or near duplicate in train."""
    from .audit import near_duplicate_pairs

    ok = feats.ok
    train_idx = np.array([i for i, it in enumerate(ds.items) if ok[i] and it.split == "train"])
    held_idx = np.array([i for i, it in enumerate(ds.items) if ok[i] and it.split != "train"])
    if len(train_idx) == 0 or len(held_idx) == 0:
        return []
    found: dict[int, int] = {}
    by_hash = {feats.hashes[i]: i for i in train_idx}
    for i in held_idx:
        if feats.hashes[i] in by_hash:
            found[i] = by_hash[feats.hashes[i]]
    fps = [fp if ok[i] else None for i, fp in enumerate(feats.fingerprints)]
    for i, j, _, _ in near_duplicate_pairs(feats.vectors, fps, rows=held_idx, cols=train_idx):
        found.setdefault(i, j)
    return [(ds.items[i].relpath, ds.items[j].relpath) for i, j in sorted(found.items())]


def imbalance_ratio(counts: dict[str, int]) -> float:
    vals = [v for v in counts.values() if v > 0]
    return max(vals) / min(vals) if vals else 1.0


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None,
               n_classes: int, class_weights: np.ndarray | None = None, seed: int = 0, max_epochs: int = 200,
               patience: int = 15, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 64,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A linear softmax head with AdamW; keeps the epoch with the best validation loss.

    Features are cheap once cached, so this runs in seconds even for thousands of images.
    Returns (weight (C, D), bias (C,), history).
    """
    import torch
    from torch import nn

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
                    logits = head(xv)
                    row["val_loss"] = float(nn.functional.cross_entropy(logits, yv))
                    row["val_acc"] = float((logits.argmax(1) == yv).float().mean())
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
                bar.update(completed=max_epochs)
                break
    state = best[1] or head.state_dict()
    return state["weight"].numpy().copy(), state["bias"].numpy().copy(), history


def best_epoch(history: list[dict]) -> int:
    """The epoch ``train_head`` kept: the first with the lowest validation loss (1-based)."""
    losses = [row["val_loss"] for row in history if "val_loss" in row]
    if not losses:
        raise ValueError("no validation loss in the history: early stopping chose no epoch")
    return int(np.argmin(losses)) + 1


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017) on validation logits: one scalar, minimising NLL."""
    from scipy.optimize import minimize_scalar

    if len(y) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t))
        return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def _class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    counts[counts == 0] = 1
    w = len(y) / (n_classes * counts)
    return (w / w.mean()).astype(np.float32)


def train(data: str | os.PathLike, out: str | os.PathLike = "runs/train", backbone: str = DEFAULT_BACKBONE,
          weights: str | os.PathLike | None = None, mode: str = "head", val: float = 0.15, test: float = 0.15,
          seed: int = 0, balance: str = "auto", max_epochs: int = 200, patience: int = 15, lr: float = 1e-3,
          force: bool = False, splits: str | os.PathLike | None = None, engine: str = "onnx",
          use_cache: bool = True, progress: bool = True, label_regex: str | None = None,
          group_by: str | None = None, allow_leakage: bool = False, keep_placeholders: bool = False,
          label_map_file: str | os.PathLike | None = None, report: bool = True, epochs: int | None = None,
          augment: str = "light", img_size: int | None = None, batch_size: int = 32, finetune_lr: float | None = None,
          resume: bool = False, workers: int = 0, audio: dict | None = None,
          spectrogram_stats: bool = False, refit: bool = False) -> TrainResult:
    """Train a classifier on ``data`` (class folders) and write a bundle to ``out/model``.

    ``splits``: a ``splits.csv`` (path,label,split) to reuse; by default ``DATA/splits.csv`` is used
    when present, else the folder's own train/val/test layout, else a stable hashed split.
    ``group_by``: ``near-duplicates``, ``regex:PATTERN`` or ``csv:FILE`` keeps groups on one side.
    Before training, val/test are checked against train for exact and near duplicates; above
    ``LEAKAGE_TOLERANCE`` of held-out files it stops and names them (``allow_leakage`` overrides).
    Flat placeholder-like images ("image not found") are skipped unless ``keep_placeholders``.

    ``mode="finetune"`` then trains the whole network (see ``finetune.py``) for ``epochs`` epochs
    with ``augment`` (none|light|strong); ``backbone="scratch"`` trains the small CNN from random
    weights. Fine-tuning checkpoints every epoch into ``.OUT.partial/``; ``resume=True`` continues.
    ``spectrogram_stats``: for audio with an ImageNet backbone and a head, append classic spectrogram
    statistics (band levels, MFCC-like means and spreads per time segment, envelope, flux) to the
    embedding. They help where each clip is one event that starts at its start (instrument notes: +8
    points on unseen instruments); off by default, because on windows cut from longer recordings
    their time segments describe where the window fell, not the sound.
    ``refit`` (head mode): once early stopping has chosen the number of epochs on the validation split,
    the head is trained again, from scratch, on train + val for that many epochs; the temperature, the
    "not sure" thresholds and the val figures stay those of the head that never saw val, and test is
    scored on the refitted head. Worth it when the groups are few (instrument notes, ~53 training
    instruments per fold: 59.9 -> 62.3 % on unseen instruments, benchmarks/audio.py); off by default.
    """
    from .finetune import AUGMENT_PRESETS, LAYER_DECAY

    if backbone == "scratch":
        mode = "finetune"  # nothing pretrained to freeze: train end to end
    if mode not in ("head", "finetune"):
        raise FoldernetError(f"--mode must be head or finetune (got {mode!r})")
    if augment not in AUGMENT_PRESETS:
        raise FoldernetError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)} (got {augment!r})")
    if balance not in ("auto", "off", "weights", "sampler"):
        raise FoldernetError(f"--balance must be auto, off, weights or sampler (got {balance!r})")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 writes the run
    final_out = out
    if rank > 0:
        out = Path(out).parent / f".{Path(out).name}.rank{rank}"
        resume, force = False, True
    with staged_dir(out, force=force, partial=mode == "finetune", resume=resume) as tmp:
        ds = scan(data, label_regex=label_regex)
        for w in ds.warnings:
            console.print(Text("warning: ", style="yellow") + Text(w))
        if len(ds.classes) < 2:
            raise FoldernetError(f"{data}: need at least 2 classes with images, found {len(ds.classes)} "
                                 f"({', '.join(ds.classes) or 'none'})")
        label_map = read_label_map(label_map_file, ds.classes) if label_map_file else None
        timings["scan"] = time.perf_counter() - t0

        t = time.perf_counter()
        bb = create_backbone(backbone, weights=weights)
        pre, audio_cfg = for_dataset(bb.data_config, ds.kind, img_size, audio, [it.path for it in ds.items])
        stats_apply = audio_cfg is not None and mode == "head"
        if spectrogram_stats and not stats_apply and rank == 0:
            console.print("note: --spectrogram-stats applies to audio in head mode only; ignored here")
        spectrogram_stats = bool(spectrogram_stats and stats_apply)
        if spectrogram_stats:
            bb = add_spectrogram_stats(bb, pre.size)
        if audio_cfg is not None and mode == "head" and rank == 0:
            hints = ["for speech, `--backbone scratch --img-size 64` did far better on unseen speakers"]
            if not backbone.startswith("musicnn"):
                hints.append("for music and instruments, the audio-pretrained `--backbone musicnn_mtt` (weights: "
                             "`pip install --no-deps musicnn`) beat ImageNet features on unseen instruments")
            if not spectrogram_stats:
                hints.append("for clips of one sound each (instrument notes), `--spectrogram-stats` added points "
                             "on unseen instruments")
            console.print(f"note: audio with {bb.name} features + head. " + "; ".join(hints).capitalize()
                          + " (benchmarks/audio.py).")
        digest = state_digest(bb.model)
        extractor = FeatureExtractor(bb.model, pre, digest, backbone, engine=engine, use_cache=use_cache,
                                     audio=audio_cfg)
        timings["load_backbone"] = time.perf_counter() - t
        feats = extractor([it.path for it in ds.items], desc="extract features", progress=progress)
        timings["features"] = feats.seconds
        skipped = list(ds.skipped) + [(ds.items[i].relpath, r) for i, r in sorted(feats.errors.items())]
        if not keep_placeholders:
            for i, fp in enumerate(feats.fingerprints):
                if feats.ok[i] and fp and fp.get("kind") != "audio" and is_low_information(fp):
                    feats.ok[i] = False
                    skipped.append((ds.items[i].relpath, f"looks like a placeholder or blank image ({fp['colours']} "
                                    f"colours, one covers {fp['dominant']:.0%}); pass --keep-placeholders to use it"))
        for rel, reason in skipped:
            console.print(Text("skipped ", style="yellow") + Text(f"{rel}: {reason}"))

        if not (splits or (ds.root / "splits.csv").is_file()):
            apply_grouping(ds, group_by, features=feats)
        resolve_splits(ds, splits, val, test, seed)
        if ds.splits_source:
            console.print(f"using splits from {ds.splits_source}", markup=False)
        leaks = check_leakage(ds, feats)
        if leaks and not allow_leakage:
            n_held = sum(1 for it, k in zip(ds.items, feats.ok) if k and it.split != "train")
            if len(leaks) > LEAKAGE_TOLERANCE * max(1, n_held):
                shown = "\n  ".join(f"{a} duplicates {b}" for a, b in leaks[:20])
                more = f"\n  ... and {len(leaks) - 20} more" if len(leaks) > 20 else ""
                raise FoldernetError(
                    f"{len(leaks)} of {n_held} validation/test images are exact or near duplicates of training "
                    f"images, so their scores would be inflated:\n  {shown}{more}\n"
                    f"Fix: `foldernet split {data} --group-by near-duplicates` (keeps duplicates on one side), "
                    f"or `foldernet audit {data} --fix` (quarantines them), or pass --allow-leakage.")
        if leaks:
            console.print(f"note: {len(leaks)} held-out image(s) duplicate training images (within tolerance)")

        labels = ds.classes
        index = {c: i for i, c in enumerate(labels)}
        y = np.array([index[it.label] for it in ds.items])
        split = np.array([it.split for it in ds.items])
        ok = feats.ok
        sel = {s: ok & (split == s) for s in ("train", "val", "test")}
        if sel["train"].sum() == 0:
            raise FoldernetError("no readable training images after the split; add images to train/")
        train_classes = set(y[sel["train"]].tolist())
        missing = [labels[i] for i in range(len(labels)) if i not in train_classes]
        if missing:
            raise FoldernetError(f"classes with no training image: {', '.join(missing)}. Add images or remove them.")

        for part in bb.model.modules():  # statistics, musicnn: standardised on the training clips (saved)
            if hasattr(part, "fit_standardisation"):
                feats.vectors = part.fit_standardisation(feats.vectors, sel["train"])
        counts_train = {labels[i]: int((y[sel['train']] == i).sum()) for i in range(len(labels))}
        ratio = imbalance_ratio(counts_train)
        use_weights = balance in ("weights", "sampler") or (balance == "auto" and ratio > 3)
        cw = _class_weights(y[sel["train"]], len(labels)) if use_weights else None
        if use_weights:
            console.print(f"class imbalance ratio {ratio:.1f}: using class-weighted loss")

        t = time.perf_counter()
        pretrained = bb.weights_source != "random init"
        xv, yv = (feats.vectors[sel["val"]], y[sel["val"]]) if sel["val"].any() else (None, None)
        weight = bias = None
        history: list[dict] = []
        if pretrained:
            weight, bias, history = train_head(feats.vectors[sel["train"]], y[sel["train"]], xv, yv, len(labels),
                                               class_weights=cw, seed=seed, max_epochs=max_epochs,
                                               patience=patience, lr=lr, progress=progress)
        timings["train_head"] = time.perf_counter() - t
        head_history = history
        if mode == "finetune":
            from .finetune import FinetuneConfig, finetune

            t = time.perf_counter()
            ft_balance = "sampler" if balance == "sampler" else "weights" if use_weights else "off"
            if finetune_lr is None:  # pretrained weights want gentle steps; random ones need larger
                finetune_lr = 1e-4 if pretrained else 3e-3
            if epochs is None:  # random weights need many more passes than a pretrained net
                epochs = 6 if pretrained else 20
            cfg_ft = FinetuneConfig(epochs=epochs, lr=finetune_lr, batch_size=batch_size, augment=augment,
                                    patience=4 if pretrained else 8,
                                    balance=ft_balance, class_weights=cw.tolist() if cw is not None else None,
                                    seed=seed, workers=workers, audio=audio_cfg)
            tr, va = np.flatnonzero(sel["train"]), np.flatnonzero(sel["val"])
            model, weight, bias, history = finetune(
                bb.model, weight, bias, [ds.items[i].path for i in tr], y[tr], [ds.items[i].path for i in va], y[va],
                pre, len(labels), int(bb.num_features), cfg_ft, tmp / "checkpoint", resume=resume,
                progress=progress, pretrained=pretrained)
            bb.model = model.eval()
            timings["finetune"] = time.perf_counter() - t
            t = time.perf_counter()
            extractor = FeatureExtractor(bb.model, pre, state_digest(bb.model), backbone, engine=engine,
                                         use_cache=use_cache, audio=audio_cfg)
            tuned = extractor([it.path for it in ds.items], desc="features (fine-tuned)", progress=progress)
            feats.vectors = tuned.vectors
            timings["features_finetuned"] = time.perf_counter() - t
            xv = feats.vectors[sel["val"]] if sel["val"].any() else None
        temperature = 1.0
        if xv is not None:
            temperature = fit_temperature(xv @ weight.T + bias, yv)

        t = time.perf_counter()
        threshold = sim_threshold = None
        train_unit = unit_rows(feats.vectors[sel["train"]])
        if xv is not None:
            threshold, sim_threshold = choose_thresholds(softmax((xv @ weight.T + bias) / temperature), yv,
                                                         knn_similarity(train_unit, xv, K_NEIGHBOURS))
        # the head every held-out figure of val comes from; with refit, test is scored on the refitted one
        heads = {"val": (weight, bias), "test": (weight, bias)}
        fit_rows = sel["train"]  # the rows the final head learned from (and "similar" searches)
        refit_info = None
        if refit and not (mode == "head" and pretrained and xv is not None):
            if rank == 0:
                console.print("note: --refit applies in head mode with a validation split; ignored here")
        elif refit:
            fit_rows = sel["train"] | sel["val"]
            epochs_chosen = best_epoch(history)
            cw_all = _class_weights(y[fit_rows], len(labels)) if use_weights else None
            weight, bias, refit_history = train_head(feats.vectors[fit_rows], y[fit_rows], None, None, len(labels),
                                                     class_weights=cw_all, seed=seed, max_epochs=epochs_chosen,
                                                     lr=lr, progress=progress)
            heads["test"] = (weight, bias)
            # "similar" and the distance rule now search train + val; the similarity threshold was chosen
            # on val against train alone, so held-out clips look a little more familiar than it assumed
            train_unit = unit_rows(feats.vectors[fit_rows])
            refit_info = {"epochs": epochs_chosen, "rows": int(fit_rows.sum()),
                          "note": "after early stopping chose the epochs on val, the head was retrained on "
                                  "train + val; temperature, thresholds and the val figures come from the head "
                                  "trained on train alone"}
            console.print(f"refit: head retrained on train + val ({refit_info['rows']} examples) for "
                          f"{epochs_chosen} epochs, the number early stopping chose on val", markup=False)
        metrics: dict = {"splits": {}, "coarse": {}}
        pred_rows: list[dict] = []
        for s in ("val", "test"):
            if not sel[s].any():
                continue
            w_s, b_s = heads[s]
            logits = feats.vectors[sel[s]] @ w_s.T + b_s
            probs, raw = softmax(logits / temperature), softmax(logits)
            ys = y[sel[s]]
            m = compute_metrics(probs, ys, labels)
            correct = probs.argmax(1) == ys
            m["ece"] = expected_calibration_error(probs.max(1), correct)
            m["ece_uncalibrated"] = expected_calibration_error(raw.max(1), raw.argmax(1) == ys)
            m["reliability"] = reliability_bins(probs.max(1), correct)
            m["reliability_uncalibrated"] = reliability_bins(raw.max(1), raw.argmax(1) == ys)
            if threshold is not None:
                sure = ~not_sure_mask(probs, knn_similarity(train_unit, feats.vectors[sel[s]], K_NEIGHBOURS),
                                      threshold, sim_threshold)
                m["not_sure_rate"] = float(1 - sure.mean())
                m["accuracy_when_sure"] = float(correct[sure].mean()) if sure.any() else float("nan")
            metrics["splits"][s] = m
            if label_map:
                cp, coarse = coarse_probs(probs, labels, label_map)
                cy = np.array([coarse.index(label_map[labels[v]]) for v in ys])
                metrics["coarse"][s] = compute_metrics(cp, cy, coarse)
            order = np.argsort(-probs, axis=1)[:, :3]
            for row_i, item_i in enumerate(np.flatnonzero(sel[s])):
                pred_rows.append({"path": ds.items[item_i].relpath, "split": s, "label": labels[ys[row_i]],
                                  "predicted": labels[order[row_i, 0]],
                                  "confidence": round(float(probs[row_i, order[row_i, 0]]), 6),
                                  "confidence_uncalibrated": round(float(raw[row_i].max()), 6),
                                  "p_true": round(float(probs[row_i, ys[row_i]]), 6),
                                  "top3": "|".join(labels[j] for j in order[row_i])})
        report_split = "test" if "test" in metrics["splits"] else "val" if "val" in metrics["splits"] else None
        metrics["reported_split"] = report_split
        metrics["history"] = history
        if refit_info:
            metrics["refit"] = {**refit_info, "history": refit_history}
        if mode == "finetune":
            metrics["head_history"] = head_history
        metrics["skipped"] = skipped
        if report_split:
            plot_confusion_matrix(metrics["splits"][report_split], tmp / "confusion_matrix.png",
                                  title=f"{Path(data).name}: {report_split} split")
        timings["evaluate"] = time.perf_counter() - t

        summary = {k: v for k, v in (metrics["splits"].get(report_split) or {}).items()
                   if k in ("n", "accuracy", "macro_f1", "top3", "top5")}
        config = {
            "backbone": backbone,
            "weights_source": bb.weights_source,
            "mode": mode,
            "labels": labels,
            "num_features": int(bb.num_features),
            "preprocess": pre.to_dict(),
            "kind": ds.kind,
            "audio": audio_cfg.to_dict() if audio_cfg else None,
            "spectrogram_stats": spectrogram_stats,
            "refit": refit_info,
            "temperature": temperature,
            "threshold": threshold,
            "similarity_threshold": sim_threshold,
            "threshold_rule": f"not sure when the calibrated top-1 confidence < threshold or the mean cosine "
                              f"similarity to the {K_NEIGHBOURS} nearest training images < similarity_threshold; "
                              f"each is the {NOT_SURE_QUANTILE / 2:.2%} quantile of that score over correctly "
                              "classified validation images",
            "label_map": label_map,
            "seed": seed,
            "group_by": group_by,
            "leakage": {"held_out_duplicates": len(leaks), "allowed": allow_leakage,
                        "examples": [list(p) for p in leaks[:20]]},
            "balance": {"setting": balance, "imbalance_ratio": ratio,
                        "class_weights": cw.tolist() if cw is not None else None},
            "data": {"root": Path(data).resolve().as_posix(), "predefined_split": ds.predefined_split,
                     "counts": {s: v for s, v in split_counts([it for it, k in zip(ds.items, ok) if k],
                                                               labels).items()},
                     "skipped": len(skipped)},
            "training": {"max_epochs": max_epochs, "epochs_run": len(history), "patience": patience, "lr": lr,
                         **({"finetune": {"epochs": cfg_ft.epochs, "lr": cfg_ft.lr, "augment": cfg_ft.augment,
                                          "batch_size": cfg_ft.batch_size, "layer_decay": LAYER_DECAY,
                                          "label_smoothing": cfg_ft.label_smoothing, "patience": cfg_ft.patience}}
                            if mode == "finetune" else {})},
            "engine": extractor.engine.name,
            "metrics": {"split": report_split, **summary},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "platform": platform.platform(),
        }
        timings["total"] = time.perf_counter() - t0
        metrics["timings"] = timings
        save_bundle(tmp / "model", bb.model, weight, bias, config, metrics)
        write_splits_csv(ds.items, tmp / "model" / "splits.csv")
        train_rows = np.flatnonzero(fit_rows)
        save_index(tmp / "model", feats.vectors[train_rows], [ds.items[i].relpath for i in train_rows],
                   [ds.items[i].label for i in train_rows])
        if pred_rows:
            atomic_write_csv(tmp / "predictions.csv", list(pred_rows[0]), pred_rows)
        atomic_write_csv(tmp / "history.csv", sorted({k for row in history for k in row},
                                                      key=lambda k: (k != "epoch", k)), history)
        write_curves(history, tmp)
        if report:
            from .report import write_report

            write_report(tmp, data_root=ds.root, title=Path(out).name)
        if skipped:
            atomic_write_csv(tmp / "skipped.csv", ["path", "reason"], skipped)
    if rank > 0:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        out = final_out
    return TrainResult(run_dir=Path(out), metrics=metrics, timings=timings, config=config, skipped=skipped)


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
