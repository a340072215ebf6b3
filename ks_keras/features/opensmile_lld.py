"""openSMILE low-level descriptors as a frame-level audio front-end, alone or with log-mel.

`features.audio.type: opensmile` gives the eGeMAPSv02 (25 per frame) or ComParE_2016 (65)
low-level descriptors (LLDs: pitch, jitter, shimmer, loudness, formants, spectral shape, …);
`logmel+opensmile` appends them to the log-mel bands of the same frames. openSMILE computes
LLDs every 10 ms; they are **averaged onto the log-mel frame grid** that `win_ms` / `hop_ms`
define (frame k is centred at `k * hop + win / 2`; every LLD frame whose centre lies within
half a hop of it counts, the nearest one where none does), so both parts share one mask and
one frame rate. `opensmile_deltas: true` appends first-order regression deltas (±2 frames) of
the LLDs on that grid.

openSMILE runs in a child process (`ks_keras.features.smile_worker`), because its native
library corrupts the heap when loaded after TensorFlow. The child starts on the first
`extract` and stays for the extractor's lifetime. Needs the optional `opensmile` package
(`pip install -e ".[baseline]"`).
"""

from __future__ import annotations

import atexit
import importlib.util
import io
import struct
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

from ks_keras.config import AudioFeatureConfig
from ks_keras.features.base import FeatureExtractor, check_waveforms, package_versions

LLD_DIMS = {"egemaps": 25, "compare": 65}
LLD_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
DELTA_WINDOW = 2


def average_onto_frames(
    values: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    n_frames: int,
    frame_length: int,
    frame_step: int,
    sample_rate: int,
) -> np.ndarray:
    """Average descriptor frames `[T, D]` (times in seconds) onto `n_frames` target frames.

    Target frame k is centred at `(k * frame_step + frame_length / 2) / sample_rate`; it gets
    the mean of the source frames whose centre lies in `[centre - hop/2, centre + hop/2)`,
    or the nearest source frame when none does. No source frames give zeros.
    """
    values = np.asarray(values, np.float64)
    dim = values.shape[1]
    if n_frames <= 0:
        return np.zeros((0, dim), np.float32)
    if values.shape[0] == 0:
        return np.zeros((n_frames, dim), np.float32)
    centres = (np.asarray(starts, np.float64) + np.asarray(ends, np.float64)) / 2.0
    target = (np.arange(n_frames) * frame_step + frame_length / 2.0) / sample_rate
    half = frame_step / sample_rate / 2.0
    lo = np.searchsorted(centres, target - half, side="left")
    hi = np.searchsorted(centres, target + half, side="left")
    totals = np.concatenate([np.zeros((1, dim)), np.cumsum(values, axis=0)])
    count = hi - lo
    out = (totals[hi] - totals[lo]) / np.maximum(count, 1)[:, None]
    empty = count == 0
    if empty.any():
        right = np.clip(np.searchsorted(centres, target[empty]), 0, len(centres) - 1)
        left = np.clip(right - 1, 0, len(centres) - 1)
        take_left = np.abs(centres[left] - target[empty]) <= np.abs(centres[right] - target[empty])
        out[empty] = values[np.where(take_left, left, right)]
    return out.astype(np.float32)


def regression_deltas(x: np.ndarray, window: int = DELTA_WINDOW) -> np.ndarray:
    """First-order regression deltas along time (edges repeated), as HTK / openSMILE define."""
    x = np.asarray(x, np.float32)
    if x.shape[0] == 0:
        return np.zeros_like(x)
    padded = np.pad(x, ((window, window), (0, 0)), mode="edge")
    n = x.shape[0]
    num = sum(
        k * (padded[window + k : window + k + n] - padded[window - k : window - k + n])
        for k in range(1, window + 1)
    )
    return (num / (2.0 * sum(k * k for k in range(1, window + 1)))).astype(np.float32)


def opensmile_available() -> bool:
    return importlib.util.find_spec("opensmile") is not None


class _SmileWorker:
    """One `python -m ks_keras.features.smile_worker` child, spoken to over pipes."""

    def __init__(self, feature_set: str, sample_rate: int):
        self.feature_set = feature_set
        self.sample_rate = sample_rate
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._stderr = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ks_keras.features.smile_worker",
                    self.feature_set,
                    str(self.sample_rate),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
            atexit.register(self.close)
        return self._proc

    def _child_error(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:])

    def process(self, wave: np.ndarray) -> np.ndarray:
        proc = self._start()
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(wave, np.float32), allow_pickle=False)
        payload = buffer.getvalue()
        try:
            proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            proc.stdin.flush()
            status, length = struct.unpack("<BQ", _read_exact(proc.stdout, 9))
            body = _read_exact(proc.stdout, length)
        except (BrokenPipeError, EOFError, OSError):
            proc.kill()
            raise RuntimeError(
                f"the openSMILE worker process stopped: {self._child_error() or 'no message'}"
            ) from None
        if status != 0:
            raise ValueError(f"openSMILE: {body.decode(errors='replace')}")
        return np.load(io.BytesIO(body), allow_pickle=False)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(struct.pack("<Q", 0))
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class OpenSmileLLDExtractor(FeatureExtractor):
    """`features.audio.type: opensmile` or `logmel+opensmile` (see the module docstring).

    Example:

    ```python
    ext = OpenSmileLLDExtractor(AudioFeatureConfig(type="logmel+opensmile", hop_ms=25.0))
    [feats] = ext.extract([np.zeros(16000, np.float32)])  # [39, 80 + 25]
    ```
    """

    modality = "audio"

    def __init__(self, cfg: AudioFeatureConfig):
        from ks_keras.features.logmel import LogMelExtractor, frame_params

        if cfg.type not in ("opensmile", "logmel+opensmile"):
            raise ValueError(
                f"features.audio.type: OpenSmileLLDExtractor serves 'opensmile' or "
                f"'logmel+opensmile', got {cfg.type!r}"
            )
        if cfg.opensmile_set not in LLD_DIMS:
            raise ValueError(
                f"features.audio.opensmile_set: expected one of {sorted(LLD_DIMS)}, got "
                f"{cfg.opensmile_set!r}"
            )
        if not opensmile_available():
            raise ImportError(
                f"features.audio.type is {cfg.type!r}, which needs the opensmile package: "
                "pip install -e '.[baseline]'"
            )
        self.cfg = cfg
        self.with_logmel = cfg.type == "logmel+opensmile"
        self.logmel = LogMelExtractor(cfg) if self.with_logmel else None
        self.frame_length, self.frame_step, _ = frame_params(
            cfg.sample_rate, cfg.win_ms, cfg.hop_ms
        )
        self.lld_dim = LLD_DIMS[cfg.opensmile_set] * (2 if cfg.opensmile_deltas else 1)
        self.dim = self.lld_dim + (cfg.n_mels if self.with_logmel else 0)
        self.name = ("logmel+" if self.with_logmel else "") + f"opensmile_{cfg.opensmile_set}"
        self.frame_rate = cfg.sample_rate / self.frame_step
        self._worker = _SmileWorker(cfg.opensmile_set, cfg.sample_rate)

    @property
    def metadata(self) -> dict[str, Any]:
        c = self.cfg
        meta = {
            "type": c.type,
            "sample_rate": c.sample_rate,
            "win_ms": c.win_ms,
            "hop_ms": c.hop_ms,
            "frame_length": self.frame_length,
            "frame_step": self.frame_step,
            "opensmile_set": LLD_SETS[c.opensmile_set],
            "opensmile_level": "LowLevelDescriptors",
            "opensmile_deltas": c.opensmile_deltas,
            "delta_window": DELTA_WINDOW if c.opensmile_deltas else None,
            "alignment": "mean over LLD frames centred within half a hop",
            "packages": package_versions("opensmile", "numpy"),
        }
        if self.logmel is not None:
            meta["logmel"] = self.logmel.metadata
        return meta

    def num_frames(self, num_samples: int) -> int:
        from ks_keras.features.logmel import num_frames

        return num_frames(num_samples, self.frame_length, self.frame_step)

    def descriptors(self, wave: np.ndarray) -> np.ndarray:
        """The LLDs (and deltas) of one waveform on the frame grid, `[T, lld_dim]`."""
        raw = self._worker.process(wave)
        lld = average_onto_frames(
            raw[:, 2:],
            raw[:, 0],
            raw[:, 1],
            self.num_frames(wave.shape[0]),
            self.frame_length,
            self.frame_step,
            self.cfg.sample_rate,
        )
        if self.cfg.opensmile_deltas:
            lld = np.concatenate([lld, regression_deltas(lld)], axis=1)
        return lld

    def extract(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        waves = check_waveforms(batch)
        llds = [self.descriptors(w) for w in waves]
        if self.logmel is None:
            return llds
        mels = self.logmel.extract(waves)
        return [
            np.ascontiguousarray(np.concatenate([m, lld], axis=1), np.float32)
            for m, lld in zip(mels, llds, strict=True)
        ]

    def close(self) -> None:
        """Stop the openSMILE child process (it also stops when Python exits)."""
        self._worker.close()
