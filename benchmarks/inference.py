"""Inference speed of the default backbone (+ head): torch eager vs ONNX Runtime fp32 vs int8.

For each engine: images/s at batch 32 and median single-image latency, on preprocessed tensors.
Also the model's FLOPs per image (torch's FlopCounterMode), the achieved GFLOP/s, and this
machine's measured fp32 peak (the best of torch, NumPy and ONNX Runtime on a 4096^2 float32 matrix
product on all cores), so the figures can be judged against the hardware. The bundle is trained on the demo digits (data shipped by
scikit-learn), so this runs anywhere.

    python benchmarks/inference.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402


def measured_peak_gflops(threads: int, n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of an n x n float32 matrix product in torch, NumPy and ONNX Runtime on ``threads``
    cores; the best of them stands for this machine's practical fp32 peak."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    def best_of(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / min(times) / 1e9

    torch.set_num_threads(threads)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b", "c")]
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", spec[:2],
                                                spec[2:]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return {"torch": best_of(lambda: torch.mm(ta, tb)), "numpy": best_of(lambda: a @ a),
            "onnxruntime": best_of(lambda: sess.run(None, {"a": a, "b": a}))}


def model_gflops(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def conv_kind(weight_shape: list[int]) -> str:
    """A convolution by its weight shape [out, in/groups, kh, kw]: pointwise (1x1), depthwise (one input
    channel per output) or full (the stem)."""
    if weight_shape[2:] == [1, 1]:
        return "pointwise conv (1x1)"
    return "depthwise conv" if weight_shape[1] == 1 else "full conv (stem)"


def op_profile(onnx_path: Path, batch: np.ndarray, threads: int, peak: float, runs: int = 5) -> list[dict]:
    """Where ONNX Runtime's fp32 time goes, from its own profiler: per kind of operation, the share of
    kernel time and of FLOPs and the GFLOP/s it reaches (FLOPs from each kernel's input and output
    shapes). The first run is a warm-up (allocations), each kernel's median over the rest counts."""
    import json
    from collections import defaultdict

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(onnx_path.parent / "ort-profile")
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: batch}
    walls = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        sess.run(None, feed)
        walls.append(time.perf_counter() - t)
    events = json.loads(Path(sess.end_profiling()).read_text())
    durations, kinds, flops = defaultdict(list), {}, {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name, args = e["name"], e["args"]
        durations[name].append(e["dur"] / 1e6)
        if name in kinds:
            continue
        shapes_in = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
        shapes_out = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
        op, out = args.get("op_name", "?"), int(np.prod(shapes_out[0])) if shapes_out else 0
        if op == "Conv" and len(shapes_in) > 1:
            w = shapes_in[1]
            kinds[name], flops[name] = conv_kind(w), 2.0 * out * w[1] * w[2] * w[3]
        elif op in ("Gemm", "MatMul") and len(shapes_in) > 1:
            kinds[name], flops[name] = "head (Gemm)", 2.0 * out * shapes_in[0][-1]
        else:
            kinds[name], flops[name] = f"other ({op})" if op in ("ReorderInput", "ReorderOutput") else \
                "other (pooling, softmax, layout)", 0.0
    per_kind_s, per_kind_flops, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, ds in durations.items():
        per_kind_s[kinds[name]] += float(np.median(ds[1:] if len(ds) > 1 else ds))
        per_kind_flops[kinds[name]] += flops[name]
        count[kinds[name]] += 1
    total_s, total_flops = sum(per_kind_s.values()), sum(per_kind_flops.values())
    rows = []
    for kind in sorted(per_kind_s, key=per_kind_s.get, reverse=True):
        sec, fl = per_kind_s[kind], per_kind_flops[kind]
        rows.append({"operation": kind, "kernels": count[kind], "time_share": round(sec / total_s, 3),
                     "flop_share": round(fl / total_flops, 3) if total_flops else 0.0,
                     "ms_per_batch": round(sec * 1e3, 1),
                     "gflop_per_s": round(fl / sec / 1e9, 1) if fl else "",
                     "fraction_of_peak": round(fl / sec / 1e9 / peak, 3) if fl else ""})
    wall = float(np.median(walls[1:]))
    rows.append({"operation": "all kernels / wall", "kernels": sum(count.values()),
                 "time_share": round(total_s / wall, 3),
                 "flop_share": 1.0, "ms_per_batch": round(wall * 1e3, 1),
                 "gflop_per_s": round(total_flops / wall / 1e9, 1),
                 "fraction_of_peak": round(total_flops / wall / 1e9 / peak, 3)})
    return rows


def time_engine(run, batch: np.ndarray, repeats: int) -> tuple[float, float]:
    """(images/s at this batch size, median single-image latency in ms)."""
    run(batch)
    t = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    ips = len(batch) * repeats / (time.perf_counter() - t)
    one = batch[:1]
    run(one)
    lat = []
    for _ in range(max(20, 4 * repeats)):
        t = time.perf_counter()
        run(one)
        lat.append((time.perf_counter() - t) * 1000)
    return ips, statistics.median(lat)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    import foldernet
    from foldernet.demo import write_digits
    from foldernet.export import _full_model
    from foldernet.onnx_predictor import OnnxClassifier

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="foldernet-inference-") as tmp:
        os.environ.setdefault("FOLDERNET_CACHE", str(Path(tmp) / "cache"))
        data = write_digits(Path(tmp) / "digits", per_class=20)
        run = foldernet.train(data, out=Path(tmp) / "run", progress=False).run_dir
        report = foldernet.export(run, int8=True)
        clf = foldernet.load(run, engine="torch", use_cache=False)
        model = _full_model(clf)
        size = clf.preprocess.size
        files = sorted(data.rglob("*.png"))[:32]
        batch = np.concatenate([clf.extractor.pixels(f) for f in files])
        flops = model_gflops(model, size)

        def torch_run(x, channels_last=False):
            with torch.inference_mode():
                t = torch.from_numpy(x)
                return model(t.contiguous(memory_format=torch.channels_last) if channels_last else t)

        rows = []
        engines = [("torch eager", lambda x: torch_run(x))]
        model_cl = model.to(memory_format=torch.channels_last)
        engines.append(("torch eager channels_last", lambda x: (model_cl, torch_run(x, True))[1]))
        fp32 = OnnxClassifier(run / "export" / "model.onnx", threads=args.threads)
        engines.append(("onnxruntime fp32", fp32.run))
        int8_path = run / "export" / "model.int8.onnx"
        if not int8_path.exists():  # the export declined to keep it; time it anyway, and say so
            from foldernet.export import quantize_int8

            int8_path = quantize_int8(run / "export" / "model.onnx", Path(tmp) / "timing.int8.onnx", batch)
        engines.append(("onnxruntime int8", OnnxClassifier(int8_path, threads=args.threads).run))
        peaks = measured_peak_gflops(args.threads)
        peak = max(peaks.values())
        for name, fn in engines:
            ips, lat = time_engine(fn, batch, args.repeats)
            rows.append({"engine": name, "img_per_s_b32": round(ips, 1), "single_ms": round(lat, 2),
                         "gflop_per_s": round(ips * flops, 1), "fraction_of_peak": round(ips * flops / peak, 3)})
        eager = rows[0]["img_per_s_b32"]
        for r in rows:
            r["speedup_vs_eager"] = round(r["img_per_s_b32"] / eager, 2)
        q = report.get("int8", {})
        for r in rows:
            r.update({"threads": args.threads, "model_gflop_per_img": round(flops, 3),
                      "peak_gflop_per_s": round(peak, 1),
                      "matmul_gflop_per_s": {k: round(v, 1) for k, v in peaks.items()}})
            if r["engine"] == "onnxruntime int8":
                r["int8_top1_agreement"] = q.get("top1_agreement")
                r["int8_size_mb"] = q.get("size_mb")
                r["int8_kept_by_export"] = q.get("kept")
        rows.append({"engine": "targets", "img_per_s_b32": ">= 100 (fp32)", "single_ms": "<= 10",
                     "speedup_vs_eager": ">= 2 (ORT)"})
        ops = op_profile(run / "export" / "model.onnx", batch, args.threads, peak)
    print_table(rows, ["engine", "img_per_s_b32", "single_ms", "speedup_vs_eager", "gflop_per_s", "fraction_of_peak",
                       "model_gflop_per_img", "peak_gflop_per_s", "int8_top1_agreement", "int8_kept_by_export"],
                "inference")
    print_table(ops, ["operation", "kernels", "time_share", "flop_share", "ms_per_batch", "gflop_per_s",
                      "fraction_of_peak"], "inference_fp32_by_operation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
