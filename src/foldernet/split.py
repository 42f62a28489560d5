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
from .io import atomic_write_csv

SPLITS = ("train", "val", "test")


def unit_hash(key: str, seed: int = 0) -> float:
    # surrogateescape: a file name that is not valid UTF-8 hashes by its raw bytes, stably
    digest = hashlib.sha1(f"{seed}:{key}".encode("utf-8", errors="surrogateescape")).digest()
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
    # Small classes: a class of 1-2 files trains on all of them; a class of 3 or more gets a val and
    # a test member moved from train when hashing gave it none.
    for members in by_class.values():
        if len(members) < 3:
            for m in members:
                m.split = "train"
            continue
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
    atomic_write_csv(path, ["path", "label", "split", "group"],
                     ([it.relpath, it.label, it.split, it.group or ""] for it in sorted(items, key=lambda x: x.relpath)))


def read_splits_csv(path: str | os.PathLike) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


def split_counts(items: list[Item], classes: list[str]) -> dict[str, dict[str, int]]:
    out = {s: {c: 0 for c in classes} for s in SPLITS}
    for it in items:
        out[it.split][it.label] += 1
    return out


def resolve_splits(ds: Dataset, splits=None, val: float = 0.15, test: float = 0.15, seed: int = 0) -> Dataset:
    """The split every stage agrees on: an explicit splits.csv, else DATA/splits.csv, else the
    folder's own train/val/test layout, else a stable hashed split."""
    path = Path(splits) if splits else (ds.root / "splits.csv")
    if splits and not path.is_file():
        raise FoldernetError(f"splits file not found: {path}")
    if path.is_file():
        given = read_splits_csv(path)
        missing = [it for it in ds.items if it.relpath not in given]
        for it in ds.items:
            if it.relpath in given:
                it.split = given[it.relpath]
        if missing:  # new files since the split was written: hash them in, old files stay put
            _hash_split(missing, val, test, seed)
        bad = {it.split for it in ds.items} - {"train", "val", "test"}
        if bad:
            raise FoldernetError(f"{path}: unknown split names {sorted(bad)}; use train, val or test")
        ds.splits_source = str(path)
    else:
        assign_splits(ds, val=val, test=test, seed=seed)
    return ds


def near_duplicate_groups(ds: Dataset, vectors, fps, hashes) -> int:
    """Give every cluster of exact or near duplicates one group key, so a split keeps it together.
    Returns the number of clusters with more than one member."""
    from collections import Counter

    from .dedup import clusters, near_duplicate_pairs

    pairs = [(i, j) for i, j, _, _ in near_duplicate_pairs(vectors, fps)]
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            if h in first:
                pairs.append((first[h], i))
            else:
                first[h] = i
    comp = clusters(len(ds.items), pairs).tolist()
    sizes = Counter(comp)
    # the key is the cluster's smallest path, so it does not change when unrelated files are added
    key: dict[int, str] = {}
    for it, c in zip(ds.items, comp):
        if sizes[c] > 1 and (c not in key or it.relpath < key[c]):
            key[c] = it.relpath
    for it, c in zip(ds.items, comp):
        if sizes[c] > 1 and it.group is None:
            it.group = "dup:" + key[c]
    return sum(1 for n in sizes.values() if n > 1)


def apply_grouping(ds: Dataset, group_by: str | None, features=None) -> None:
    """``--group-by``: ``near-duplicates``, ``regex:PATTERN`` (first group of a match on the relative
    path) or ``csv:FILE`` (columns path,group)."""
    import re

    if not group_by and (ds.root / "groups.csv").is_file() and not ds.predefined_split:
        group_by = f"csv:{ds.root / 'groups.csv'}"  # written by `foldernet collect` / `frames`
    if not group_by:
        return
    if ds.predefined_split:
        raise FoldernetError(f"{ds.root} already has train/val/test folders; --group-by applies to splits that "
                             "foldernet makes. Merge the folders or drop --group-by.")
    if group_by.startswith("regex:"):
        from .data import regex_key

        pat = re.compile(group_by[len("regex:"):])
        for it in ds.items:
            it.group = regex_key(pat, it.relpath)
    elif group_by.startswith("csv:"):
        path = Path(group_by[len("csv:"):])
        if not path.is_file():
            raise FoldernetError(f"group file not found: {path} (expected columns path,group)")
        with open(path, newline="", encoding="utf-8") as f:
            groups = {row["path"]: row["group"] for row in csv.DictReader(f)}
        for it in ds.items:
            it.group = groups.get(it.relpath) or None
    elif group_by == "near-duplicates":
        if features is None:
            features = _default_features(ds)
        near_duplicate_groups(ds, features.vectors, features.fingerprints, features.hashes)
    else:
        raise FoldernetError(f"--group-by {group_by!r}: use near-duplicates, regex:PATTERN or csv:FILE")


def _default_features(ds: Dataset):
    from .encoder import Encoder

    encoder = Encoder.build(kind=ds.kind, paths=[it.path for it in ds.items])
    return encoder.extractor()([it.path for it in ds.items], desc="features for grouping")


def split_dataset(data: str | os.PathLike, val: float = 0.15, test: float = 0.15, seed: int = 0,
                  out: str | os.PathLike | None = None, group_by: str | None = None,
                  label_regex: str | None = None) -> Dataset:
    """Python door for ``foldernet split``: scan, group, assign, and write ``splits.csv``."""
    from .data import scan
    from .params import check

    check("split", {"val": val, "test": test, "seed": seed, "group_by": group_by, "label_regex": label_regex})
    ds = scan(data, label_regex=label_regex)
    apply_grouping(ds, group_by)
    assign_splits(ds, val, test, seed)
    write_splits_csv(ds.items, Path(out) if out else Path(data) / "splits.csv")
    return ds


def split_folds(data: str | os.PathLike, folds: int, out: str | os.PathLike, seed: int = 0,
                group_by: str | None = None, label_regex: str | None = None) -> list[tuple[list[str], Path]]:
    """Cross-validation over groups, for when one held-out speaker or instrument decides too much:
    scikit-learn's StratifiedGroupKFold deals the groups (each file is its own group when there are
    none) into ``folds`` folds; split k tests on fold k, validates on fold k+1 and trains on the rest,
    so every group is tested once and none straddles. Writes ``out/splits-fold<k>.csv`` for
    ``train --splits``; returns (test groups, path) per fold."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    from .data import scan
    from .params import check

    check("split", {"seed": seed, "group_by": group_by, "label_regex": label_regex, "folds": folds})
    ds = scan(data, label_regex=label_regex)
    if ds.predefined_split:
        raise FoldernetError(f"{ds.root} has its own train/val/test folders; folds need a flat DATA/<class>/ layout")
    apply_grouping(ds, group_by)
    keys = [it.group or it.relpath for it in ds.items]
    n_groups = len(set(keys))
    if not 3 <= folds <= n_groups:
        raise FoldernetError(f"--folds {folds}: need 3 to {n_groups} (the number of groups) folds")
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected
        warnings.simplefilter("ignore", UserWarning)
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        tests = [te for _, te in cv.split(keys, [it.label for it in ds.items], keys)]
    fold_of = {i: k for k, te in enumerate(tests) for i in te}
    made = []
    for k in range(folds):
        for i, it in enumerate(ds.items):
            it.split = "test" if fold_of[i] == k else "val" if fold_of[i] == (k + 1) % folds else "train"
        path = Path(out) / f"splits-fold{k + 1}.csv"
        write_splits_csv(ds.items, path)
        made.append((sorted({keys[i] for i in tests[k]}), path))
    return made
