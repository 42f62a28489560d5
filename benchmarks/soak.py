"""Soak: `foldernet serve` under 32 clients for 5 minutes on 127.0.0.1 with a mix of good and bad
uploads (truncated, HTML named .jpg, empty, random bytes, a pixel bomb). Bounded; stops by itself.
Targets: 0 5xx errors, every bad upload answered 4xx, memory stable (RSS by quarter of the run).

    python benchmarks/soak.py [--seconds 300] [--clients 32]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _common import print_table  # noqa: E402
from _load import demo_bundle, load_served_run  # noqa: E402


def payloads(files: list[Path]) -> list[tuple[str, bytes, bool]]:
    from corpus.make_corpus import _png_bomb

    good = []
    for f in files[:40]:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").resize((320, 240)).save(buf, "JPEG")
        good.append((f.stem + ".jpg", buf.getvalue(), True))
    rng = np.random.default_rng(0)
    bad = [("empty.jpg", b"", False), ("page.jpg", b"<html>not found</html>", False),
           ("trunc.jpg", good[0][1][:300], False), ("noise.png", rng.bytes(5000), False),
           ("bomb.png", _png_bomb(), False), ("../../etc/passwd", b"\x00" * 64, False)]
    return good + bad  # about 1 in 8 uploads is bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="foldernet-soak-") as tmp:
        run, files = demo_bundle(Path(tmp))
        res = load_served_run(run, payloads(files), args.clients, args.seconds)
    res.update({"clients": args.clients, "seconds": args.seconds,
                "bad_all_4xx": res["bad_answered_4xx"] == res["bad_uploads"],
                "rss_growth_last_half_mb": round(res["rss_quarters_mb"][3] - res["rss_quarters_mb"][1], 1)})
    print_table([res], ["clients", "seconds", "requests", "bad_uploads", "bad_all_4xx", "errors_5xx", "p50_ms",
                        "p99_ms", "rss_start_mb", "rss_quarters_mb", "rss_growth_last_half_mb"], "soak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
