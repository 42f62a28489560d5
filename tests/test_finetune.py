"""Fine-tuning, the scratch baseline, class imbalance, resume after SIGKILL, compare and DDP.

Small and quick: digits at 32 px, a few epochs, torch engine (no ONNX export per fine-tuned model).
At 32 px ImageNet features are weak, which is where adapting the backbone pays."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import foldernet

SMALL = dict(img_size=32, engine="torch", progress=False)


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    from foldernet.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("ft") / "data", per_class=60, seed=3, size=32)


def test_finetune_improves_over_head(small_digits, tmp_path):
    head = foldernet.train(small_digits, out=tmp_path / "head", **SMALL)
    tuned = foldernet.train(small_digits, out=tmp_path / "ft", mode="finetune", epochs=6, **SMALL)
    f1_head = head.metrics["splits"]["val"]["macro_f1"]
    f1_tuned = tuned.metrics["splits"]["val"]["macro_f1"]
    assert f1_tuned >= f1_head + 0.02, (f1_head, f1_tuned)
    acc_head, acc_tuned = head.metrics["splits"]["test"]["accuracy"], tuned.metrics["splits"]["test"]["accuracy"]
    assert acc_tuned >= acc_head, (acc_head, acc_tuned)
    assert tuned.config["training"]["finetune"]["augment"] == "light"
    stages = [row["stage"] for row in tuned.metrics["history"]]
    assert stages[0] == 1 and stages[-1] == 2  # progressive unfreezing happened
    assert tuned.config["logit_norm"] is True  # a kept fine-tuned epoch: a label-smoothed head
    assert (tmp_path / "ft" / "curves.png").exists()
    assert list((tmp_path / "ft" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "ft" / "checkpoint").exists()  # the optimizer state is dropped unless asked
    # the fine-tuned bundle predicts like it evaluated
    model = foldernet.load(tmp_path / "ft", engine="torch")
    assert model.predict(sorted((small_digits / "1_one").glob("*.png"))[:1])[0].label


def test_scratch_cnn_trains_from_random_weights(small_digits, tmp_path):
    result = foldernet.train(small_digits, out=tmp_path / "scratch", backbone="scratch", epochs=8,
                             keep_checkpoint=True, **SMALL)
    assert result.config["weights_source"] == "random init" and result.config["mode"] == "finetune"
    assert (tmp_path / "scratch" / "checkpoint" / "best.safetensors").is_file()  # kept, as asked
    assert result.metrics["splits"]["val"]["accuracy"] > 0.3  # chance is 0.1


def test_class_weights_engage_on_an_imbalanced_folder(small_digits, tmp_path, capfd):
    data = tmp_path / "imb"
    for i, cls in enumerate(sorted(p.name for p in small_digits.iterdir())[:3]):
        (data / cls).mkdir(parents=True)
        for f in sorted((small_digits / cls).glob("*.png"))[: (40 if i == 0 else 8)]:
            shutil.copy(f, data / cls / f.name)
    result = foldernet.train(data, out=tmp_path / "run", progress=False, val=0.25, test=0.25)
    bal = result.config["balance"]
    assert bal["imbalance_ratio"] > 3 and bal["class_weights"] is not None
    assert bal["class_weights"][0] < bal["class_weights"][1]
    assert "class-weighted loss" in capfd.readouterr().err
    off = foldernet.train(data, out=tmp_path / "off", progress=False, val=0.25, test=0.25, balance="off")
    assert off.config["balance"]["class_weights"] is None


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "foldernet", "train", str(data), "--out", str(out), "--mode", "finetune",
            "--epochs", "4", "--img-size", "32", "--engine", "torch", *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(small_digits, tmp_path):
    ref = foldernet.train(small_digits, out=tmp_path / "ref", mode="finetune", epochs=4, **SMALL)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(small_digits, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".killed.partial" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # never a half-written, loadable bundle
    with pytest.raises(foldernet.FoldernetError, match="--resume"):
        foldernet.train(small_digits, out=out, mode="finetune", epochs=4, **SMALL)
    done = subprocess.run(_train_cmd(small_digits, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch" in done.stderr
    got = json.loads((out / "model" / "metrics.json").read_text())
    want = ref.metrics
    assert len(got["history"]) == len(want["history"])
    assert got["history"][-1]["val_macro_f1"] == pytest.approx(want["history"][-1]["val_macro_f1"], abs=0.05)
    assert got["splits"]["test"]["accuracy"] == pytest.approx(want["splits"]["test"]["accuracy"], abs=0.1)


def test_compare_writes_a_leaderboard(small_digits, tmp_path):
    from foldernet.compare import compare

    rows = compare(small_digits, tmp_path / "cmp", ["tf_efficientnet_lite0", "scratch"], ["head"], epochs=2,
                   img_size=32, engine="torch", progress=False)
    assert {r["model"] for r in rows} == {"tf_efficientnet_lite0-head", "scratch-finetune"}
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 100
    assert all(r["latency_ms"] > 0 and r["model_mb"] > 0 for r in rows)
    assert rows[0]["accuracy"] >= rows[1]["accuracy"]  # sorted best first


def test_ddp_with_two_gloo_processes(small_digits, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the interpreter")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--standalone",
                           "-m", "foldernet", "train", str(small_digits), "--out", str(tmp_path / "ddp"),
                           "--mode", "finetune", "--epochs", "2", "--img-size", "32", "--engine", "torch"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "model" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["splits"]["val"]["accuracy"] > 0.2
    assert not list(tmp_path.glob(".ddp.rank*"))


def test_low_res_epochs_train_small_then_full_size(small_digits, tmp_path):
    """Progressive resizing: the first epochs on 3/4-size crops, the last at the input size; the
    model still learns (well above chance on the test split) and predicts at full size."""
    out = tmp_path / "lowres"
    result = foldernet.train(small_digits, out=out, mode="finetune", epochs=3, low_res_epochs=2,
                             **{**SMALL, "img_size": 64})
    assert [h["train_size"] for h in result.metrics["history"]] == [48, 48, 64]
    assert result.metrics["splits"]["test"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert result.config["training"]["finetune"]["low_res_epochs"] == 2


def test_low_res_epochs_must_leave_full_size_epochs(small_digits, tmp_path):
    from foldernet.errors import FoldernetError

    with pytest.raises(FoldernetError, match="--low-res-epochs 6 must be smaller than --epochs"):
        foldernet.train(small_digits, out=tmp_path / "x", mode="finetune", low_res_epochs=6, **SMALL)
    assert not (tmp_path / "x").exists()


def test_top_mode_tunes_the_last_stages_on_cached_activations(small_digits, tmp_path):
    """--mode top: the last stages and the head train on cached activations of the frozen trunk. At 48
    px ImageNet features are weak, so tuning pays: it beats the head on frozen features; the trunk's
    weights are untouched, the top's changed; the bundle predicts the held-out files exactly as the run
    scored them (its features came from the tuned network)."""
    import csv

    from safetensors.numpy import load_file

    from foldernet.models import create_backbone

    opts = {**SMALL, "img_size": 48}
    head = foldernet.train(small_digits, out=tmp_path / "head", **opts)
    out = tmp_path / "top"
    tuned = foldernet.train(small_digits, out=out, mode="top", epochs=8, tta="auto", **opts)
    f1_head = head.metrics["splits"]["val"]["macro_f1"]
    f1_top = tuned.metrics["splits"]["val"]["macro_f1"]
    assert f1_top >= f1_head + 0.02, (f1_head, f1_top)
    assert tuned.metrics["splits"]["test"]["accuracy"] > 0.6  # 10 classes: chance is 0.1
    info = tuned.metrics["top"]
    assert info["stages"] == 2 and info["views"] == 3 and info["kept_epoch"] >= 1
    assert len(tuned.metrics["history"]) == 8 and tuned.metrics["head_history"]
    assert tuned.config["training"]["top"]["stages"] == 2 and tuned.metrics["tta"]["val_loss_flip"] > 0
    # top mode's frozen features come from its one pass over the files (with the trunk's activations):
    # the head it fits on them before tuning learns exactly as head mode's head did
    np.testing.assert_allclose([e["val_loss"] for e in tuned.metrics["head_history"]],
                               [e["val_loss"] for e in head.metrics["history"]], rtol=1e-4)

    prefix = "backbone.net." if tuned.config["tta"] == "flip" else "backbone."  # flip TTA wraps the network
    saved = load_file(str(out / "model" / "model.safetensors"))
    original = create_backbone("tf_efficientnet_lite0").model.state_dict()
    changed = {k for k, v in original.items() if not np.array_equal(saved[prefix + k], v.numpy())}
    assert changed and all(k.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2.")) for k in changed), changed

    rows = [r for r in csv.DictReader(open(out / "predictions.csv")) if r["split"] == "test"]
    model = foldernet.load(out, engine="torch")
    preds = model.predict([small_digits / r["path"] for r in rows])
    assert [p.label for p in preds] == [r["predicted"] for r in rows]
    # a label-smoothed head is calibrated on unit-normalised logits, in the bundle and in its ONNX graph
    assert tuned.config["logit_norm"] is True and head.config["logit_norm"] is False
    np.testing.assert_allclose([p.confidence for p in preds], [float(r["confidence"]) for r in rows], atol=2e-3)
    import onnxruntime as ort

    from foldernet.calibration import scaled_logits, softmax

    foldernet.export(out)
    onnx_model = foldernet.load(out / "export" / "model.onnx")
    session = ort.InferenceSession(str(out / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.concatenate([onnx_model.pixels(small_digits / r["path"]) for r in rows[:8]])
    probs, _, logits = session.run(["probabilities", "features", "logits"], {"input": pixels})
    np.testing.assert_allclose(probs, softmax(scaled_logits(logits, tuned.config["temperature"], True)), atol=1e-5)
    assert not np.allclose(probs, softmax(logits / tuned.config["temperature"]), atol=1e-3)


def test_top_mode_skips_an_unreadable_file_and_still_tunes(small_digits, tmp_path):
    """Top mode's one pass over the files yields features and trunk activations together: a file that
    cannot be read is skipped and named, and the others' activations still line up with their labels."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_digits, data)
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (first / "broken.png").write_bytes(b"not an image")
    tuned = foldernet.train(data, out=tmp_path / "top", mode="top", epochs=8, views=1, report=False,
                            **{**SMALL, "img_size": 48})
    assert [rel for rel, _ in tuned.skipped] == [f"{first.name}/broken.png"]
    assert tuned.metrics["top"]["kept_epoch"] >= 1 and tuned.config["logit_norm"] is True
    assert tuned.metrics["splits"]["test"]["accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("mode", ["top", "finetune"])
def test_a_head_no_epoch_beat_is_calibrated_on_plain_logits(small_digits, tmp_path, mode):
    """Top and finetune train with label smoothing, but when no epoch beats the head trained on frozen
    features they keep that head, which never saw smoothing: its temperature is fitted on plain logits."""
    result = foldernet.train(small_digits, out=tmp_path / mode, mode=mode, epochs=1, finetune_lr=1e-12, views=1,
                             report=False, **SMALL)
    if mode == "top":
        assert result.metrics["top"]["kept_epoch"] == 0
    else:
        assert not any(row["best"] for row in result.metrics["history"])
    assert result.config["logit_norm"] is False
    head = foldernet.train(small_digits, out=tmp_path / "head", report=False, **SMALL)
    assert result.config["temperature"] == pytest.approx(head.config["temperature"], rel=1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(top_stages=7), "--top-stages 7: 'tf_efficientnet_lite0' has 7 stages; choose 1 to 6"),
    (dict(backbone="tf_efficientnet_lite0+tf_efficientnet_lite1"), "--mode top tunes one backbone's last stages"),
])
def test_top_mode_refuses_what_it_cannot_cut_before_work(small_digits, tmp_path, options, message):
    from foldernet.errors import FoldernetError

    with pytest.raises(FoldernetError, match=message.replace("(", r"\(").replace("+", r"\+")):
        foldernet.train(small_digits, out=tmp_path / "x", mode="top", **{**SMALL, **options})
    assert not (tmp_path / "x").exists()
