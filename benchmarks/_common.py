"""Shared by the benchmarks: where the real datasets live, and how results are printed."""

from __future__ import annotations

import json
from pathlib import Path

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def print_table(rows: list[dict], cols: list[str], name: str) -> None:
    """A plain aligned table, then one JSON line per row tagged with the benchmark's name."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print(json.dumps({"benchmark": name, **r}))
