"""Load generation against a foldernet server on 127.0.0.1: bounded in clients and time, it stops
by itself. Shared by serve_load.py (good uploads, 60 s) and soak.py (good and bad, 5 minutes)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(run: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "foldernet.cli", "serve", str(run), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


async def _client(url: str, payloads: list[tuple[str, bytes, bool]], stop: float, out: list, seed: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        k = seed
        while time.perf_counter() < stop:
            name, data, good = payloads[k % len(payloads)]
            k += 7
            t = time.perf_counter()
            try:
                r = await client.post(url, files={"file": (name, data, "application/octet-stream")})
                status = r.status_code
            except Exception:  # noqa: BLE001 - a dropped connection counts as an error
                status = 0
            out.append((time.perf_counter() - t, status, good))


def run_load(port: int, payloads: list[tuple[str, bytes, bool]], clients: int, seconds: float, pid: int) -> dict:
    """``clients`` concurrent clients post ``payloads`` for ``seconds``; returns latency/status/memory figures."""
    results: list = []
    mem = [rss_mb(pid)]

    async def main() -> None:
        stop = time.perf_counter() + seconds

        async def sample() -> None:
            while time.perf_counter() < stop:
                await asyncio.sleep(1)
                mem.append(rss_mb(pid))

        await asyncio.gather(sample(), *(_client(f"http://127.0.0.1:{port}/predict", payloads, stop, results, i)
                                          for i in range(clients)))

    t = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t
    lat = sorted(r[0] for r in results if r[1] == 200)
    codes: dict[int, int] = {}
    for _, status, _ in results:
        codes[status] = codes.get(status, 0) + 1
    good = [r for r in results if r[2]]
    bad = [r for r in results if not r[2]]
    return {
        "requests": len(results), "req_per_s": round(len(results) / wall, 1),
        "ok_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
        "errors_5xx": sum(v for k, v in codes.items() if k >= 500 or k == 0),
        "good_not_200": sum(1 for r in good if r[1] != 200), "bad_uploads": len(bad),
        "bad_answered_4xx": sum(1 for r in bad if 400 <= r[1] < 500),
        "status_counts": {str(k): v for k, v in sorted(codes.items())},
        "rss_start_mb": round(mem[0], 1), "rss_end_mb": round(mem[-1], 1), "rss_peak_mb": round(max(mem), 1),
        # RSS at each quarter of the run: a plateau is a warm-up, a steady climb is a leak
        "rss_quarters_mb": [round(mem[min(len(mem) - 1, int(len(mem) * q))], 1) for q in (0.25, 0.5, 0.75, 1.0)],
    }


def load_served_run(run: Path, payloads: list[tuple[str, bytes, bool]], clients: int, seconds: float) -> dict:
    """Start `foldernet serve run` on a free loopback port, load it, always stop it."""
    port = free_port()
    proc = start_server(run, port)
    try:
        return run_load(port, payloads, clients, seconds, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def demo_bundle(tmp: Path, export: bool = True) -> tuple[Path, list[Path]]:
    """A small trained (and exported) bundle on the demo digits, and its image files."""
    import foldernet
    from foldernet.demo import write_digits

    os.environ.setdefault("FOLDERNET_CACHE", str(tmp / "cache"))
    data = write_digits(tmp / "digits", per_class=20)
    run = foldernet.train(data, out=tmp / "run", progress=False).run_dir
    if export:
        foldernet.export(run)
    return run, sorted(data.rglob("*.png"))
