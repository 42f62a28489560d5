"""32 concurrent clients against `foldernet serve` on 127.0.0.1 for 60 s (bounded; stops by itself).

Reports errors, p50/p99 latency, throughput, peak server memory, and throughput as a fraction of
the bare model's batch throughput (ONNX Runtime, batch 32, preprocessed tensors) measured first.
The clients run on the same 2 cores as the server, so they take their share of the CPU.

    python benchmarks/serve_load.py [--clients 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATASETS, print_table  # noqa: E402
from _load import demo_bundle, load_served_run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    from foldernet.onnx_predictor import OnnxClassifier

    with tempfile.TemporaryDirectory(prefix="foldernet-serve-load-") as tmp:
        run, files = demo_bundle(Path(tmp))
        clf = OnnxClassifier(run / "export" / "model.onnx")
        batch = np.concatenate([clf.pixels(f) for f in files[:32]])
        clf.run(batch)
        t = time.perf_counter()
        for _ in range(5):
            clf.run(batch)
        bare = 32 * 5 / (time.perf_counter() - t)
        # realistic uploads: photos when the datasets are here, else the digits as JPEG
        photos = sorted((DATASETS / "hymenoptera" / "val").rglob("*.jpg"))[:64]
        if photos:
            payloads = [(p.name, p.read_bytes(), True) for p in photos]
        else:
            payloads = []
            for f in files[:64]:
                buf = io.BytesIO()
                Image.open(f).convert("RGB").resize((400, 300)).save(buf, "JPEG")
                payloads.append((f.name, buf.getvalue(), True))
        res = load_served_run(run, payloads, args.clients, args.seconds)
    res.update({"clients": args.clients, "seconds": args.seconds, "bare_model_img_per_s": round(bare, 1),
                "fraction_of_bare": round(res["ok_per_s"] / bare, 3),
                "uploads": "hymenoptera photos" if photos else "digits as JPEG"})
    print_table([res], ["clients", "seconds", "requests", "ok_per_s", "p50_ms", "p99_ms", "errors_5xx",
                        "bare_model_img_per_s", "fraction_of_bare", "rss_start_mb", "rss_peak_mb"], "serve_load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
