"""The feature-extractor interface and helpers to fingerprint what an extractor is.

Every extractor (built-in log-mel, Hugging Face audio, Hugging Face text) has:

- `name`: short identifier, e.g. `"logmel"` or `"hf_text:all-MiniLM-L6-v2"`;
- `dim`: feature width D;
- `frame_rate`: frames per second for audio, `None` for text (tokens);
- `metadata`: a JSON-able dict that identifies the extractor exactly (settings, model folder
  and a hash of its files, package versions). The feature cache compares it to decide whether
  stored features are still valid;
- `extract(batch)`: a list of inputs (1-D float32 waveforms at the configured rate, or
  strings) → a list of `[T, D]` float32 arrays, one per input, without padding.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import numpy as np

# Files in a model folder that do not change what the model computes.
_IGNORED_FILES = {"README.md", ".gitattributes", "LICENSE", "LICENSE.txt"}
_hash_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) within the process."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_memo:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _hash_memo[key] = digest.hexdigest()
    return _hash_memo[key]


def folder_fingerprint(folder: str | Path) -> dict[str, str]:
    """`{relative file path: sha256}` for every file of a model folder (docs excluded)."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in _IGNORED_FILES and ".git" not in path.parts:
            out[path.relative_to(folder).as_posix()] = file_sha256(path)
    return out


def package_versions(*names: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_waveforms(batch: list[np.ndarray], min_samples: int = 1) -> list[np.ndarray]:
    """Validate an audio batch: 1-D, finite, at least `min_samples` samples each."""
    if not isinstance(batch, list | tuple):
        raise ValueError(f"audio batch: expected a list of 1-D waveforms, got {type(batch)}")
    out = []
    for i, wave in enumerate(batch):
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(
                f"audio batch item {i}: expected a 1-D waveform, got shape {wave.shape}"
            )
        if wave.shape[0] < min_samples:
            raise ValueError(
                f"audio batch item {i}: {wave.shape[0]} samples, need at least {min_samples}"
            )
        if not np.isfinite(wave).all():
            raise ValueError(f"audio batch item {i}: contains NaN/inf samples")
        out.append(wave)
    return out


def check_texts(batch: list[str]) -> list[str]:
    if not isinstance(batch, list | tuple) or not all(isinstance(t, str) for t in batch):
        raise ValueError("text batch: expected a list of strings")
    return list(batch)


def env_flag_offline() -> None:
    """Hugging Face loads from local folders only: never let it try the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class FeatureExtractor(abc.ABC):
    """Common interface of audio and text extractors (see the module docstring)."""

    modality: str  # "audio" or "text"
    name: str
    dim: int
    frame_rate: float | None

    @property
    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """JSON-able dict that identifies the extractor exactly."""

    @abc.abstractmethod
    def extract(self, batch: list) -> list[np.ndarray]:
        """A batch of inputs → one `[T, D]` float32 array per input (no padding)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"
