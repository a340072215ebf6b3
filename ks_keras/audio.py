"""Decode, validate and resample audio files (`soundfile` + `soxr`).

`load_audio` is the one door through which waveforms enter the project: every file is decoded
with `soundfile` (WAV, FLAC, OGG, …), mixed down to mono, checked, and resampled with `soxr`
to the rate the feature extractor expects. Problems that would otherwise surface later as a
cryptic TF error or a silent NaN are raised here as one `ValueError`/`FileNotFoundError` that
names the file. Suspicious but usable audio (clipping, silence) only warns.

Example:

```python
wave = load_audio("data/emodb/wav/03a01Fa.wav", sample_rate=16000)
wave.dtype, wave.ndim  # float32, 1
```
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# |x| at or above this counts as a clipped sample (int16 full scale is 32767/32768 = 0.99997).
CLIP_LEVEL = 0.999
# Warn about clipping when more than this fraction of samples sit at full scale.
CLIP_FRACTION = 1e-3
# Peak below this (-80 dBFS) is treated as an all-silent recording.
SILENCE_PEAK = 1e-4


class AudioQualityWarning(UserWarning):
    """A recording decodes fine but looks wrong (clipped, silent); it is still used."""


def _wav_truncation(path: Path) -> str | None:
    """For RIFF/WAVE files, compare the data chunk's declared size with the bytes present.

    libsndfile silently shortens a truncated WAV to what is there, so a half-copied file
    would otherwise pass as a shorter recording. Returns a description, or None if fine or
    not a WAV (other formats are checked by their decoders).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - pos - 8
                # 0 and 0xFFFFFFFF mean "unknown" (streamed writers); nothing to compare.
                if chunk_size not in (0, 0xFFFFFFFF) and available < chunk_size:
                    return (
                        f"truncated: its header declares {chunk_size} bytes of audio but the "
                        f"file holds {available}"
                    )
                return None
            pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word aligned
    return None


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file to float32 mono at its own sample rate, validated.

    Args:
        path: audio file (any format libsndfile reads: WAV, FLAC, OGG/Vorbis, …).

    Returns:
        `(waveform [N] float32, sample_rate)`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable, corrupt, truncated, empty, or NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        truncation = _wav_truncation(path)
        info = sf.info(str(path))
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, struct.error) as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from None
    if truncation:
        raise ValueError(f"{path}: {truncation}")
    if info.frames > 0 and data.shape[0] < info.frames:
        raise ValueError(
            f"{path}: truncated: header declares {info.frames} frames, decoded {data.shape[0]}"
        )
    if data.shape[0] == 0:
        raise ValueError(f"{path}: contains no audio samples (zero length)")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{path}: {bad} NaN/inf sample(s); the recording is corrupt")
    # Mono by averaging channels (keeps the level of a dual-mono file unchanged).
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate)


def load_audio(path: str | Path, sample_rate: int = 16000, min_seconds: float = 0.0) -> np.ndarray:
    """Load a recording as float32 mono in [-1, 1] at `sample_rate`.

    Args:
        path: audio file (WAV, FLAC, OGG, …).
        sample_rate: target rate in Hz; the file is resampled with soxr (high quality) if needed.
        min_seconds: recordings shorter than this are an error (0 accepts any non-empty file).

    Returns:
        1-D float32 array in [-1, 1].

    Raises:
        FileNotFoundError: missing file.
        ValueError: corrupt/truncated/empty/too short file or NaN/inf samples; the message
            names the file.

    Warns:
        AudioQualityWarning: clipping (many samples at full scale) or an all-silent recording.

    Example:

    >>> wave = load_audio("data/emodb/wav/03a01Fa.wav")  # doctest: +SKIP
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate: expected a positive rate in Hz, got {sample_rate!r}")
    wave, rate = read_audio(path)
    duration = wave.shape[0] / rate
    if duration < min_seconds:
        raise ValueError(
            f"{path}: {duration:.3f} s of audio is shorter than the minimum {min_seconds:g} s"
        )
    peak = float(np.abs(wave).max())
    clipped = float(np.mean(np.abs(wave) >= CLIP_LEVEL))
    if clipped > CLIP_FRACTION or peak > 1.0:
        warnings.warn(
            f"{path}: clipping ({clipped:.2%} of samples at full scale, peak {peak:.3f})",
            AudioQualityWarning,
            stacklevel=2,
        )
    elif peak < SILENCE_PEAK:
        warnings.warn(
            f"{path}: all silence (peak {peak:.2e}, below -80 dBFS)",
            AudioQualityWarning,
            stacklevel=2,
        )
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
        if wave.shape[0] == 0:
            raise ValueError(f"{path}: too short to resample from {rate} Hz to {sample_rate} Hz")
    # Float files may exceed full scale and resampling can overshoot slightly: clamp.
    return np.clip(wave, -1.0, 1.0, out=wave)


def change_speed(wave: np.ndarray, factor: float, sample_rate: int = 16000) -> np.ndarray:
    """Speed perturbation, as sox's `speed` effect: the recording played `factor` times as
    fast (tempo and pitch change together; `factor` 0.9 is 10 % slower and lower), at the
    same sample rate. The length becomes `len(wave) / factor` (rounded).

    Args:
        wave: 1-D float32 samples at `sample_rate`.
        factor: speed factor in [0.5, 2.0]; 1.0 returns `wave` unchanged.
        sample_rate: the rate of `wave` (and of the result).

    Raises:
        ValueError: a factor outside [0.5, 2.0] or a non-1-D input.
    """
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"speed factor: expected a number in [0.5, 2.0], got {factor!r}")
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise ValueError(f"change_speed: expected 1-D samples, got shape {wave.shape}")
    if factor == 1.0:
        return wave
    # Read the samples as if recorded at `factor * rate`, then resample to `rate`.
    out = soxr.resample(wave, sample_rate * factor, sample_rate, quality="HQ")
    return np.clip(out.astype(np.float32, copy=False), -1.0, 1.0)
