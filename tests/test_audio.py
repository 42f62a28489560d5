"""Audio through the same pipeline, on sounds the tests synthesise with NumPy."""

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import foldernet
from foldernet.errors import FoldernetError
from foldernet.models import create_backbone
from foldernet.spectrogram_stats import spectrogram_stats_dim
from foldernet.audio import (AudioConfig, config_for, log_mel, mel_filterbank, read_audio, resample,
                             warp_spectrogram, windows)

RATES = (8000, 16000, 22050, 44100)


def _tone(kind: str, rng, sr: int, seconds: float | None = None) -> np.ndarray:
    """One synthetic sound: a random length, a random silent lead-in, noise at a random level."""
    seconds = seconds or rng.uniform(0.3, 0.9)
    t = np.arange(int(sr * seconds)) / sr
    if kind == "low":
        x = np.sin(2 * np.pi * rng.uniform(150, 400) * t)
    elif kind == "high":
        x = np.sin(2 * np.pi * rng.uniform(2000, 3500) * t)
    else:  # chirp sweeping up
        f0, f1 = rng.uniform(200, 500), rng.uniform(3000, 4000)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    x = x * np.hanning(len(t)) ** rng.uniform(0.1, 1.0)  # varied envelopes
    lead = np.zeros(int(sr * rng.uniform(0, 0.3)))
    x = np.concatenate([lead, rng.uniform(0.2, 0.6) * x])
    return (x + rng.uniform(0.005, 0.05) * rng.standard_normal(len(x))).astype(np.float32)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """Three classes of 14 clips, at mixed sample rates, some stereo, as WAV, FLAC and OGG."""
    root = tmp_path_factory.mktemp("audio") / "data"
    rng = np.random.default_rng(0)
    for cls in ("low", "high", "chirp"):
        (root / cls).mkdir(parents=True)
        for k in range(14):
            sr = RATES[k % len(RATES)]
            x = _tone(cls, rng, sr)
            if k % 3 == 0:
                x = np.stack([x, 0.8 * x], axis=1)  # stereo
            ext, fmt = [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG")][k % 3]
            sf.write(root / cls / f"{cls}_{k}.{ext}", x, sr, format=fmt)
    return root


def test_loading_resamples_and_mixes_to_mono(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 44100)
    clip = read_audio(tmp_path / "s.wav")
    assert clip.channels == 2 and clip.sample_rate == 44100 and clip.samples.ndim == 1
    x = resample(clip.samples, 44100, 16000)
    assert abs(len(x) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spectrum) * 16000 / len(x) - 440) < 5  # the tone survives resampling
    cfg = AudioConfig()
    db = log_mel(x, cfg)
    assert db.shape[0] == cfg.n_mels and db.max() <= 0 and db.min() >= -cfg.top_db
    assert len(windows(np.zeros(4000, np.float32), cfg)) == 1  # short clip padded
    assert len(windows(np.zeros(16000 * 5, np.float32), cfg)) == 9  # long clip: 50 % overlap


def test_eight_bit_and_mp3_named_wav_are_read(tmp_path):
    sr = 16000
    x = (0.5 * np.sin(2 * np.pi * 300 * np.arange(sr) / sr)).astype(np.float32)
    sf.write(tmp_path / "u8.wav", x, sr, subtype="PCM_U8")
    assert abs(np.abs(read_audio(tmp_path / "u8.wav").samples).max() - 0.5) < 0.02
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="MP3")
    (tmp_path / "really_mp3.wav").write_bytes(buf.getvalue())
    clip = read_audio(tmp_path / "really_mp3.wav")
    assert clip.seconds > 0.9


def test_train_predict_and_export_on_audio(sounds, tmp_path):
    result = foldernet.train(sounds, out=tmp_path / "run", progress=False, val=0.2, test=0.2)
    assert result.config["kind"] == "audio" and result.config["audio"]["sample_rate"] == 16000
    assert not result.config["spectrogram_stats"]  # off by default
    assert result.metrics["splits"]["test"]["accuracy"] >= 0.8  # chance is 1/3
    # a long clip (several windows, averaged) of an unseen low tone
    rng = np.random.default_rng(99)
    long_low = np.concatenate([_tone("low", rng, 22050, 1.0) for _ in range(4)])
    sf.write(tmp_path / "long_low.wav", long_low, 22050)
    model = foldernet.load(tmp_path / "run")
    assert model.predict([tmp_path / "long_low.wav"])[0].label == "low"
    report = foldernet.export(tmp_path / "run")
    assert report["fp32"]["top1_agreement"] == 1.0
    from foldernet.onnx_predictor import OnnxClassifier

    onnx_pred = OnnxClassifier(tmp_path / "run" / "export" / "model.onnx").predict([tmp_path / "long_low.wav"])[0]
    torch_pred = model.predict([tmp_path / "long_low.wav"])[0]
    assert onnx_pred.label == torch_pred.label
    assert abs(onnx_pred.confidence - torch_pred.confidence) < 1e-3

    # a timeline answers each window of a long recording: five low tones, then five high ones,
    # each followed by 0.3 s of silence
    sr, rng = 22050, np.random.default_rng(99)
    low_then_high = np.concatenate([part for kind in ["low"] * 5 + ["high"] * 5
                                    for part in (_tone(kind, rng, sr), np.zeros(int(0.3 * sr), np.float32))])
    sf.write(tmp_path / "low_then_high.wav", low_then_high, sr)
    seconds = len(low_then_high) / sr
    segments = model.timeline(tmp_path / "low_then_high.wav")
    window = result.config["audio"]["window_seconds"]
    assert len(segments) >= 2 * seconds / window - 2  # every window, not max_windows of them
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    assert segments[0].start == 0 and abs(segments[-1].end - seconds) < 0.01
    early = [s.label for s in segments if s.end <= 3.5]
    late = [s.label for s in segments if s.start >= seconds - 3.5]
    assert early.count("low") >= 0.8 * len(early) and late.count("high") >= 0.8 * len(late)
    onnx_segments = OnnxClassifier(tmp_path / "run" / "export" / "model.onnx").timeline(tmp_path / "low_then_high.wav")
    assert [s.label for s in onnx_segments] == [s.label for s in segments]
    with pytest.raises(FoldernetError, match="cannot read audio .*broken.wav"):
        (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
        model.timeline(tmp_path / "broken.wav")
    proc = subprocess.run([sys.executable, "-m", "foldernet", "predict", str(tmp_path / "run"),
                           str(tmp_path / "low_then_high.wav"), str(tmp_path / "broken.wav"), "--timeline",
                           "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "broken.wav" in proc.stdout and "skipped" in proc.stdout  # named, and the good file still done
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["label1"] for r in rows] == [s.label for s in segments]
    assert float(rows[1]["start_s"]) == segments[1].start


def test_spectrogram_stats_follow_the_time_course(tmp_path):
    """A plucked (decaying) and a swelling note with the same pitch: the statistics' loudness
    envelope falls for one and rises for the other, and the spectral part sees the same pitch."""
    import torch

    from foldernet.spectrogram_stats import STATS_ENVELOPE, add_spectrogram_stats
    from foldernet.modality import for_dataset, source_pixels

    sr = 16000
    t = np.arange(2 * sr) / sr
    tone = np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 880 * t)
    sf.write(tmp_path / "pluck.wav", (0.5 * tone * np.exp(-3 * t)).astype(np.float32), sr)
    sf.write(tmp_path / "swell.wav", (0.5 * tone * np.minimum(1, t / 1.5)).astype(np.float32), sr)
    bb = create_backbone()
    pre, cfg = for_dataset(bb.data_config, "audio", None, {"window_seconds": 2.0})
    model = add_spectrogram_stats(bb, pre.size).model
    out = {}
    for name in ("pluck", "swell"):
        with torch.no_grad():
            x = torch.from_numpy(source_pixels(tmp_path / f"{name}.wav", pre, cfg))
            out[name] = model.stats(x)[0].numpy()
            assert model(x).shape[1] == bb.num_features + spectrogram_stats_dim()
    envelope = slice(-STATS_ENVELOPE - 64, -64)
    pluck, swell = out["pluck"][envelope], out["swell"][envelope]
    assert pluck[2] > pluck[-2] + 0.3 and swell[-2] > swell[2] + 0.3  # 0.3 units ~ 5 dB
    bands = out["pluck"][:320].reshape(64, 5).mean(axis=1)  # band levels, highest frequencies first
    assert bands.max() > bands.min() + 1.0 and bands.argmax() > 32  # 440 Hz is loud and in the lower half


def test_spectrogram_stats_train_export_and_reload(sounds, tmp_path):
    """Through the command line, with the audio settings chosen there."""
    import json

    proc = subprocess.run([sys.executable, "-m", "foldernet", "train", str(sounds), "--out", str(tmp_path / "run"),
                           "--val", "0.2", "--test", "0.2", "--spectrogram-stats", "--window", "0.8",
                           "--n-mels", "96"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["spectrogram_stats"] and config["audio"]["window_seconds"] == 0.8 and config["audio"]["n_mels"] == 96
    assert config["num_features"] == create_backbone().num_features + spectrogram_stats_dim()
    assert config["metrics"]["accuracy"] >= 0.8  # chance is 1/3
    model = foldernet.load(tmp_path / "run")
    stats = model.predict_batch([next((sounds / "low").iterdir())])[1][0, -spectrogram_stats_dim():]
    assert 0.05 < np.abs(stats).mean() < 3  # standardised with the training clips' mean and spread
    report = foldernet.export(tmp_path / "run")
    assert report["fp32"]["top1_agreement"] == 1.0


def test_spectrogram_warp_moves_pitch_and_time_but_keeps_the_frame():
    cfg = AudioConfig()
    t = np.arange(16000) / 16000
    burst = np.sin(2 * np.pi * 1000 * t) * (np.abs(t - 0.5) < 0.1)  # 1 kHz, 0.2 s, mid-window
    db = log_mel(burst.astype(np.float32), cfg)
    rng = np.random.default_rng(0)
    assert np.array_equal(warp_spectrogram(db, rng, cfg.top_db, stretch=0.0, shift=0.0, gain_db=(0, 0)), db)
    peak_row = int(np.argmax(db.max(axis=1)))
    rows, starts = [], []
    for _ in range(40):
        w = warp_spectrogram(db, rng, cfg.top_db)
        assert w.shape == db.shape and w.min() >= -cfg.top_db and w.max() <= 0
        rows.append(int(np.argmax(w.max(axis=1))))
        starts.append(int(np.argmax(w.max(axis=0) > -20)))
    assert min(rows) < peak_row < max(rows) and max(rows) <= peak_row * 1.2  # up and down, by <= 15 %
    assert len(set(starts)) > 5  # the sound moves in time


def test_speech_rate_config_and_scratch_cnn_learn_from_spectrograms(sounds, tmp_path):
    narrow = tmp_path / "narrow.wav"
    sf.write(narrow, np.zeros(8000, np.float32), 8000)
    cfg = config_for([narrow])
    assert (cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmax) == (8000, 256, 64, 4000)
    wide = tmp_path / "wide.wav"
    sf.write(wide, np.zeros(44100, np.float32), 44100)
    chosen = config_for([wide], {"sample_rate": 8000, "window_seconds": None})  # a chosen rate sets the rest
    assert (chosen.sample_rate, chosen.n_fft, chosen.n_mels, chosen.fmax) == (8000, 256, 64, 4000)
    with pytest.raises(foldernet.FoldernetError, match="window seconds 0.01 is out of range"):
        config_for([wide], {"window_seconds": 0.01})
    assert (mel_filterbank(8000, 256, 64, 20.0, 4000.0).sum(axis=1) > 0).all()  # no empty mel band at the speech setting
    result = foldernet.train(sounds, out=tmp_path / "run", backbone="scratch", img_size=48, epochs=8,
                             progress=False, val=0.2, test=0.2)
    assert result.config["training"]["finetune"]["epochs"] == 8
    m = result.metrics["splits"]
    n = m["val"]["n"] + m["test"]["n"]
    acc = (m["val"]["accuracy"] * m["val"]["n"] + m["test"]["accuracy"] * m["test"]["n"]) / n
    assert acc >= 0.6  # chance is 1/3


def test_audio_audit_flags_silent_clipped_short_corrupt_and_mixed_rates(sounds, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sounds, data)
    sf.write(data / "low" / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(data / "low" / "clipped.wav", np.clip(3 * np.sin(np.arange(16000) / 3), -1, 1).astype(np.float32), 16000)
    sf.write(data / "high" / "blip.wav", np.ones(80, np.float32) * 0.3, 16000)
    (data / "high" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    (data / "chirp" / "empty.wav").write_bytes(b"")
    from foldernet.audit import audit

    r = audit(data, progress=False)
    f = r["findings"]
    assert any(e["path"] == "low/silent.wav" for e in f["silent"])
    assert any(e["path"] == "low/clipped.wav" for e in f["clipped"])
    assert any(e["path"] == "high/blip.wav" for e in f["too_short"])
    unreadable = {e["path"] for e in f["unreadable"]}
    assert {"high/corrupt.wav", "chirp/empty.wav"} <= unreadable
    assert "44100 Hz" in f["mixed_sample_rates"][0]["reason"]


def test_flat_folder_with_labels_and_groups_in_file_names(tmp_path):
    rng = np.random.default_rng(1)
    flat = tmp_path / "recordings"
    flat.mkdir()
    for kind in ("low", "high"):
        for speaker in ("ann", "bob", "cyd", "dan", "eve"):
            for n in range(3):
                sf.write(flat / f"{kind}_{speaker}_{n}.wav", _tone(kind, rng, 8000), 8000)
    ds = foldernet.split_dataset(flat, label_regex=r"^([a-z]+)_", group_by=r"regex:^[a-z]+_([a-z]+)_",
                                 val=0.2, test=0.2, out=tmp_path / "splits.csv")
    assert set(ds.classes) == {"low", "high"}
    sides = {}
    for it in ds.items:
        sides.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in sides.values())  # each speaker on one side only


def test_server_accepts_audio_and_returns_a_spectrogram(sounds, tmp_path):
    from fastapi.testclient import TestClient

    from foldernet.serve import create_app

    foldernet.train(sounds, out=tmp_path / "run", progress=False, val=0.2, test=0.2)
    with TestClient(create_app(tmp_path / "run"), base_url="http://127.0.0.1") as client:
        wav = next((sounds / "high").glob("*.wav")).read_bytes()
        r = client.post("/predict", files={"file": ("clip.bin", wav, "application/octet-stream")})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["label"] in ("low", "high", "chirp") and j["spectrogram"].startswith("data:image/png;base64,")
        assert "timeline" not in j
        x, sr = sf.read(io.BytesIO(wav), always_2d=True)
        x = x.mean(axis=1)
        buf = io.BytesIO()
        sf.write(buf, np.concatenate([x, np.zeros(sr // 2), x]), sr, format="WAV")  # two sounds, 1/2 s apart
        r = client.post("/predict?timeline=true", files={"file": ("two.wav", buf.getvalue(), "audio/wav")})
        assert r.status_code == 200, r.text
        windows = r.json()["timeline"]
        assert len(windows) >= 2 and windows[0]["start"] == 0 and windows[-1]["end"] > windows[0]["end"]
        assert {w["label"] for w in windows} <= {"low", "high", "chirp"}
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(png, "PNG")
        r = client.post("/predict?timeline=true", files={"file": ("x.png", png.getvalue(), "image/png")})
        assert r.status_code == 415 and "sounds" in r.json()["error"]  # a sound model refuses an image
        two_sounds = buf.getvalue()
    # the page: an audio upload shows its spectrogram, the bar chart and the per-window timeline
    from browser import browser_page, running_server

    (tmp_path / "two.wav").write_bytes(two_sounds)
    with running_server(create_app(tmp_path / "run")) as url, browser_page(1000, 900) as page:
        page.goto(url + "/")
        page.set_input_files("#file", str(tmp_path / "two.wav"))
        page.wait_for_selector("#chart .bar", timeout=30000)
        assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")
        assert page.locator("#timeline tr").count() == len(windows) + 1
        r = client.post("/predict", files={"file": ("x.wav", b"RIFF....WAVEjunk", "audio/wav")})
        assert r.status_code == 415 and "audio" in r.json()["error"]
    # labelling sounds: the queue says audio, the page gets the clip and its spectrogram; suggest's sheet plays them
    from foldernet.grow import suggest, write_suggestions

    pile = tmp_path / "pile"
    pile.mkdir()
    for f in sorted((sounds / "low").glob("*.wav"))[:3] + sorted((sounds / "chirp").glob("*.wav"))[:3]:
        (pile / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    app = create_app(tmp_path / "run", label=([pile], tmp_path / "labelled"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        queue = client.get("/label/queue").json()
        assert queue["items"] and all(it["kind"] == "audio" for it in queue["items"])
        first = queue["items"][0]["id"]
        assert client.get(f"/label/item/{first}").headers["content-type"] == "audio/wav"
        assert client.get(f"/label/item/{first}/spectrogram").headers["content-type"] == "image/png"
        r = client.post(f"/label/item/{first}", json={"label": "low"})
        assert r.status_code == 200 and r.json()["copied"] and r.json()["path"].startswith("low/")
    model = foldernet.load(tmp_path / "run")
    chosen = suggest(model, pile, n=3)  # (clips that duplicate training clips are left out)
    write_suggestions(tmp_path / "sheet", chosen, model.audio)
    page = (tmp_path / "sheet" / "suggest.html").read_text()
    assert chosen.chosen and page.count("<audio controls") == page.count('alt="spectrogram"') == len(chosen.chosen)


def test_hostile_wav_headers_are_refused_without_huge_allocations(tmp_path):
    import struct

    from foldernet.errors import FoldernetError

    buf = io.BytesIO()
    sf.write(buf, np.zeros(800, np.float32), 8000, format="WAV", subtype="FLOAT")
    good = bytearray(buf.getvalue())
    many_channels = bytearray(good)
    many_channels[22:24] = struct.pack("<H", 60000)
    huge_rate = bytearray(good)
    huge_rate[24:28] = struct.pack("<I", 2_000_000_000)
    huge_data = bytearray(good)
    i = bytes(huge_data).find(b"data")
    huge_data[i + 4:i + 8] = struct.pack("<I", 0xFFFFFFF0)  # claims 4 GB of samples
    for data in (many_channels, huge_rate):
        with pytest.raises(FoldernetError):
            read_audio(bytes(data))
    clip = read_audio(bytes(huge_data))  # reads what is really there
    assert clip.seconds <= 0.2


def test_finetune_validation_sees_every_window_as_predict_does(tmp_path):
    """Fine-tuning picks its epoch on validation clips: they must look as predict sees them (every
    window, in dB from the clip's loudest bin), not one middle window that misses a note's onset."""
    import torch

    from foldernet.finetune import FolderDataset
    from foldernet.modality import for_dataset, source_pixels

    rng = np.random.default_rng(5)
    note = np.concatenate([_tone("low", rng, 16000, 0.5), 0.02 * _tone("high", rng, 16000, 2.5)])
    sf.write(tmp_path / "note.wav", note, 16000)
    pre, cfg = for_dataset(create_backbone("scratch", pretrained=False).data_config, "audio",
                           audio={"window_seconds": 1.0}, paths=[tmp_path / "note.wav"])
    expected = source_pixels(tmp_path / "note.wav", pre, cfg)
    assert len(expected) >= 4
    val = FolderDataset([tmp_path / "note.wav"], np.array([0]), None, pre.resize_size, cfg, "none", pre, train=False)
    x, label = val[0]
    assert label == 0 and x.shape == expected.shape
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    train = FolderDataset([tmp_path / "note.wav"], np.array([0]), None, pre.resize_size, cfg, "none", pre, train=True)
    torch.manual_seed(0)
    drawn = set()
    for _ in range(20):  # training draws one window at a time, each as predict sees it (no augmentation here)
        x = train[0][0].numpy()
        match = [k for k, w in enumerate(expected) if np.abs(w - x).max() < 1e-6]
        assert match, "a training window is not rendered as predict renders it (quiet windows must stay quiet)"
        drawn.add(match[0])
    assert len(drawn) > 1


def test_top_mode_and_a_crop_are_refused_for_sound_before_work(sounds, tmp_path):
    """--mode top caches activations per input, but a clip's windows are averaged after the backbone;
    a spectrogram is rendered at the input size, so there is nothing to crop."""
    from foldernet.errors import FoldernetError

    with pytest.raises(FoldernetError, match="--mode top is for images, not audio"):
        foldernet.train(sounds, out=tmp_path / "x", mode="top", progress=False)
    with pytest.raises(FoldernetError, match="--crop-pct 0.875 is for images"):
        foldernet.train(sounds, out=tmp_path / "x", crop_pct=0.875, progress=False)
    assert not (tmp_path / "x").exists()
