"""Collect labelled images: from a URL list (``foldernet collect``) or from videos (``foldernet frames``).

Downloads are concurrent but bounded, time out, retry transient failures with exponential
backoff, refuse files over a size limit, check that the bytes really are an image (never trusting
the extension or the Content-Type alone), and name each file by its content hash, so a file seen
twice is stored once (the first row of the list that holds it is "ok", later ones "duplicate", whatever
order the downloads finish in). Every row gets a status in ``collect_log.csv``; a re-run skips what is done.
Frames keep their source video as their group in ``groups.csv``, so splits keep a video together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import FoldernetError
from .io import atomic_write_bytes, atomic_write_csv
from .progress import progress_bar

LOG_NAME = "collect_log.csv"
GROUPS_NAME = "groups.csv"
DONE = {"ok", "duplicate"}
PERMANENT = {"not an image", "too large", "bad url"}  # not retried on a re-run (http 4xx neither)
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
              "MPO": ".jpg"}
SAFE_LABEL = re.compile(r"^[^/\\\x00]+$")


@dataclass
class Row:
    url: str
    label: str
    group: str = ""


def read_list(path: str | os.PathLike) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise FoldernetError(f"URL list not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "url" not in fields or "label" not in fields:
            raise FoldernetError(f"{path}: expected a header with columns url,label (and optionally group); "
                                 f"found {reader.fieldnames}")
        rows = []
        for n, raw in enumerate(reader, start=2):
            r = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            label = r.get("label", "")
            if not r.get("url"):
                continue
            if not label or not SAFE_LABEL.match(label) or label in (".", ".."):
                raise FoldernetError(f"{path} line {n}: label {label!r} cannot be a folder name")
            rows.append(Row(r["url"], label, r.get("group", "")))
    return rows


def _read_log(path: Path) -> dict[tuple[str, str], dict]:
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["url"], r["label"]): r for r in csv.DictReader(f)}


def _sniff(data: bytes) -> str | None:
    from PIL import Image

    from .data import MAX_PIXELS

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] > MAX_PIXELS:
                return None
            img.load()
            return img.format
    except Exception:  # noqa: BLE001 - anything Pillow cannot decode is not an image for us
        return None


class Downloader:
    def __init__(self, out: Path, timeout: float, retries: int, max_bytes: int, backoff: float = 0.5):
        import httpx

        self.out, self.retries, self.max_bytes, self.backoff = out, retries, max_bytes, backoff
        self.client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout),
                                   headers={"User-Agent": "foldernet-collect/1"}, max_redirects=5)
        self.lock = threading.Lock()

    def fetch(self, row: Row) -> dict:
        import httpx

        result = {"url": row.url, "label": row.label, "group": row.group, "status": "", "file": "", "bytes": 0,
                  "attempts": 0}
        if not re.match(r"^https?://", row.url):
            result["status"] = "bad url"
            return result
        for attempt in range(self.retries + 1):
            result["attempts"] = attempt + 1
            try:
                status, data = self._get(row.url)
            except httpx.TooManyRedirects:
                result["status"] = "too many redirects"
                return result
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                result["status"] = f"network error: {type(exc).__name__}"
                time.sleep(self.backoff * 2 ** attempt)
                continue
            if status == "too large":
                result["status"] = "too large"
                return result
            if isinstance(status, int) and status != 200:
                result["status"] = f"http {status}"
                if status == 429 or status >= 500:
                    time.sleep(self.backoff * 2 ** attempt)
                    continue
                return result
            return self._store(row, data, result)
        return result

    def _get(self, url: str):
        with self.client.stream("GET", url) as resp:
            if resp.status_code != 200:
                return resp.status_code, b""
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                return "too large", b""
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) > self.max_bytes:
                    return "too large", b""
            return 200, bytes(buf)

    def _store(self, row: Row, data: bytes, result: dict) -> dict:
        fmt = _sniff(data)
        if fmt is None:
            result["status"] = "not an image"
            return result
        name = hashlib.sha256(data).hexdigest()[:20] + FORMAT_EXT.get(fmt, ".img")
        target = self.out / row.label / name
        result["file"] = f"{row.label}/{name}"
        result["bytes"] = len(data)
        with self.lock:
            if not target.exists():  # the same bytes under the same label are stored once
                atomic_write_bytes(target, data)
        result["status"] = "ok"  # collect() then marks every row but the list's first of a file "duplicate"
        return result


def collect(url_list: str | os.PathLike, out: str | os.PathLike, workers: int = 8, timeout: float = 20.0,
            retries: int = 3, max_mb: float = 20.0, progress: bool = True, backoff: float = 0.5) -> dict:
    """Download every row of ``url_list`` (url,label[,group]) into ``out/<label>/<content hash>.<ext>``."""
    from .params import check

    o = check("collect", {"workers": workers, "timeout": timeout, "retries": retries, "max_mb": max_mb})
    workers, timeout, retries, max_mb = o["workers"], o["timeout"], o["retries"], o["max_mb"]
    rows = read_list(url_list)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    previous = _read_log(log_path)

    def done(key: tuple[str, str]) -> bool:
        st = previous.get(key, {}).get("status", "")
        return st in DONE or st.startswith("duplicate") or st in PERMANENT or (st.startswith("http 4")
                                                                                 and st != "http 429")

    keys = list(dict.fromkeys((r.url, r.label) for r in rows))  # the same url and label is fetched once
    first_row = {}
    for r in rows:
        first_row.setdefault((r.url, r.label), r)
    todo = [first_row[k] for k in keys if not done(k)]
    dl = Downloader(out, timeout, retries, int(max_mb * 1024 * 1024), backoff)
    results = dict(previous)
    fields = ["url", "label", "group", "status", "file", "bytes", "attempts"]
    log_lock = threading.Lock()
    new_log = not log_path.exists()
    with open(log_path, "a", newline="", encoding="utf-8") as logf, progress_bar(len(todo), "collect", progress) as bar:
        writer = csv.DictWriter(logf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        if new_log:
            writer.writeheader()

        def work(r: Row) -> None:
            res = dl.fetch(r)
            with log_lock:  # append as we go: an interrupted run keeps what it finished
                writer.writerow(res)
                logf.flush()
                results[(r.url, r.label)] = res
                bar.advance(1)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(work, todo))
    dl.client.close()
    # One log line per row of the list, in its order. The first row that holds a file is "ok"; a later
    # row with the same file (the url listed again, or other bytes-identical content) says whose
    # duplicate it is, so the log does not depend on which download thread finished first.
    per_row: list[dict] = []
    owner: dict[str, int] = {}
    for n, r in enumerate(rows, start=2):  # line numbers of the list, its header being line 1
        res = dict(results.get((r.url, r.label), {}), url=r.url, label=r.label, group=r.group)
        status = res.get("status", "")
        if (status in DONE or status.startswith("duplicate")) and res.get("file"):
            if res["file"] in owner:
                res["status"] = f"duplicate of line {owner[res['file']]} ({res['file']})"
            else:
                res["status"] = "ok"
                owner[res["file"]] = n
        per_row.append(res)
    atomic_write_csv(log_path, fields, per_row)
    groups = {res["file"]: res["group"] for res in per_row
              if res.get("status") == "ok" and res.get("group")}  # the group of the row that owns the file
    if groups:
        merge_groups(out, groups)
    counts: dict[str, int] = {}
    for res in per_row:
        st = res.get("status") or "not tried"
        key = "http 4xx/5xx" if st.startswith("http ") else "duplicate" if st.startswith("duplicate") else st
        counts[key] = counts.get(key, 0) + 1
    return {"rows": len(rows), "skipped_as_done": len(rows) - len(todo), "status": counts, "log": str(log_path)}


def merge_groups(root: Path, groups: dict[str, str]) -> Path:
    """Add path->group rows to ``root/groups.csv`` (read by train/split as --group-by csv:...)."""
    path = root / GROUPS_NAME
    existing: dict[str, str] = {}
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            existing = {r["path"]: r["group"] for r in csv.DictReader(f)}
    existing.update(groups)
    return atomic_write_csv(path, ["path", "group"], ([p, existing[p]] for p in sorted(existing)))


def extract_frames(videos: list[str | os.PathLike], out: str | os.PathLike, every: float = 0.5,
                   max_frames: int | None = None, quality: int = 92) -> dict:
    """Save a frame every ``every`` seconds of each video as JPEG into ``out`` (a class folder), and
    record the video as each frame's group in ``out/../groups.csv``."""
    from .params import check

    o = check("frames", {"every": every, "max_frames": max_frames})
    every, max_frames = o["every"], o["max_frames"]
    import av

    if every <= 0:
        raise FoldernetError("--every must be a positive number of seconds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, str] = {}
    per_video: dict[str, int] = {}
    for video in videos:
        video = Path(video)
        if not video.is_file():
            raise FoldernetError(f"video not found: {video}")
        try:
            container = av.open(str(video))
        except Exception as exc:  # noqa: BLE001 - unreadable video: say which and why
            raise FoldernetError(f"cannot open video {video}: {exc}") from exc
        saved = 0
        with container:
            if not container.streams.video:
                raise FoldernetError(f"{video} has no video stream")
            stream = container.streams.video[0]
            next_t = 0.0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else saved * every
                if t + 1e-6 < next_t:
                    continue
                name = f"{video.stem}_t{int(round(t * 1000)):08d}.jpg"
                buf = io.BytesIO()
                frame.to_image().save(buf, "JPEG", quality=quality)
                atomic_write_bytes(out / name, buf.getvalue())
                groups[f"{out.name}/{name}"] = video.stem
                saved += 1
                next_t = t + every
                if max_frames and saved >= max_frames:
                    break
        per_video[str(video)] = saved
    merge_groups(out.parent, groups)
    return {"frames": per_video, "groups": str(out.parent / GROUPS_NAME)}
