import json
import subprocess
import sys

import numpy as np
import pytest

import foldernet
from foldernet.errors import FoldernetError


@pytest.fixture(scope="session")
def exported(trained_run):
    from foldernet.export import export

    report = export(trained_run.run_dir, int8=True)
    return trained_run.run_dir / "export", report


def test_fp32_export_agrees_with_pytorch_on_every_held_out_image(exported):
    folder, report = exported
    assert report["fp32"]["top1_agreement"] == 1.0
    assert report["fp32"]["max_prob_diff"] < 1e-3
    assert report["n"] == sum(1 for _ in open(folder.parent / "model" / "splits.csv") if ",test," in _)
    saved = json.loads((folder / "parity.json").read_text())
    assert saved["fp32"]["top1_agreement"] == 1.0
    # int8 was tried and its numbers reported; the file exists exactly when the report says it was kept
    q = saved["int8"]
    assert {"top1_agreement", "img_per_s", "fp32_img_per_s", "kept", "reason"} <= set(q)
    assert (folder / "model.int8.onnx").exists() == q["kept"]
    if q["kept"]:
        assert q["top1_agreement"] >= 0.99


def test_onnx_predictor_runs_without_torch_and_matches_the_bundle(exported, trained_run, digits_dir):
    folder, _ = exported
    files = sorted((digits_dir / "7_seven").glob("*.png"))[:5]
    code = (
        "import sys, json; sys.modules['torch'] = None\n"  # any torch import now fails
        "from foldernet.onnx_predictor import OnnxClassifier\n"
        f"clf = OnnxClassifier({str(folder / 'model.onnx')!r})\n"
        f"preds = clf.predict({[str(f) for f in files]!r}, top_k=3)\n"
        "print(json.dumps([[p.source, p.top] for p in preds]))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    onnx_preds = json.loads(proc.stdout)
    bundle_preds = foldernet.load(trained_run.run_dir).predict(files, top_k=3)
    for (src, top), p in zip(onnx_preds, bundle_preds):
        assert src == p.source
        assert [t[0] for t in top][:1] == [p.label]
        np.testing.assert_allclose([t[1] for t in top], [t[1] for t in p.top], atol=1e-3)


def test_export_refuses_to_overwrite_without_force(exported, trained_run):
    with pytest.raises(FoldernetError, match="--force"):
        foldernet.export(trained_run.run_dir)
