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

    # the post-training plans only (seconds); the distillation round is tested on small_run
    report = export(trained_run.run_dir, int8=True, int8_distill="never")
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


def test_export_report_tabulates_every_file_with_size_and_speed(exported):
    from foldernet.export import table_rows

    folder, report = exported
    q = report["int8"]
    assert q["plan"] and q["plans_tried"] and q["plans_tried"][0]["plan"] == "all layers int8"
    assert q["calibration_images"] > 0
    if not q["kept"]:  # a refusal names what was measured
        assert f"{q['top1_agreement']:.4f}" in q["reason"] or "slower" in q["reason"]
    rows = {(r["format"], r["precision"]): r for r in table_rows(folder)}
    assert rows[("onnx", "fp32")]["size_mb"] > 1 and rows[("onnx", "fp32")]["single_ms"] > 0
    assert rows[("onnx", "int8")]["status"] == ("kept" if q["kept"] else rows[("onnx", "int8")]["status"])
    assert "| onnx | fp32 | model.onnx |" in (folder / "report.md").read_text()


def test_int8_plans_count_blocks_so_a_stage_can_be_kept_in_part(exported):
    """The plans keep leading *blocks* in fp32: lite0's stage 1 holds two blocks, so a plan can keep its
    first in fp32 and quantise the second. The exported graph's groups begin with the stem, then blocks."""
    from foldernet.int8 import block_groups, block_of

    assert block_of("backbone.blocks.1.0.conv_pw.weight") == "backbone.blocks.1.0"
    assert block_of("backbone.blocks.1.0.conv_pw.weight", blocks=False) == "backbone.blocks.1"
    assert block_of("backbone.members.1.blocks.2.1.conv_dw.weight") == "backbone.members.1.blocks.2.1"
    assert block_of("backbone.layer1.0.conv1.weight") == "backbone.layer1.0"
    assert block_of("backbone.conv_stem.weight") == "backbone.conv_stem"
    folder, _ = exported
    blocks, stages = block_groups(folder / "model.onnx"), block_groups(folder / "model.onnx", blocks=False)
    assert len(blocks[0]) == 1 and len(blocks) > len(stages) > 2  # the stem alone first; more blocks than stages
    assert [n for g in blocks for n in g] == [n for g in stages for n in g]  # the same nodes, in the same order


@pytest.fixture(scope="session")
def tflite_export(trained_run, tmp_path_factory):
    pytest.importorskip("litert_torch", reason="the mobile extra: pip install 'foldernet[mobile]'")
    from foldernet.export import export

    out = tmp_path_factory.mktemp("mobile") / "export"
    # the post-training plans only: distillation is format-independent and tested on ONNX (small_run)
    return out, export(trained_run.run_dir, out=out, format="tflite", int8=True, int8_distill="never")


def _answers_like_the_bundle(clf, run_dir, files) -> None:
    """An exported model carries the bundle's labels and preprocessing and gives its answers."""
    bundle = foldernet.load(run_dir)
    assert clf.labels == bundle.labels and clf.preprocess.size == bundle.preprocess.size
    for mine, theirs in zip(clf.predict(files, top_k=2), bundle.predict(files, top_k=2)):
        assert mine.label == theirs.label
        np.testing.assert_allclose(mine.top[0][1], theirs.top[0][1], atol=1e-3)


def _int8_kept_only_when_it_agrees(report, path) -> None:
    q = report["int8"]
    assert path.exists() == q["kept"]
    if q["kept"]:
        assert q["top1_agreement"] >= 0.99 and q["size_mb"] < report["fp32"]["size_mb"] / 2


def test_tflite_export_agrees_with_pytorch_and_carries_labels(tflite_export, trained_run, digits_dir):
    from foldernet.mobile import TFLiteClassifier

    out, report = tflite_export
    assert report["fp32"]["top1_agreement"] == 1.0
    clf = TFLiteClassifier(out / "model.tflite")
    _answers_like_the_bundle(clf, trained_run.run_dir, sorted((digits_dir / "3_three").glob("*.png"))[:4])
    _int8_kept_only_when_it_agrees(report, out / "model.int8.tflite")
    saved = json.loads((out / "parity.tflite.json").read_text())
    assert saved["fp32"]["top1_agreement"] == 1.0
    assert "| tflite | fp32 | model.tflite |" in (out / "report.md").read_text()


def test_damaged_tflite_file_is_named_not_a_traceback(tflite_export, tmp_path):
    from foldernet.mobile import TFLiteClassifier

    out, _ = tflite_export
    broken = tmp_path / "model.tflite"
    broken.write_bytes((out / "model.tflite").read_bytes()[:5000])
    with pytest.raises(FoldernetError, match="damaged"):
        TFLiteClassifier(broken)


@pytest.fixture(scope="session")
def openvino_export(trained_run, tmp_path_factory):
    pytest.importorskip("openvino", reason="the openvino extra: pip install 'foldernet[openvino]'")
    from foldernet.export import export

    out = tmp_path_factory.mktemp("openvino") / "export"
    return out, export(trained_run.run_dir, out=out, format="openvino", int8=True, int8_distill="never")


def test_openvino_export_agrees_with_pytorch_and_reports_the_runtime_default(openvino_export, trained_run,
                                                                             digits_dir):
    from foldernet.export import check_replaceable, table_rows
    from foldernet.openvino_ir import OpenVINOClassifier, runtime_precision

    out, report = openvino_export
    assert report["fp32"]["top1_agreement"] == 1.0 and report["fp32"]["max_prob_diff"] < 1e-3
    assert sorted(p.name for p in (out / "model.openvino").iterdir()) == ["model.bin", "model.xml"]
    check_replaceable(out / "model.openvino")  # what foldernet wrote, --force may replace
    clf = foldernet.load(out / "model.openvino")  # the folder, as the bundle loader is given it
    assert isinstance(clf, OpenVINOClassifier) and clf.precision == "f32"
    _answers_like_the_bundle(clf, trained_run.run_dir, sorted((digits_dir / "5_five").glob("*.png"))[:4])
    _int8_kept_only_when_it_agrees(report, out / "model.int8.openvino")
    rows = {(r["format"], r["precision"]): r for r in table_rows(out)}
    assert rows[("openvino", "fp32")]["status"] == "kept" and rows[("openvino", "fp32")]["size_mb"] > 1
    # what a plain compile_model runs on this CPU is measured beside the checked f32 numbers
    default = runtime_precision()
    if default == "f32":
        assert "runtime_default" not in report
    else:
        d = report["runtime_default"]
        assert d["precision"] == default and 0 < d["top1_agreement"] <= 1 and d["img_per_s"] > 0
        assert rows[("openvino", f"{default} (runtime default)")]["file"] == "model.openvino"
    assert json.loads((out / "parity.openvino.json").read_text())["fp32"]["top1_agreement"] == 1.0
    assert "| openvino | fp32 | model.openvino |" in (out / "report.md").read_text()


def test_damaged_openvino_model_is_named_not_a_traceback(openvino_export, tmp_path):
    import shutil

    from foldernet.openvino_ir import OpenVINOClassifier

    out, _ = openvino_export
    broken = tmp_path / "model.openvino"
    shutil.copytree(out / "model.openvino", broken)
    with open(broken / "model.bin", "r+b") as f:
        f.truncate(5000)
    with pytest.raises(FoldernetError, match="damaged.*Incorrect weights"):
        OpenVINOClassifier(broken)
    with pytest.raises(FoldernetError, match="no OpenVINO model"):
        OpenVINOClassifier(tmp_path / "nothing.openvino")


def test_coreml_export_checks_its_spec_and_says_what_a_mac_must_check(trained_run, tmp_path):
    pytest.importorskip("coremltools", reason="the mobile extra: pip install 'foldernet[mobile]'")
    from foldernet.export import export

    report = export(trained_run.run_dir, out=tmp_path / "export", format="coreml")
    fp = report["fp32"]
    assert (tmp_path / "export" / "model.mlpackage").is_dir()
    assert fp["spec"]["problems"] == [] and fp["spec"]["labels"] == len(foldernet.load(trained_run.run_dir).labels)
    assert fp["spec"]["outputs"] == ["probabilities", "features", "logits"]
    if sys.platform != "darwin":
        assert fp["verified"] is False and "macOS" in fp["note"]


def test_missing_optional_extra_gives_the_install_line(trained_run, tmp_path):
    code = ("import sys; sys.modules['litert_torch'] = None; sys.modules['coremltools'] = None\n"
            "sys.modules['openvino'] = None\n"
            "from foldernet.cli import main; sys.argv = ['foldernet', 'export', sys.argv[1], '--format', sys.argv[2],"
            " '--out', sys.argv[3]]; main()")
    for fmt, extra in (("tflite", "mobile"), ("coreml", "mobile"), ("openvino", "openvino")):
        proc = subprocess.run([sys.executable, "-c", code, str(trained_run.run_dir), fmt, str(tmp_path / fmt)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert f"pip install 'foldernet[{extra}]'" in text and "Traceback" not in text
        assert not (tmp_path / fmt).exists()  # checked before any work


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_force_replaces_only_what_foldernet_wrote_in_its_export_folder(exported, tmp_path, fmt):
    """--force in a marked export folder still refuses, before any work, to replace what the user put
    at a target: a folder holding their files (the int8 twin's name included), or a symbolic link to
    their own file. Their files stay as they were."""
    import shutil

    if fmt == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra: pip install 'foldernet[openvino]'")
    folder, _ = exported
    out = tmp_path / "export"
    shutil.copytree(folder, out)  # carries the export marker
    name = {"onnx": "model.onnx", "openvino": "model.openvino"}[fmt]
    twin = name.replace("model.", "model.int8.")
    for target in (name, twin):
        if (out / target).is_dir():
            shutil.rmtree(out / target)
        else:
            (out / target).unlink(missing_ok=True)
        (out / target).mkdir()
        (out / target / "notes.txt").write_text("the user's own file")
        with pytest.raises(FoldernetError, match=r"holds files foldernet does not write there \(notes.txt\)"):
            foldernet.export(folder.parent, out=out, format=fmt, int8=True, force=True)
        assert (out / target / "notes.txt").read_text() == "the user's own file"
        shutil.rmtree(out / target)
    if fmt == "openvino":  # their file deeper down, beside a model folder's own entries
        (out / name / "model.bin").mkdir(parents=True)
        (out / name / "model.xml").write_text("<net/>")
        (out / name / "model.bin" / "notes.txt").write_text("the user's own file")
        with pytest.raises(FoldernetError, match=r"does not write there \(model.bin/notes.txt\)"):
            foldernet.export(folder.parent, out=out, format=fmt, force=True)
        assert (out / name / "model.bin" / "notes.txt").read_text() == "the user's own file"
        shutil.rmtree(out / name)
    mine = tmp_path / "mine.bin"
    mine.write_text("the user's own file")
    (out / name).symlink_to(mine)
    with pytest.raises(FoldernetError, match="is a symbolic link"):
        foldernet.export(folder.parent, out=out, format=fmt, force=True)
    assert mine.read_text() == "the user's own file" and (out / name).is_symlink()


def test_a_core_ml_package_is_replaceable_only_when_it_holds_what_coremltools_writes(tmp_path):
    from foldernet.export import check_replaceable

    package = tmp_path / "model.mlpackage"
    (package / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (package / "Manifest.json").write_text("{}")
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"spec")
    (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"w")
    check_replaceable(package)
    (package / "Data" / "holiday.jpg").write_bytes(b"the user's own file")
    with pytest.raises(FoldernetError, match=r"does not write there \(Data/holiday.jpg\)"):
        check_replaceable(package)


def test_quantize_int8_leaves_files_beside_the_model_alone(exported, tmp_path):
    import shutil

    from foldernet.export import quantize_int8

    folder, _ = exported
    shutil.copy(folder / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "model.prep.onnx").write_text("the user's own file")
    import onnx

    size = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[2].dim_value
    calib = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    quantize_int8(tmp_path / "model.onnx", tmp_path / "q.onnx", calib)
    assert (tmp_path / "q.onnx").stat().st_size > 0
    assert (tmp_path / "model.prep.onnx").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.prep.onnx", "q.onnx"]


@pytest.fixture(scope="session")
def small_run(digits_dir, tmp_path_factory):
    """The digits at 64 px: a real lite0 bundle whose int8 tuning takes seconds, not minutes."""
    out = tmp_path_factory.mktemp("runs") / "digits64"
    return foldernet.train(digits_dir, out=out, img_size=64, progress=False)


def test_distillation_tunes_a_copy_toward_int8_without_changing_its_answers(small_run):
    """The distilled copy's simulated int8 output moves toward the original's logits (the objective
    falls), its fp32 answers on held-out images stay the original's, and the original is untouched."""
    import torch

    from foldernet.bundle import load
    from foldernet.export import _full_model, split_files
    from foldernet.int8 import distill
    from foldernet.modality import source_pixels

    clf = load(small_run.run_dir, engine="torch", use_cache=False)
    _, splits = split_files(small_run.run_dir / "model")
    rows = {s: np.concatenate([source_pixels(p, clf.preprocess, None) for p in splits[s]]) for s in ("train", "test")}
    module = _full_model(clf)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    student, info = distill(module, rows["train"], rows["train"][:64], progress=False)
    assert info["kl_after"] < info["kl_before"], info
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not any("parametrizations" in k for k in student.state_dict())  # plain weights again
    with torch.no_grad():
        x = torch.from_numpy(rows["test"])
        same = np.mean(student(x)[0].numpy().argmax(1) == module(x)[0].numpy().argmax(1))
    assert same >= 0.95, same


def test_equalisation_keeps_the_function_and_evens_the_channel_ranges(small_run):
    """The equalised copy gives the same outputs on the calibration rows (it is a rescaling, exact
    below the ReLU6 clip), the original is untouched, and in every activation that feeds a depthwise
    conv the channels now use more of the tensor's one int8 range."""
    import torch

    from foldernet.bundle import load
    from foldernet.export import _full_model, split_files
    from foldernet.int8 import equalise, equalise_pairs
    from foldernet.modality import source_pixels

    clf = load(small_run.run_dir, engine="torch", use_cache=False)
    _, splits = split_files(small_run.run_dir / "model")
    rows = np.concatenate([source_pixels(p, clf.preprocess, None) for p in splits["train"][:64]])
    module = _full_model(clf)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    equalised, info = equalise(module, rows)
    assert info["pairs"] == len(equalise_pairs(module)) > 10  # lite0: the stem and each inverted residual
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    def channel_use(net) -> tuple:
        """The network's outputs on ``rows`` and, per pair, the median channel's share of the tensor's range."""
        highs = {}
        hooks = [bn.register_forward_hook(lambda m, i, o, k=k: highs.__setitem__(k, o.amax((0, 2, 3))))
                 for k, (bn, _) in enumerate(equalise_pairs(net))]
        with torch.no_grad():
            out = net(torch.from_numpy(rows))
        for h in hooks:
            h.remove()
        return out, [float(h.median() / h.max()) for _, h in sorted(highs.items())]

    out0, use0 = channel_use(module)
    out1, use1 = channel_use(equalised)
    assert torch.allclose(out0[2], out1[2], atol=1e-3, rtol=1e-3)  # the logits
    assert all(b >= a - 1e-6 for a, b in zip(use0, use1)) and sum(use1) > sum(use0) * 1.1, (use0, use1)


def test_export_int8_distill_always_tries_only_distilled_plans(small_run, tmp_path):
    from foldernet.export import export

    report = export(small_run.run_dir, out=tmp_path / "export", int8=True, int8_distill="always")
    q = report["int8"]
    assert q["plans_tried"] and all(p["plan"].endswith(", distilled") for p in q["plans_tried"])
    assert q["plan"].endswith(", distilled") and q["distillation"]["seconds"] > 0
    assert (tmp_path / "export" / "model.int8.onnx").exists() == q["kept"]
    if q["kept"]:
        assert q["top1_agreement"] >= 0.99
    else:
        assert f"{q['top1_agreement']:.4f}" in q["reason"] or "slower" in q["reason"]


def test_bad_int8_distill_is_one_line_before_any_work(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "foldernet", "export", str(trained_run.run_dir), "--int8",
                           "--int8-distill", "sometimes", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--int8-distill" in proc.stderr and "always" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_serve_uses_int8_only_when_the_last_export_kept_it(exported, tmp_path):
    import shutil

    from foldernet.serve import _exported_onnx

    folder, _ = exported
    shutil.copy(folder / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(folder / "model.onnx", tmp_path / "model.int8.onnx")  # a file the report does not vouch for
    (tmp_path / "parity.json").write_text(json.dumps({"fp32": {}, "int8": {"kept": False, "path": None}}))
    assert _exported_onnx(tmp_path) == (tmp_path / "model.onnx", "fp32")
    (tmp_path / "parity.json").write_text("{damaged")
    assert _exported_onnx(tmp_path) == (tmp_path / "model.onnx", "fp32")
    (tmp_path / "parity.json").write_text(json.dumps({"int8": {"kept": True, "path": "model.int8.onnx"}}))
    assert _exported_onnx(tmp_path) == (tmp_path / "model.int8.onnx", "int8")
