"""The hardening corpus: every command survives 30+ kinds of bad or odd input, names each bad file
with a reason, uses every good file, and never modifies or deletes anything."""

import csv
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import foldernet

sys.path.insert(0, str(Path(__file__).parent))
from corpus.make_corpus import build  # noqa: E402


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):  # no followlinks: the loop stays a loop
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if not p.is_symlink():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{st.st_mode}"
    return out


def _as_written(rel: str) -> str:
    """How a path appears in foldernet's CSV files: names that are not UTF-8 are backslash-escaped."""
    return rel.encode("utf-8", errors="backslashreplace").decode("utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    kinds = build(root)
    return root, kinds, _digest(root)


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "foldernet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_corpus_has_thirty_kinds_of_odd_input(corpus):
    _, kinds, _ = corpus
    odd = [k for part in kinds.values() for k, v in part.items() if not k.split("/")[-1].startswith("good")]
    assert len(odd) >= 30, len(odd)


def test_every_command_survives_the_image_corpus(corpus, tmp_path):
    root, kinds, before = corpus
    data, k = root / "images", kinds["images"]
    proc = _cli("audit", data, "--out", tmp_path / "audit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    import json

    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    unreadable = {e["path"]: e["reason"] for e in report["findings"]["unreadable"]}
    for rel, kind in k.items():
        if kind == "bad":
            assert rel in unreadable and unreadable[rel], rel

    proc = _cli("train", data, "--out", tmp_path / "run", "--allow-leakage")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "skipped.csv"))}
    used = {r["path"] for r in csv.DictReader(open(tmp_path / "run" / "model" / "splits.csv"))}
    for rel, kind in k.items():
        rel = _as_written(rel)
        if kind == "bad":
            assert rel in skipped and skipped[rel], rel
        elif kind == "good":
            assert rel in used and rel not in skipped, rel
    assert "placeholder" in skipped["dogs/one_pixel.png"]
    assert "symlink loop" in " ".join(skipped.values())
    assert "empty_class" in proc.stderr and "lonely" in proc.stderr

    proc = _cli("predict", tmp_path / "run", data / "cats", data / "dogs", "--csv", tmp_path / "p.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert rows["truncated.jpg"]["error"] and rows["page.jpg"]["error"] and rows["good0.jpg"]["label1"]

    proc = _cli("evaluate", tmp_path / "run", data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr

    from fastapi.testclient import TestClient

    from foldernet.serve import create_app

    with TestClient(create_app(tmp_path / "run"), base_url="http://127.0.0.1") as client:
        for rel in k:
            p = data / rel
            if p.is_file() and os.access(p, os.R_OK):
                r = client.post("/predict", files={"file": ("../../x", p.read_bytes(), "image/jpeg")})
                assert r.status_code < 500, (rel, r.text)
                assert r.status_code == 200 or "error" in r.json()
    assert _digest(root) == before  # nothing modified, nothing deleted


def test_every_command_survives_the_audio_corpus(corpus, tmp_path):
    root, kinds, before = corpus
    data, k = root / "audio", kinds["audio"]
    proc = _cli("audit", data, "--out", tmp_path / "audit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli("train", data, "--out", tmp_path / "run", "--allow-leakage", "--val", "0.25", "--test", "0.25")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "skipped.csv"))}
    used = {r["path"] for r in csv.DictReader(open(tmp_path / "run" / "model" / "splits.csv"))}
    for rel, kind in k.items():
        if kind == "bad":
            assert rel in skipped, rel
        else:
            assert rel in used and rel not in skipped, rel
    proc = _cli("predict", tmp_path / "run", data / "low")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "corrupt_header.wav" in proc.stdout and "skipped" in proc.stdout
    assert _digest(root) == before


def test_three_random_sigkills_then_resume_to_completion(tmp_path):
    from foldernet.demo import write_digits

    data = write_digits(tmp_path / "data", per_class=30, size=32)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "foldernet", "train", str(data), "--out", str(out), "--mode", "finetune",
           "--epochs", "4", "--img-size", "32", "--engine", "torch"]
    rng = random.Random(7)
    partial = tmp_path / ".run.partial"
    for _ in range(3):
        proc = subprocess.Popen(cmd + (["--resume"] if (partial / "checkpoint" / "state.json").exists() else
                                       ["--force"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 9.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():  # it finished before the kill: a complete, loadable run
            break
        # never a half-written bundle where the run should be
        assert not out.exists()
    if not out.exists():
        args = ["--resume"] if (partial / "checkpoint" / "state.json").exists() else ["--force"]
        done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    model = foldernet.load(out, engine="torch")
    assert len(model.labels) == 10
    assert not partial.exists()


def test_bundles_load_without_unpickling(trained_run):
    import builtins

    import pickle  # noqa: F401 - imported so it can be blocked below

    real = pickle.loads

    def refuse(*a, **k):
        raise AssertionError("a bundle tried to unpickle something")

    pickle.loads, pickle.load = refuse, refuse
    try:
        model = foldernet.load(trained_run.run_dir, engine="torch", use_cache=False)
        assert model.labels
    finally:
        pickle.loads = real
        del builtins
