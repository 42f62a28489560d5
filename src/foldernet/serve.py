"""``foldernet serve RUN``: a web page (upload, camera, confidence bar chart, dataset explorer) and a
JSON API (``POST /predict``, ``GET /health``, ``GET /labels``, ``GET /info``, OpenAPI at ``/docs``).

Uploads are capped in bytes and pixels, their type is sniffed from content (never the extension or
the name), nothing is written to disk, and every error is JSON with a plain message. Concurrent
requests are micro-batched: decoding runs in parallel threads, the model runs one batch at a time.
"""


import asyncio
import csv
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .bundle import find_model_dir
from .data import thumbnail_jpeg

ALLOWED_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"}


@dataclass
class Limits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 32
    max_wait_ms: float = 4.0


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class Access:
    """Who may use the server and what it shows. Off loopback, ``api_key`` is required (clients send
    it as ``X-API-Key``, ``Authorization: Bearer``, or as the password of HTTP Basic, which browsers
    ask for); ``allow_origins`` enables CORS for those origins only; ``trusted_hosts`` are the Host
    headers accepted (always the loopback names when bound there); ``explorer`` serves training
    examples (thumbnails of the training data) to clients."""

    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    explorer: bool = False


def access_for(host: str, api_key: str | None = None, allow_origins=(), explorer: bool = False,
               insecure_no_auth: bool = False, trusted_hosts=()) -> Access:
    """The access rules for binding ``host``, refusing an unauthenticated bind off loopback."""
    from .errors import FoldernetError

    api_key = api_key or os.environ.get("FOLDERNET_API_KEY") or None
    loopback = host in LOOPBACK or host.startswith("127.")
    if not loopback and not api_key and not insecure_no_auth:
        raise FoldernetError(f"--host {host} lets other machines in: give --api-key KEY (or set FOLDERNET_API_KEY), "
                             "or pass --insecure-no-auth if anyone who reaches it may use it")
    if api_key is not None and len(api_key) < 16:
        raise FoldernetError("--api-key must be at least 16 characters (e.g. python -c 'import secrets; "
                             "print(secrets.token_urlsafe(24))')")
    hosts = tuple(trusted_hosts) or (("127.0.0.1", "localhost", "::1") if loopback else
                                     ("*",) if host in ("0.0.0.0", "::") else (host, "127.0.0.1", "localhost"))
    return Access(api_key=api_key, allow_origins=tuple(allow_origins), trusted_hosts=hosts, explorer=explorer)


def _presented_key(headers) -> str:
    import base64
    import binascii

    if headers.get("x-api-key"):
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode("utf-8", "replace").partition(":")[2]
        except (binascii.Error, ValueError):
            return ""
    return ""


def _csp_hash(page: str, tag: str) -> str:
    import base64
    import hashlib
    import re

    body = re.search(f"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def sniff_and_decode(data: bytes, limits: Limits, pixels_fn, audio: bool = False) -> np.ndarray:
    """Check what the bytes really are before decoding them fully; raise UploadError with a reason.
    An audio model also takes sound files (judged by content) and returns one row per window."""
    if not data:
        raise UploadError(400, "the upload is empty")
    if audio:
        from .modality import looks_like_image

        if looks_like_image(data):
            raise UploadError(415, "the upload is an image, and this model classifies sounds: send an audio file "
                                   "(WAV, FLAC, OGG, MP3)")
        try:
            return pixels_fn(data)
        except Exception:  # noqa: BLE001
            raise UploadError(415, "the upload is not a readable audio file (WAV, FLAC, OGG, MP3)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"image has too many pixels (limit {limits.max_pixels:,})") from None
    except Exception:  # noqa: BLE001 - whatever it is, it is not an image we read
        raise UploadError(415, "the upload is not an image (JPEG, PNG, GIF, BMP, WebP or TIFF)") from None
    if fmt not in ALLOWED_FORMATS:
        raise UploadError(415, f"image format {fmt} is not accepted; send JPEG, PNG, GIF, BMP, WebP or TIFF")
    if w * h > limits.max_pixels:
        raise UploadError(413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,}")
    try:
        return pixels_fn(data)
    except Exception as exc:  # noqa: BLE001
        raise UploadError(422, f"the image could not be decoded ({type(exc).__name__}); it may be truncated") from None


def _exported_onnx(folder: Path) -> tuple[Path, str]:
    """The ONNX file to serve: ``model.int8.onnx`` when the last export's parity report says it was
    kept (a file left from an earlier export, or one the report does not vouch for, is not used),
    else ``model.onnx``."""
    try:
        q = json.loads((folder / "parity.json").read_text(encoding="utf-8")).get("int8") or {}
    except (OSError, ValueError, AttributeError):
        q = {}
    int8 = folder / "model.int8.onnx"
    if isinstance(q, dict) and q.get("kept") is True and q.get("path") == int8.name and int8.is_file() \
            and (folder / "model.onnx").is_file():
        return int8, "int8"
    return folder / "model.onnx", "fp32"


class ServedModel:
    """Whatever the run has, behind one ``pixels`` + ``run`` pair: the exported ONNX file when
    present (no torch in the request path; its int8 twin when the last export kept it, i.e. it
    agreed on >= 99 % of the held-out split and was faster), else the bundle."""

    def __init__(self, run: str | os.PathLike):
        self.model_dir = find_model_dir(run)
        onnx_path, precision = _exported_onnx(self.model_dir.parent / "export")
        from .bundle import BundleConfig

        self.config = BundleConfig.read(self.model_dir)
        if onnx_path.is_file():
            from .onnx_predictor import OnnxClassifier

            clf = OnnxClassifier(onnx_path)
            self.backend = f"onnx export ({precision})"
        else:
            from .bundle import load

            clf = load(self.model_dir)
            self.backend = f"bundle ({clf.extractor.engine.name})"
        self.pixels = clf.pixels if onnx_path.is_file() else clf.extractor.pixels
        self.audio = getattr(clf, "audio", None)
        self.clf = clf
        self.labels: list[str] = list(self.config.labels)
        self.threshold = self.config.threshold
        self.root = Path(self.config.data.get("root", ""))
        try:  # metrics only fill /info: a missing or damaged file leaves it without them
            self.metrics = json.loads((self.model_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.metrics = {}
        if not isinstance(self.metrics, dict):
            self.metrics = {}
        self.examples = self._examples()

    def run(self, pixel_list: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One model call for a micro-batch of inputs (each k windows) -> (probabilities, features) each."""
        probs, feats = self.clf.forward(pixel_list)
        return [(probs[i], feats[i] if feats is not None else None) for i in range(len(probs))]

    def answer(self, probs: np.ndarray, feats: np.ndarray | None, top_k: int, similar: int,
               images: bool = False) -> dict:
        order = np.argsort(-probs)[:min(top_k, len(self.labels))]
        top = [{"label": self.labels[i], "probability": round(float(probs[i]), 6)} for i in order]
        f = feats[None] if feats is not None else None
        reason = self.clf.not_sure_reasons(probs[None], f)[0]
        out = {"label": top[0]["label"], "confidence": top[0]["probability"], "not_sure": bool(reason),
               "not_sure_reason": reason, "top": top, "similar": []}
        if similar and f is not None and self.clf.index is not None:
            # training file names and thumbnails only with the explorer on: they show the training data
            out["similar"] = [{"label": n.label, "similarity": round(n.similarity, 4),
                               **({"path": n.path, "image": f"/train-image/{n.index}"} if images else {})}
                              for n in self.clf.index.search(f, similar)[0]]
        return out

    def info(self, explorer: bool) -> dict:
        """What the model is and how good, per class (with example thumbnails only with the explorer)."""
        split = self.metrics.get("reported_split")
        m = self.metrics.get("splits", {}).get(split, {}) if split else {}
        counts = self.config.data.get("counts", {})
        classes = []
        for c in self.labels:
            pc = m.get("per_class", {}).get(c, {})
            classes.append({"label": c, "train": counts.get("train", {}).get(c), "val": counts.get("val", {}).get(c),
                            "test": counts.get("test", {}).get(c), "precision": pc.get("precision"),
                            "recall": pc.get("recall"), "f1": pc.get("f1"),
                            "examples": [f"/example/{i}" for i in self.examples.get(c, [])] if explorer else []})
        return {"backbone": self.config.backbone, "mode": self.config.mode, "backend": self.backend,
                "metrics": self.config.metrics, "classes": classes, "threshold": self.threshold,
                "explorer": explorer}

    def _examples(self) -> dict[str, list[int]]:
        """Training image indices per class for the dataset explorer (files addressed by index only)."""
        self.files: list[Path] = []
        out: dict[str, list[int]] = {c: [] for c in self.labels}
        root = self.root
        splits = self.model_dir / "splits.csv"
        if not splits.exists() or not root.is_dir():
            return out
        try:  # the explorer is a convenience: a damaged splits.csv leaves it empty, the API works on
            with open(splits, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    if row["split"] == "train" and row["label"] in out and len(out[row["label"]]) < 8:
                        out[row["label"]].append(len(self.files))
                        self.files.append(root / row["path"])
        except (OSError, ValueError, KeyError, TypeError, csv.Error):
            self.files = []
            return {c: [] for c in self.labels}
        return out


class MicroBatcher:
    """Collects concurrent requests for up to ``max_wait_ms`` (or ``max_batch`` items) and runs
    them through the model as one batch, in one worker thread."""

    def __init__(self, fn, max_batch: int, max_wait_ms: float):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                out = await asyncio.to_thread(self.fn, [p for p, _ in items])  # one result per item
                for (_, fut), row in zip(items, out):
                    if not fut.done():
                        fut.set_result(row)
            except Exception as exc:  # noqa: BLE001 - hand the error to every waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
            self.batches += 1
            self.items += len(items)


def _install_guard(app, access: Access) -> None:
    """Host check, API key (constant time; /health is open), CORS when asked, and security headers
    on every answer (a CSP that allows the page's own inline script and style by hash only)."""
    import hmac

    from fastapi import Request
    from fastapi.responses import JSONResponse

    page_csp = {path: ("default-src 'none'; img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
                       f"script-src {_csp_hash(page, 'script')}; style-src {_csp_hash(page, 'style')}; "
                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
                for path, page in (("/", PAGE), ("/label", LABEL_PAGE), ("/review", REVIEW_PAGE))}
    docs_csp = ("default-src 'none'; img-src 'self' data:; connect-src 'self'; script-src 'self' 'unsafe-inline'; "
                "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]") if request.headers.get("host") else ""
        if "*" not in access.trusted_hosts and host not in access.trusted_hosts:
            response = JSONResponse({"error": "untrusted Host header"}, status_code=400)
        elif (access.api_key and request.url.path != "/health" and request.method != "OPTIONS"
              and not hmac.compare_digest(_presented_key(request.headers).encode(), access.api_key.encode())):
            response = JSONResponse({"error": "missing or wrong API key (send it as X-API-Key)"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="foldernet"'})
        else:
            response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        docs = request.url.path.startswith(("/docs", "/redoc", "/static-offline-docs"))
        response.headers["Content-Security-Policy"] = docs_csp if docs else page_csp.get(
            request.url.path, "default-src 'none'; frame-ancestors 'none'")
        return response

    if access.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(access.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])


def _install_error_handlers(app) -> None:
    """Every error is JSON with one message; a 405 keeps its Allow header."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {fields}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


async def _thumbnail(path: Path | None, what: str, size: int = 120, cache: str = "max-age=3600"):
    """A JPEG thumbnail answer for a file the server addresses by index (None: no such index), or a
    404 that says which it was."""
    from fastapi.responses import JSONResponse, Response

    if path is None:
        return JSONResponse({"error": f"no such {what}"}, status_code=404)
    img = await asyncio.to_thread(thumbnail_jpeg, path, size, 88 if size > 120 else 80)
    if img is None:
        return JSONResponse({"error": f"{what} unavailable (moved, or not an image)"}, status_code=404)
    return Response(img, media_type="image/jpeg", headers={"Cache-Control": cache})


def _install_explorer(app, model: ServedModel, access: Access) -> None:
    """Thumbnails of training examples, by index only (never by path); they show the training data,
    so they answer 404 unless the server was started with ``--explorer``."""
    @app.get("/example/{index}", include_in_schema=False)
    async def example(index: int):
        ok = access.explorer and 0 <= index < len(model.files)
        return await _thumbnail(model.files[index] if ok else None, "example")

    @app.get("/train-image/{index}", include_in_schema=False)
    async def train_image(index: int):
        index_obj = model.clf.index if access.explorer else None
        ok = index_obj is not None and 0 <= index < len(index_obj.paths)
        return await _thumbnail(model.root / index_obj.paths[index] if ok else None, "training image")


def create_app(run: str | os.PathLike, limits: Limits | None = None, access: Access | None = None,
               label: tuple | None = None, review: str | os.PathLike | None = None):
    """The web page and the JSON API for one run (checked as it loads: a damaged bundle stops here).
    ``label=(UNLABELLED, DATA)`` adds the labelling page at /label (``grow.LabelSession``), ``review=AUDIT_DIR``
    the page at /review that walks through an audit's likely label errors (``grow.ReviewSession``)."""
    from fastapi import File, Query, UploadFile
    from fastapi.responses import HTMLResponse
    from fastapi_offline import FastAPIOffline
    from pydantic import BaseModel

    class ErrorBody(BaseModel):
        error: str

    limits = limits or Limits()
    access = access or Access()
    model = ServedModel(run)
    batcher = MicroBatcher(model.run, limits.max_batch, limits.max_wait_ms)
    what = "sound" if model.audio is not None else "image"
    app = FastAPIOffline(title="foldernet", version=model.config.foldernet_version or "0",
                         description=f"{what.capitalize()} classifier: {', '.join(model.labels[:20])}. "
                                     + ("Send the API key as X-API-Key." if access.api_key else ""))
    errors = {401: {"model": ErrorBody, "description": "missing or wrong API key"},
              500: {"model": ErrorBody, "description": "internal error"}} if access.api_key else \
        {500: {"model": ErrorBody, "description": "internal error"}}
    _install_guard(app, access)
    _install_error_handlers(app)
    if label is not None:
        from .grow import LabelSession

        _install_labelling(app, LabelSession(model.clf, *label), model.audio)
    if review is not None:
        from .grow import ReviewSession

        _install_review(app, ReviewSession(review, model.labels))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(PAGE)

    @app.get("/health", responses={500: errors[500]})
    async def health():
        return {"status": "ok", "backend": model.backend, "classes": len(model.labels),
                "batches": batcher.batches, "predictions": batcher.items}

    @app.get("/labels", responses=errors)
    async def labels():
        return {"labels": model.labels}

    @app.get("/info", responses=errors)
    async def info():
        return model.info(access.explorer)

    _install_explorer(app, model, access)

    upload_errors = {**errors,
                     400: {"model": ErrorBody, "description": "the upload is empty"},
                     413: {"model": ErrorBody, "description": "the upload has too many bytes or pixels"},
                     415: {"model": ErrorBody, "description": f"the upload is not an {what} this model reads"},
                     422: {"model": ErrorBody, "description": "a bad parameter, or a file that does not decode"}}

    @app.post("/predict", responses=upload_errors)
    async def predict(file: UploadFile = File(..., description=f"an {what}"),
                      top_k: int = Query(5, ge=1, le=100), similar: int = Query(0, ge=0, le=20),
                      timeline: bool = Query(False, description="audio: also answer every window (what sounds when)")):
        """Top-k labels with probabilities; ``not_sure`` by the bundle's open-set rule; ``similar``
        nearest training images when asked; for audio, ``timeline`` adds one answer per window."""
        data = await file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise UploadError(413, f"upload is larger than {limits.max_bytes // (1024 * 1024)} MB")
        pixels = await asyncio.to_thread(sniff_and_decode, data, limits, model.pixels, model.audio is not None)
        probs, feats = await batcher.submit(pixels)
        answer = await asyncio.to_thread(model.answer, probs, feats, top_k, similar, access.explorer)
        if model.audio is not None and pixels.shape[0] >= 1:
            answer["spectrogram"] = await asyncio.to_thread(_spectrogram_uri, data, model.audio)
            if timeline and answer["spectrogram"]:  # a sound, not an image sent to a sound model
                segments = await asyncio.to_thread(model.clf.timeline, data, min(top_k, 3))
                answer["timeline"] = [{"start": s.start, "end": s.end, "label": s.label,
                                       "confidence": round(s.confidence, 6), "not_sure": s.not_sure}
                                      for s in segments]
        return answer

    return app


def _spectrogram_uri(data: bytes, cfg) -> str | None:
    import base64

    from .modality import looks_like_image

    if looks_like_image(data):
        return None
    from .audio import spectrogram_png

    return "data:image/png;base64," + base64.b64encode(spectrogram_png(data, cfg)).decode()


def serve(run: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          access: Access | None = None, on_ready=None, label: tuple | None = None,
          review: str | os.PathLike | None = None) -> None:
    """Load and check the model, then listen; ``on_ready`` is called once the app is built (the CLI
    prints the address then, so a damaged bundle never shows "serving on")."""
    import uvicorn

    app = create_app(run, limits, access or access_for(host), label=label, review=review)
    if on_ready is not None:
        on_ready()
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>foldernet</title>
<style>
 body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
 header{background:#1d3557;color:#fff;padding:12px 20px} header h1{margin:0;font-size:20px}
 main{max-width:980px;margin:0 auto;padding:16px;display:grid;gap:16px}
 .card{background:#fff;border-radius:10px;padding:16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
 #drop{border:2px dashed #8aa1c1;border-radius:10px;padding:28px;text-align:center;cursor:pointer}
 #drop.over{background:#eef4ff} .row{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
 #preview{width:220px;max-height:300px;object-fit:contain;border-radius:8px;display:none;background:#eee}
 #chart{flex:1;min-width:260px} .bar{display:flex;align-items:center;gap:8px;margin:6px 0}
 .bar .name{width:140px;text-align:right;font-size:14px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
 .bar .track{flex:1;background:#e8ecf1;border-radius:4px;height:20px}
 .bar .fill{display:block;background:#457b9d;height:20px;border-radius:4px} .bar.top .fill{background:#e63946}
 .bar .val{width:58px;font-variant-numeric:tabular-nums;font-size:13px}
 #verdict{font-size:18px;margin:4px 0 8px} .unsure{color:#b5651d;font-weight:600}
 #error{color:#b00020} table{border-collapse:collapse;width:100%;font-size:14px}
 th,td{padding:4px 6px;border-bottom:1px solid #eee;text-align:left} td.num{text-align:right}
 #similar{display:flex;gap:8px;flex-wrap:wrap;margin-top:10px} #similar p{flex-basis:100%;margin:4px 0}
 #similar figure{margin:0;font-size:12px;text-align:center} #similar img{width:72px;height:72px;object-fit:cover;border-radius:4px}
 .thumbs img{width:48px;height:48px;object-fit:cover;border-radius:4px;margin-right:3px}
 button,label.btn{background:#1d3557;color:#fff;border:0;border-radius:6px;padding:8px 12px;cursor:pointer;font-size:14px}
</style></head>
<body><header><h1>foldernet classifier</h1><div id="meta"></div></header>
<main>
 <section class="card">
  <div id="drop" tabindex="0">Drop an image (or a sound, for audio models) here, or
   <label class="btn" for="file">choose a file</label>
   <label class="btn" for="camera">take a photo</label>
   <input id="file" type="file" accept="image/*,audio/*" hidden>
   <input id="camera" type="file" accept="image/*" capture="environment" hidden>
  </div>
  <div id="error" role="alert"></div>
  <div class="row" id="result">
   <img id="preview" alt="uploaded image">
   <div id="chart" aria-live="polite"></div>
  </div>
 </section>
 <section class="card"><h2>Dataset</h2><div id="explorer">loading...</div></section>
</main>
<script>
const $ = (id) => document.getElementById(id);
function esc(s){return String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function pct(x){return x==null?'':(100*x).toFixed(1)+'%';}
async function send(file){
  if(!file) return;
  $('error').textContent=''; $('chart').innerHTML='classifying...';
  const img=$('preview');
  if((file.type||'').startsWith('image/')){ img.src=URL.createObjectURL(file); img.style.display='block'; }
  else { img.style.display='none'; }
  const body = new FormData(); body.append('file', file);
  try{
    const isImage = (file.type||'').startsWith('image/');
    const r = await fetch('/predict?top_k=5&similar=4' + (isImage ? '' : '&timeline=true'), {method:'POST', body});
    const j = await r.json();
    if(!r.ok){ $('chart').innerHTML=''; $('error').textContent=j.error||('error '+r.status); return; }
    let html = '<div id="verdict">' + (j.not_sure ? '<span class="unsure">not sure ('+esc(j.not_sure_reason||'')+')</span> — best guess: ' : '')
      + '<b>' + esc(j.label) + '</b> ' + pct(j.confidence) + '</div>';
    for(const [i,t] of j.top.entries()){
      html += '<div class="bar'+(i===0?' top':'')+'"><span class="name" title="'+esc(t.label)+'">'+esc(t.label)+'</span>'
        + '<span class="track"><span class="fill" data-w="'+(100*t.probability).toFixed(1)+'"></span></span>'
        + '<span class="val">'+pct(t.probability)+'</span></div>';
    }
    if(j.spectrogram){ img.src=j.spectrogram; img.style.display='block'; img.alt='spectrogram'; }
    if(j.timeline && j.timeline.length > 1){
      html += '<table id="timeline"><tr><th>when (s)</th><th>sounds like</th><th>confidence</th></tr>' + j.timeline.map(w =>
        '<tr><td>'+w.start.toFixed(1)+'–'+w.end.toFixed(1)+'</td><td>'+esc(w.label)+(w.not_sure?' <span class="unsure">?</span>':'')
        +'</td><td class="num">'+pct(w.confidence)+'</td></tr>').join('') + '</table>';
    }
    if(j.similar && j.similar.length){
      html += '<div id="similar"><p>Most similar training images:</p>' + j.similar.map(n =>
        '<figure>'+(n.image ? '<img alt="" src="'+n.image+'">' : '')+'<figcaption>'+esc(n.label)+' '+n.similarity.toFixed(2)+'</figcaption></figure>').join('') + '</div>';
    }
    $('chart').innerHTML = html;
    for(const f of $('chart').querySelectorAll('.fill')){ f.style.width = f.dataset.w + '%'; }  // CSSOM: allowed by the CSP
  }catch(e){ $('chart').innerHTML=''; $('error').textContent='request failed: '+e; }
}
$('file').addEventListener('change', e=>send(e.target.files[0]));
$('camera').addEventListener('change', e=>send(e.target.files[0]));
const drop=$('drop');
drop.addEventListener('dragover', e=>{e.preventDefault(); drop.classList.add('over');});
drop.addEventListener('dragleave', ()=>drop.classList.remove('over'));
drop.addEventListener('drop', e=>{e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files[0]);});
fetch('/info').then(r=>r.json()).then(info=>{
  const m = info.metrics||{};
  $('meta').textContent = info.backbone + ' · ' + info.backend + (m.accuracy!=null ? ' · '+m.split+' accuracy '+pct(m.accuracy) : '');
  let h = '<table><tr><th>class</th><th>train</th><th>val</th><th>test</th><th>precision</th><th>recall</th><th>F1</th><th>examples</th></tr>';
  for(const c of info.classes){
    h += '<tr><td>'+esc(c.label)+'</td><td class="num">'+(c.train??'')+'</td><td class="num">'+(c.val??'')+'</td><td class="num">'+(c.test??'')
      + '</td><td class="num">'+pct(c.precision)+'</td><td class="num">'+pct(c.recall)+'</td><td class="num">'+pct(c.f1)+'</td><td class="thumbs">'
      + c.examples.slice(0,6).map(u=>'<img loading="lazy" alt="" src="'+u+'">').join('') + '</td></tr>';
  }
  $('explorer').innerHTML = h + '</table>';
}).catch(()=>{$('explorer').textContent='dataset information unavailable';});
</script></body></html>
"""


def _session_page(title: str, css: str, body: str, script: str) -> str:
    """A page of the labelling or review session: shared look, helpers (``$``, ``esc``, ``post``) and
    one inline script and style, each allowed by its hash in the CSP."""
    return ("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>foldernet: """ + title + """</title>
<style>
 body{font:15px system-ui,sans-serif;margin:24px;max-width:1000px} h1{font-size:20px}
 button{margin:3px;padding:6px 10px;font-size:14px;border:1px solid #888;border-radius:4px;background:#fff}
 #hint{color:#555;font-size:13px} #status{margin-top:10px;color:#1d3557} .done{color:#2a9d8f}
""" + css + """</style></head><body>
""" + body + """
<script>
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
async function post(url, body){
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body || {})});
  return [r.ok, await r.json()];
}
let items = [], classes = [], i = 0, trail = [];   // the queue, where we are, and what undo walks back
function more(doneText){  // the progress line; false (and a closing word) once the queue is done
  $('progress').textContent = Math.min(i + 1, items.length) + ' of ' + items.length;
  if(i < items.length) return true;
  $('media').innerHTML = '<p class="done">' + doneText + '</p>'; $('classes').innerHTML = '';
  return false;
}
function classButtons(highlight, cls, pick){  // a button per class (keys 1-9 for the first nine)
  $('classes').innerHTML = classes.map((c, k) => '<button data-class="' + esc(c) + '"' + (c === highlight ? ' class="' + cls + '"' : '')
    + '>' + (k < 9 ? (k + 1) + ' ' : '') + esc(c) + '</button>').join('');
  for(const b of $('classes').querySelectorAll('button')){ b.addEventListener('click', () => pick(b.dataset.class)); }
}
function answered(text){ $('status').textContent = text; trail.push('answer'); i++; render(); }
function skip(){ if(i < items.length){ trail.push('skip'); i++; $('status').textContent = 'skipped'; render(); } }
async function undo(url){  // a skip just steps back; an answer is undone on the server first
  const last = trail.pop();
  if(!last) return;
  if(last === 'answer'){
    const [, j] = await post(url);
    $('status').textContent = j.undone !== null ? 'undone' : ('not undone: ' + (j.note || 'nothing to undo'));
  } else { $('status').textContent = 'back one'; }
  i = Math.max(0, i - 1); render();
}
function load(url){
  fetch(url).then(r => r.json()).then(j => { items = j.items; classes = j.classes; render(); })
    .catch(() => { $('progress').textContent = 'the queue is unavailable'; });
}
""" + script + """
</script></body></html>
""")


LABEL_PAGE = _session_page("label", """
 #media img{max-width:420px;max-height:420px;min-width:220px;display:block;border:1px solid #ccc}
 #media audio{display:block;margin-top:8px;width:420px}
 #classes button.guess{border:2px solid #e63946;font-weight:bold}
""", """<h1>Label: <span id="progress">loading...</span></h1>
<div id="media"></div>
<p id="guess"></p>
<div id="classes"></div>
<p id="hint">keys: 1-9 a class, Enter the model's guess, s skip, u undo</p>
<p id="status"></p>""", """
function render(){
  if(!more('all done')){ $('guess').textContent = ''; return; }
  const it = items[i];
  $('media').innerHTML = it.kind === 'audio'
    ? '<img alt="spectrogram" src="/label/item/' + it.id + '/spectrogram"><audio controls src="/label/item/' + it.id + '"></audio>'
    : '<img alt="' + esc(it.name) + '" src="/label/item/' + it.id + '">';
  $('guess').innerHTML = esc(it.name) + ': the model guesses <b>' + esc(it.guess) + '</b> ('
    + Math.round(100 * it.confidence) + ' %); ' + esc(it.why);
  classButtons(it.guess, 'guess', label);
}
async function label(c){
  if(i >= items.length) return;
  const [ok, j] = await post('/label/item/' + items[i].id, {label: c});
  if(!ok){ $('status').textContent = j.error || 'error'; return; }
  if(j.copied){ answered('copied to ' + j.path); } else { $('status').textContent = 'already in ' + c; trail.push('skip'); i++; render(); }
}
document.addEventListener('keydown', e => {
  if(e.key >= '1' && e.key <= '9'){ const c = classes[Number(e.key) - 1]; if(c) label(c); }
  else if(e.key === 'Enter' && i < items.length){ label(items[i].guess); }
  else if(e.key === 's'){ skip(); } else if(e.key === 'u'){ undo('/label/undo'); }
});
load('/label/queue');""")


def _session_path(session, item: int) -> Path | None:
    """The file of a labelling or review item, or None when there is no such item."""
    from .errors import FoldernetError

    try:
        return session.path(item)
    except FoldernetError:
        return None


def _install_labelling(app, session, audio_cfg) -> None:
    """``serve --label PILE --into DATA``: the page at /label and the calls it makes. Each answer copies
    the file into DATA/<class>/ (``grow.LabelSession``); files are addressed by their place in the queue."""
    from fastapi import Body
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from .errors import FoldernetError
    from .modality import modality_of

    def kind(i: int) -> str:
        m = modality_of(session.path(i))
        return m.kind if m is not None else "image"

    @app.get("/label", response_class=HTMLResponse, include_in_schema=False)
    async def label_page():
        return HTMLResponse(LABEL_PAGE)

    @app.get("/label/queue", include_in_schema=False)
    async def label_queue():
        items = [{**it, "kind": kind(it["id"])} for it in session.queue()]
        return {"classes": session.labels, "items": items, "unreadable": len(session.skipped),
                "duplicates_left_out": len(session.dropped)}

    @app.get("/label/item/{item}", include_in_schema=False)
    async def label_item(item: int):
        path = _session_path(session, item)
        if path is not None and kind(item) == "audio":
            media = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".flac": "audio/flac"}
            data = await asyncio.to_thread(path.read_bytes)
            return Response(data, media_type=media.get(path.suffix.lower(), "application/octet-stream"))
        return await _thumbnail(path, "item", 480, "no-store")

    @app.get("/label/item/{item}/spectrogram", include_in_schema=False)
    async def label_spectrogram(item: int):
        from .audio import spectrogram_png

        try:
            png = await asyncio.to_thread(spectrogram_png, session.path(item), audio_cfg)
        except Exception:  # noqa: BLE001 - a picture is a convenience; the player still plays
            return JSONResponse({"error": "no spectrogram"}, status_code=404)
        return Response(png, media_type="image/png")

    @app.post("/label/item/{item}", include_in_schema=False)
    async def label_answer(item: int, body: dict = Body(...)):
        try:
            return await asyncio.to_thread(session.label, item, str(body.get("label", "")))
        except FoldernetError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.post("/label/undo", include_in_schema=False)
    async def label_undo():
        return await asyncio.to_thread(session.undo)


REVIEW_PAGE = _session_page("review", """
 #media{display:flex;gap:16px} #media figure{margin:0}
 #media img{max-width:380px;max-height:380px;min-width:200px;border:1px solid #ccc}
 #classes button.suggested{border:2px solid #e63946;font-weight:bold}
""", """<h1>Review: <span id="progress">loading...</span></h1>
<div id="media"></div>
<p id="why"></p>
<div id="actions"><button data-act="keep">k keep</button><button data-act="relabel">r relabel as suggested</button>
<button data-act="quarantine">q quarantine</button></div>
<div id="classes"></div>
<p id="hint">keys: k keep, r relabel as suggested, 1-9 relabel as that class, q quarantine, s skip, u undo.
Nothing moves but on your word; foldernet restore undoes every move.</p>
<p id="status"></p>""", """
function render(){
  if(!more('all reviewed')){ $('why').textContent = ''; return; }
  const it = items[i];
  $('media').innerHTML = '<figure><img alt="' + esc(it.name) + '" src="/review/item/' + it.id + '"><figcaption>' + esc(it.path)
    + ' (filed as <b>' + esc(it.given) + '</b>)</figcaption></figure>'
    + (it.other_id !== null ? '<figure><img alt="other" src="/review/item/' + it.other_id + '"><figcaption>its duplicate</figcaption></figure>' : '');
  $('why').innerHTML = esc(it.why) + '; suggested: <b>' + esc(it.suggested) + '</b>';
  classButtons(it.suggested, 'suggested', c => decide('relabel', c));
}
async function decide(decision, label){
  if(i >= items.length) return;
  const [ok, j] = await post('/review/item/' + items[i].id, {decision: decision, label: label || null});
  if(!ok){ $('status').textContent = j.error || 'error'; return; }
  answered(decision + (j.moved_to ? ': moved to ' + j.moved_to : ''));
}
for(const b of document.querySelectorAll('#actions button')){ b.addEventListener('click', () => decide(b.dataset.act)); }
document.addEventListener('keydown', e => {
  if(e.key >= '1' && e.key <= '9'){ const c = classes[Number(e.key) - 1]; if(c) decide('relabel', c); }
  else if(e.key === 'k'){ decide('keep'); } else if(e.key === 'r'){ decide('relabel'); }
  else if(e.key === 'q'){ decide('quarantine'); } else if(e.key === 's'){ skip(); } else if(e.key === 'u'){ undo('/review/undo'); }
});
load('/review/queue');""")


def _install_review(app, session) -> None:
    """``serve --review AUDIT_DIR``: the page at /review and the calls it makes (``grow.ReviewSession``)."""
    from fastapi import Body
    from fastapi.responses import HTMLResponse, JSONResponse

    from .errors import FoldernetError

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    async def review_page():
        return HTMLResponse(REVIEW_PAGE)

    @app.get("/review/queue", include_in_schema=False)
    async def review_queue():
        return {"classes": session.labels, "items": session.queue()}

    @app.get("/review/item/{item}", include_in_schema=False)
    async def review_item(item: int):
        return await _thumbnail(_session_path(session, item), "item", 400, "no-store")

    @app.post("/review/item/{item}", include_in_schema=False)
    async def review_decide(item: int, body: dict = Body(...)):
        try:
            return await asyncio.to_thread(session.decide, item, str(body.get("decision", "")), body.get("label"))
        except FoldernetError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.post("/review/undo", include_in_schema=False)
    async def review_undo():
        return await asyncio.to_thread(session.undo)
