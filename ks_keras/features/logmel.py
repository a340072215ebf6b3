"""Built-in log-mel filterbank features, computed in-graph with `tf.signal`.

Hann window of `win_ms` (25 ms), hop `hop_ms` (10 ms), FFT size the next power of two,
power spectrum, `n_mels` triangular mel filters between `mel_fmin` and `mel_fmax`,
`log(max(mel, log_floor))`.

Framing: only frames that lie entirely inside the signal are kept, so a waveform of N samples
gives `1 + (N - win) // hop` frames (one zero-padded frame if `0 < N < win`, none if N = 0).
Each frame depends only on its own samples, so padding a batch never changes a valid frame,
and `logmel_tf` on a padded batch gives exactly the numbers that `extract` gives per file.

`logmel_tf` is pure TensorFlow (no Python side effects), so the export code can place it
inside a `tf.function` / SavedModel signature that takes raw waveforms.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from ks_keras.config import AudioFeatureConfig
from ks_keras.features.base import FeatureExtractor, check_waveforms, package_versions


def frame_params(sample_rate: int, win_ms: float, hop_ms: float) -> tuple[int, int, int]:
    """`(frame_length, frame_step, fft_length)` in samples."""
    frame_length = int(round(sample_rate * win_ms / 1000.0))
    frame_step = int(round(sample_rate * hop_ms / 1000.0))
    if frame_length < 1 or frame_step < 1:
        raise ValueError(
            f"features.audio.win_ms/hop_ms: {win_ms} ms / {hop_ms} ms at {sample_rate} Hz give "
            f"less than one sample per window or hop"
        )
    fft_length = 1 << math.ceil(math.log2(frame_length))
    return frame_length, frame_step, fft_length


def num_frames(num_samples: int, frame_length: int, frame_step: int) -> int:
    """Frames `logmel_tf` produces for a waveform of `num_samples` samples."""
    if num_samples <= 0:
        return 0
    return 1 + max(0, num_samples - frame_length) // frame_step


def logmel_tf(
    waveforms: tf.Tensor,
    lengths: tf.Tensor,
    sample_rate: int = 16000,
    n_mels: int = 80,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    log_floor: float = 1e-6,
    mel_fmin: float = 20.0,
    mel_fmax: float | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Log-mel features of a zero-padded waveform batch, in pure TensorFlow.

    Args:
        waveforms: `[B, N]` float32, each row a waveform at `sample_rate`, zero-padded at the
            end.
        lengths: `[B]` int32, real samples per row.
        sample_rate, n_mels, win_ms, hop_ms, log_floor, mel_fmin, mel_fmax: the settings
            (`features.audio.*`).

    Returns:
        `(features [B, T, n_mels] float32, mask [B, T] int32)`; padded frames are 0 in both.

    Example:

    ```python
    feats, mask = logmel_tf(tf.zeros([2, 16000]), tf.constant([16000, 8000]))
    feats.shape  # (2, 98, 80)
    ```
    """
    frame_length, frame_step, fft_length = frame_params(sample_rate, win_ms, hop_ms)
    waveforms = tf.convert_to_tensor(waveforms, tf.float32)
    lengths = tf.cast(tf.convert_to_tensor(lengths), tf.int32)
    # A batch shorter than one window still yields one (zero-padded) frame per row.
    short = tf.maximum(0, frame_length - tf.shape(waveforms)[1])
    waveforms = tf.pad(waveforms, [[0, 0], [0, short]])
    stft = tf.signal.stft(
        waveforms,
        frame_length=frame_length,
        frame_step=frame_step,
        fft_length=fft_length,
        window_fn=tf.signal.hann_window,
        pad_end=False,
    )
    power = tf.square(tf.abs(stft))
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        num_mel_bins=n_mels,
        num_spectrogram_bins=fft_length // 2 + 1,
        sample_rate=sample_rate,
        lower_edge_hertz=mel_fmin,
        upper_edge_hertz=mel_fmax if mel_fmax is not None else sample_rate / 2.0,
    )
    mel = tf.tensordot(power, mel_matrix, axes=1)
    logmel = tf.math.log(tf.maximum(mel, log_floor))
    frames = tf.where(lengths > 0, 1 + tf.maximum(lengths - frame_length, 0) // frame_step, 0)
    mask = tf.sequence_mask(frames, tf.shape(logmel)[1], dtype=tf.int32)
    logmel = logmel * tf.cast(mask, tf.float32)[:, :, None]
    return logmel, mask


class LogMelExtractor(FeatureExtractor):
    """`features.audio.type: logmel`.

    Example:

    ```python
    ext = LogMelExtractor(AudioFeatureConfig(n_mels=80))
    [feats] = ext.extract([np.zeros(16000, np.float32)])  # [98, 80]
    ```
    """

    modality = "audio"

    def __init__(self, cfg: AudioFeatureConfig, batch_size: int = 16):
        if cfg.n_mels < 1:
            raise ValueError(f"features.audio.n_mels: expected an integer >= 1, got {cfg.n_mels}")
        if cfg.log_floor <= 0:
            raise ValueError(f"features.audio.log_floor: expected > 0, got {cfg.log_floor}")
        nyquist = cfg.sample_rate / 2.0
        fmax = cfg.mel_fmax if cfg.mel_fmax is not None else nyquist
        if not 0.0 <= cfg.mel_fmin < fmax <= nyquist:
            raise ValueError(
                f"features.audio.mel_fmin/mel_fmax: expected 0 <= fmin < fmax <= {nyquist:g} Hz, "
                f"got {cfg.mel_fmin} / {cfg.mel_fmax}"
            )
        self.cfg = cfg
        self.frame_length, self.frame_step, self.fft_length = frame_params(
            cfg.sample_rate, cfg.win_ms, cfg.hop_ms
        )
        self.name = "logmel"
        self.dim = cfg.n_mels
        self.frame_rate = cfg.sample_rate / self.frame_step
        self.batch_size = batch_size
        # Traced once per padded length bucket; the numbers equal the eager op's exactly.
        self._fn = tf.function(self.logmel_tf, reduce_retracing=True)

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            sample_rate=c.sample_rate,
            n_mels=c.n_mels,
            win_ms=c.win_ms,
            hop_ms=c.hop_ms,
            log_floor=c.log_floor,
            mel_fmin=c.mel_fmin,
            mel_fmax=c.mel_fmax,
        )

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "type": "logmel",
            **self.settings(),
            "frame_length": self.frame_length,
            "frame_step": self.frame_step,
            "fft_length": self.fft_length,
            "window": "hann_periodic",
            "packages": package_versions("tensorflow"),
        }

    def logmel_tf(self, waveforms: tf.Tensor, lengths: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`logmel_tf` bound to this extractor's settings (for `tf.function`/signatures)."""
        return logmel_tf(waveforms, lengths, **self.settings())

    def num_frames(self, num_samples: int) -> int:
        return num_frames(num_samples, self.frame_length, self.frame_step)

    def extract(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        waves = check_waveforms(batch)
        out: list[np.ndarray] = [None] * len(waves)  # type: ignore[list-item]
        # Group similar lengths so little work is spent on padding.
        order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0])
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = np.array([waves[i].shape[0] for i in idx], np.int32)
            padded = np.zeros((len(idx), int(lengths.max())), np.float32)
            for row, i in enumerate(idx):
                padded[row, : lengths[row]] = waves[i]
            feats, mask = self._fn(tf.constant(padded), tf.constant(lengths))
            feats, valid = feats.numpy(), mask.numpy().sum(axis=1)
            for row, i in enumerate(idx):
                out[i] = np.ascontiguousarray(feats[row, : valid[row]])
        return out
