"""collect against a local HTTP server on 127.0.0.1; frames from a video the test encodes itself."""

import csv
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import foldernet
from foldernet.collect import collect, extract_frames


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    hits: dict = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body=b"", ctype="image/jpeg", extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        p = self.path
        if p.startswith("/good/"):
            if p == "/good/1.jpg":
                time.sleep(0.3)  # its copy, later in the list, arrives first: the list order must still win
            self._send(200, _jpeg(int(p.split("/")[-1].split(".")[0])))
        elif p == "/copy-of-1.jpg":
            self._send(200, _jpeg(1))
        elif p == "/missing.jpg":
            self._send(404, b"not found", "text/plain")
        elif p == "/page.jpg":
            self._send(200, b"<html><body>moved</body></html>", "image/jpeg")
        elif p == "/redirect.jpg":
            self._send(302, b"", "text/plain", {"Location": "/good/7.jpg"})
        elif p == "/flaky.jpg":
            if Handler.hits[p] == 1:
                self._send(503, b"busy", "text/plain")
            else:
                self._send(200, _jpeg(9))
        elif p == "/slow.jpg":
            time.sleep(2.0)
            self._send(200, _jpeg(11))
        elif p == "/huge.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\xff" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self._send(404, b"", "text/plain")


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients that time out on purpose break the pipe
        pass


@pytest.fixture()
def server():
    Handler.hits = {}
    srv = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_collect_downloads_checks_dedups_and_resumes(server, tmp_path):
    rows = [("/good/1.jpg", "cats", "a"), ("/good/2.jpg", "cats", "a"), ("/good/3.jpg", "dogs", "b"),
            ("/copy-of-1.jpg", "cats", ""), ("/missing.jpg", "dogs", ""), ("/page.jpg", "dogs", ""),
            ("/redirect.jpg", "dogs", ""), ("/flaky.jpg", "dogs", ""), ("/slow.jpg", "dogs", ""),
            ("/huge.jpg", "dogs", "")]
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "label", "group"])
        for path, label, group in rows:
            w.writerow([server + path, label, group])
    out = tmp_path / "data"
    collect(lst, out, workers=4, timeout=0.5, retries=2, max_mb=1, progress=False, backoff=0.05)
    log = {row["url"].replace(server, ""): row for row in csv.DictReader(open(out / "collect_log.csv"))}
    assert log["/good/1.jpg"]["status"] == "ok"
    assert log["/copy-of-1.jpg"]["status"].startswith("duplicate of line 2 (cats/")
    assert log["/missing.jpg"]["status"] == "http 404"
    assert log["/page.jpg"]["status"] == "not an image"
    assert log["/redirect.jpg"]["status"] == "ok"
    assert log["/flaky.jpg"]["status"] == "ok" and log["/flaky.jpg"]["attempts"] == "2"
    assert log["/slow.jpg"]["status"].startswith("network error") and log["/slow.jpg"]["attempts"] == "3"
    assert log["/huge.jpg"]["status"] == "too large"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert len(files) == 5 and all(len(p.split("/")[1]) == 24 for p in files)  # content-hash names
    assert (out / "groups.csv").read_text().count("\n") == 4  # header + 3 grouped files

    before = dict(Handler.hits)
    r2 = collect(lst, out, workers=4, timeout=0.5, retries=0, max_mb=1, progress=False)
    assert r2["skipped_as_done"] == 9  # everything but the timed-out row is final
    assert Handler.hits.get("/good/1.jpg") == before.get("/good/1.jpg")
    assert Handler.hits["/slow.jpg"] > before["/slow.jpg"]


def test_a_url_listed_twice_is_ok_once_and_the_counts_match_the_files(server, tmp_path):
    """The row that produced a file says ok; its repeats say whose duplicate they are; the summary's
    ok count is the number of files written."""
    rows = [("/good/1.jpg", "cats"), ("/good/2.jpg", "cats"), ("/good/1.jpg", "cats"), ("/good/3.jpg", "dogs"),
            ("/copy-of-1.jpg", "cats"), ("/good/3.jpg", "dogs"), ("/missing.jpg", "dogs"), ("/good/2.jpg", "cats")]
    lst = tmp_path / "list.csv"
    lst.write_text("url,label\n" + "".join(f"{server}{p},{label}\n" for p, label in rows))
    out = tmp_path / "data"
    r = collect(lst, out, workers=4, timeout=2, retries=0, progress=False)
    log = list(csv.DictReader(open(out / "collect_log.csv")))
    assert [row["status"].split(" (")[0] for row in log] == [
        "ok", "ok", "duplicate of line 2", "ok", "duplicate of line 2", "duplicate of line 5", "http 404",
        "duplicate of line 3"]
    files = [p for p in out.rglob("*.jpg")]
    assert r["status"]["ok"] == len(files) == 3
    assert r["status"]["duplicate"] == 4 and r["rows"] == len(rows)
    assert Handler.hits["/good/1.jpg"] == 1  # a repeated url is fetched once


def test_bad_url_list_is_a_clear_error(tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text("link,class\nhttp://x/1.jpg,a\n")
    with pytest.raises(foldernet.FoldernetError, match="url,label"):
        collect(lst, tmp_path / "d", progress=False)
    lst.write_text("url,label\nhttp://x/1.jpg,../escape\n")
    with pytest.raises(foldernet.FoldernetError, match="folder name"):
        collect(lst, tmp_path / "d", progress=False)


def _video(path, seconds=2, fps=10, seed=0):
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_frames_every_half_second_grouped_by_video(tmp_path):
    for k in range(2):
        _video(tmp_path / f"clip{k}.mp4", seed=k)
    r = extract_frames([tmp_path / "clip0.mp4", tmp_path / "clip1.mp4"], tmp_path / "data" / "painting", every=0.5)
    assert list(r["frames"].values()) == [4, 4]
    groups = {row["path"]: row["group"] for row in csv.DictReader(open(tmp_path / "data" / "groups.csv"))}
    assert len(groups) == 8 and set(groups.values()) == {"clip0", "clip1"}
    assert all(p.startswith("painting/clip") for p in groups)
    with pytest.raises(foldernet.FoldernetError, match="not found"):
        extract_frames([tmp_path / "nope.mp4"], tmp_path / "data" / "x")
