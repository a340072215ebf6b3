"""Metadata shared by exports and `.keras` sidecars: constants of the export format, the
description of a trained model a client needs to build its inputs (`build_metadata`) and the
checks on it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import Config, config_from_dict, padding_invariant

EXPORT_FORMAT = "ks_keras.export"
SIDECAR_FORMAT = "ks_keras.model_sidecar"
FORMAT_VERSION = 1
METADATA_FILE = "ks_keras.json"
LABELS_FILE = "labels.txt"
SIDECAR_SUFFIX = ".json"
DEFAULT_SIGNATURE = "serving_default"
FUNCTIONALS_INPUT = "functionals"
WAVEFORM_SIGNATURE = "serving_waveform"
OUTPUT_NAMES = ("probabilities", "class_id")


def _check_labels(labels: Any, num_classes: int) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, list | tuple):
        raise ValueError(f"labels: expected a list of class names, got {labels!r}")
    labels = list(labels)
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip() or "\n" in lab]
    if bad:
        raise ValueError(f"labels: expected non-empty single-line strings, got {bad!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels: expected distinct names, got {labels!r}")
    if len(labels) != num_classes:
        raise ValueError(
            f"labels: the model has {num_classes} classes (model.num_classes) but "
            f"{len(labels)} labels were given: {labels!r}"
        )
    return labels


def _check_feature_metadata(feature_metadata: Any, modalities: list[str]) -> dict[str, dict]:
    if not isinstance(feature_metadata, dict):
        raise ValueError(
            "feature_metadata: expected a dict {modality: extractor.metadata}, "
            f"got {type(feature_metadata).__name__}"
        )
    missing = [m for m in modalities if not isinstance(feature_metadata.get(m), dict)]
    if missing:
        raise ValueError(
            f"feature_metadata: expected a metadata dict for each modality {modalities}; "
            f"missing or not a dict: {missing}"
        )
    out = {m: feature_metadata[m] for m in modalities}
    try:
        return json.loads(json.dumps(out))
    except (TypeError, ValueError) as e:
        raise ValueError(f"feature_metadata: must be JSON-serialisable ({e})") from None


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    import ks_keras

    return {
        "ks_keras": ks_keras.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def normalization_metadata(cfg: Config, norm_stats: Any = None) -> dict | None:
    """How audio features were normalised in training (`features.audio.normalize`).

    - `none` → None.
    - `global` → `{"mode": "global", "modality", "mean": [D], "std": [D]}`: the training-set
      statistics, applied inside the exported graph. `norm_stats` is required: the
      `ks_keras.data.NormStats` from `compute_norm_stats` (or its `to_dict()`).
    - `speaker` → `{"mode": "speaker", "modality"}`: each speaker was normalised with its own
      statistics, which cannot be stored for unseen speakers; clients normalise per speaker
      (`ks-keras predict` does, from the utterances of each speaker in the request) and no
      raw-waveform signature is exported.
    """
    mode = cfg.features.audio.normalize
    if "audio" not in cfg.model.modalities or mode == "none":
        return None
    if mode == "speaker":
        return {"mode": "speaker", "modality": "audio"}
    stats = norm_stats.to_dict() if hasattr(norm_stats, "to_dict") else norm_stats
    if not isinstance(stats, dict) or stats.get("mode") != "global":
        raise ValueError(
            "features.audio.normalize is 'global': pass the training set's statistics as "
            "norm_stats (ks_keras.data.compute_norm_stats(..., mode='global')), got "
            f"{type(norm_stats).__name__}"
        )
    dim = cfg.model.audio_dim
    mean = np.asarray(stats.get("mean"), dtype=np.float32)
    std = np.asarray(stats.get("std"), dtype=np.float32)
    if mean.shape != (dim,) or std.shape != (dim,) or not (std > 0).all():
        raise ValueError(
            f"norm_stats: expected mean and std of shape ({dim},) (model.audio_dim) with "
            f"std > 0, got {mean.shape} and {std.shape}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError("norm_stats: mean/std contain NaN or inf")
    return {"mode": "global", "modality": "audio", "mean": mean.tolist(), "std": std.tolist()}


def functionals_metadata(cfg: Config) -> dict | None:
    """How the model's openSMILE functionals input (`functionals`) was made, or None when the
    model has none (`model.functionals_dim: 0`).

    `{"set", "opensmile_set", "dim", "sample_rate", "normalize", "packages"}`: the feature set
    (`features.functionals`), its width, the rate the audio was resampled to before openSMILE
    ran, `"speaker"` when each speaker's functionals were z-normalised with that speaker's
    statistics (`features.audio.normalize: speaker`, as `model_functionals` does in training)
    else `"none"` (raw values; the model standardises them itself), and the openSMILE version.
    Clients compute the functionals of each request (`ks-keras predict` does); they cannot run
    inside the exported graph.

    Raises:
        ValueError: `model.functionals_dim` disagrees with `features.functionals`.
    """
    import importlib.metadata

    from ks_keras.features.functionals import FEATURE_SETS, FUNCTIONAL_DIMS

    dim, feature_set = cfg.model.functionals_dim, cfg.features.functionals
    if FUNCTIONAL_DIMS.get(feature_set, 0) != dim:
        raise ValueError(
            f"model.functionals_dim={dim} but features.functionals={feature_set!r} gives "
            f"{FUNCTIONAL_DIMS.get(feature_set, 0)} (0 = no functionals input)"
        )
    if not dim:
        return None
    try:
        version = importlib.metadata.version("opensmile")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "set": feature_set,
        "opensmile_set": FEATURE_SETS[feature_set],
        "dim": dim,
        # Training extracts at the audio front-end's rate (`model_functionals`).
        "sample_rate": cfg.features.audio.sample_rate,
        "normalize": "speaker" if cfg.features.audio.normalize == "speaker" else "none",
        "packages": {"opensmile": version},
    }


def model_input_names(metadata: dict) -> list[str]:
    """The model's named inputs: `<modality>`, `<modality>_mask` and `functionals` if used."""
    names = [n for m in metadata["modalities"] for n in (m, f"{m}_mask")]
    if metadata_functionals(metadata) is not None:
        names.append(FUNCTIONALS_INPUT)
    return names


def metadata_functionals(metadata: dict) -> dict | None:
    """The `functionals` entry of export/sidecar metadata (see `functionals_metadata`), or
    None for a model without that input (and for metadata written before it existed)."""
    if FUNCTIONALS_INPUT not in metadata.get("inputs", {}):
        return None
    spec = metadata.get("functionals")
    if not isinstance(spec, dict) or not {"set", "dim", "normalize"} <= set(spec):
        raise ValueError(
            "model metadata: the model has a 'functionals' input but no valid 'functionals' "
            f"entry (set, dim, normalize) saying how they were made, got {spec!r}"
        )
    return spec


def config_feature_metadata(cfg: Config) -> dict[str, dict]:
    """`{modality: extractor.metadata}` of the extractors `cfg.features` names (no weights load;
    Hugging Face folders are fingerprinted)."""
    from ks_keras.features import get_audio_extractor, get_text_extractor

    getters = {"audio": get_audio_extractor, "text": get_text_extractor}
    return {mod: getters[mod](getattr(cfg.features, mod)).metadata for mod in cfg.model.modalities}


def build_metadata(
    cfg: Config, labels: list[str], feature_metadata: dict, norm_stats: Any = None
) -> dict[str, Any]:
    """The description of a trained model that a client needs to build its inputs.

    Args:
        cfg: the resolved training config (its `model`, `features` and `data` sections
            define the inputs).
        labels: class names in output order (`len == cfg.model.num_classes`).
        feature_metadata: `{modality: extractor.metadata}` for every trained modality.
        norm_stats: training-set normalisation statistics when
            `features.audio.normalize` is `global` (see `normalization_metadata`).

    Returns:
        A JSON-serialisable dict: format tag, labels, modalities, per-input width and trained
        max length (`inputs`; `inputs["functionals"] = {"dim": D}` when the model reads
        openSMILE functionals), audio sample rate, crop policy, extractor metadata,
        normalisation, openSMILE functionals settings (`functionals`, see
        `functionals_metadata`; None without that input), package versions and the full
        config.
    """
    if not isinstance(cfg, Config):
        raise ValueError(f"cfg: expected a ks_keras Config, got {type(cfg).__name__}")
    cfg.validate()
    modalities = list(cfg.model.modalities)
    labels = _check_labels(labels, cfg.model.num_classes)
    inputs = {
        mod: {
            "dim": getattr(cfg.model, f"{mod}_dim"),
            "max_len": getattr(cfg.data, f"{mod}_max_len"),
        }
        for mod in modalities
    }
    functionals = functionals_metadata(cfg)
    if functionals is not None:
        inputs[FUNCTIONALS_INPUT] = {"dim": functionals["dim"]}
    return {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "labels": labels,
        "modalities": modalities,
        "inputs": inputs,
        "sample_rate": cfg.features.audio.sample_rate,
        "crop": "end",
        # The graph cuts a batch after its last real step instead of padding it to max_len
        # (only where the model's output ignores trailing padding).
        "crop_to_longest": padding_invariant(cfg.model),
        "features": _check_feature_metadata(feature_metadata, modalities),
        "normalization": normalization_metadata(cfg, norm_stats),
        "functionals": functionals,
        "config": cfg.to_dict(),
    }


def metadata_config(metadata: dict) -> Config:
    """The resolved `Config` stored in export or sidecar metadata."""
    try:
        return config_from_dict(metadata["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model metadata holds no valid config ({e})") from None


def _check_model_matches(model, cfg: Config, labels: list[str]) -> None:
    """The Keras model's inputs and output width agree with the config and labels."""
    expected = {}
    for mod in cfg.model.modalities:
        expected[mod] = getattr(cfg.model, f"{mod}_dim")
        expected[f"{mod}_mask"] = None
    if cfg.model.functionals_dim:
        expected[FUNCTIONALS_INPUT] = cfg.model.functionals_dim
    got = {t.name: t.shape for t in model.inputs}
    if set(got) != set(expected):
        raise ValueError(
            f"model inputs {sorted(got)} do not match the config's modalities "
            f"{cfg.model.modalities} and model.functionals_dim={cfg.model.functionals_dim} "
            f"(expected inputs {sorted(expected)})"
        )
    for name, want in expected.items():
        if want is None:
            continue
        dim = got[name][-1]
        if dim != want:
            field_name = "functionals_dim" if name == FUNCTIONALS_INPUT else f"{name}_dim"
            raise ValueError(
                f"model input {name!r} has width {dim} but the config says "
                f"model.{field_name}={want}"
            )
    n_out = model.outputs[0].shape[-1]
    if n_out != len(labels):
        raise ValueError(f"the model outputs {n_out} classes but {len(labels)} labels were given")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _check_format_version(meta: dict, path: Path) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported by this ks_keras "
            f"(supports <= {FORMAT_VERSION}); upgrade ks_keras"
        )
