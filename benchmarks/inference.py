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
    print_table(rows, ["engine", "img_per_s_b32", "single_ms", "speedup_vs_eager", "gflop_per_s", "fraction_of_peak",
                       "model_gflop_per_img", "peak_gflop_per_s", "int8_top1_agreement", "int8_kept_by_export"],
                "inference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
