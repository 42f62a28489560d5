import io

import numpy as np
import pytest
from PIL import Image

from foldernet.data import open_image, scan
from foldernet.errors import FoldernetError


def _photo(w=80, h=60, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def test_odd_image_modes_become_correct_rgb(tmp_path):
    # 16-bit grayscale: a full-scale value must map to white, not saturate or wrap
    arr16 = np.full((10, 12), 65535, np.uint16)
    arr16[0, 0] = 0
    Image.fromarray(arr16).save(tmp_path / "g16.png")
    img = open_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and img.size == (12, 10)
    assert img.getpixel((5, 5)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 0)

    # RGBA fully transparent -> composited on white
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    assert open_image(tmp_path / "rgba.png").getpixel((3, 3)) == (255, 255, 255)

    # palette with a transparent index
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    img = open_image(tmp_path / "pal.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (0, 255, 0)

    # LA and CMYK
    Image.new("LA", (8, 8), (0, 255)).save(tmp_path / "la.png")
    assert open_image(tmp_path / "la.png").getpixel((0, 0)) == (0, 0, 0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    r, g, b = open_image(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def test_scan_skips_and_reports_bad_files_and_odd_classes(tmp_path):
    data = tmp_path / "data"
    for cls, n in (("cats", 3), ("chiens é 日本", 3), ("solo", 1)):
        (data / cls).mkdir(parents=True)
        for i in range(n):
            _photo(seed=i).save(data / cls / f"{i}.png")
    (data / "empty").mkdir()
    fmt = {"jpg": "JPEG", "bmp": "BMP", "gif": "GIF", "webp": "WEBP", "tiff": "TIFF"}
    for ext, f in fmt.items():
        _photo().save(data / "cats" / f"ok.{ext}", f)
    (data / "cats" / "zero.jpg").write_bytes(b"")
    (data / "cats" / "html.jpg").write_text("<html>404 not found</html>")
    good = io.BytesIO()
    _photo(400, 300).save(good, "JPEG")
    (data / "cats" / "truncated.jpg").write_bytes(good.getvalue()[:500])
    (data / "cats" / "notes.txt").write_text("hello")
    (data / "cats" / "dir.jpg").mkdir()

    ds = scan(data)
    skipped = dict(ds.skipped)
    assert "cats/zero.jpg" in skipped and "empty" in skipped["cats/zero.jpg"]
    assert "cats/html.jpg" in skipped and "not a readable image" in skipped["cats/html.jpg"]
    assert "cats/notes.txt" in skipped
    assert "cats/dir.jpg" in skipped
    names = {it.relpath for it in ds.items}
    assert {f"cats/ok.{e}" for e in fmt} <= names
    assert "chiens é 日本" in ds.classes
    assert any("'empty'" in w and "no usable images" in w for w in ds.warnings)
    assert any("'solo'" in w and "only 1 image" in w for w in ds.warnings)
    # the truncated JPEG passes the header check but cannot be decoded
    with pytest.raises(OSError):
        open_image(data / "cats" / "truncated.jpg")


def test_predefined_split_layout_and_empty_folder(tmp_path):
    for split in ("train", "valid", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            _photo().save(tmp_path / split / cls / "x.png")
    ds = scan(tmp_path)
    assert ds.predefined_split
    assert {it.split for it in ds.items} == {"train", "val", "test"}
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FoldernetError, match="no usable images"):
        scan(tmp_path / "nothing")
    with pytest.raises(FoldernetError, match="not found"):
        scan(tmp_path / "missing")
