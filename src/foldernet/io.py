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


MARKER = ".foldernet.json"  # in every folder foldernet creates as an output: what wrote it, and when


def write_marker(folder: Path, kind: str) -> None:
    import time

    from . import __version__

    atomic_write_json(folder / MARKER, {"kind": kind, "foldernet_version": __version__,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def marker_kind(folder: Path) -> str | None:
    """The kind of output foldernet wrote into ``folder`` ('run', 'audit', ...), or None when the
    folder carries no readable marker: then foldernet cannot prove it wrote it."""
    try:
        with open(folder / MARKER, encoding="utf-8") as f:
            kind = json.load(f).get("kind")
        return kind if isinstance(kind, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def check_data_dir(data: str | os.PathLike, what: str = "data folder") -> Path:
    """An existing input folder, resolved."""
    path = Path(data).expanduser()
    if not path.is_dir():
        raise FoldernetError(f"{what} not found: {path}. Expected DATA/<class>/<files>.")
    return path.resolve()


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def check_outside_inputs(out: str | os.PathLike, inputs=()) -> Path:
    """Refuse an output that is, contains or lies inside one of the input folders."""
    out = Path(out).expanduser()
    where = out.resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if _is_within(where, src) or _is_within(src, where):
            rel = "is" if where == src else "is inside" if _is_within(where, src) else "contains"
            raise FoldernetError(f"--out {out} {rel} the input folder {src}; write outputs elsewhere")
    return out


def check_new_output(out: str | os.PathLike, force: bool, kind: str = "run", inputs=()) -> Path:
    """Where an output folder may go. Refused, whatever ``force`` says: a plain file; ``/``, the
    home folder or the current folder; a folder that is, contains or lies inside an input. An
    existing, non-empty folder is replaced only with ``force`` and only when its marker shows that
    foldernet wrote it as the same kind of output."""
    out = check_outside_inputs(out, inputs)
    where = out.resolve()
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_symlink() or not out.is_dir():
        raise FoldernetError(f"--out {out} exists and is not a folder foldernet made; choose another --out")
    if not any(out.iterdir()):
        return out
    if not force:
        raise FoldernetError(f"{out} already exists. Choose another --out, or pass --force to replace it.")
    if where in (Path("/"), Path.home().resolve(), Path.cwd().resolve()):
        raise FoldernetError(f"--force refused: {out} is {'/' if where == Path('/') else 'your home folder' if where == Path.home().resolve() else 'the current folder'}; "
                             "foldernet never replaces it")
    found = marker_kind(out)
    if found is None:
        raise FoldernetError(f"--force refused: {out} has no {MARKER} marker, so foldernet cannot tell that it "
                             "wrote it. Choose another --out, or remove it yourself if you are sure.")
    if found != kind:
        raise FoldernetError(f"--force refused: {out} holds a foldernet {found} folder, and this command writes "
                             f"{kind} folders; choose another --out")
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False, partial: bool = False, resume: bool = False,
               kind: str = "run", inputs=(), keep: bool = True):
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    A crash leaves ``out`` as it was, never a half-written run. With ``partial`` the folder is
    ``.OUT.partial`` and survives a crash (it holds checkpoints), so ``resume`` can continue it; its
    ``checkpoint/`` is dropped from the finished run unless ``keep``. The old ``out`` is checked by
    ``check_new_output`` when the command starts and again when the new run is complete (a folder may
    have appeared there meanwhile), moved aside, and removed only once the new one is in place.
    """
    out = check_new_output(out, force, kind, inputs)  # with --resume too: out is replaced all the same
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial:
        tmp = out.parent / f".{out.name}.partial"
        if tmp.exists() and marker_kind(tmp) != kind:
            raise FoldernetError(f"{tmp} has no foldernet {kind} marker, so it is not an interrupted foldernet run; "
                                 "foldernet will neither resume nor replace it. Move it away, or choose another --out.")
        if tmp.exists() and not resume:
            if not force:
                raise FoldernetError(f"an interrupted run of {out} exists in {tmp}. Pass --resume to continue it, "
                                     "or --force to start over.")
            shutil.rmtree(tmp)  # carries our marker: an interrupted run foldernet wrote
        if resume and not tmp.exists():
            raise FoldernetError(f"nothing to resume: {tmp} does not exist (start the run without --resume)")
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    write_marker(tmp, kind)
    try:
        yield tmp
    except BaseException:
        if not partial:
            shutil.rmtree(tmp, ignore_errors=True)  # our own mkdtemp folder
        raise
    if partial and not keep and (tmp / "checkpoint").is_dir():
        shutil.rmtree(tmp / "checkpoint")  # written by fine-tuning inside our own staging folder
    old = None
    if out.exists() or out.is_symlink():
        try:  # checked again: something may have been put there while the run was being written
            check_new_output(out, force, kind)
        except FoldernetError as exc:
            raise FoldernetError(f"{exc} (it appeared while this run was being written; the finished run is "
                                 f"kept in {tmp})") from None
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # checked by check_new_output: empty, or ours


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise FoldernetError(f"missing file: {path}") from exc
    except ValueError as exc:  # not JSON, or not even UTF-8 text
        raise FoldernetError(f"{path} is not valid JSON ({str(exc)[:120]}); the file may be damaged") from exc
