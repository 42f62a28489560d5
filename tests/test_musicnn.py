"""musicnn, the audio-pretrained backbone: its TensorFlow checkpoint read without TensorFlow, the
network rebuilt in PyTorch against TensorFlow's own numbers, and the whole pipeline on it."""

import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf

import foldernet
from foldernet.errors import FoldernetError
from foldernet.models import create_backbone
from foldernet.musicnn import checkpoint_prefix, create_musicnn_model, read_tf_checkpoint
from foldernet.modality import for_dataset

needs_weights = pytest.mark.skipif(importlib.util.find_spec("musicnn") is None,
                                   reason="musicnn's weights are not installed (pip install --no-deps musicnn)")

# TensorFlow 2.21 running musicnn's own code (musicnn.models.define_model, checkpoint restored) on
# the input of _pattern(): its max_pool and mean_pool outputs, concatenated, at these indices, and
# the sum of their absolute values per row. Computed once; TensorFlow is not needed to run the test.
TF_REFERENCE = {
    "musicnn_mtt": ([95, 121, 349, 370, 752, 848, 1102, 1505],
                    [[20.0092, 30.0741, 20.5422, 24.0513, 4.1990, 19.5172, 20.3243, -0.3451],
                     [19.6217, 32.7218, 19.8867, 25.4903, 3.9109, 19.1340, 19.6897, -0.0302]],
                    [1375.857, 1405.729]),
    "musicnn_msd": ([695, 698, 706, 714, 725, 728, 752, 1505],
                    [[23.2066, 58.7654, 29.8446, 22.5654, 27.4135, 26.2997, 11.2516, -1.4596],
                     [29.7704, 55.3912, 28.5298, 25.4387, 31.0686, 23.3808, 7.6787, -1.8679]],
                    [1185.174, 1282.997]),
}


def _pattern() -> np.ndarray:
    """(2, 187, 96): a log-mel-like input with structure along time and frequency."""
    t, f = np.meshgrid(np.arange(187), np.arange(96), indexing="ij")
    return np.stack([2.0 + 1.5 * np.sin(0.05 * t * (b + 1) + 0.2 * f) for b in range(2)]).astype(np.float32)


@needs_weights
@pytest.mark.parametrize("name", sorted(TF_REFERENCE))
def test_checkpoint_read_without_tensorflow_matches_tensorflow(name):
    import torch

    variables = read_tf_checkpoint(checkpoint_prefix(name))
    assert variables["conv2d_1/kernel"].shape == (7, 67, 1, 204)  # the 0.7 x 96-band timbral filters
    backbone = create_backbone(name)
    assert backbone.weights_source.startswith("pypi:musicnn/") and backbone.num_features == 1506
    with torch.no_grad():
        pooled = backbone.model.pooled(torch.from_numpy(_pattern())).numpy()
    idx, values, abs_sums = TF_REFERENCE[name]
    np.testing.assert_allclose(pooled[:, idx], values, atol=2e-3)
    np.testing.assert_allclose(np.abs(pooled).sum(axis=1), abs_sums, rtol=1e-4)


def test_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(FoldernetError, match="cannot read the TensorFlow checkpoint .*nothing"):
        read_tf_checkpoint(tmp_path / "nothing")
    (tmp_path / "bad.index").write_bytes(b"\0" * 64)
    (tmp_path / "bad.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(FoldernetError, match="bad.*not a TensorFlow checkpoint"):
        read_tf_checkpoint(tmp_path / "bad")
    # a state_dict saved from the module loads with --weights; a foreign one is refused by name
    import torch

    torch.save(create_musicnn_model().state_dict(), tmp_path / "mine.pt")
    assert create_backbone("musicnn_mtt", weights=tmp_path / "mine.pt").weights_source == "file:mine.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(FoldernetError, match="other.pt do not fit"):
        create_backbone("musicnn_mtt", weights=tmp_path / "other.pt")


def test_the_backbone_sets_how_spectrograms_are_made(tmp_path):
    config = create_backbone("musicnn_mtt", pretrained=False).data_config
    pre, cfg = for_dataset(config, "audio", paths=[])
    assert (cfg.n_mels, cfg.n_fft, cfg.hop_length, cfg.mel_scale, cfg.window_seconds) == (96, 512, 256, "slaney", 3.0)
    assert for_dataset(config, "audio", audio={"window_seconds": 2.0}, paths=[])[1].window_seconds == 2.0
    with pytest.raises(FoldernetError, match="needs audio n mels 96 .*not 64"):
        for_dataset(config, "audio", audio={"n_mels": 64}, paths=[])
    with pytest.raises(FoldernetError, match="cannot read images"):
        for_dataset(config, "image")


def _note(kind: str, rng, sr: int = 16000) -> np.ndarray:
    """A 1 s note at a random pitch: a pure sine, or a buzzy sawtooth; same pitches, same envelopes."""
    f0, t = rng.uniform(150, 700), np.arange(sr) / sr
    if kind == "sine":
        x = np.sin(2 * np.pi * f0 * t)
    else:
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, int(7000 / f0)))
    x = x * np.exp(-t * rng.uniform(0.5, 4.0)) * rng.uniform(0.2, 0.6) / np.abs(x).max()
    return (x + 0.003 * rng.standard_normal(sr)).astype(np.float32)


@needs_weights
def test_train_export_and_predict_on_musicnn(tmp_path):
    """Telling a sine from a sawtooth at the same pitches is timbre, which musicnn was trained on."""
    rng = np.random.default_rng(3)
    for kind in ("sine", "saw"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        for k in range(12):
            sf.write(tmp_path / "data" / kind / f"{kind}_{k}.wav", _note(kind, rng), 16000)
    result = foldernet.train(tmp_path / "data", out=tmp_path / "run", backbone="musicnn_mtt", progress=False,
                             val=0.25, test=0.25, allow_leakage=True)  # two sines of close pitch look alike
    assert result.config["audio"]["mel_scale"] == "slaney" and result.config["audio"]["n_mels"] == 96
    assert result.metrics["splits"]["test"]["accuracy"] >= 0.8  # chance is 1/2
    html_report = (tmp_path / "run" / "report.html").read_text()
    assert "3 s windows" in html_report and "96 mel bands (slaney scale, 0-8000 Hz), n_fft 512, hop 256" in html_report
    sf.write(tmp_path / "saw.wav", _note("saw", rng), 16000)
    model = foldernet.load(tmp_path / "run")
    assert model.predict([tmp_path / "saw.wav"])[0].label == "saw"
    report = foldernet.export(tmp_path / "run")
    assert report["fp32"]["top1_agreement"] == 1.0
    from foldernet.onnx_predictor import OnnxClassifier

    onnx = OnnxClassifier(tmp_path / "run" / "export" / "model.onnx").predict([tmp_path / "saw.wav"])[0]
    assert onnx.label == "saw"
    assert json.loads((tmp_path / "run" / "export" / "parity.json").read_text())["fp32"]["top1_agreement"] == 1.0


def test_slaney_mel_scale_is_linear_below_1khz_and_logarithmic_above():
    from foldernet.audio import mel_filterbank

    freqs = np.linspace(0, 8000, 4097)
    peaks = freqs[mel_filterbank(16000, 8192, 96, 0.0, 8000.0, "slaney").argmax(axis=1)]
    steps = np.diff(peaks[peaks < 900])
    assert len(steps) > 10 and steps.std() < 0.05 * steps.mean()  # equal steps in Hz (200/3 Hz each)
    ratios = np.diff(np.log(peaks[peaks > 1500]))
    assert ratios.std() < 0.05 * ratios.mean()  # equal steps in log frequency
    htk_peaks = freqs[mel_filterbank(16000, 8192, 96, 0.0, 8000.0, "htk").argmax(axis=1)]
    assert np.diff(htk_peaks[htk_peaks < 900]).std() > 0.05 * np.diff(htk_peaks[htk_peaks < 900]).mean()
    with pytest.raises(FoldernetError, match="unknown mel scale 'bark'"):
        mel_filterbank(16000, 512, 96, 0.0, 8000.0, "bark")
