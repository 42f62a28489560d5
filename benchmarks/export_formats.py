"""Every export format on real bundles: size, top-1 agreement with PyTorch, speed, and whether int8
was kept (it must agree on >= 99 % of the held-out split and be faster).

Bundles: the demo digits (`foldernet demo`'s data: scikit-learn's digits, 50 per class, runs
anywhere), hymenoptera and clothing from ../shared/datasets (skipped when absent), each trained with
default settings. Formats: ONNX fp32/int8 always; TFLite fp32/int8 and Core ML fp16/int8 when the
mobile extra is installed (Core ML is only spec-checked on Linux).

    python benchmarks/export_formats.py [--datasets demo,hymenoptera,clothing] [--formats onnx,tflite,coreml]
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
    ap.add_argument("--formats", default="onnx,tflite,coreml")
    args = ap.parse_args()
    import foldernet
    from foldernet.demo import write_digits
    from foldernet.export import table_rows

    formats = [f for f in args.formats.split(",")
               if f == "onnx" or importlib.util.find_spec("litert_torch" if f == "tflite" else "coremltools")]
    skipped = sorted(set(args.formats.split(",")) - set(formats))
    if skipped:
        print(f"skip {','.join(skipped)}: pip install 'foldernet[mobile]'", file=sys.stderr)
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
            for r in table_rows(run / "export"):
                rep = reports[r["format"]]
                q = rep.get("int8", {}) if r["precision"] == "int8" else {}
                rows.append({"dataset": name, "held_out": rep["n"], **r,
                             "speedup_vs_fp32": q.get("speedup", ""), "int8_plan": q.get("plan", ""),
                             "answered_agreement": round(q["answered_top1_agreement"], 4)
                             if "answered_top1_agreement" in q else "",
                             "export_s": rep["seconds"]})
    rows.append({"dataset": "targets", "precision": "int8", "top1_agreement": ">= 0.99 (kept)",
                 "speedup_vs_fp32": ">= 1.8 (ONNX, b32)", "status": "kept on every dataset"})
    print_table(rows, ["dataset", "format", "precision", "held_out", "size_mb", "top1_agreement", "answered_agreement",
                       "single_ms", "img_per_s", "speedup_vs_fp32", "int8_plan", "status", "export_s"],
                "export_formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
