"""Honest, stable splits.

Each file (or each group: a source video, a speaker, a near-duplicate cluster) gets a number in
[0, 1) from a hash of its relative path (or group key) and the seed, as TF's retrain.py did. The
number decides its split, so adding files never moves existing ones, and every member of a group
lands on the same side. Hashing per file is stratified in expectation; a class too small to get a
val or test member by chance gets one moved from train (the only case where a file can move).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from pathlib import Path

from .data import Dataset, Item
from .errors import FoldernetError
from .io import atomic_write_text

SPLITS = ("train", "val", "test")


def unit_hash(key: str, seed: int = 0) -> float:
    digest = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(ds: Dataset, val: float = 0.15, test: float = 0.15, seed: int = 0) -> Dataset:
    """Fill ``item.split`` for every item (respecting a predefined train/val/test layout)."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise FoldernetError(f"--val {val} and --test {test} must be fractions that add up to less than 1")
    if ds.predefined_split:
        present = {it.split for it in ds.items}
        if "train" not in present:
            raise FoldernetError(f"{ds.root} has split folders but no 'train' folder with images")
        if "val" not in present:  # carve validation out of train, stably
            _hash_split([it for it in ds.items if it.split == "train"], val=val or 0.15, test=0.0, seed=seed)
        return ds
    _hash_split(ds.items, val=val, test=test, seed=seed)
    return ds


def _hash_split(items: list[Item], val: float, test: float, seed: int) -> None:
    by_class: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        u = unit_hash(it.group if it.group else it.relpath, seed)
        it.split = "test" if u < test else "val" if u < test + val else "train"
        by_class[it.label].append(it)
    # Small classes: make sure val/test get a member when the class can spare one (n >= 3).
    for label, members in by_class.items():
        for split, frac in (("val", val), ("test", test)):
            if frac <= 0 or any(m.split == split for m in members):
                continue
            train = [m for m in members if m.split == "train"]
            if len(members) >= 3 and len(train) >= 2:
                # move the train member (and its group) whose hash is closest to the split's bucket
                pick = min(train, key=lambda m: unit_hash(m.group or m.relpath, seed))
                key = pick.group
                for m in members:
                    if m is pick or (key is not None and m.group == key):
                        m.split = split


def write_splits_csv(items: list[Item], path: str | os.PathLike) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", "group"])
    for it in sorted(items, key=lambda x: x.relpath):
        w.writerow([it.relpath, it.label, it.split, it.group or ""])
    atomic_write_text(path, buf.getvalue())


def read_splits_csv(path: str | os.PathLike) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


def split_counts(items: list[Item], classes: list[str]) -> dict[str, dict[str, int]]:
    out = {s: {c: 0 for c in classes} for s in SPLITS}
    for it in items:
        out[it.split][it.label] += 1
    return out


def split_dataset(data: str | os.PathLike, val: float = 0.15, test: float = 0.15, seed: int = 0,
                  out: str | os.PathLike | None = None, group_regex: str | None = None,
                  label_regex: str | None = None) -> Dataset:
    """Python door for ``foldernet split``: scan, assign, and write ``splits.csv``."""
    from .data import scan

    ds = assign_splits(scan(data, group_regex=group_regex, label_regex=label_regex), val, test, seed)
    write_splits_csv(ds.items, Path(out) if out else Path(data) / "splits.csv")
    return ds
