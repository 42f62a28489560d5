"""Never lose a user's file, never show a traceback: --force only replaces what foldernet wrote,
options are checked before any work, damaged bundles are named, predict keeps every result, and the
server is safe off localhost. Each case asserts the message, the exit code, and that every input
file is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
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


def _cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "foldernet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) <= 2, err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture()
def data(tmp_path):
    """A small class-folder dataset inside a parent that holds another file of the user's."""
    root = tmp_path / "project" / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    (tmp_path / "project" / "notes.txt").write_text("the user's own notes")
    return root


# ------------------------------------------------------------------------------- --force and outputs

@pytest.mark.parametrize("where", ["data", "parent", "inside", "file", "unmarked"])
def test_force_never_replaces_what_foldernet_did_not_write(data, tmp_path, where):
    project = data.parent
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    (tmp_path / "plain.txt").write_text("a plain file")
    out = {"data": data, "parent": project, "inside": data / "a" / "run", "file": tmp_path / "plain.txt",
           "unmarked": tmp_path / "mine"}[where]
    before = _digest(tmp_path)
    with pytest.raises(FoldernetError) as err:
        foldernet.train(data, out=out, force=True, progress=False)
    msg = str(err.value)
    assert str(out.name) in msg and ("input folder" in msg or "cannot tell that it wrote it" in msg
                                     or "not a folder foldernet made" in msg), msg
    assert _digest(tmp_path) == before  # every file byte-identical, nothing added


def test_force_refuses_home_and_current_folder_from_the_cli(data, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine")
    proc = _cli("train", data, "--out", "~", "--force", env={"HOME": str(home)})
    _one_line_error(proc, "home folder")
    proc = _cli("train", data, "--out", ".", "--force", cwd=home)
    _one_line_error(proc, "current folder")
    assert (home / ".bashrc").read_text() == "# mine"


def test_force_replaces_a_run_foldernet_wrote_and_only_then(digits_dir, tmp_path):
    out = tmp_path / "run"
    foldernet.train(digits_dir, out=out, progress=False, max_epochs=3, report=False)
    from foldernet.audit import audit

    marker = json.loads((out / ".foldernet.json").read_text())
    assert marker["kind"] == "run"
    (out / "stale.txt").write_text("from the old run")
    foldernet.train(digits_dir, out=out, progress=False, max_epochs=3, report=False, force=True)
    assert not (out / "stale.txt").exists() and (out / "model" / "config.json").is_file()
    assert not list(tmp_path.glob(".run.*"))  # nothing left beside it
    with pytest.raises(FoldernetError, match="holds a foldernet run folder"):
        audit(digits_dir, out=out, force=True, progress=False)  # a run is not an audit folder


def test_resume_never_takes_or_replaces_a_folder_foldernet_did_not_write(data, tmp_path):
    from foldernet.io import write_marker

    mine = tmp_path / ".mine.partial" / "checkpoint"  # the user's folder, named like a staging folder
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    before = _digest(tmp_path)
    with pytest.raises(FoldernetError, match="no foldernet run marker"):
        foldernet.train(data, out=tmp_path / "mine", mode="finetune", resume=True, progress=False)
    with pytest.raises(FoldernetError, match="no foldernet run marker"):
        foldernet.train(data, out=tmp_path / "mine", mode="finetune", force=True, progress=False)
    assert _digest(tmp_path) == before
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "keep.txt").write_text("the user's too")
    (tmp_path / ".theirs.partial").mkdir()
    write_marker(tmp_path / ".theirs.partial", "run")  # a real interrupted run beside a folder of the user's
    with pytest.raises(FoldernetError, match="already exists"):
        foldernet.train(data, out=tmp_path / "theirs", mode="finetune", resume=True, progress=False)
    assert (tmp_path / "theirs" / "keep.txt").read_text() == "the user's too"


def test_a_folder_that_appears_while_a_run_is_written_is_not_replaced(tmp_path):
    from foldernet.io import staged_dir

    out = tmp_path / "late"
    with pytest.raises(FoldernetError, match="appeared while this run was being written"):
        with staged_dir(out, kind="run") as staging:
            (staging / "model.txt").write_text("the new run")
            out.mkdir()  # meanwhile, someone puts a folder where the run goes
            (out / "mine.txt").write_text("the user's")
    assert (out / "mine.txt").read_text() == "the user's" and not (out / "model.txt").exists()
    kept = list(tmp_path.glob(".late.tmp-*"))
    assert len(kept) == 1 and (kept[0] / "model.txt").read_text() == "the new run"  # nothing lost either way


# --------------------------------------------------------------------------- options, at the boundary

BAD_TRAIN = [
    (["--epochs", "-1"], "--epochs"), (["--epochs", "0"], "--epochs"), (["--img-size", "0"], "--img-size"),
    (["--img-size", "-5"], "--img-size"), (["--crop-pct", "1.5"], "--crop-pct"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "-1"], "--lr"),
    (["--engine", "banana"], "--engine"), (["--val", "0.6", "--test", "0.5"], "--val + --test"),
    (["--mode", "finetune", "--lr", "-1"], "--lr"), (["--group-by", "regex:("], "regular expression"),
]


@pytest.mark.parametrize("args,words", BAD_TRAIN)
def test_bad_train_options_stop_before_any_work(data, tmp_path, args, words):
    before = _digest(data)
    proc = _cli("train", data, "--out", tmp_path / "run", *args)
    _one_line_error(proc, words)
    assert "must be" in proc.stderr or "valid" in proc.stderr or "leave" in proc.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))  # a failed start leaves nothing
    assert _digest(data) == before


def test_the_python_api_gives_the_same_messages(data, tmp_path):
    for kwargs, words in (({"epochs": -1}, "train --epochs must be a whole number from 1"),
                          ({"img_size": 0}, "train --img-size must be a whole number from 16"),
                          ({"engine": "banana"}, "train --engine must be one of onnx, torch"),
                          ({"epoch": 3}, "unknown option epoch")):
        with pytest.raises(FoldernetError, match=words):
            foldernet.train(data, out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,words", [(["-k", "0"], "--top-k"), (["-k", "-3"], "--top-k"),
                                        (["--similar", "-1"], "--similar")])
def test_bad_predict_options(trained_run, digits_dir, args, words):
    proc = _cli("predict", trained_run.run_dir, next((digits_dir / "0_zero").iterdir()), *args)
    _one_line_error(proc, words)


# ------------------------------------------------------------------------------------ damaged bundles

@pytest.fixture()
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_truncated_weights_labels_that_do_not_fit_and_a_newer_format_are_named(run_copy, digits_dir):
    image = next((digits_dir / "0_zero").iterdir())
    cfg_path = run_copy / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "labels": cfg["labels"][:-1]}))
    with pytest.raises(FoldernetError, match="is damaged: the head has shape"):
        foldernet.load(run_copy)
    cfg_path.write_bytes(cfg_path.read_bytes()[:200] + b"\xba\xe8" + cfg_path.read_bytes()[200:])  # not UTF-8
    with pytest.raises(FoldernetError, match="is damaged: config.json cannot be read"):
        foldernet.load(run_copy)
    cfg_path.write_text(json.dumps({**cfg, "format": 99}))
    with pytest.raises(FoldernetError, match="newer foldernet"):
        foldernet.load(run_copy)
    cfg_path.write_text(json.dumps({**cfg, "logit_norm": "yes"}))
    with pytest.raises(FoldernetError, match="is damaged: config.json 'logit_norm' is 'yes'"):
        foldernet.load(run_copy)
    cfg_path.write_text(json.dumps(cfg))
    _truncate(run_copy / "model" / "model.safetensors")
    proc = _cli("predict", run_copy, image)
    _one_line_error(proc, "is damaged: model.safetensors cannot be read", "retrain or restore it")


def test_export_never_writes_into_a_folder_of_the_users(run_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.int8.onnx").write_bytes(b"the user's own file")
    before = _digest(mine)
    with pytest.raises(FoldernetError, match="did not write as an export"):
        foldernet.export(run_copy, out=mine, force=True)
    assert _digest(mine) == before


def test_a_bundle_in_the_first_format_still_loads(run_copy, digits_dir):
    cfg_path = run_copy / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    old = {k: v for k, v in cfg.items() if k != "spec"} | {"format": 1}  # as foldernet 0.1 wrote it
    cfg_path.write_text(json.dumps(old))
    model = foldernet.load(run_copy)
    assert model.labels == cfg["labels"]
    p = model.predict(next((digits_dir / "3_three").iterdir()))[0]
    assert p.error is None and p.label in cfg["labels"]


def test_damaged_or_missing_similar_index(run_copy, digits_dir):
    image = next((digits_dir / "0_zero").iterdir())
    _truncate(run_copy / "model" / "index.safetensors")
    _one_line_error(_cli("similar", run_copy, image), "is damaged: index.safetensors cannot be read")
    (run_copy / "model" / "index.safetensors").unlink()
    proc = _cli("predict", run_copy, image, "--similar", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "similar examples are unavailable" in proc.stderr
    _one_line_error(_cli("similar", run_copy, image), "similar examples are unavailable")


def test_damaged_onnx_export_is_named_before_serving(run_copy):
    # only the damaged file: an int8 twin that an earlier test's export kept would be served instead
    shutil.rmtree(run_copy / "export", ignore_errors=True)
    (run_copy / "export").mkdir()
    (run_copy / "export" / "model.onnx").write_bytes(b"\x08\x07\x12\x08" + os.urandom(2000))
    from foldernet.onnx_predictor import OnnxClassifier

    with pytest.raises(FoldernetError, match="is damaged"):
        OnnxClassifier(run_copy)
    proc = _cli("serve", run_copy, "--port", "8799")
    _one_line_error(proc, "is damaged")
    assert "serving on" not in proc.stdout


# ------------------------------------------------------------------------- predict keeps every result

def test_every_input_gets_a_row_even_when_a_whole_chunk_fails(trained_run, digits_dir, tmp_path):
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (bad / "notes.txt").write_text("hello")
    (bad / "beep.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    good = next((digits_dir / "5_five").iterdir())
    before = _digest(bad)
    model = foldernet.load(trained_run.run_dir)
    preds = model.predict([bad / "broken.jpg", bad / "notes.txt", bad / "beep.wav"], batch_size=2)
    assert [p.error is not None for p in preds] == [True, True, True]
    assert all("BytesIO" not in p.error for p in preds)
    assert "sound file" in preds[2].error  # an image model refuses a sound, with a reason
    csv_out = tmp_path / "preds.csv"
    proc = _cli("predict", trained_run.run_dir, bad / "broken.jpg", bad / "notes.txt", good, "--csv", csv_out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = csv_out.read_text().splitlines()
    assert len(rows) == 4 and "not_sure_reason" in rows[0]
    last = rows[3].split(",")
    assert last[0] == str(good) and last[1] in model.labels and last[-1] == ""  # a label, no error
    assert _digest(bad) == before


def test_an_empty_folder_is_an_error(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("predict", trained_run.run_dir, tmp_path / "empty"), "no image or sound files")


# ------------------------------------------------------------------------------------------- small things

def test_version_and_backbones():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"foldernet {foldernet.__version__}"
    proc = _cli("backbones")
    assert proc.returncode == 0
    assert "tf_efficientnet_lite0" in proc.stdout and "ready" in proc.stdout and "needs weights" in proc.stdout


def test_head_history_ends_where_early_stopping_chose(trained_run):
    history = trained_run.metrics["history"]
    assert len(history) < 200  # stopped early, and the record ends there
    assert trained_run.config["training"]["epochs_run"] == len(history)
