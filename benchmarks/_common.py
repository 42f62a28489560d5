"""Shared by the benchmarks: where the real datasets live, and how results are printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def dataset(relpath: str, what: str = "") -> Path | None:
    """``DATASETS/relpath`` when it is there; else None, after saying which part is skipped."""
    path = DATASETS / relpath
    if path.is_dir():
        return path
    print(f"skip{' ' + what if what else ''}: {path} not found", file=sys.stderr)
    return None


def print_table(rows: list[dict], cols: list[str], name: str) -> None:
    """A plain aligned table, then one JSON line per row tagged with the benchmark's name."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print(json.dumps({"benchmark": name, **r}))
