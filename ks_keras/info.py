"""Installed package versions (for `ks-keras info` and report folders) and the strategy
`train.strategy: auto` picks; the `ks-keras info` command is `ks_keras.commands.info`."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = (
    "tensorflow",
    "keras",
    "keras-tuner",
    "tensorboard",
    "numpy",
    "soundfile",
    "soxr",
    "torch",
    "transformers",
    "tensorflow-serving-api",
    "opensmile",
    "scikit-learn",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter here (None = not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_strategy_choice(gpus: int) -> str:
    """What `train.strategy: auto` picks on a machine with `gpus` GPUs."""
    if gpus > 1:
        return f"MirroredStrategy over {gpus} GPUs"
    if gpus == 1:
        return "default strategy (one GPU)"
    return "default strategy (CPU)"
