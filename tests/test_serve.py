import io

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    from foldernet.serve import Limits, create_app

    app = create_app(trained_run.run_dir, Limits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000))
    with TestClient(app) as c:
        yield c


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_predict_health_labels_and_docs(client, digits_dir):
    img = sorted((digits_dir / "4_four").glob("*.png"))[0]
    r = client.post("/predict", files={"file": ("../../etc/passwd", img.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    j = r.json()
    assert len(j["top"]) == 5 and abs(sum(t["probability"] for t in j["top"]) - 1) < 0.2
    assert j["label"] == j["top"][0]["label"] and isinstance(j["not_sure"], bool)
    assert client.get("/health").json()["status"] == "ok"
    assert len(client.get("/labels").json()["labels"]) == 10
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    r = client.post("/predict?similar=3", files={"file": ("x.png", img.read_bytes(), "image/png")})
    sims = r.json()["similar"]
    assert len(sims) == 3 and sims[0]["similarity"] >= sims[-1]["similarity"]
    assert client.get(sims[0]["image"]).headers["content-type"] == "image/jpeg"
    assert client.get("/train-image/999999").status_code == 404
    info = client.get("/info").json()
    assert len(info["classes"]) == 10 and info["classes"][0]["examples"]
    assert client.get(info["classes"][0]["examples"][0]).headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("payload,status,words", [
    (b"", 400, "empty"),
    (b"<html><body>not an image</body></html>", 415, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 415, "not an image"),
])
def test_bad_uploads_get_json_errors(client, payload, status, words):
    r = client.post("/predict", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert r.status_code == status
    assert words in r.json()["error"] and "Traceback" not in r.text


def test_limits_on_bytes_and_pixels(client):
    big = Image.new("RGB", (2500, 2000))  # 5 Mpx > 4 Mpx limit, small as PNG
    r = client.post("/predict", files={"file": ("big.png", _png(big), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    r = client.post("/predict", files={"file": ("huge.bin", b"\xff" * (3 * 1024 * 1024), "image/jpeg")})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    r = client.post("/predict", data={"nothing": "here"})
    assert r.status_code == 422 and "error" in r.json()


def test_concurrent_requests_are_micro_batched(client, digits_dir):
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(digits_dir.rglob("*.png"))[:24]
    before = client.get("/health").json()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda f: client.post("/predict", files={"file": ("a.png", f.read_bytes())}).status_code,
                              files))
    assert codes == [200] * len(files)
    after = client.get("/health").json()
    assert after["predictions"] - before["predictions"] == len(files)
    assert after["batches"] - before["batches"] < len(files)  # at least some requests shared a batch


def test_browser_uploads_an_image_and_sees_the_bar_chart(trained_run, digits_dir):
    from browser import browser_page, running_server, screenshot
    from foldernet.serve import create_app

    with running_server(create_app(trained_run.run_dir)) as url, browser_page(1000, 900) as page:
        page.goto(url + "/")
        page.wait_for_selector("#explorer table")
        img = sorted((digits_dir / "2_two").glob("*.png"))[0]
        page.set_input_files("#file", str(img))
        page.wait_for_selector("#chart .bar", timeout=30000)
        assert page.locator("#chart .bar").count() == 5
        assert page.locator("#verdict b").inner_text() in trained_run.config["labels"]
        width = page.locator("#chart .bar .fill").first.evaluate("e => e.getBoundingClientRect().width")
        assert width > 0
        screenshot(page, "serve_upload.png")
