"""Atomic writes and run folders: an interrupted command never leaves a half-written file that
looks complete, and an existing run is never overwritten without ``force``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FoldernetError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    # file names that are not valid UTF-8 are written with backslash escapes rather than crash
    return atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_csv(path: str | os.PathLike, header: list[str], rows) -> Path:
    """A CSV written atomically; each row is a sequence, or a dict read by ``header`` (missing -> "")."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([row.get(k, "") for k in header] if isinstance(row, dict) else row)
    return atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return o.as_posix()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_new_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to touch an existing, non-empty output folder unless ``force``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FoldernetError(f"{out} already exists. Choose another --out, or pass --force to replace it.")
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False, partial: bool = False, resume: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    A crash leaves ``out`` as it was, never a half-written run. With ``partial`` the folder is
    ``.OUT.partial`` and survives a crash (it holds checkpoints), so ``resume`` can continue it.
    """
    out = Path(out).expanduser()
    if not resume:
        out = check_new_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial:
        tmp = out.parent / f".{out.name}.partial"
        if tmp.exists() and not resume:
            if not force:
                raise FoldernetError(f"an interrupted run of {out} exists in {tmp}. Pass --resume to continue it, "
                                     "or --force to start over.")
            shutil.rmtree(tmp)
        if resume and not tmp.exists():
            raise FoldernetError(f"nothing to resume: {tmp} does not exist (start the run without --resume)")
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        if not partial:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise FoldernetError(f"missing file: {path}") from exc
    except json.JSONDecodeError as exc:
        raise FoldernetError(f"{path} is not valid JSON ({exc}); the file may be damaged") from exc
