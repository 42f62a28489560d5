"""Batch work over large collections: predict or embed every file of a folder, glob or path list into
Parquet, in this process or on Ray Data (``pip install 'foldernet[ray]'``), resumably.

Both engines run the same two steps on the same exported ONNX model: ``decode`` (read bytes, local
or any fsspec URI, and preprocess; a bad file becomes a row with the reason) and ``ModelWorker``
(one ONNX Runtime session, no torch). Ray Data runs decoding as tasks and the model in an actor
pool, started in-process unless ``address`` names a cluster. Rows are grouped into fixed chunks of
the sorted input list; each chunk is written as one Parquet file, atomically, when all its rows are
back, so a killed job restarted with the same output continues from the finished chunks and writes
every file's row exactly once.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .errors import FoldernetError
from .io import MARKER, marker_kind, write_marker
from .progress import console

RAY_HINT = "pip install 'foldernet[ray]'"
LIST_SUFFIXES = (".txt", ".csv", ".parquet")


# --- inputs ---------------------------------------------------------------------------------------

def _is_uri(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def read_sources(source: str | os.PathLike) -> list[str]:
    """The files of a job, sorted: a folder (its image and sound files, recursively), a glob, or a
    .txt / .csv / .parquet list of paths or URIs (a ``path`` column, else the first column)."""
    from .modality import media_extensions

    s = str(source)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        paths = _read_list(p)
    elif p.is_dir():
        media = media_extensions()
        paths = [f.as_posix() for f in p.rglob("*") if f.is_file() and f.suffix.lower() in media]
    elif _is_uri(s):
        import fsspec

        fs, root = fsspec.core.url_to_fs(s)
        protocol = s.split("://", 1)[0]
        found = fs.glob(root) if any(c in root for c in "*?[") else fs.find(root)
        paths = [f"{protocol}://{f}" for f in found]
    elif any(c in s for c in "*?["):
        paths = [f for f in globlib.glob(os.path.expanduser(s), recursive=True) if os.path.isfile(f)]
    elif p.is_file():
        paths = [p.as_posix()]
    else:
        raise FoldernetError(f"source not found: {s} (give a folder, a glob, or a .txt/.csv/.parquet list of paths)")
    paths = sorted(dict.fromkeys(paths))
    if not paths:
        raise FoldernetError(f"no files in {s}")
    return paths


def _read_list(p: Path) -> list[str]:
    base = p.parent
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        col = "path" if "path" in table.column_names else table.column_names[0]
        items = [str(v) for v in table.column(col).to_pylist() if v]
    elif p.suffix.lower() == ".csv":
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        head = rows[0]
        col = head.index("path") if "path" in head else 0
        body = rows[1:] if ("path" in head or not _looks_like_path(head[col])) else rows
        items = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        items = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    # relative paths in a list are relative to the list's folder
    return [i if _is_uri(i) or os.path.isabs(i) else (base / i).as_posix() for i in items]


def _looks_like_path(s: str) -> bool:
    return "/" in s or "." in Path(s).name


# --- the two steps, shared by both engines ---------------------------------------------------------

def read_bytes(path: str) -> bytes:
    if _is_uri(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


class ModelWorker:
    """One ONNX Runtime session over the exported model; decodes and predicts batches of paths.
    Never imports torch, so Ray workers stay light."""

    def __init__(self, onnx_path: str, threads: int = 1, task: str = "predict", top_k: int = 5):
        from .onnx_predictor import OnnxClassifier

        self.clf = OnnxClassifier(onnx_path, threads=max(1, int(threads)))
        self.task, self.top_k = task, min(top_k, len(self.clf.labels))

    def decode(self, paths) -> tuple[list, list[str | None], list[str]]:
        return decode_paths(self.clf, paths)

    def __call__(self, batch: dict) -> dict:
        """Ray Data calls this with a batch of ``{"row": ..., "path": ...}`` (and decoded pixels when
        decoding ran as separate tasks); returns the output columns."""
        if "pixels" in batch:
            pixels = [None if e else np.asarray(x, np.float32).reshape(-1, 3, self.clf.preprocess.size,
                                                                         self.clf.preprocess.size)
                      for x, e in zip(batch["pixels"], batch["error"])]
            errors = [e or None for e in batch["error"]]
            digests = list(batch["sha256"])
        else:
            pixels, errors, digests = self.decode(batch["path"])
        return self.answer(list(batch["row"]), list(batch["path"]), pixels, errors, digests)

    def answer(self, rows, paths, pixels, errors, digests) -> dict:
        good = [i for i, x in enumerate(pixels) if x is not None]
        n = len(paths)
        out: dict = {"row": np.asarray(rows, np.int64), "path": np.asarray(paths, object),
                     "error": np.asarray([e or "" for e in errors], object), "sha256": np.asarray(digests, object)}
        probs = feats = None
        if good:
            probs, feats = self.clf.forward([pixels[i] for i in good])
        if self.task == "embed":
            dim = feats.shape[1] if feats is not None else 0
            emb = np.zeros((n, dim), np.float16)
            if good:
                v = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
                emb[good] = v.astype(np.float16)
            out["embedding"] = emb
            return out
        k = self.top_k
        labels = np.asarray(self.clf.labels, object)
        top_idx = np.zeros((n, k), np.int64)
        top_p = np.zeros((n, k), np.float32)
        unsure = np.zeros(n, bool)
        if good:
            order = np.argsort(-probs, axis=1)[:, :k]
            top_idx[good] = order
            top_p[good] = np.take_along_axis(probs, order, axis=1)
            unsure[good] = self.clf.not_sure(probs, feats)
        ok = np.zeros(n, bool)
        ok[good] = True
        out["label"] = np.where(ok, labels[top_idx[:, 0]], "")
        out["confidence"] = np.where(ok, top_p[:, 0], np.nan).astype(np.float32)
        out["top_labels"] = np.asarray([list(labels[r]) if o else [] for r, o in zip(top_idx, ok)] + [None],
                                       object)[:-1]
        out["top_probs"] = np.asarray([[float(v) for v in r] if o else [] for r, o in zip(top_p, ok)] + [None],
                                      object)[:-1]
        out["not_sure"] = unsure
        return out


def decode_paths(clf, paths) -> tuple[list, list[str | None], list[str]]:
    """Preprocessed pixels of each path (None with the reason when it cannot be read or decoded),
    and the SHA-256 of its bytes (exact duplicates)."""
    import hashlib

    from .modality import decode_error

    pixels, errors, digests = [], [], []
    for p in paths:
        try:
            data = read_bytes(str(p))
        except OSError as exc:
            pixels.append(None)
            errors.append(f"cannot read the file: {exc.strerror or type(exc).__name__}")
            digests.append("")
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        try:
            pixels.append(clf.pixels(data))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - a bad file is a row with its reason, never fatal
            pixels.append(None)
            errors.append(decode_error(exc, clf.audio))
    return pixels, errors, digests


class Decoder:
    """A Ray Data task's callable: paths -> flattened pixels and errors, from the model's metadata
    alone (no session, no torch)."""

    def __init__(self, onnx_path: str):
        self.onnx_path = onnx_path
        self.clf = None

    def __call__(self, batch: dict) -> dict:
        if self.clf is None:
            self.clf = _Preprocessing(self.onnx_path)
        pixels, errors, digests = decode_paths(self.clf, batch["path"])
        size = 3 * self.clf.preprocess.size ** 2
        flat = np.empty(len(pixels), object)
        for i, x in enumerate(pixels):
            flat[i] = x.reshape(-1) if x is not None else np.zeros(size, np.float32)
        return {"row": batch["row"], "path": batch["path"], "pixels": flat,
                "error": np.asarray([e or "" for e in errors], object), "sha256": np.asarray(digests, object)}


class _Preprocessing:
    """Labels and preprocessing of an exported model, read from its metadata only."""

    def __new__(cls, onnx_path: str):
        import onnx

        from .onnx_predictor import ExportedClassifier

        model = onnx.load(onnx_path, load_external_data=False)
        raw = next((p.value for p in model.metadata_props if p.key == "foldernet"), None)
        clf = ExportedClassifier()
        clf.path = Path(onnx_path)
        clf._read_metadata(raw, "export it again")
        return clf


# --- the output folder -----------------------------------------------------------------------------

class Output:
    """``OUT/`` (a Parquet dataset): ``part-NNNNNN.parquet`` per finished chunk, ``job.json`` saying
    which job it holds (so a restart continues only the same job), and foldernet's marker."""

    def __init__(self, out: Path, job: dict, force: bool):
        self.dir, self.job = out, job
        if out.exists() and not out.is_dir():
            raise FoldernetError(f"--out {out} is a file; give a folder name for the Parquet dataset")
        if out.is_dir() and any(out.iterdir()):
            if marker_kind(out) != "batch":
                raise FoldernetError(f"--out {out} holds files foldernet did not write (no {MARKER} marker); "
                                     "choose a new folder")
            try:
                old = json.loads((out / "job.json").read_text())
            except (OSError, ValueError):
                old = None
            if old != job:
                if not force:
                    raise FoldernetError(f"--out {out} holds another job's results (other model, inputs or "
                                         "settings); pass --force to replace them, or choose a new folder")
                for f in out.glob("part-*.parquet*"):
                    f.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if marker_kind(out) is None:
            write_marker(out, "batch")
        for f in out.glob("part-*.parquet.tmp*"):  # a write the last run did not finish
            f.unlink()
        (out / "job.json").write_text(json.dumps(job, indent=1))

    def part(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:06d}.parquet"

    def done(self, n_chunks: int) -> set[int]:
        return {c for c in range(n_chunks) if self.part(c).is_file()}

    def write(self, chunk: int, cols: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        order = np.argsort(cols["row"], kind="stable")
        arrays = {}
        for k, v in cols.items():
            v = np.asarray(v)[order] if not isinstance(v, list) else [v[i] for i in order]
            if k == "embedding":
                arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(v).reshape(-1), pa.float16()),
                                                              np.asarray(v).shape[1])
            elif k in ("top_labels", "top_probs"):
                arrays[k] = pa.array(list(v), pa.list_(pa.string() if k == "top_labels" else pa.float32()))
            elif k in ("path", "label", "error", "sha256"):
                arrays[k] = pa.array([str(x) for x in v], pa.string())
            else:
                arrays[k] = pa.array(v)
        table = pa.table(arrays)
        tmp = self.part(chunk).with_suffix(f".parquet.tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, self.part(chunk))


def _merge(parts: list[dict]) -> dict:
    out: dict = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = np.concatenate(vals) if not isinstance(vals[0], list) else sum(vals, [])
    return out


# --- the job ---------------------------------------------------------------------------------------

def _model_file(model: str | os.PathLike) -> Path:
    p = Path(model)
    if p.is_file() and p.suffix == ".onnx":
        return p
    for cand in (p / "export" / "model.onnx", p.parent / "export" / "model.onnx", p / "model.onnx"):
        if cand.is_file():
            return cand
    raise FoldernetError(f"no exported model for {model}: batch jobs run the ONNX export; run "
                         f"`foldernet export {model}` first")


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def run_batch(model: str | os.PathLike, source, out: str | os.PathLike, task: str = "predict", engine: str = "local",
              address: str | None = None, top_k: int = 5, chunk_rows: int = 1024, force: bool = False,
              progress: bool = True) -> dict:
    """Predict (top-k labels, probabilities, not sure) or embed (unit float16 features) every file of
    ``source`` into the Parquet folder ``out``; returns counts and timing."""
    if engine == "ray":
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise FoldernetError(f"--engine ray needs the ray extra, which is not installed: {RAY_HINT}") from None
    onnx_path = _model_file(model)
    paths = read_sources(source)
    stat = onnx_path.stat()
    job = {"task": task, "model": str(onnx_path.resolve()), "model_size": stat.st_size,
           "model_mtime": int(stat.st_mtime), "inputs": len(paths), "inputs_sha": _digest(paths),
           "chunk_rows": chunk_rows, "top_k": top_k if task == "predict" else None}
    output = Output(Path(out), job, force)
    n_chunks = (len(paths) + chunk_rows - 1) // chunk_rows
    finished = output.done(n_chunks)
    todo = [(i, p) for i, p in enumerate(paths) if i // chunk_rows not in finished]
    if finished:
        console.print(f"resuming: {len(finished)} of {n_chunks} chunks already written in {out}")
    t = time.perf_counter()
    pending: dict[int, list[dict]] = {}
    counts = {c: min(chunk_rows, len(paths) - c * chunk_rows) for c in range(n_chunks) if c not in finished}
    got = {c: 0 for c in counts}
    done_rows = 0
    errors = 0
    from .progress import progress_bar

    with progress_bar(len(todo), f"{task} ({engine})", enabled=progress) as bar:
        batches = _ray_batches(onnx_path, todo, task, top_k, address) if engine == "ray" else \
            _local_batches(onnx_path, todo, task, top_k)
        for cols in batches:
            chunks = np.asarray(cols["row"]) // chunk_rows
            for c in np.unique(chunks):
                sel = np.flatnonzero(chunks == c)
                part = {k: (np.asarray(v)[sel] if not isinstance(v, list) else [v[i] for i in sel])
                        for k, v in cols.items()}
                pending.setdefault(int(c), []).append(part)
                got[int(c)] += len(sel)
                if got[int(c)] == counts[int(c)]:
                    output.write(int(c), _merge(pending.pop(int(c))))
            n = len(cols["row"])
            done_rows += n
            errors += int(np.sum(np.asarray([bool(e) for e in cols["error"]])))
            rate = done_rows / max(time.perf_counter() - t, 1e-9)
            bar.update(info=f"{rate:.0f} files/s")
            bar.advance(n)
    seconds = time.perf_counter() - t
    return {"files": len(paths), "processed": done_rows, "skipped_chunks": len(finished), "unreadable": errors,
            "seconds": round(seconds, 2), "files_per_s": round(done_rows / seconds, 1) if done_rows else None,
            "out": str(out), "engine": engine}


def _local_batches(onnx_path: Path, todo, task: str, top_k: int, batch: int = 64):
    """In-process: decode on two threads, the model on all cores."""
    from concurrent.futures import ThreadPoolExecutor

    worker = ModelWorker(str(onnx_path), threads=os.cpu_count() or 1, task=task, top_k=top_k)
    groups = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        decoded = pool.map(lambda g: worker.decode([p for _, p in g]), groups)
        for g, (pixels, errors, digests) in zip(groups, decoded):
            yield worker.answer([i for i, _ in g], [p for _, p in g], pixels, errors, digests)


def _ray_batches(onnx_path: Path, todo, task: str, top_k: int, address: str | None, batch: int = 64):
    """Ray Data: decoding as tasks, the model in an actor pool (one ONNX session per actor, its
    intra-op threads from the actor's CPUs)."""
    import ray

    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": os.cpu_count() or 1}
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 logging_level="ERROR", **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # The model actors take most CPUs (intra-op threads = their CPUs, rounded up) and leave a share
    # to the decoding tasks; taking every CPU would starve decoding and stall the pipeline.
    cpus = float(ray.cluster_resources().get("CPU", 1))
    decode_cpus = max(0.5, 0.25 * cpus)
    actor_cpus = min(4.0, max(0.5, cpus - decode_cpus))
    actors = max(1, int((cpus - decode_cpus) // actor_cpus))
    items = [{"row": i, "path": p} for i, p in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch, 200)))
    ds = ds.map_batches(Decoder(str(onnx_path)), batch_size=batch, batch_format="numpy",
                        num_cpus=min(decode_cpus, 1.0))
    ds = ds.map_batches(ModelWorker, fn_constructor_kwargs={"onnx_path": str(onnx_path),
                                                            "threads": int(np.ceil(actor_cpus)), "task": task,
                                                            "top_k": top_k},
                        batch_size=batch, batch_format="numpy", num_cpus=actor_cpus,
                        compute=ray.data.ActorPoolStrategy(size=actors))
    for cols in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield {k: (list(v) if k in ("top_labels", "top_probs") else v) for k, v in cols.items()}


def read_results(out: str | os.PathLike):
    """The Parquet folder as one pyarrow Table, in input order."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    parts = sorted(Path(out).glob("part-*.parquet"))
    if not parts:
        raise FoldernetError(f"no results in {out}")
    return pa.concat_tables([pq.read_table(p) for p in parts])


def read_splits(path: str | os.PathLike) -> dict[str, str]:
    """``path,split`` rows of a splits.csv (a dataset's, or a bundle's ``model/splits.csv``)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {r["path"].replace("\\", "/"): r["split"] for r in rows}
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise FoldernetError(f"--splits {path} cannot be read as a splits.csv with path and split columns "
                             f"({type(exc).__name__})") from None


def _split_of(path: str, splits: dict[str, str]) -> str:
    """The split of an absolute path whose tail is a relative path in ``splits`` ('' when none is)."""
    parts = path.replace("\\", "/").split("/")
    for i in range(len(parts)):
        hit = splits.get("/".join(parts[i:]))
        if hit:
            return hit
    return ""


def duplicates(embeddings: str | os.PathLike, min_cosine: float = 0.95, k: int = 10,
               splits: dict[str, str] | None = None) -> list[dict]:
    """Exact (same bytes) and near (embedding cosine >= ``min_cosine``) duplicate pairs among the files
    of an ``embed`` job's Parquet folder; near pairs come from an approximate index when there are many.
    With ``splits`` (relative path -> split), each pair says which splits it joins: a pair across
    train and val/test is leakage."""
    from .dedup import similar_pairs

    table = read_results(embeddings)
    if "embedding" not in table.column_names:
        raise FoldernetError(f"{embeddings} holds no embeddings; make them with `foldernet embed RUN SOURCE --out DIR`")
    paths = table.column("path").to_pylist()
    errors = table.column("error").to_pylist()
    digests = table.column("sha256").to_pylist() if "sha256" in table.column_names else [""] * len(paths)
    ok = np.flatnonzero([not e for e in errors])
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = flat.reshape(-1, dim)[ok].astype(np.float32)
    out: list[dict] = []
    first: dict[str, int] = {}
    for i, d in enumerate(digests):
        if not d:
            continue
        if d in first:
            out.append({"kind": "exact", "path_a": paths[first[d]], "path_b": paths[i], "cosine": 1.0})
        else:
            first[d] = i
    for a, b, c in similar_pairs(emb, min_cosine, k=k):
        if digests[ok[a]] and digests[ok[a]] == digests[ok[b]]:
            continue  # the same bytes: listed as exact
        out.append({"kind": "near", "path_a": paths[ok[a]], "path_b": paths[ok[b]], "cosine": round(float(c), 4)})
    if splits:
        for r in out:
            sa, sb = _split_of(r["path_a"], splits), _split_of(r["path_b"], splits)
            r["splits"] = f"{sa}~{sb}" if sa and sb else ""
            r["leak"] = bool(sa and sb and sa != sb and "train" in (sa, sb))
    return out
