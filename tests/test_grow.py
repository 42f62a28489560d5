"""Label less: suggest ranks what is worth labelling and leaves duplicates out; autolabel copies only
what the model is sure of, never touches its inputs, and restore undoes it exactly."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import foldernet
from foldernet.errors import FoldernetError


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pile(tmp_path_factory, digits_dir, trained_run):
    """Unlabelled: fresh digit images, one planted ambiguous blend of two digits, an exact copy of the
    blend, a copy of a training image, and an unreadable file."""
    from foldernet.demo import write_digits

    root = tmp_path_factory.mktemp("pile")
    fresh = write_digits(root / "src", per_class=6, seed=7)
    pile = root / "unlabelled"
    pile.mkdir()
    for f in sorted(fresh.rglob("*.png"))[::2]:
        shutil.copy(f, pile / f"{f.parent.name}_{f.name}")
    zero = np.asarray(Image.open(sorted((digits_dir / "0_zero").glob("*.png"))[0]).convert("L"), float)
    nine = np.asarray(Image.open(sorted((digits_dir / "9_nine").glob("*.png"))[0]).convert("L"), float)
    Image.fromarray(((zero + nine) / 2).astype(np.uint8)).save(pile / "blend.png")
    shutil.copy(pile / "blend.png", pile / "blend_again.png")
    import json

    trained_on = json.loads((trained_run.model_dir / "index.json").read_text())["paths"][0]
    shutil.copy(digits_dir / trained_on, pile / "seen_before.png")
    (pile / "broken.png").write_bytes(b"not a png")
    return pile


def test_suggest_ranks_the_ambiguous_above_the_clear_and_drops_duplicates(trained_run, pile):
    model = foldernet.load(trained_run.run_dir)
    before = _digest(pile)
    ranked = model.suggest(pile, n=100, strategy="margin")
    order = [Path(s.path).name for s in ranked.chosen]
    clear = [Path(s.path).name for s in ranked.chosen if s.confidence >= 0.8]
    assert "blend.png" in order and clear
    assert all(order.index("blend.png") < order.index(c) for c in clear), order
    dropped = dict((Path(p).name, why) for p, why in ranked.dropped)
    assert "exact duplicate of" in dropped["blend_again.png"] and "blend.png" in dropped["blend_again.png"]
    assert "training example" in dropped["seen_before.png"]
    assert [Path(p).name for p, _ in ranked.skipped] == ["broken.png"]
    batch = model.suggest(pile, n=5)  # the default: uncertain and unlike each other
    most_uncertain = {Path(s.path).name for s in ranked.chosen[:20]}  # its candidates: the 4n most uncertain
    assert len(batch.chosen) == 5 and {Path(s.path).name for s in batch.chosen} <= most_uncertain
    vecs = model.predict_batch([s.path for s in batch.chosen]).features
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert sims[~np.eye(5, dtype=bool)].max() < 0.95  # no two near-identical picks
    assert _digest(pile) == before


def test_suggest_cli_writes_a_csv_and_a_contact_sheet(trained_run, pile, tmp_path):
    out = tmp_path / "next"
    proc = subprocess.run([sys.executable, "-m", "foldernet", "suggest", str(trained_run.run_dir), str(pile),
                           "-n", "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "suggest.csv").read_text().splitlines()
    assert lines[0].startswith("path,guess,confidence") and len([x for x in lines if "skipped" not in x
                                                                  and "left out" not in x]) == 5
    page = (out / "suggest.html").read_text()
    assert page.count("<figure>") == 4 and "guessed" in page and "data:image/jpeg;base64," in page
    proc = subprocess.run([sys.executable, "-m", "foldernet", "suggest", str(trained_run.run_dir), str(pile),
                           "--strategy", "random"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--strategy must be one of default, margin, entropy, diverse" in proc.stderr


def test_autolabel_copies_only_sure_files_and_restore_undoes_it(trained_run, pile, tmp_path):
    from foldernet.audit import restore

    model = foldernet.load(trained_run.run_dir)
    data = tmp_path / "data"
    (data / "3_three").mkdir(parents=True)
    (data / "3_three" / "mine.png").write_bytes(b"a file of the user's")
    before_pile, before_data = _digest(pile), _digest(data)
    r = model.autolabel(pile, data, min_confidence=0.9)
    assert r["counts"]["copied"] > 0 and r["counts"]["unreadable"] == 1
    copied = {p: h for p, h in _digest(data).items() if p not in before_data and not p.startswith(".foldernet")}
    assert len(copied) == r["counts"]["copied"]
    for rel in copied:  # each copy is a file the model is sure of, in the folder of its guess
        p = model.predict(data / rel)[0]
        assert p.confidence >= 0.9 and not p.not_sure and rel.split("/")[0] == p.label
    assert "blend.png" not in {Path(rel).name for rel in copied}  # the ambiguous one is left for a person
    assert _digest(pile) == before_pile  # copies, never moves
    assert restore(r["manifest"]) == len(copied)
    assert {p: h for p, h in _digest(data).items() if not p.startswith(".foldernet")} == before_data


def test_autolabel_refuses_what_it_would_confuse(trained_run, pile, tmp_path):
    model = foldernet.load(trained_run.run_dir)
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    with pytest.raises(FoldernetError, match="class folders the model does not know"):
        model.autolabel(pile, data)
    with pytest.raises(FoldernetError, match="input folder"):
        model.autolabel(pile, pile / "labelled")
    with pytest.raises(FoldernetError, match="--min-confidence"):
        model.autolabel(pile, tmp_path / "d2", min_confidence=1.5)


def test_labelling_page_by_keyboard_in_chromium(trained_run, pile, tmp_path):
    """Three files labelled with the keyboard (a class key, Enter for the guess, skip, then undo):
    copies land in DATA/<class>/, the manifest records them, the pile is untouched."""
    import json

    import re

    from browser import browser_page, running_server, screenshot
    from playwright.sync_api import expect

    from foldernet.audit import restore
    from foldernet.serve import create_app

    data = tmp_path / "data"
    before = _digest(pile)
    app = create_app(trained_run.run_dir, label=([pile], data))
    with running_server(app) as url, browser_page(900, 800) as page:
        page.goto(url + "/label")
        page.wait_for_selector("#classes button")
        first = page.locator("#media img").get_attribute("alt")
        guess = page.locator("#classes button.guess").get_attribute("data-class")
        page.keyboard.press("Enter")                    # 1: the model's guess
        expect(page.locator("#status")).to_have_text(re.compile("^copied"))
        page.keyboard.press("3")                        # 2: the third class
        expect(page.locator("#progress")).to_have_text(re.compile("^3 of"))
        page.keyboard.press("s")                        # 3: skipped
        page.keyboard.press("1")                        # 4: the first class
        expect(page.locator("#progress")).to_have_text(re.compile("^5 of"))
        page.keyboard.press("u")                        # undo the last answer
        expect(page.locator("#status")).to_have_text("undone")
        screenshot(page, "label_page.png")
    manifests = list((data / ".foldernet").glob("label-*.json"))
    assert len(manifests) == 1
    copied = json.loads(manifests[0].read_text())["copied"]
    labels = trained_run.config["labels"]
    assert [e["label"] for e in copied] == [guess, labels[2]]
    assert Path(copied[0]["path"]).name == first and (data / copied[0]["path"]).is_file()
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert files == sorted(e["path"] for e in copied)  # the undone copy is gone, nothing else was written
    assert _digest(pile) == before
    assert restore(manifests[0]) == 2 and not list(data.rglob("*.png"))


def test_review_page_walks_through_label_errors_and_restore_undoes_it(trained_run, digits_dir, tmp_path):
    """Planted label errors found by audit; on the page a person relabels one, quarantines one and
    keeps one (then undoes the keep); files move only on those words, and restore puts everything back."""
    import json
    import re

    from browser import browser_page, running_server
    from playwright.sync_api import expect

    from foldernet.audit import audit, restore
    from foldernet.serve import create_app

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    for k, f in enumerate(sorted((data / "0_zero").glob("*.png"))[:3]):  # three zeros filed as fours
        f.rename(data / "4_four" / f"planted{k}.png")
    before = _digest(data)
    audit(data, out=tmp_path / "audit", progress=False)
    issues = json.loads((tmp_path / "audit" / "audit.json").read_text())["findings"]["label_issue"]
    assert sum("planted" in e["path"] for e in issues) >= 2
    app = create_app(trained_run.run_dir, review=tmp_path / "audit")
    with running_server(app) as url, browser_page(1000, 800) as page:
        page.goto(url + "/review")
        page.wait_for_selector("#classes button")
        expect(page.locator("#progress")).to_have_text(re.compile("^1 of"))
        page.keyboard.press("r")       # relabel as suggested
        expect(page.locator("#status")).to_have_text(re.compile("^relabel: moved to"))
        page.keyboard.press("q")       # quarantine
        expect(page.locator("#status")).to_have_text(re.compile("^quarantine: moved to"))
        page.keyboard.press("k")       # keep ...
        expect(page.locator("#progress")).to_have_text(re.compile("^4 of|^all|^3 of 3"))
        page.keyboard.press("u")       # ... undone
        expect(page.locator("#status")).to_have_text("undone")
    manifest = next((tmp_path / "data.quarantine").glob("review-*.json"))
    record = json.loads(manifest.read_text())
    assert len(record["moved"]) == 2 and record["kept"] == []
    relabelled = record["moved"][0]
    assert (manifest.parent / relabelled["stored"]).is_file() and not (data / relabelled["path"]).exists()
    assert restore(manifest) == 2
    assert _digest(data) == before  # every move undone, nothing else touched


def test_a_tampered_manifest_cannot_reach_outside_the_dataset(tmp_path):
    """restore acts only inside the dataset (and its quarantine), whatever a manifest says."""
    import json

    from foldernet.audit import restore

    data, outside = tmp_path / "data", tmp_path / "precious.txt"
    (data / "a").mkdir(parents=True)
    outside.write_text("not foldernet's")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    manifest = data / ".foldernet" / "autolabel-x.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"kind": "autolabel", "data": str(data),
                                    "copied": [{"path": "../precious.txt", "sha256": digest}]}))
    assert restore(manifest) == 0 and outside.read_text() == "not foldernet's"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({"data": str(data), "moved": [{"path": "../elsewhere.txt", "stored": "precious.txt"}]}))
    assert restore(moved) == 0 and outside.exists() and not (tmp_path / "elsewhere.txt").exists()


def test_review_never_moves_a_file_outside_the_audited_folder(tmp_path):
    import json

    from foldernet.grow import ReviewSession

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "x.png").write_bytes(b"in the dataset")
    (tmp_path / "outside.png").write_bytes(b"the user's")
    issue = {"given": "a", "suggested": "b", "given_prob": 0.1, "suggested_prob": 0.9}
    (tmp_path / "audit.json").write_text(json.dumps({"data": str(data), "classes": ["a", "b"], "findings": {
        "label_issue": [{"path": "../outside.png", **issue}, {"path": "a/x.png", **issue}]}}))
    session = ReviewSession(tmp_path / "audit.json", ["a", "b"])
    for decision in ("relabel", "quarantine"):
        with pytest.raises(FoldernetError, match="outside the audited folder"):
            session.decide(0, decision)
    with pytest.raises(FoldernetError, match="unknown class"):
        session.decide(1, "relabel", "../../b")
    assert (tmp_path / "outside.png").read_bytes() == b"the user's"
    assert (data / "a" / "x.png").read_bytes() == b"in the dataset"
