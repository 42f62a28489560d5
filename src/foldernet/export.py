"""Export a bundle to one model file (backbone + head + temperature), checked against the original.

Formats: ONNX (servers, ONNX Runtime), OpenVINO IR (servers with Intel CPUs; the ``openvino``
extra), TFLite (LiteRT: Android, embedded) and Core ML (Apple), the last two with the ``mobile``
extra. The parity check runs on the bundle's held-out split: the fp32
file must give the same top-1 as the PyTorch model on every image, or the export fails loudly. An
int8 file (static quantisation, calibrated on training images; the fastest of a few plans that
keep the first blocks in fp32, chosen by agreement on a selection split, on weights equalised for
per-tensor scales (ONNX, OpenVINO) and, when no plan agrees, distilled for int8: see ``int8.py``) is written only
when it agrees on >= 99 % and is faster here, or when the user asks for the smaller file. The numbers land
in ``parity*.json`` either way, and ``report.md`` tabulates size, agreement and speed.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from . import __version__
from .bundle import find_model_dir, load
from .errors import FoldernetError
from .io import MARKER, atomic_write_bytes, atomic_write_json, marker_kind, write_marker
from .int8 import (INT8_MIN_AGREEMENT, INT8_PLANS, INT8_SELECT_AGREEMENT, block_groups, distill, equalise,
                   plan_name, prepared, quantize_int8)
from .progress import console

def _full_model(clf):
    """backbone -> linear head -> softmax(logits / T), plus the features for similarity search."""
    from .head import network

    return network(clf.backbone, clf.head, clf.head.n_classes, clf.head.dim, with_outputs=True).eval()


def split_files(model_dir: Path, data: str | os.PathLike | None = None) -> tuple[Path, dict[str, list[Path]]]:
    """The data root and the existing files of each split of the bundle (``data`` overrides the root
    recorded at training time)."""
    from .bundle import BundleConfig

    root = Path(data) if data else Path(BundleConfig.read(model_dir).data.get("root", ""))
    with open(model_dir / "splits.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list[Path]] = {}
    for r in rows:
        out.setdefault(r["split"], []).append(root / r["path"])
    return root, {k: [p for p in v if p.is_file()] for k, v in out.items()}


def held_out_files(model_dir: Path, data: str | os.PathLike | None, split: str = "test",
                   limit: int | None = None) -> list[Path]:
    """Paths of a split of the bundle's data (the validation split when there is no test split)."""
    root, splits = split_files(model_dir, data)
    paths = splits.get(split) or splits.get("val") or []
    if not paths:
        raise FoldernetError(f"no held-out images found under {root} for the parity check; pass --data DATA "
                             "(the folder the model was trained on)")
    return paths[:limit] if limit else paths


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return float(np.mean(a.argmax(1) == b.argmax(1))), float(np.abs(a - b).max())


def _throughput(predictor, pixels: np.ndarray, repeats: int = 3, rounds: int = 3) -> float:
    """Images/s of ``predictor.run`` on one batch: the best of a few rounds (other work on the
    machine only ever slows a round down)."""
    predictor.run(pixels)
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            predictor.run(pixels)
        best = max(best, len(pixels) * repeats / (time.perf_counter() - t))
    return best


TARGETS = {"onnx": "model.onnx", "openvino": "model.openvino", "tflite": "model.tflite",
           "coreml": "model.mlpackage"}
PARITY = {"onnx": "parity.json", "openvino": "parity.openvino.json", "tflite": "parity.tflite.json",
          "coreml": "parity.coreml.json"}


def _metadata(clf) -> dict:
    """What a model file needs beside its weights to answer like the bundle (same in every format)."""
    return {"labels": clf.labels, "preprocess": clf.preprocess.to_dict(), "temperature": clf.temperature,
            "logit_norm": clf.config.logit_norm,
            "threshold": clf.config.threshold, "similarity_threshold": clf.config.similarity_threshold,
            "backbone": clf.config.backbone, "audio": clf.audio.to_dict() if clf.audio is not None else None,
            "input": {"name": "input", "layout": "NCHW", "dtype": "float32",
                      "shape": [None, 3, clf.preprocess.size, clf.preprocess.size]},
            "outputs": ["probabilities", "features", "logits"], "foldernet_version": __version__}


def _latency_ms(predictor, row: np.ndarray, repeats: int = 15) -> float:
    """Median single-image latency of ``predictor.run`` (preprocessed input, model only)."""
    row = row[None]
    predictor.run(row)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.run(row)
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 2)


# Every path inside a model folder when foldernet writes it (OpenVINO's IR, coremltools' .mlpackage).
# The export folder's marker proves the folder is foldernet's, not what a user may have put inside it:
# an existing folder at a target is replaced only when it holds nothing else, at any depth.
_COREML = "Data/com.apple.CoreML"
MODEL_FOLDER_ENTRIES = {".openvino": {"model.xml", "model.bin"},
                        ".mlpackage": {"Manifest.json", "Data", _COREML, f"{_COREML}/model.mlmodel",
                                       f"{_COREML}/weights", f"{_COREML}/weights/weight.bin"}}


def int8_path(target: Path) -> Path:
    """Where the int8 twin of an export target goes: model.onnx -> model.int8.onnx, and so on."""
    return target.with_name(target.stem + ".int8" + target.suffix)


def check_replaceable(path: Path) -> None:
    """Refuse, with the path and the fix, to replace what foldernet cannot have written there: a
    symbolic link, or a folder holding anything a model folder of its kind does not."""
    if path.is_symlink():
        raise FoldernetError(f"{path} is a symbolic link, which foldernet never writes; remove it or choose "
                             "another --out")
    if path.is_dir():
        inside = {p.relative_to(path).as_posix() for p in path.rglob("*")}
        extra = sorted(inside - MODEL_FOLDER_ENTRIES.get(path.suffix, set()))
        if extra:
            raise FoldernetError(f"{path} holds files foldernet does not write there ({', '.join(extra[:3])}); "
                                 "move them away or choose another --out")


def _replace(tmp: Path, target: Path) -> None:
    """Move a finished file or folder (an .mlpackage, an OpenVINO IR) into place. A file replaces the
    old one atomically; an old folder (which os.replace cannot overwrite) is removed first, once
    ``check_replaceable`` has shown it is a model folder."""
    import shutil

    check_replaceable(target)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    """Delete a file or folder this export has just written itself (a refused file, an int8 file not kept)."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _size_mb(path: Path) -> float:
    """A model file's size, or a model folder's (an IR's .xml + .bin, an .mlpackage)."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return round(sum(f.stat().st_size for f in files) / 1e6, 2)


def export(run: str | os.PathLike, out: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
           parity_limit: int | None = None, **options) -> dict:
    """Write ``RUN/export/model.onnx`` (or ``model.tflite`` / ``model.mlpackage`` with ``format``),
    plus ``model.int8.*`` when it earns its place, the parity numbers (``parity*.json``) and a
    size/latency table of everything in the folder (``report.md``).
    Options: those of ``foldernet export`` (format, int8, prefer_size, force), checked first."""
    from .params import check

    o = check("export", options)
    fmt, int8, prefer_size, force = o["format"], o["int8"], o["prefer_size"], o["force"]
    if fmt != "onnx":  # the optional converters are checked before any work starts
        from .mobile import require

        if fmt == "openvino":
            require("openvino", fmt, extra="openvino")
        else:
            require("litert_torch" if fmt == "tflite" else "coremltools", fmt)
        if fmt == "tflite":
            require("ai_edge_litert", fmt)

    model_dir = find_model_dir(run)
    out = Path(out) if out else model_dir.parent / "export"
    target = out / TARGETS[fmt]
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and marker_kind(out) != "export")):
        raise FoldernetError(f"--out {out} holds files foldernet did not write as an export (no {MARKER} marker); "
                             "choose a new or empty folder")
    if target.exists() and not force:
        raise FoldernetError(f"{target} already exists; pass --force to replace it")
    for path in (target, int8_path(target)) if int8 else (target,):  # --force replaces only foldernet's own
        check_replaceable(path)
    clf = load(model_dir, engine="torch", use_cache=False)
    files = held_out_files(model_dir, data, limit=parity_limit)
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None:
        write_marker(out, "export")

    job = _Job(clf, model_dir, data, out, target, files, prefer_size, o["int8_distill"])
    report = {"onnx": job.onnx, "openvino": job.openvino, "tflite": job.tflite, "coreml": job.coreml}[fmt](int8)
    atomic_write_json(out / PARITY[fmt], report)
    write_table(out)
    return report


def write_onnx(module, size: int, path: Path, meta: dict) -> Path:
    """``module`` (backbone -> head -> calibrated probabilities) as an ONNX file at ``path`` with the
    bundle's metadata (labels, preprocessing, ...) that ``OnnxClassifier`` reads."""
    import onnx

    from .features import export_onnx

    export_onnx(module, size, path, output_names=["probabilities", "features", "logits"])
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    proto.metadata_props.add(key="foldernet", value=json.dumps(meta, ensure_ascii=False))
    proto.producer_name = "foldernet"
    atomic_write_bytes(path, proto.SerializeToString())
    return path


class _Job:
    """One export: the bundle, the held-out files and PyTorch's answers on them, shared by the
    fp32 file, its parity check and the int8 search."""

    def __init__(self, clf, model_dir, data, out, target, files, prefer_size, distill_mode="auto"):
        self.clf, self.model_dir, self.data, self.out, self.target = clf, model_dir, data, out, target
        self.files, self.prefer_size, self.distill_mode = files, prefer_size, distill_mode
        self.what = "clips" if clf.audio is not None else "images"
        self.meta = _metadata(clf)
        self.size = clf.preprocess.size
        self._ref = None

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """PyTorch's probabilities on the held-out split (computed once) and which files it read."""
        if self._ref is None:
            console.print(f"parity check on {len(self.files)} held-out {self.what}: PyTorch eager first...")
            ref, ok, _ = self.clf.predict_proba(self.files, progress=True)
            if not ok.any():
                raise FoldernetError(f"the parity check could not read any held-out file (e.g. {self.files[0]}); "
                                     "nothing exported")
            self._ref = ref, ok
        return self._ref

    def parity(self, predictor, name: str) -> dict:
        """Top-1 agreement and largest probability difference against PyTorch on the held-out split,
        and the agreement on the items the model answers (not "not sure" by its confidence threshold):
        where a quantised file changes an answer the model was already unsure of, a user never sees it."""
        from .calibration import not_sure_mask

        ref, ok_ref = self.reference()
        got, ok, _ = predictor.predict_proba(self.files)
        both = ok & ok_ref
        if not both.any():
            raise FoldernetError(f"the {name} model could not read any held-out file (e.g. {self.files[0]})")
        agree, diff = _agreement(ref[both], got[both])
        out = {"top1_agreement": agree, "max_prob_diff": diff, "n": int(both.sum())}
        sure = both & ~not_sure_mask(ref, None, self.clf.threshold, None)
        if sure.any():
            out.update(answered_top1_agreement=float(np.mean(ref[sure].argmax(1) == got[sure].argmax(1))),
                       answered=int(sure.sum()))
        return out

    def base_report(self, fmt: str, export_s: float, checked: dict) -> dict:
        return {"format": fmt, "n": checked["n"], "inputs": self.what,
                "split_files_from": str(self.files[0].parent.parent),
                "fp32": {"top1_agreement": checked["top1_agreement"], "max_prob_diff": checked["max_prob_diff"],
                         "export_seconds": round(export_s, 1)}}

    def refuse(self, fmt: str, report: dict, tmp: Path) -> None:
        _remove(tmp)
        atomic_write_json(self.out / PARITY[fmt], report)
        fp = report["fp32"]
        raise FoldernetError(f"the {fmt} export disagrees with PyTorch on {(1 - fp['top1_agreement']) * 100:.2f}% of "
                             f"held-out {self.what} (max probability difference {fp['max_prob_diff']:.3g}); not "
                             f"written. Details: {self.out / PARITY[fmt]}")

    def check_fp32(self, fmt: str, name: str, tmp: Path, predictor_cls, export_s: float):
        """The fp32 file at ``tmp``: checked against PyTorch (every top-1 must match, or it is removed
        and the export stops), moved into place, and timed. Returns (report, predictor, bench batch)."""
        report = self.base_report(fmt, export_s, self.parity(predictor_cls(tmp), name))
        if report["fp32"]["top1_agreement"] < 1.0:
            self.refuse(fmt, report, tmp)
        _replace(tmp, self.target)
        predictor = predictor_cls(self.target)
        bench = self.bench(predictor)
        # TFLite runs one image at a time: its batch throughput is 32 single runs
        report["fp32"].update(path=self.target.name, size_mb=_size_mb(self.target),
                              img_per_s=round(_throughput(predictor, bench, repeats=1 if fmt == "tflite" else 3), 1),
                              single_ms=_latency_ms(predictor, bench[0]))
        return report, predictor, bench

    def bench(self, predictor) -> np.ndarray:
        rows = np.concatenate([predictor.pixels(p) for p in self.files[:32]])[:32]
        return np.concatenate([rows] * (32 // len(rows) + 1))[:32] if len(rows) < 32 else rows

    # --- ONNX ---

    def onnx(self, int8: bool) -> dict:
        from .onnx_predictor import OnnxClassifier

        t = time.perf_counter()
        module = _full_model(self.clf)
        tmp = self.write_onnx(module, self.out / ".model.export.onnx")
        console.print("...then ONNX Runtime")
        report, predictor, bench = self.check_fp32("onnx", "ONNX", tmp, OnnxClassifier, time.perf_counter() - t)
        if int8:
            def make(k: int, calib: np.ndarray, work: Path, state: dict):
                cand = self.qdq_plan(k, calib, work, state)
                return None if cand is None else (cand, OnnxClassifier(cand))

            report["int8"] = self.int8(predictor, make, OnnxClassifier, bench, module)
        return report

    def write_onnx(self, module, path: Path) -> Path:
        return write_onnx(module, self.size, path, self.meta)

    def qdq_plan(self, k: int, calib: np.ndarray, work: Path, state: dict) -> Path | None:
        """The int8 ONNX file (QDQ) of plan ``k`` (the first ``k`` blocks fp32) of this round's network
        (``state['module']``: equalised, or distilled), or None when the network has no such plan."""
        tag = state["tag"]
        if "path" not in state:  # the fp32 graph this round quantises, pre-processed once
            src = self.write_onnx(state["module"], work / f"round{tag}.onnx")
            state["path"] = prepared(src, work)
            state["groups"] = block_groups(state["path"])
        groups = state["groups"]
        if k and k >= len(groups):
            return None
        cand = work / f"plan{k}{tag}.onnx"
        quantize_int8(state["path"], cand, calib, keep_fp32=[n for g in groups[:k] for n in g],
                      prepared_path=state["path"])
        return cand

    # --- OpenVINO ---

    def openvino(self, int8: bool) -> dict:
        import tempfile

        from .openvino_ir import OpenVINOClassifier, runtime_precision, save_ir

        console.print("converting to OpenVINO IR...")
        t = time.perf_counter()
        module = _full_model(self.clf)
        with tempfile.TemporaryDirectory(prefix=".openvino.", dir=self.out, ignore_cleanup_errors=True) as work:
            tmp = save_ir(self.write_onnx(module, Path(work) / "model.onnx"), Path(work) / self.target.name,
                          self.meta)
            console.print("...then the OpenVINO runtime (f32)")
            report, predictor, bench = self.check_fp32("openvino", "OpenVINO", tmp, OpenVINOClassifier,
                                                       time.perf_counter() - t)
        default = runtime_precision()
        if default != "f32":  # what a plain compile_model gives a user on this CPU: measured, not assumed
            fast = OpenVINOClassifier(self.target, precision="default")
            checked = self.parity(fast, f"OpenVINO ({default})")
            speed = _throughput(fast, bench)
            report["runtime_default"] = {
                "precision": default, "top1_agreement": checked["top1_agreement"],
                "max_prob_diff": checked["max_prob_diff"], "img_per_s": round(speed, 1),
                "speedup": round(speed / report["fp32"]["img_per_s"], 2), "single_ms": _latency_ms(fast, bench[0]),
                "path": self.target.name, "size_mb": report["fp32"]["size_mb"],
                "note": f"the same file run in OpenVINO's default precision on this CPU ({default}); foldernet runs "
                        "it in f32 (INFERENCE_PRECISION_HINT=f32), as the parity check did"}
            console.print(f"OpenVINO's default precision here is {default}: {speed:.0f} img/s, top-1 agreement "
                          f"{checked['top1_agreement']:.4f} (foldernet runs the file in f32)")
        if int8:
            def make(k: int, calib: np.ndarray, work: Path, state: dict):
                qdq = self.qdq_plan(k, calib, work, state)
                if qdq is None:
                    return None
                cand = save_ir(qdq, work / f"plan{k}{state['tag']}.openvino", self.meta)
                return cand, OpenVINOClassifier(cand)

            report["int8"] = self.int8(predictor, make, OpenVINOClassifier, bench, module)
        return report

    # --- TFLite ---

    def tflite(self, int8: bool) -> dict:
        from .mobile import TFLiteClassifier, convert_tflite, with_metadata

        console.print("converting to TFLite (LiteRT)...")
        t = time.perf_counter()
        module = _full_model(self.clf)
        tmp = self.out / ".model.export.tflite"
        atomic_write_bytes(tmp, with_metadata(convert_tflite(module, self.size), self.meta))
        console.print("...then the LiteRT interpreter")
        report, predictor, bench = self.check_fp32("tflite", "TFLite", tmp, TFLiteClassifier, time.perf_counter() - t)
        if int8:
            def make(k: int, calib: np.ndarray, work: Path, state: dict):
                from .mobile import _blocks

                net = state["module"]
                if k and k >= len(_blocks(net)):
                    return None
                cand = work / f"plan{k}{state['tag']}.tflite"
                atomic_write_bytes(cand, with_metadata(convert_tflite(net, self.size, calib[:128], k), self.meta))
                return cand, TFLiteClassifier(cand)

            # not equalised: with the first 3 blocks in fp32, litert-torch's PT2E int8 of the equalised demo
            # network agreed with fp32 on 95.5 % of its validation answers, of the network as it is on 100 %
            # (2026-12-07); equalisation is measured to help ONNX Runtime's int8 only
            report["int8"] = self.int8(predictor, make, TFLiteClassifier, bench, module, single=True, equalised=False)
        return report

    # --- Core ML ---

    def coreml(self, int8: bool) -> dict:
        import shutil
        import tempfile

        from .mobile import MAC_CHECK, CoreMLClassifier, can_run_coreml, check_coreml, convert_coreml

        report: dict = {"format": "coreml", "n": 0, "inputs": self.what,
                        "split_files_from": str(self.files[0].parent.parent)}
        module = _full_model(self.clf)
        for precision, name in (("fp32", self.target.name), ("int8", int8_path(self.target).name)):
            if precision == "int8" and not int8:
                continue
            console.print(f"converting to Core ML ({'fp16 compute' if precision == 'fp32' else 'int8 weights'})...")
            t = time.perf_counter()
            model = convert_coreml(module, self.size, self.meta, int8=precision == "int8")
            tmp = Path(tempfile.mkdtemp(prefix=".coreml.", dir=self.out)) / name
            try:
                model.save(str(tmp))
                spec = check_coreml(tmp, self.meta, self.size)
                if spec["problems"]:
                    raise FoldernetError(f"the Core ML conversion is wrong: {'; '.join(spec['problems'])}; not written")
                entry = {"path": name, "export_seconds": round(time.perf_counter() - t, 1), "spec": spec,
                         "size_mb": _size_mb(tmp),
                         "compute": "fp16" if precision == "fp32" else "int8 weights, fp16 activations"}
                if can_run_coreml():
                    checked = self.parity(CoreMLClassifier(tmp), "Core ML")
                    entry.update(top1_agreement=checked["top1_agreement"], max_prob_diff=checked["max_prob_diff"])
                    report["n"] = checked["n"]
                    need = 1.0 if precision == "fp32" else INT8_MIN_AGREEMENT
                    entry["kept"] = checked["top1_agreement"] >= need
                else:
                    entry.update(top1_agreement=None, kept=True, verified=False, note=MAC_CHECK)
                if entry["kept"]:
                    _replace(tmp, self.out / name)
            finally:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            report[precision] = entry
        if not can_run_coreml():
            console.print(f"[yellow]note:[/] {MAC_CHECK}")
        return report

    # --- int8, any format ---

    def int8(self, fp32_predictor, make, predictor_cls, bench: np.ndarray, module, single: bool = False,
             equalised: bool = True) -> dict:
        """Quantise with the fastest plan that agrees with fp32 on a selection split (when none does,
        or only one that keeps blocks in fp32, and ``int8_distill`` allows: the faster plans again on
        weights distilled for int8), then check it on the held-out split like the fp32 file: kept
        when it agrees on >= 99 % and is faster. ``equalised``: the plans quantise the equalised copy of
        ``module`` (ONNX Runtime's quantiser, per-channel weights), else ``module`` itself."""
        _, splits = split_files(self.model_dir, self.data)
        train = splits.get("train") or self.files
        calib_files = _sample(train, 128)
        calib = np.concatenate([fp32_predictor.pixels(p) for p in calib_files])
        # choose the plan on the validation split when the check runs on a test split; without one, on
        # the check split itself (training images would flatter int8: the head fits them with wide margins)
        if splits.get("test") and splits.get("val"):
            select_files, select_split = _sample(splits["val"], 300, seed=1), "val"
        else:
            select_files, select_split = self.files, "the check split itself (no separate validation split)"
        select_ref, ok_sel, _ = fp32_predictor.predict_proba(select_files)
        path8 = int8_path(self.target)
        import tempfile

        work = Path(tempfile.mkdtemp(prefix=".int8.", dir=self.out))
        tried, best, distilled_info = [], None, None
        # every round quantises the equalised copy (the same function in fp32, rounded better in int8), or,
        # for a quantiser equalisation does not help, the network as it is
        base, equalised_info = equalise(module, calib) if equalised else (module, {"pairs": 0, "used": False})
        rounds = {"never": (False,), "auto": (False, True), "always": (True,)}[self.distill_mode]

        def better(k: int, agree: float) -> bool:
            """An agreeing plan beats any that does not, and among agreeing plans the faster (fewer
            fp32 blocks) wins; among the rest, the higher agreement."""
            if best is None:
                return True
            ok, best_ok = agree >= INT8_SELECT_AGREEMENT, best[1] >= INT8_SELECT_AGREEMENT
            return (ok and (not best_ok or k < best[3])) or (not ok and not best_ok and agree > best[1])

        try:
            for distilled in rounds:
                # distil only when it can win: nothing agreed yet, or only a plan slower than all-int8
                plans = [k for k in INT8_PLANS if best is None or best[1] < INT8_SELECT_AGREEMENT or k < best[3]]
                if not plans:
                    break
                state: dict = {"module": base, "tag": "e"}
                if distilled:
                    t = time.perf_counter()
                    rows = np.concatenate([fp32_predictor.pixels(p) for p in _sample(train, 512)])[:1024]
                    state["module"], distilled_info = distill(base, rows, calib)
                    state["tag"] = "d"
                    distilled_info["seconds"] = round(time.perf_counter() - t, 1)
                for k in plans:
                    made = make(k, calib, work, state)
                    if made is None:
                        break
                    cand, predictor = made
                    got, ok, _ = predictor.predict_proba(select_files)
                    m = ok & ok_sel
                    agree = float(np.mean(got[m].argmax(1) == select_ref[m].argmax(1))) if m.any() else 0.0
                    name = plan_name(k, distilled)
                    tried.append({"plan": name, "selection_agreement": round(agree, 4)})
                    console.print(f"int8 plan '{name}': agreement {agree:.4f} on {int(m.sum())} images of "
                                  f"{select_split}")
                    if better(k, agree):
                        best = (name, agree, cand, k)
                    if agree >= INT8_SELECT_AGREEMENT:
                        break
            chosen, _, cand, _ = best
            _replace(cand, path8)
        finally:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        clf8 = predictor_cls(path8)
        checked = self.parity(clf8, "int8")
        answered = {k: checked[k] for k in ("answered_top1_agreement", "answered") if k in checked}
        agree8, diff8 = checked["top1_agreement"], checked["max_prob_diff"]
        speed32 = _throughput(fp32_predictor, bench, repeats=1 if single else 3)
        speed8 = _throughput(clf8, bench, repeats=1 if single else 3)
        size32, size8 = _size_mb(self.target), _size_mb(path8)
        faster = speed8 > speed32
        keep = agree8 >= INT8_MIN_AGREEMENT and (faster or self.prefer_size)
        reason = ("kept: " + ("faster" if faster else "smaller, as asked")) if keep else (
            f"not kept: top-1 agreement {agree8:.4f} < {INT8_MIN_AGREEMENT}" if agree8 < INT8_MIN_AGREEMENT else
            f"not kept: slower than fp32 here ({speed8:.1f} vs {speed32:.1f} img/s); pass --prefer-size to keep "
            f"the {size8:.1f} MB file anyway")
        single_ms = _latency_ms(clf8, bench[0])
        if not keep:
            _remove(path8)
        console.print(f"int8: {reason}")
        return {"top1_agreement": agree8, "max_prob_diff": diff8, "img_per_s": round(speed8, 1),
                "fp32_img_per_s": round(speed32, 1), "speedup": round(speed8 / speed32, 2),
                "single_ms": single_ms, "size_mb": round(size8, 2), "fp32_size_mb": round(size32, 2), "kept": keep,
                "reason": reason, "path": path8.name if keep else None, "plan": chosen,
                "plans_tried": tried, "selection_split": select_split, "calibration_images": len(calib_files),
                "equalisation": equalised_info, "distillation": distilled_info, **answered}


def _sample(files: list[Path], n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [files[i] for i in sorted(rng.permutation(len(files))[:n])]


def table_rows(folder: Path) -> list[dict]:
    """One row per format and precision exported into ``folder``: file, size, agreement, speed."""
    rows = []
    for fmt, name in PARITY.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        for precision in ("fp32", "runtime_default", "int8"):
            r = report.get(precision)
            if not r:
                continue
            label = precision if not (fmt == "coreml" and precision == "fp32") else "fp16"
            if precision == "runtime_default":  # the fp32 file, run in the runtime's own default precision
                rows.append({"format": fmt, "precision": f"{r['precision']} (runtime default)", "file": r["path"],
                             "size_mb": r.get("size_mb"), "top1_agreement": r.get("top1_agreement"),
                             "single_ms": r.get("single_ms"), "img_per_s": r.get("img_per_s"),
                             "status": "same file; foldernet runs it in f32"})
                continue
            if r.get("kept") is False or not r.get("path"):
                reason = r.get("reason", "")
                status = ("not kept: agreement" if "agreement" in reason else
                          "not kept: slower" if "slower" in reason else "not written")
            elif r.get("verified") is False:
                status = "unverified (needs macOS)"
            else:
                status = "kept"
            rows.append({"format": fmt, "precision": label, "file": r.get("path") or "-",
                         "size_mb": r.get("size_mb"), "top1_agreement": r.get("top1_agreement"),
                         "single_ms": r.get("single_ms"), "img_per_s": r.get("img_per_s"), "status": status})
    return rows


def write_table(folder: Path) -> Path:
    """``report.md``: the size/latency table of every model file in the export folder."""
    rows = table_rows(folder)
    cols = ["format", "precision", "file", "size_mb", "top1_agreement", "single_ms", "img_per_s", "status"]
    lines = ["# foldernet export", "",
             f"Measured on this machine ({os.cpu_count()} CPU cores). top1_agreement: with the PyTorch model "
             "on the held-out split; single_ms: one preprocessed image through the model; img_per_s: batch 32 "
             "for ONNX Runtime and OpenVINO, one image at a time for TFLite.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{v:.4f}" if k == "top1_agreement" and isinstance(v, float) else ("" if v is None else str(v))
                 for k, v in ((c, r[c]) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    path = folder / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
