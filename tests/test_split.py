from collections import Counter

from PIL import Image

from foldernet.data import scan
from foldernet.split import assign_splits, split_dataset, read_splits_csv


def _make(root, classes, n, start=0):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            Image.new("RGB", (4, 4), (i % 255, 0, 0)).save(root / c / f"img_{i}.png")


def test_split_is_stable_when_files_are_added(tmp_path):
    _make(tmp_path, ["a", "b", "c"], 60)
    before = {it.relpath: it.split for it in assign_splits(scan(tmp_path), 0.15, 0.15, seed=1).items}
    _make(tmp_path, ["a", "b", "c"], 40, start=60)
    after = {it.relpath: it.split for it in assign_splits(scan(tmp_path), 0.15, 0.15, seed=1).items}
    assert all(after[k] == v for k, v in before.items())
    counts = Counter(after.values())
    assert 0.08 < counts["val"] / len(after) < 0.25 and 0.08 < counts["test"] / len(after) < 0.25
    # stratified: every class is present in every split
    for split in ("train", "val", "test"):
        assert {rel.split("/")[0] for rel, s in after.items() if s == split} == {"a", "b", "c"}
    # another seed gives another split
    other = {it.relpath: it.split for it in assign_splits(scan(tmp_path), 0.15, 0.15, seed=2).items}
    assert other != after


def test_small_class_still_gets_val_and_test(tmp_path):
    _make(tmp_path, ["big"], 50)
    _make(tmp_path, ["tiny"], 3)
    ds = assign_splits(scan(tmp_path), 0.15, 0.15)
    assert sorted(it.split for it in ds.items if it.label == "tiny") == ["test", "train", "val"]


def test_groups_stay_on_one_side(tmp_path):
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for video in range(12):
            for frame in range(5):
                Image.new("RGB", (4, 4)).save(tmp_path / c / f"vid{video}_f{frame}.png")
    ds = split_dataset(tmp_path, group_by=r"regex:(vid\d+)_", out=tmp_path / "s.csv")
    sides = {}
    for it in ds.items:
        sides.setdefault((it.label, it.group), set()).add(it.split)
    assert all(len(s) == 1 for s in sides.values())
    assert set(read_splits_csv(tmp_path / "s.csv").values()) == {"train", "val", "test"}


def test_folds_test_every_speaker_once_and_keep_speakers_whole(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "recordings"
    data.mkdir()
    speakers = ["ann", "bob", "cy", "dee", "eve"]
    for s in speakers:
        for digit in range(3):
            for take in range(4):
                Image.new("RGB", (4, 4), (digit * 80, take, 0)).save(data / f"{digit}_{s}_{take}.png")
    args = [sys.executable, "-m", "foldernet", "split", str(data), "--label-regex", r"^(\d+)_",
            "--group-by", r"regex:^\d+_([a-z]+)_", "--out", str(tmp_path / "folds")]
    proc = subprocess.run(args + ["--folds", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tested = Counter()
    for k in range(1, 6):
        split = read_splits_csv(tmp_path / "folds" / f"splits-fold{k}.csv")
        side = {}
        for rel, s in split.items():
            side.setdefault(rel.split("_")[1], set()).add(s)
        assert all(len(s) == 1 for s in side.values())  # a speaker never straddles
        roles = Counter(next(iter(s)) for s in side.values())
        assert roles == {"train": 3, "val": 1, "test": 1}
        tested.update(sp for sp, s in side.items() if s == {"test"})
        assert {rel.split("_")[0] for rel, s in split.items() if s == "train"} == {"0", "1", "2"}
    assert tested == {s: 1 for s in speakers}
    assert "fold 5: tests" in proc.stdout
    too_many = subprocess.run(args + ["--folds", "9"], capture_output=True, text=True, timeout=120)
    assert too_many.returncode != 0 and "3 to 5" in too_many.stderr + too_many.stdout
