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


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """", <CPU model> (<its bf16/int8 matrix features>)": the figures depend on them (OpenVINO's bf16 and
    int8 kernels use AMX where it exists), and the machines that run these benchmarks differ."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni") if f in flags]
    return f", {model}" + (f" ({' '.join(extras)})" if extras else "") if model else ""


def record(rows: list[dict], cols: list[str], name: str) -> None:
    """Replace this benchmark's section of benchmarks/RESULTS.md with the new table (with the date
    and machine), so the figures that code and docs quote live in one regenerated place."""
    import os
    import platform
    import re
    import time

    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    cmd = f"python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}".strip()
    section = (f"## {name}\n\n`{cmd}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
               f"{platform.machine()}{cpu_model()}\n\n" + "\n".join(table) + "\n")
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")


def print_table(rows: list[dict], cols: list[str], name: str) -> None:
    """A plain aligned table, then one JSON line per row tagged with the benchmark's name; the table
    is also recorded in benchmarks/RESULTS.md."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print(json.dumps({"benchmark": name, **r}))
    record(rows, cols, name)
