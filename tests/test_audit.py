"""Audit, quarantine and grouped splits on real photo tiles (cut from the photos scikit-learn ships)."""

import hashlib
import io
import json
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw, ImageOps

import foldernet
from foldernet.audit import audit, files_to_fix, label_conflicts, restore
from foldernet.errors import FoldernetError


def _tiles(path, rows=3, cols=4):
    img = Image.open(path).convert("RGB")
    w, h = img.width // cols, img.height // rows
    return [img.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)) for r in range(rows) for c in range(cols)]


def _leaked_copy(img):
    img = ImageOps.mirror(img)
    img = img.resize((int(img.width * 0.7), int(img.height * 0.7)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return buf.getvalue()


def _placeholder():
    img = Image.new("RGB", (300, 300), (242, 242, 242))
    d = ImageDraw.Draw(img)
    d.text((80, 140), "IMAGE NOT FOUND", fill=(90, 90, 90))
    return img


@pytest.fixture()
def messy(tmp_path, sample_photos):
    """train/val folders with leaked copies, a placeholder, duplicates, a conflict, tiny and mislabelled files."""
    data = tmp_path / "data"
    tiles = {"temple": _tiles(sample_photos["china"]), "flower": _tiles(sample_photos["flower"])}
    for cls, ims in tiles.items():
        for split, part in (("train", ims[:9]), ("val", ims[9:])):
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            for k, im in enumerate(part):
                im.save(data / split / cls / f"{cls}{k}.jpg", quality=92)
    for k in range(3):  # leaked: flipped, resized, re-compressed copies of (textured) training tiles in val
        (data / "val" / "temple" / f"copy{k}.jpg").write_bytes(_leaked_copy(tiles["temple"][4 + k]))
    _placeholder().save(data / "train" / "temple" / "notfound.gif")
    (data / "train" / "flower" / "same_as_temple0.jpg").write_bytes((data / "train/temple/temple0.jpg").read_bytes())
    tiles["flower"][0].resize((12, 9)).save(data / "train" / "flower" / "tiny.png")
    Image.open(sample_photos["flower"]).resize((96, 64)).save(data / "train" / "flower" / "really_png.jpg", "PNG")
    return data


def test_audit_finds_what_is_wrong_and_nothing_else(messy, tmp_path):
    report = audit(messy, out=tmp_path / "audit", progress=False)
    f = report["findings"]
    leaked = {e["path"] for e in f["leakage"]}
    assert {f"val/temple/copy{k}.jpg" for k in range(3)} <= leaked
    # no genuinely different tiles are paired: every near duplicate involves a planted copy
    for e in f.get("near_duplicate", []):
        assert any("copy" in p or "same_as" in p for p in e["paths"]), e
    assert [e["path"] for e in f["low_information"]] == ["train/temple/notfound.gif"]
    assert any(set(e["labels"]) == {"flower", "temple"} for e in f["conflict"])
    assert any(e["path"] == "train/flower/tiny.png" for e in f["tiny"])
    assert any(e["path"] == "train/flower/really_png.jpg" and "PNG" in e["reason"] for e in f["wrong_type"])
    assert report["class_counts"]["temple"] > 0 and report["imbalance_ratio"] >= 1
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["summary"] == report["summary"]
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "Leakage" in page and "data:image/jpeg;base64," in page


def test_likely_label_errors_are_ranked(tmp_path, sample_photos):
    data = tmp_path / "data"
    for cls, photo in (("temple", "china"), ("flower", "flower")):
        (data / cls).mkdir(parents=True)
        for k, im in enumerate(_tiles(sample_photos[photo], rows=4, cols=5)):
            im.save(data / cls / f"{k}.jpg")
    wrong = data / "temple" / "wrong.jpg"
    _tiles(sample_photos["flower"], rows=2, cols=2)[1].save(wrong)
    report = audit(data, progress=False)
    issues = [e["path"] for e in report["findings"].get("label_issue", [])]
    assert "temple/wrong.jpg" in issues[:3], issues


def test_fix_quarantines_and_restore_puts_everything_back(messy, tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}

    before = digest(messy)
    proc = subprocess.run([sys.executable, "-m", "foldernet.cli", "audit", str(messy), "--out", str(tmp_path / "a"),
                           "--fix", "--no-label-issues"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "foldernet restore" in proc.stdout
    after = digest(messy)
    moved = set(before) - set(after)
    assert {"train/temple/notfound.gif", "train/flower/tiny.png", "val/temple/copy0.jpg"} <= moved
    # the cross-label pair stays, the original included: only a person can say which label is right
    assert not {"train/temple/temple0.jpg", "train/flower/same_as_temple0.jpg"} & moved
    assert "different labels" in proc.stdout
    quarantined = messy.parent / "data.quarantine"
    assert len(json.loads((quarantined / "manifest.json").read_text())["moved"]) == len(moved)
    assert restore(quarantined) == len(moved)
    assert digest(messy) == before  # nothing lost, nothing changed


def test_train_stops_on_leakage_and_skips_placeholders(messy, tmp_path):
    with pytest.raises(FoldernetError) as err:
        foldernet.train(messy, out=tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "val/temple/copy0.jpg" in msg and "--group-by near-duplicates" in msg and "--allow-leakage" in msg
    assert not (tmp_path / "run").exists()
    result = foldernet.train(messy, out=tmp_path / "run", allow_leakage=True, progress=False)
    reasons = dict(result.skipped)
    assert "placeholder" in reasons["train/temple/notfound.gif"]
    assert result.config["leakage"]["held_out_duplicates"] >= 3


def test_grouped_split_keeps_copies_with_their_originals(tmp_path, sample_photos):
    data = tmp_path / "flat"
    originals = {}
    for cls, photo in (("temple", "china"), ("flower", "flower")):
        (data / cls).mkdir(parents=True)
        for k, im in enumerate(_tiles(sample_photos[photo], rows=4, cols=5)):
            im.save(data / cls / f"{k}.jpg")
            if k in (11, 12, 13, 16, 17, 18):  # textured tiles: flat sky has no stable hash
                (data / cls / f"{k}_copy.jpg").write_bytes(_leaked_copy(im))
                originals[f"{cls}/{k}_copy.jpg"] = f"{cls}/{k}.jpg"
    ds = foldernet.split_dataset(data, group_by="near-duplicates", val=0.25, test=0.25)
    where = {it.relpath: it.split for it in ds.items}
    assert all(where[c] == where[o] for c, o in originals.items()), [(c, where[c], where[o]) for c, o in originals.items()]
    assert {"train", "val", "test"} <= set(where.values())
    # and training on that split finds no leakage
    result = foldernet.train(data, out=tmp_path / "run", progress=False)
    assert result.config["leakage"]["held_out_duplicates"] == 0


def test_files_to_fix_keeps_one_copy_of_plain_duplicates():
    report = {"findings": {"exact_duplicate": [{"paths": ["a/1.jpg", "a/2.jpg"], "labels": ["a"]},
                                               {"paths": ["a/3.jpg", "b/3.jpg"], "labels": ["a", "b"]}]}}
    moves = files_to_fix(report, ("exact_duplicate",))
    assert set(moves) == {"a/2.jpg"}  # a label conflict moves nothing: a person decides
    assert label_conflicts(report) == [["a/3.jpg", "b/3.jpg"]]
