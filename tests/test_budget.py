"""More accuracy per CPU-second: augmented views (the feature bank), test-time flip from the mirror
view, the lite0/1/2 ensemble as one backbone, and the --budget planner."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

import foldernet
from foldernet.errors import FoldernetError
from foldernet.preprocess import Preprocess, augmented_view, view_rng


def test_augmented_views_are_fixed_by_content_and_view(sample_photos):
    """A view is drawn from the file's content hash and the view number: the same every time (so its
    features can be cached), different between views; view 1 is exactly the mirror image."""
    img = Image.open(sample_photos["china"]).convert("RGB")
    pre = Preprocess()
    resized = pre.resize(img)
    a = np.asarray(augmented_view(resized, pre, 2, view_rng("ab" * 16, 2)))
    b = np.asarray(augmented_view(resized, pre, 2, view_rng("ab" * 16, 2)))
    c = np.asarray(augmented_view(resized, pre, 3, view_rng("ab" * 16, 3)))
    assert a.shape == (224, 224, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    mirror = pre.normalize(augmented_view(resized, pre, 1, view_rng("ab" * 16, 1)))
    assert np.array_equal(mirror, pre(resized, resized=True)[:, :, ::-1])


def test_views_and_ensemble_train_one_bundle_that_answers_as_scored(digits_dir, tmp_path):
    """lite0+lite1 with 3 views per training image and test-time flip: one backbone in the bundle, the
    head learned from 3x the rows, well above chance, and the saved model answers a validation image
    exactly as the run scored it (the mirror view used in training equals the flip inside the model), and
    exports to one ONNX file that agrees with it."""
    out = tmp_path / "ens"
    r = foldernet.train(digits_dir, out=out, backbone="lite0+lite1", views=3, tta="flip", progress=False,
                        report=False)
    assert r.config["backbone"] == "tf_efficientnet_lite0+tf_efficientnet_lite1"
    assert r.config["num_features"] == 2560 and r.config["preprocess"]["size"] == 240
    assert r.metrics["views"]["views"] == 3 and r.metrics["tta"]["used"]
    val = r.metrics["splits"]["val"]
    assert val["accuracy"] > 0.5  # 4 classes: chance is 0.25
    rows = [row for row in csv.DictReader(open(out / "predictions.csv")) if row["split"] == "val"]
    model = foldernet.load(out, engine="torch")
    got = model.predict([digits_dir / rows[0]["path"]], top_k=1)[0]
    assert got.label == rows[0]["predicted"]
    assert got.confidence == pytest.approx(float(rows[0]["confidence"]), abs=2e-3)
    report = foldernet.export(out)  # the whole ensemble, flip included, is one ONNX graph that agrees
    assert report["fp32"]["top1_agreement"] == 1.0


def test_budget_measures_plans_and_records(digits_dir, tmp_path):
    """--budget times this machine on the data, lists every plan with its estimate and picks the
    richest that fits; a budget nothing fits runs the cheapest and says so. Estimates grow with the plans."""
    from foldernet.plan import CANDIDATES, estimate

    r = foldernet.train(digits_dir, out=tmp_path / "b", budget="1s", progress=False, report=False)
    plan = r.metrics["plan"]
    assert plan["fits"] is False and plan["chosen"]["backbone"] == "tf_efficientnet_lite0"
    assert plan["seconds_per_image_lite0"] > 0 and len(plan["candidates"]) == len(CANDIDATES)
    assert r.config["backbone"] == "tf_efficientnet_lite0" and plan["spent_s"] > 0
    head_plans = [p for p in CANDIDATES if p.mode == "head"]
    costs = [estimate(p, 1000, 700, 300, 0.01, {}) for p in head_plans]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    # top mode: 420 training items are too few (the frozen ensembles won there), and it says so
    top = next(row for row in plan["candidates"] if row["mode"] == "top")
    assert top["estimate_s"] is None and "at least 1000 training items" in top["skipped"]


def test_budget_chooses_top_mode_on_a_large_set_and_lets_the_clock_cut_its_last_epoch(digits_dir):
    """With enough training items and time, the planner's richest plan is --mode top; with a little
    less time it keeps top mode's schedule, planned on one epoch fewer (the deadline decides the last);
    with less still it tunes on 2 views instead of 3, and then falls back to frozen features. Estimates grow
    with the epochs planned and the views. With --min-precision top mode is not planned."""
    from foldernet.plan import CANDIDATES, TOP_MARGIN, Plan, choose, estimate

    top = next(p for p in CANDIDATES if p.mode == "top")
    paths = sorted(digits_dir.rglob("*.png"))
    plan, facts = choose("2h", paths, 3000, 400)
    assert plan.mode == "top" and plan.epochs == plan.planned_epochs == 5 and facts["fits"]
    assert "--mode top" in plan.describe() and "may stop" not in plan.describe()
    per = facts["seconds_per_image_lite0"]
    four, five = (estimate(Plan(top.backbone, 3, "auto", mode="top", epochs=5, planned_epochs=e), len(paths), 3000,
                           400, per, {}) for e in (4, 5))
    assert four < five
    shorter, _ = choose(f"{(four + five) / 2 / TOP_MARGIN:.1f}s", paths, 3000, 400, per_image=per)
    assert shorter.mode == "top" and shorter.epochs == 5 and shorter.planned_epochs == 4
    assert shorter.estimate_s == pytest.approx(four, abs=0.1) and "the clock may stop it after 4" in shorter.describe()
    # 3 views planned on 4 epochs do not fit: top mode with 2 views, then frozen features
    two = estimate(Plan(top.backbone, 2, "auto", mode="top", epochs=5, planned_epochs=4), len(paths), 3000, 400, per,
                   {})
    assert two < four
    short, _ = choose(f"{(two + four) / 2 / TOP_MARGIN:.1f}s", paths, 3000, 400, per_image=per)
    assert short.mode == "top" and short.views == 2 and short.planned_epochs == 4
    shorter_still, _ = choose(f"{two * 0.95 / TOP_MARGIN:.1f}s", paths, 3000, 400, per_image=per)
    assert shorter_still.mode == "head"
    # asked for a precision, the same two hours plan the richest frozen ensemble: it answered more at 0.98
    precise, facts = choose("2h", paths, 3000, 400, per_image=per, min_precision=0.98)
    assert precise.mode == "head" and precise.backbone.count("+") == 2 and facts["fits"]
    skipped = [row["skipped"] for row in facts["candidates"] if row["mode"] == "top"]
    assert skipped and all("--min-precision" in why for why in skipped)


def test_a_budget_run_on_enough_images_tunes_the_top_and_stays_within_it(tmp_path):
    """End to end: 1,015 training images and a generous budget give a --mode top run (its epochs as
    planned), well above chance, recorded with the plan and the seconds spent, inside the budget."""
    from foldernet.demo import write_digits

    data = write_digits(tmp_path / "data", per_class=145, seed=5, size=32)  # 1,015 training images
    r = foldernet.train(data, out=tmp_path / "run", budget="20m", img_size=32, progress=False, report=False)
    plan = r.metrics["plan"]
    assert plan["chosen"]["mode"] == "top" and r.config["mode"] == "top"
    assert len(r.metrics["history"]) == plan["chosen"]["epochs"] and "top" in r.metrics
    assert r.metrics["splits"]["test"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert plan["spent_s"] <= plan["budget_s"]


@pytest.mark.parametrize("options, words", [
    ({"budget": "soon"}, "--budget must be a duration"),
    ({"budget": "0m"}, "--budget must be a duration"),
    ({"backbone": "lite0+lite0"}, "two or more different backbones"),
    ({"backbone": "lite0+", "views": 2}, "two or more different backbones"),
    ({"views": 0}, "--views must be a whole number from 1 to 64"),
    ({"budget": "5m", "mode": "finetune"}, "--budget plans head-mode runs"),
])
def test_bad_budget_views_and_ensembles_are_refused_in_one_line(digits_dir, tmp_path, options, words):
    with pytest.raises(FoldernetError, match=words) as exc:
        foldernet.train(digits_dir, out=tmp_path / "x", progress=False, **options)
    assert "\n" not in str(exc.value)


def test_min_precision_threshold_is_chosen_with_a_margin_and_holds_on_unseen_halves():
    """The operating point of --min-precision uses a lower bound on precision, so it is stricter than the
    raw rate, and on halves of the data that did not choose it the precision asked is met on average."""
    from foldernet.calibration import crossfit_operating_point, operating_point

    rng = np.random.default_rng(0)
    n, c = 2000, 5
    conf = rng.beta(5, 1, n)                         # calibrated: right with probability = confidence
    right = rng.random(n) < conf
    y = rng.integers(0, c, n)
    pred = np.where(right, y, (y + 1) % c)
    probs = np.full((n, c), 0.0)
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), (pred + 1) % c] = (1 - conf) * 0.999
    raw = operating_point(probs, y, 0.95, bound=0.5)
    strict = operating_point(probs, y, 0.95)
    assert raw is not None and strict is not None and strict >= raw
    kept = probs.max(1) >= strict
    assert (probs.argmax(1) == y)[kept].mean() >= 0.95 and 0.1 < kept.mean() < 0.9
    held = crossfit_operating_point(probs, y, 0.95)
    assert held["crossfit_precision"] >= 0.95 and held["crossfit_coverage"] > 0.1
