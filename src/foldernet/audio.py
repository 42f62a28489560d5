"""Audio through the same pipeline: a clip becomes log-mel spectrogram images, one per window.

Loading: soundfile (libsndfile: WAV, FLAC, OGG, MP3) and PyAV (FFmpeg) for anything else, sniffed
by content, never by extension; any sample rate is resampled (``scipy.signal.resample_poly``) to
``AudioConfig.sample_rate`` and mixed to mono. Clips shorter than a window are zero-padded; longer
ones are cut into windows (hop = half a window) whose embeddings are averaged, which for a linear
head is averaging the logits of the windows.

Spectrogram (documented): 16 kHz (or the data's own rate when all of it is lower, e.g. 8 kHz
telephone speech), n_fft 1024 (64 ms at 16 kHz, Hann window; 32 ms below 16 kHz), hop 10 ms, 128 mel
bands (64 below 16 kHz) from 20 Hz to half the rate (Slaney-style triangular filters on the HTK mel
scale), power in dB relative to the clip's loudest bin (so loudness does not matter and quiet
stretches stay quiet), clipped to [-80, 0] dB and mapped to 0..255. The image is time along x, low
frequencies at the bottom, resized to the backbone's input size and copied to three channels.
The mel filterbank is written here with NumPy because librosa's first call JIT-compiles for ~45 s.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FoldernetError

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif"}
MAX_SECONDS = 300.0  # a longer file is read only this far (windows past it are not used)
MAX_RATE = 192_000   # a header claiming more is corrupt (or hostile)
MAX_CHANNELS = 64


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    window_seconds: float = 1.0
    n_fft: int = 1024
    hop_length: int = 160
    n_mels: int = 128
    fmin: float = 20.0
    fmax: float = 8000.0
    top_db: float = 80.0
    max_windows: int = 16
    mel_scale: str = "htk"  # or "slaney" (librosa's default), what a backbone trained with librosa saw

    @property
    def window_samples(self) -> int:
        """The window's length in samples at ``sample_rate``."""
        return int(self.window_seconds * self.sample_rate)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def config_for(paths: list[Path], overrides: dict | None = None) -> AudioConfig:
    """The dataset's AudioConfig: 16 kHz, or the highest rate in the data when that is lower (no
    upsampled, empty top half of the spectrogram), with the mel range up to half the rate; a window
    of 1 s, or shorter (down to 0.5 s) when 95 % of the clips are shorter (spoken words: ~0.7 s)."""
    import soundfile as sf

    rates, seconds = [], []
    for p in paths[:: max(1, len(paths) // 64)][:64]:
        try:
            info = sf.info(str(p))
            rates.append(info.samplerate)
            seconds.append(info.duration)
        except Exception:  # noqa: BLE001 - unreadable files are reported elsewhere
            continue
    base = AudioConfig()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, low, high in (("window_seconds", 0.1, MAX_SECONDS), ("sample_rate", 4000, 192000), ("n_mels", 16, 256)):
        if key in overrides and not low <= overrides[key] <= high:
            raise FoldernetError(f"audio {key.replace('_', ' ')} {overrides[key]} is out of range: use {low} to {high}")
    rate = min(base.sample_rate, max(rates)) if rates else base.sample_rate
    rate = int(overrides.get("sample_rate", rate))  # a chosen rate sets the derived fields too
    hop = max(1, round(rate * base.hop_length / base.sample_rate))
    # below 16 kHz (speech, telephone): a 32 ms frame and 64 bands, so no mel band is narrower than
    # an FFT bin (128 bands over 0-4 kHz would leave the lowest ones empty)
    fields = {"sample_rate": rate, "fmax": rate / 2, "hop_length": hop,
              "n_fft": 1024 if rate >= 16000 else 2 ** round(np.log2(rate * 0.032)),
              "n_mels": base.n_mels if rate >= 16000 else 64}
    if seconds:  # short clips (words, hits): a window that holds 95 % of them whole, not mostly silence
        fields["window_seconds"] = float(min(base.window_seconds,
                                             max(0.5, np.ceil(np.percentile(seconds, 95) * 10) / 10)))
    fields.update(overrides)
    return AudioConfig(**fields)


def is_audio_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


@dataclass
class Clip:
    samples: np.ndarray     # float32 mono in [-1, 1] at the original rate
    sample_rate: int
    channels: int
    subtype: str = ""

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate if self.sample_rate else 0.0


def read_audio(source: str | os.PathLike | bytes, max_seconds: float = MAX_SECONDS) -> Clip:
    """Decode any audio file or bytes to mono float32; raises with a plain reason when it cannot."""
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    if not data:
        raise FoldernetError("empty audio file (0 bytes)")
    try:
        import soundfile as sf

        with sf.SoundFile(io.BytesIO(data)) as f:
            _check_header(f.samplerate, f.channels)
            # read in blocks: memory follows the samples really there, not what a header claims
            limit, got, blocks = int(max_seconds * f.samplerate), 0, []
            for block in f.blocks(blocksize=65536, dtype="float32", always_2d=True):
                blocks.append(block.mean(axis=1))
                got += len(block)
                if got >= limit:
                    break
            x = np.concatenate(blocks)[:limit] if blocks else np.zeros(0, np.float32)
            return Clip(x.astype(np.float32), int(f.samplerate), int(f.channels), str(f.subtype))
    except FoldernetError:
        raise
    except Exception:  # noqa: BLE001 - not something libsndfile reads: let FFmpeg try
        pass
    return _read_with_av(data, max_seconds)


def _read_with_av(data: bytes, max_seconds: float) -> Clip:
    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise FoldernetError("no audio stream in the file")
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate)
            channels = int(stream.codec_context.channels or 1)
            _check_header(rate, channels)
            chunks, total = [], 0
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1)
                    chunks.append(arr)
                    total += len(arr)
                if total >= max_seconds * rate:
                    break
            x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
            return Clip(x[:int(max_seconds * rate)], rate, channels, "ffmpeg")
    except FoldernetError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything FFmpeg cannot decode is not audio for us
        raise FoldernetError(f"not a readable audio file ({type(exc).__name__})") from None


def _check_header(rate: int, channels: int) -> None:
    if not 1000 <= rate <= MAX_RATE or not 1 <= channels <= MAX_CHANNELS:
        raise FoldernetError(f"implausible audio header ({rate} Hz, {channels} channels): the file is damaged")


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target or len(x) == 0:
        return x.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(x, target // g, rate // g).astype(np.float32)


@lru_cache(maxsize=8)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, scale: str = "htk") -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, area-normalised (Slaney), on the HTK mel scale or
    Slaney's (linear below 1 kHz, logarithmic above: librosa's default)."""
    if scale not in ("htk", "slaney"):
        raise FoldernetError(f"unknown mel scale '{scale}': use htk or slaney")
    step, log_step = 200.0 / 3, np.log(6.4) / 27.0  # Slaney: 15 mels per kHz below 1 kHz

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        if scale == "htk":
            return 2595.0 * np.log10(1.0 + f / 700.0)
        return np.where(f < 1000.0, f / step, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / log_step)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        if scale == "htk":
            return 700.0 * (10 ** (m / 2595.0) - 1.0)
        return np.where(m < 15.0, m * step, 1000.0 * np.exp(log_step * (m - 15.0)))

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(min(fmax, sr / 2)), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)), np.float32)
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[m] = np.maximum(0, np.minimum(up, down)) * (2.0 / max(hi - lo, 1e-9))
    return fb


def _raw_db(x: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Mel power in dB, unreferenced and unclipped."""
    n_fft, hop = cfg.n_fft, cfg.hop_length
    pad = n_fft // 2
    x = np.pad(x, (pad, pad), mode="constant")
    n_frames = 1 + max(0, (len(x) - n_fft) // hop)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    spec = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** 2 / (window.sum() ** 2 / 4)
    mel = mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.mel_scale) @ spec.T
    return 10.0 * np.log10(np.maximum(mel, 1e-12))


def log_mel(x: np.ndarray, cfg: AudioConfig, ref_db: float | None = None) -> np.ndarray:
    """(n_mels, frames) in dB relative to ``ref_db`` (default: this window's loudest bin), clipped to
    [-top_db, 0]: loudness (microphone, speaker, gain) does not change the picture, only its shape."""
    db = _raw_db(x, cfg)
    return np.clip(db - (db.max() if ref_db is None else ref_db), -cfg.top_db, 0.0)


def window_starts(n_samples: int, cfg: AudioConfig) -> list[int]:
    """Where each window begins (in samples at ``cfg.sample_rate``): 0 for a short clip; for a long
    one every half window, the last flush with the end, at most max_windows spread evenly."""
    n = cfg.window_samples
    if n_samples <= n:
        return [0]
    starts = list(range(0, n_samples - n + 1, n // 2))
    if starts[-1] != n_samples - n:
        starts.append(n_samples - n)
    if len(starts) > cfg.max_windows:
        starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, cfg.max_windows)]
    return starts


def windows(x: np.ndarray, cfg: AudioConfig) -> list[np.ndarray]:
    """Fixed-length windows: centre a short clip in silence; cut a long one with 50 % overlap (at
    most max_windows, spread evenly over the clip)."""
    n = cfg.window_samples
    if len(x) <= n:
        left = (n - len(x)) // 2
        return [np.pad(x, (left, n - len(x) - left))]
    return [x[s:s + n] for s in window_starts(len(x), cfg)]


def warp_spectrogram(db: np.ndarray, rng: np.random.Generator, top_db: float, stretch: float = 0.15,
                     shift: float = 0.125, gain_db: tuple[float, float] = (-12.0, 4.0)) -> np.ndarray:
    """Training augmentation for speech and notes: stretch the (n_mels, frames) dB array along
    frequency by up to +-``stretch`` (like vocal-tract-length perturbation: a higher or lower voice;
    low frequencies stay anchored at row 0), along time by up to +-``stretch`` (faster or slower),
    and move it by up to ``shift`` of the window in time, then raise or lower its level by ``gain_db``
    (a quieter or louder recording: more or less of it above the noise floor). Uncovered cells
    become silence (``-top_db``). On spoken digits with unseen speakers this was worth more than
    SpecAugment."""
    h, w = db.shape
    fh = max(1, int(round(h * rng.uniform(1 - stretch, 1 + stretch))))
    fw = max(1, int(round(w * rng.uniform(1 - stretch, 1 + stretch))))
    warped = np.asarray(Image.fromarray(db.astype(np.float32), "F").resize((fw, fh), Image.Resampling.BILINEAR))
    out = np.full((h, w), -top_db, np.float32)
    rows = min(h, fh)
    offset = (w - fw) // 2 + int(rng.integers(-int(shift * w), int(shift * w) + 1))
    a, b = max(0, offset), min(w, offset + fw)
    if b > a:
        out[:rows, a:b] = warped[:rows, a - offset:b - offset]
    return np.clip(out + rng.uniform(*gain_db), -top_db, 0.0)


def spectrogram_image(db: np.ndarray, cfg: AudioConfig, size: int | None = None) -> Image.Image:
    """dB mel spectrogram -> RGB image (low frequencies at the bottom)."""
    g = ((db + cfg.top_db) * (255.0 / cfg.top_db)).clip(0, 255).astype(np.uint8)[::-1]
    img = Image.fromarray(np.ascontiguousarray(g), "L")
    if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img.convert("RGB")


def _render_windows(source, cfg: AudioConfig, size: int | None):
    """Decode, resample, window and render: (images, clip, window starts, samples at cfg's rate)."""
    clip = read_audio(source)
    clip.samples = np.clip(np.nan_to_num(clip.samples, nan=0.0, posinf=1.0, neginf=-1.0), -10.0, 10.0)
    x = resample(clip.samples, clip.sample_rate, cfg.sample_rate)
    images = [spectrogram_image(db, cfg, size) for db in window_mels(x, cfg)]
    return images, clip, window_starts(len(x), cfg), len(x)


def window_mels(x: np.ndarray, cfg: AudioConfig) -> list[np.ndarray]:
    """Each window's (n_mels, frames) dB spectrogram relative to the clip's loudest bin, clipped to
    [-top_db, 0]: quiet windows of a loud clip stay quiet, as the model hears them everywhere."""
    mels = [_raw_db(w, cfg) for w in windows(x, cfg)]
    ref = max(float(m.max()) for m in mels)
    return [np.clip(m - ref, -cfg.top_db, 0.0) for m in mels]


def clip_images(source, cfg: AudioConfig, size: int | None = None) -> tuple[list[Image.Image], dict]:
    """Decode, resample, window and render a clip: (one image per window, facts for the audit)."""
    images, clip, _, _ = _render_windows(source, cfg, size)
    return images, audio_facts(clip)


def timeline_images(source, cfg: AudioConfig, size: int | None = None
                    ) -> tuple[list[Image.Image], list[tuple[float, float]]]:
    """Every window of a recording (no max_windows cap, up to MAX_SECONDS) with its (start, end) in
    seconds: the input of a timeline, where a long recording's windows are answered one by one."""
    images, _, starts, total = _render_windows(source, replace(cfg, max_windows=1 << 30), size)
    n = cfg.window_samples
    return images, [(s / cfg.sample_rate, min(s + n, total) / cfg.sample_rate) for s in starts]


def audio_facts(clip: Clip) -> dict:
    x = clip.samples
    peak = float(np.abs(x).max()) if len(x) else 0.0
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0
    return {"kind": "audio", "sample_rate": clip.sample_rate, "channels": clip.channels,
            "seconds": round(clip.seconds, 4), "peak": round(peak, 5),
            "rms_dbfs": round(20 * np.log10(max(rms, 1e-10)), 2),
            "clipped": round(float(np.mean(np.abs(x) >= 0.999)) if len(x) else 0.0, 5)}


def check_audio_header(path: Path) -> str | None:
    """Cheap check that a file is audio we can read; a reason when it is not."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        import soundfile as sf

        try:
            info = sf.info(str(path))
            return None if info.frames > 0 or info.duration > 0 else "audio file has no samples (zero length)"
        except Exception:  # noqa: BLE001 - libsndfile does not know it: ask FFmpeg
            import av

            with av.open(str(path)) as c:
                return None if c.streams.audio else "no audio stream in the file"
    except PermissionError:
        return "permission denied: make the file readable"
    except Exception as exc:  # noqa: BLE001
        return f"not a readable audio file ({type(exc).__name__})"


def spectrogram_png(source, cfg: AudioConfig) -> bytes:
    """The first window's spectrogram as PNG (for the web page)."""
    images, _ = clip_images(source, cfg)
    buf = io.BytesIO()
    images[0].resize((images[0].width * 2, images[0].height * 2)).save(buf, "PNG")
    return buf.getvalue()
