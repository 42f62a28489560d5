"""Batch jobs over large collections: Parquet output, both engines agree, bad files get a reason,
a killed job resumes and writes every row once."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from foldernet.errors import FoldernetError
from foldernet.scale import read_results, read_sources, run_batch


@pytest.fixture(scope="session")
def onnx_model(trained_run, tmp_path_factory):
    from foldernet.export import export

    out = tmp_path_factory.mktemp("scale") / "export"
    export(trained_run.run_dir, out=out)
    return out / "model.onnx"


@pytest.fixture(scope="session")
def collection(digits_dir, tmp_path_factory):
    """~200 images (the digits twice over, as PNG and as JPEG) plus two files that cannot be read."""
    from PIL import Image

    root = tmp_path_factory.mktemp("collection")
    for i, f in enumerate(sorted(digits_dir.rglob("*.png"))):
        img = Image.open(f).convert("RGB")
        img.save(root / f"{f.parent.name}__{i:04d}.png")
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / f"{f.parent.name}__{i:04d}_flip.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def _table(out):
    return read_results(out).to_pydict()


def test_local_job_writes_one_row_per_file_with_reasons_for_bad_ones(onnx_model, collection, tmp_path):
    r = run_batch(onnx_model, collection, tmp_path / "preds.parquet", chunk_rows=64, progress=False)
    t = _table(tmp_path / "preds.parquet")
    files = read_sources(collection)
    assert t["path"] == files and r["files"] == len(files) >= 200
    bad = {p.rsplit("/", 1)[1]: e for p, e in zip(t["path"], t["error"]) if e}
    assert set(bad) == {"broken.jpg", "empty.png"} and all(bad.values())
    ok = [i for i, e in enumerate(t["error"]) if not e]
    assert all(len(t["top_labels"][i]) == 5 and np.all(np.diff(t["top_probs"][i]) <= 0) for i in ok)
    # the model answers the digits it was trained on far above chance (10 classes)
    upright = [i for i in ok if t["path"][i].endswith(".png")]
    correct = [t["label"][i] == t["path"][i].rsplit("/", 1)[1].split("__")[0] for i in upright]
    assert np.mean(correct) > 0.6


def test_ray_engine_gives_the_same_predictions_as_in_process(onnx_model, collection, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra: pip install 'foldernet[ray]'")
    local = run_batch(onnx_model, collection, tmp_path / "local", chunk_rows=50, progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        on_ray = run_batch(onnx_model, collection, tmp_path / "ray", engine="ray", chunk_rows=50, progress=False)
    finally:
        ray.shutdown()
    a, b = _table(tmp_path / "local"), _table(tmp_path / "ray")
    assert local["files"] == on_ray["files"] == len(a["path"])
    assert a["path"] == b["path"] and a["label"] == b["label"] and a["error"] == b["error"]
    assert a["not_sure"] == b["not_sure"]
    np.testing.assert_allclose(np.nan_to_num(a["confidence"]), np.nan_to_num(b["confidence"]), atol=1e-5)
    assert len(list((tmp_path / "ray").glob("part-*.parquet"))) == -(-len(a["path"]) // 50)


def test_embed_writes_unit_float16_features(onnx_model, collection, tmp_path):
    run_batch(onnx_model, collection, tmp_path / "emb", task="embed", chunk_rows=100, progress=False)
    table = read_results(tmp_path / "emb")
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    ok = np.asarray([not e for e in table.column("error").to_pylist()])
    assert emb.shape[1] > 100 and str(table.schema.field("embedding").type.value_type) == "halffloat"
    np.testing.assert_allclose(np.linalg.norm(emb[ok], axis=1), 1, atol=2e-3)
    assert np.all(emb[~ok] == 0)


def test_a_killed_job_resumes_and_writes_each_row_once(onnx_model, collection, tmp_path):
    out = tmp_path / "preds"
    cmd = [sys.executable, "-m", "foldernet", "predict", str(onnx_model), str(collection), "--out", str(out),
           "--chunk-rows", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("part-*.parquet")))
    n_files = len(read_sources(collection))
    assert 3 <= written < -(-n_files // 8), "the job should have been killed part way"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    t = _table(out)
    assert sorted(t["path"]) == t["path"] == read_sources(collection)  # every file once, in order
    assert not list(out.glob("*.tmp*"))


def test_list_files_and_globs_are_sources(collection, tmp_path):
    files = read_sources(collection)
    (tmp_path / "list.txt").write_text("\n".join(files[:5]) + "\n")
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{f},x\n" for f in files[5:8]))
    assert read_sources(tmp_path / "list.txt") == files[:5]
    assert read_sources(tmp_path / "list.csv") == files[5:8]
    assert read_sources(str(collection / "*_flip.jpg")) == [f for f in files if f.endswith("_flip.jpg")]
    with pytest.raises(FoldernetError, match="source not found"):
        read_sources(tmp_path / "nope")


def test_another_jobs_output_is_not_replaced_without_force(onnx_model, collection, tmp_path):
    out = tmp_path / "p"
    run_batch(onnx_model, collection, out, chunk_rows=500, progress=False)
    with pytest.raises(FoldernetError, match="another job"):
        run_batch(onnx_model, collection, out, chunk_rows=100, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FoldernetError, match="did not write"):
        run_batch(onnx_model, collection, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ray_engine_without_the_extra_says_how_to_install(onnx_model, collection, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from foldernet.cli import main; sys.argv = ['foldernet', 'predict', sys.argv[1], sys.argv[2], "
            "'--engine', 'ray', '--out', sys.argv[3]]; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(onnx_model), str(collection), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "pip install 'foldernet[ray]'" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_duplicates_from_embeddings_finds_copies_and_flips(onnx_model, collection, tmp_path):
    import shutil

    from foldernet.dedup import similar_pairs

    pile = tmp_path / "pile"
    pile.mkdir()
    files = sorted(collection.glob("*.png"))[:30]
    for f in files:
        shutil.copy(f, pile / f.name)
    shutil.copy(files[0], pile / "copy_of_first.png")                     # same bytes
    from PIL import Image

    Image.open(files[1]).convert("RGB").save(pile / "reencoded_second.jpg", quality=92)  # other bytes
    run_batch(onnx_model, pile, tmp_path / "emb", task="embed", progress=False)
    proc = subprocess.run([sys.executable, "-m", "foldernet", "duplicates", str(tmp_path / "emb"), "--out",
                           str(tmp_path / "pairs.csv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import csv

    rows = list(csv.DictReader(open(tmp_path / "pairs.csv")))
    names = {(r["kind"], os.path.basename(r["path_a"]), os.path.basename(r["path_b"])) for r in rows}
    assert ("exact", "copy_of_first.png", files[0].name) in names or \
        ("exact", files[0].name, "copy_of_first.png") in names
    assert any(k == "near" and "reencoded_second.jpg" in (a, b) and files[1].name in (a, b) for k, a, b in names)
    # with a splits.csv, the copy that sits in test while its original is in train is leakage
    (tmp_path / "splits.csv").write_text("path,label,split,group\n" + "".join(
        f"pile/{f.name},x,train,\n" for f in files) + "pile/copy_of_first.png,x,test,\n")
    proc = subprocess.run([sys.executable, "-m", "foldernet", "duplicates", str(tmp_path / "emb"), "--out",
                           str(tmp_path / "pairs2.csv"), "--splits", str(tmp_path / "splits.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    leaks = [r for r in csv.DictReader(open(tmp_path / "pairs2.csv")) if r["leak"] == "True"]
    assert [sorted(os.path.basename(r[k]) for k in ("path_a", "path_b")) for r in leaks] == \
        [sorted(["copy_of_first.png", files[0].name])] and "1 joining train" in proc.stdout
    # the approximate index finds planted near duplicates as the exact search does
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    x[1500:1600] = x[:100] + 0.01 * rng.standard_normal((100, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = {(a, b) for a, b, _ in similar_pairs(x, 0.99)}
    approx = {(a, b) for a, b, _ in similar_pairs(x, 0.99, exact_below=100)}
    assert exact == {(i, 1500 + i) for i in range(100)} and approx == exact


def test_similar_search_uses_the_approximate_index_on_large_sets(trained_run):
    pytest.importorskip("faiss", reason="the ray extra: pip install 'foldernet[ray]'")
    from foldernet.similar import SimilarIndex

    exact = SimilarIndex(trained_run.run_dir / "model")
    approx = SimilarIndex(trained_run.run_dir / "model")
    approx.exact_below = 10  # as if the training set were large
    queries = exact.embeddings[::7]
    a, b = exact.search(queries, k=3), approx.search(queries, k=3)
    assert approx._approximate() is not None and exact._approximate() is None
    # every training image finds itself first, through either path
    assert [n[0].index for n in a] == [n[0].index for n in b] == list(range(0, len(exact.embeddings), 7))
    np.testing.assert_allclose(exact.knn_similarity(queries, 3), approx.knn_similarity(queries, 3), atol=0.05)


def test_batch_workers_never_load_torch(onnx_model, collection, tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"  # any torch import now fails
            "from foldernet.scale import run_batch\n"
            "r = run_batch(sys.argv[1], sys.argv[2], sys.argv[3], task='embed', progress=False)\n"
            "assert r['processed'] == r['files'], r\n")
    proc = subprocess.run([sys.executable, "-c", code, str(onnx_model), str(collection), str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
