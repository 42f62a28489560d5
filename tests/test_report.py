"""The report, calibration, 'not sure', coarse labels and similar examples, on the digits run."""

import csv
import io

import numpy as np
from PIL import Image, ImageOps

import foldernet
from foldernet.calibration import ece_if_calibrated
from foldernet.evaluate import choose_threshold, expected_calibration_error
from foldernet.report import SECTIONS


def test_report_renders_in_a_real_browser_with_every_section(trained_run):
    from browser import browser_page, screenshot

    page_file = trained_run.run_dir / "report.html"
    text = page_file.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # self-contained
    with browser_page() as page:
        page.goto(page_file.as_uri())
        for section in SECTIONS:
            assert page.locator(f"section#{section}").count() == 1, section
            assert page.locator(f"section#{section} h2").inner_text()
        # every plot is embedded and actually decodes
        widths = page.eval_on_selector_all("section img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) >= 3 and all(w > 0 for w in widths)
        assert "top-1 accuracy" in page.locator("section#metrics").inner_text()
        screenshot(page, "report.png")


def test_calibration_threshold_and_not_sure(trained_run, digits_dir):
    cfg = trained_run.config
    m = trained_run.metrics["splits"]["test"]
    assert cfg["temperature"] > 0 and 0 < cfg["threshold"] < 1
    assert 0 <= m["ece"] <= 1 and 0 <= m["ece_uncalibrated"] <= 1
    # a blank image is far from every digit: the model must not be sure about it
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(blank, "PNG")
    model = foldernet.load(trained_run.run_dir)
    p = model.predict([blank.getvalue()], top_k=3)[0]
    assert len(p.top) == 3
    rows = list(csv.DictReader(open(trained_run.run_dir / "predictions.csv")))
    confident = [r for r in rows if float(r["confidence"]) >= cfg["threshold"]]
    assert len(confident) >= len(rows) * 0.5
    assert p.not_sure == (p.confidence < cfg["threshold"])


def test_threshold_rule_and_ece_on_known_numbers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    probs = np.full((400, 3), 0.1)
    probs[np.arange(400), y] = 0.8          # always right with confidence 0.8
    assert abs(choose_threshold(probs, y) - 0.8) < 1e-9
    assert abs(expected_calibration_error(probs.max(1), np.ones(400, bool)) - 0.2) < 1e-9


def test_logit_normalisation_reorders_confidence_but_never_an_answer():
    """Unit-normalised logits: an answer whose logits are all large (a label-smoothed head's confident
    mistake looks like that) loses confidence against a clear-cut one; the argmax never moves."""
    from foldernet.calibration import scaled_logits, softmax
    from foldernet.head import LinearHead

    logits = np.array([[9.0, 7.0, 6.0], [3.0, 0.0, 0.0]])
    plain, normed = softmax(scaled_logits(logits, 1.0)), softmax(scaled_logits(logits, 0.1, logit_norm=True))
    assert plain[0].max() < plain[1].max() and normed[0].max() < normed[1].max()
    logits2 = np.array([[12.0, 8.0, 0.0], [3.0, 0.0, 0.0]])
    plain, normed = softmax(scaled_logits(logits2, 1.0)), softmax(scaled_logits(logits2, 0.2, logit_norm=True))
    assert plain[0].max() > plain[1].max() and normed[0].max() < normed[1].max()  # the order flips
    assert (plain.argmax(1) == normed.argmax(1)).all()
    head = LinearHead(np.eye(3), np.zeros(3), temperature=0.2, logit_norm=True)
    np.testing.assert_allclose(head.proba(logits2), normed)


def test_ece_chance_band_separates_chance_from_miscalibration():
    """A calibrated model's ECE on a few hundred items is not zero; the band says how far chance goes,
    and an overconfident model lands outside it."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.4, 1.0, 341)
    band = ece_if_calibrated(conf)
    assert 0.01 < band["mean"] < band["p95"] < 0.1
    calibrated = [expected_calibration_error(conf, rng.random(341) < conf) for _ in range(50)]
    assert np.mean(np.array(calibrated) <= band["p95"]) >= 0.8
    overconfident = expected_calibration_error(conf, rng.random(341) < conf - 0.15)
    assert overconfident > band["p95"]
    # more items, a narrower band
    assert ece_if_calibrated(rng.uniform(0.4, 1.0, 5000))["mean"] < band["mean"] / 2


def test_similar_returns_the_flipped_copy_of_a_training_image_first(trained_run, digits_dir, tmp_path):
    rows = list(csv.DictReader(open(trained_run.model_dir / "splits.csv")))
    train_file = next(r["path"] for r in rows if r["split"] == "train" and r["label"] == "5_five")
    img = ImageOps.mirror(Image.open(digits_dir / train_file).convert("RGB")).resize((48, 48))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    query = tmp_path / "query.jpg"
    query.write_bytes(buf.getvalue())
    model = foldernet.load(trained_run.run_dir)
    hits = model.similar([query], k=5)[0]
    assert hits[0].path == train_file and hits[0].label == "5_five"
    assert hits[0].similarity >= hits[-1].similarity
    p = model.predict([query], similar=3)[0]
    assert [n.path for n in p.similar][0] == train_file


def test_label_map_reports_coarse_level(digits_dir, tmp_path):
    labels = sorted(p.name for p in digits_dir.iterdir())
    mapping = tmp_path / "parity.csv"
    mapping.write_text("fine,coarse\n" + "".join(f"{c},{'even' if int(c[0]) % 2 == 0 else 'odd'}\n" for c in labels))
    result = foldernet.train(digits_dir, out=tmp_path / "run", label_map_file=mapping, progress=False)
    coarse = result.metrics["coarse"]["test"]
    assert coarse["labels"] == ["even", "odd"] and coarse["accuracy"] >= result.metrics["splits"]["test"]["accuracy"]
    assert "Coarse labels" in (tmp_path / "run" / "report.html").read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text("0_zero,even\n")
    import pytest

    with pytest.raises(foldernet.FoldernetError, match="maps no coarse label"):
        foldernet.train(digits_dir, out=tmp_path / "run2", label_map_file=bad, progress=False)
