"""`.keras` sidecar: the export metadata next to a saved `.keras` model, and loading such a
model (archive check, custom layers, finite weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import Config
from ks_keras.export.metadata import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    _check_format_version,
    _read_json,
    build_metadata,
    metadata_functionals,
)


def sidecar_path(model_path: str | Path) -> Path:
    """Where the sidecar of a `.keras` file lives: `best.keras` → `best.keras.json`."""
    return Path(str(model_path) + SIDECAR_SUFFIX)


def write_model_sidecar(
    path: str | Path,
    cfg: Config,
    labels: list[str],
    feature_metadata: dict,
    norm_stats: Any = None,
) -> Path:
    """Write the metadata `ks-keras export`/`predict` need next to a saved `.keras` model.

    Training code calls this right after `model.save("run/best.keras")`; the file written is
    `run/best.keras.json` (see `sidecar_path`), with the same content as an export's
    `assets/ks_keras.json` (config, labels, extractor metadata, max lengths).

    Args:
        path: the `.keras` file (it need not exist yet).
        cfg: the resolved training config.
        labels: class names in output order.
        feature_metadata: `{modality: extractor.metadata}` for the trained modalities.
        norm_stats: the `NormStats` used in training when `features.audio.normalize` is
            `global` (required then).

    Returns:
        The sidecar's path.

    Example:

    >>> model.save(run_dir / "best.keras")
    >>> write_model_sidecar(run_dir / "best.keras", cfg, labels, feature_metadata)
    """
    meta = build_metadata(cfg, labels, feature_metadata, norm_stats)
    meta["format"] = SIDECAR_FORMAT
    out = sidecar_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_model_sidecar(model_path: str | Path) -> dict | None:
    """The sidecar metadata of a `.keras` file, or None when there is none."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    meta = _read_json(path)
    if meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a ks_keras model sidecar (format={meta.get('format')!r})")
    _check_format_version(meta, path)
    try:
        metadata_functionals(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return meta


def load_keras_model(path: str | Path):
    """Load a `.keras` file saved by our training code (custom layers registered)."""
    import keras

    import ks_keras.layers  # noqa: F401  (registers the ks_keras custom layers)

    path = Path(path)
    check_keras_archive(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, unknown layer, bad config: one clear message
        raise ValueError(
            f"{path}: cannot load as a Keras model ({type(e).__name__}: {e})"
        ) from None
    check_finite_weights(model, str(path))
    return model


def check_keras_archive(path: str | Path) -> None:
    """Fail clearly unless `path` is a Keras v3 archive (a zip holding `config.json`).

    Keras itself answers "File not found" for a file that exists but is not a zip.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another kind of file; the message says which kind.
    """
    from ks_keras.files import describe_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file not found: {path}")
    kind = describe_file(path)
    if kind != "a Keras v3 archive":
        raise ValueError(
            f"{path}: not a Keras model archive: it is {kind}; expected a .keras file "
            "written by model.save() (e.g. run/best.keras from ks-keras train)"
        )


def check_finite_weights(model, where: str) -> None:
    """Refuse a model with NaN/inf weights (a diverged training run): its every answer would
    be NaN, or a constant label with made-up probabilities.

    Raises:
        ValueError: naming the first weights that are not finite.
    """
    bad = [
        w.path
        for w in model.weights
        if not np.isfinite(np.asarray(w.numpy(), dtype=np.float64)).all()
    ]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN/inf ({', '.join(bad[:3])}"
            f"{', …' if len(bad) > 3 else ''}): the model comes from a diverged training run; "
            "retrain it (e.g. with a lower train.lr)"
        )
