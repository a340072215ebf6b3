"""SavedModel export for TF Serving: layout, signatures, shipped metadata and a parity check.

An export is a plain SavedModel in TF Serving's layout, `<base_dir>/<name>/<version>/`, with
integer versions (the next free one by default):

```
saved_models/<name>/<version>/
  saved_model.pb, variables/        the graph and weights
  assets/labels.txt                 one class label per line, in output order
  assets/ks_keras.json              label order, feature extractor metadata, input widths,
                                    trained max lengths, openSMILE functionals settings,
                                    signatures and the resolved config
```

Signatures:

- `serving_default`: named inputs `audio` `[None, None, Da]` float32, `audio_mask`
  `[None, None]` int32, `text` `[None, None, Dt]` float32, `text_mask` `[None, None]` int32
  (only the trained modalities), plus `functionals` `[None, D]` float32 when the model reads
  openSMILE utterance functionals (`features.functionals`; no mask, no time axis; the client
  computes them and, under `features.audio.normalize: speaker`, z-normalises them per
  speaker as in training), named outputs `probabilities` `[None, C]` float32 and
  `class_id` `[None]` int32. Batch and length are dynamic. Inside the graph every sequence is
  brought to the trained length exactly as in training: steps beyond `data.<mod>_max_len`
  are cropped **at the end** (the start is kept), shorter inputs are zero-padded at the end,
  and feature values at masked steps are zeroed. The result therefore does not depend on how
  a client padded its batch. Where the model ignores trailing padding
  (`config.padding_invariant`, metadata `crop_to_longest`), the batch is then cut after its
  last real step instead of being padded to the trained length (same result, less work).
- `serving_waveform` (only when the audio front-end is the built-in log-mel and neither
  per-speaker normalisation nor openSMILE functionals are used: neither can run in the
  graph): raw 16 kHz mono `waveform` `[None, None]` float32 plus `waveform_length` `[None]`
  int32 (valid samples per row) and the text inputs; log-mel is computed in the graph, then
  as `serving_default`.

A version is written to a hidden temporary folder, verified there (unless asked not to) and
only then renamed to its integer name, so TF Serving, which polls the base folder, never
sees a half-written or unverified version.

Models saved as `.keras` files carry the same metadata in a sidecar JSON next to them
(`best.keras` → `best.keras.json`, see `write_model_sidecar`); `ks-keras export` and
`ks-keras predict` read it.

Example:

```python
path = export_model(model, cfg, labels=["angry", "happy", "neutral", "sad"],
                    feature_metadata={"audio": audio_ex.metadata, "text": text_ex.metadata})
exported = load_exported("saved_models/ks_keras")  # latest version
exported.predict({"audio": a, "audio_mask": am, "text": t, "text_mask": tm})
```
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
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
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------------
# Metadata shared by exports and `.keras` sidecars.


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


# ---------------------------------------------------------------------------------------------
# `.keras` sidecar.


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


# ---------------------------------------------------------------------------------------------
# TF Serving layout.


def list_versions(model_dir: str | Path) -> list[int]:
    """Integer version folders under `model_dir` holding a SavedModel, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    versions = [
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()
    ]
    return sorted(versions)


def next_version(model_dir: str | Path) -> int:
    """The next free integer version under `model_dir` (1 for a new model)."""
    model_dir = Path(model_dir)
    taken = (
        [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(taken, default=0) + 1


def resolve_export_dir(path: str | Path) -> Path:
    """A version folder from either a version folder or a model base folder (→ latest).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: it is neither a SavedModel nor a folder of integer versions.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: expected an export folder (saved_models/<name>[/<version>])")
    if (path / "saved_model.pb").is_file():
        return path
    versions = list_versions(path)
    if not versions:
        raise ValueError(
            f"{path}: not a ks_keras export: expected saved_model.pb here or integer version "
            "folders (saved_models/<name>/<version>/) below it"
        )
    return path / str(versions[-1])


def load_export_metadata(path: str | Path) -> tuple[Path, dict]:
    """Read an export's `assets/ks_keras.json` without loading TensorFlow.

    Returns:
        `(version_dir, metadata)`.
    """
    version_dir = resolve_export_dir(path)
    meta_path = version_dir / "assets" / METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{version_dir}: a SavedModel, but not a ks_keras export (no assets/{METADATA_FILE})"
        )
    meta = _read_json(meta_path)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: not a ks_keras export (format={meta.get('format')!r})")
    _check_format_version(meta, meta_path)
    for key in ("labels", "modalities", "inputs", "features", "signatures"):
        if key not in meta:
            raise ValueError(f"{meta_path}: incomplete export metadata (no {key!r})")
    try:
        metadata_functionals(meta)
    except ValueError as e:
        raise ValueError(f"{meta_path}: {e}") from None
    labels_path = version_dir / "assets" / LABELS_FILE
    if labels_path.is_file():
        from ks_keras.files import read_utf8

        listed = [ln.strip() for ln in read_utf8(labels_path, LABELS_FILE).splitlines()]
        listed = [ln for ln in listed if ln]
        if listed != list(meta["labels"]):
            raise ValueError(
                f"{labels_path}: lists {listed}, but {meta_path.name} says {meta['labels']}; "
                "the export was edited or mixed up: export the model again"
            )
    return version_dir, meta


# ---------------------------------------------------------------------------------------------
# Signatures.


def feature_input_specs(metadata: dict) -> dict:
    """`tf.TensorSpec`s of the `serving_default` inputs (dynamic batch and length)."""
    import tensorflow as tf

    specs = {}
    for mod in metadata["modalities"]:
        dim = metadata["inputs"][mod]["dim"]
        specs[mod] = tf.TensorSpec([None, None, dim], tf.float32, name=mod)
        specs[f"{mod}_mask"] = tf.TensorSpec([None, None], tf.int32, name=f"{mod}_mask")
    functionals = metadata_functionals(metadata)
    if functionals is not None:
        specs[FUNCTIONALS_INPUT] = tf.TensorSpec(
            [None, functionals["dim"]], tf.float32, name=FUNCTIONALS_INPUT
        )
    return specs


def waveform_input_specs(metadata: dict) -> dict:
    """`tf.TensorSpec`s of the `serving_waveform` inputs."""
    import tensorflow as tf

    specs = {
        "waveform": tf.TensorSpec([None, None], tf.float32, name="waveform"),
        "waveform_length": tf.TensorSpec([None], tf.int32, name="waveform_length"),
    }
    for name, spec in feature_input_specs(metadata).items():
        if not name.startswith("audio"):
            specs[name] = spec
    return specs


def waveform_signature_problem(cfg: Config) -> str | None:
    """Why `serving_waveform` cannot be exported for `cfg`, or None when it can.

    The built-in log-mel front-end runs in the graph, so raw audio can be served. Features
    normalised per speaker (`features.audio.normalize: speaker`) cannot be reproduced from
    one waveform alone, and openSMILE functionals (`features.functionals`) are not TensorFlow
    ops, so such models get `serving_default` only.
    """
    audio = cfg.features.audio
    if "audio" not in cfg.model.modalities:
        return "the model has no audio input"
    if audio.type != "logmel":
        return f"features.audio.type is {audio.type!r}; only the built-in log-mel runs in-graph"
    if cfg.model.functionals_dim:
        return (
            f"the model reads openSMILE functionals (features.functionals="
            f"{cfg.features.functionals!r}), which cannot run inside the graph; clients "
            "compute them from the audio file (ks-keras predict does)"
        )
    if audio.normalize == "speaker":
        return (
            "features.audio.normalize is 'speaker': each speaker's statistics come from that "
            "speaker's utterances and cannot be part of the graph"
        )
    return None


def fit_length(x, mask, max_len: int, crop_to_longest: bool = False):
    """Crop at the end / zero-pad at the end to `max_len` steps and zero masked steps (tf ops).

    This is the training pipeline's `pad_or_crop` for a whole batch inside the graph. With
    `crop_to_longest` (for models whose output ignores trailing padding, see
    `ks_keras.config.padding_invariant`) the batch is then cut after its last real step instead
    of being padded to `max_len`: the same result for less work (a single short request no
    longer pays for `max_len` steps).
    """
    import tensorflow as tf

    mask = tf.cast(tf.not_equal(mask, 0), tf.int32)
    x = x[:, :max_len]
    mask = mask[:, :max_len]
    target = max_len
    if crop_to_longest:
        # One past the last real step of any row (at least 1 step, so shapes stay valid).
        steps = tf.range(1, tf.shape(mask)[1] + 1, dtype=tf.int32)
        target = tf.maximum(tf.reduce_max(mask * steps[None, :]), 1)
        x = x[:, :target]
        mask = mask[:, :target]
    pad = tf.maximum(target - tf.shape(mask)[1], 0)
    x = tf.pad(x, [[0, 0], [0, pad], [0, 0]])
    mask = tf.pad(mask, [[0, 0], [0, pad]])
    x = x * tf.cast(mask, x.dtype)[:, :, None]
    length = None if crop_to_longest else max_len
    x = tf.ensure_shape(x, [None, length, x.shape[-1]])
    mask = tf.ensure_shape(mask, [None, length])
    return x, mask


def _check_batch(inputs: dict, modalities: list[str]):
    """Graph-side shape (and `functionals` value) checks; TF Serving returns their messages
    to the client."""
    import tensorflow as tf

    checks = []
    if FUNCTIONALS_INPUT in inputs:
        functionals = inputs[FUNCTIONALS_INPUT]
        checks.append(
            tf.debugging.assert_equal(
                tf.reduce_all(tf.math.is_finite(functionals)),
                True,
                message="'functionals' holds NaN/inf (openSMILE gives NaN for audio that is "
                "too short); every value must be finite",
            )
        )
        if modalities:
            first = modalities[0]
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(functionals)[0],
                    tf.shape(inputs[first])[0],
                    message=f"'functionals' and '{first}' must have the same batch size",
                )
            )
    for mod in modalities:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(inputs[mod])[:2],
                tf.shape(inputs[f"{mod}_mask"]),
                message=f"'{mod}' [batch, time, dim] and '{mod}_mask' [batch, time] must agree "
                "in batch size and length",
            )
        )
    if len(modalities) == 2:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(inputs["audio"])[0],
                tf.shape(inputs["text"])[0],
                message="'audio' and 'text' must have the same batch size",
            )
        )
    return checks


def make_serving_functions(model, metadata: dict, audio_config=None) -> dict:
    """Serving functions keyed by signature name (`tf.function`s or plain Python functions,
    traced by the archive).

    Args:
        model: the Keras model (dict inputs, logits output).
        metadata: `build_metadata(...)` of that model.
        audio_config: `AudioFeatureConfig` of a log-mel front-end to also build
            `serving_waveform`; None for `serving_default` only.
    """
    import tensorflow as tf

    modalities = metadata["modalities"]
    max_len = {mod: metadata["inputs"][mod]["max_len"] for mod in modalities}
    crop = metadata.get("crop_to_longest")
    if crop is None:  # metadata written before the flag existed: decide from its config
        crop = "config" in metadata and padding_invariant(metadata_config(metadata).model)
    norm = metadata.get("normalization")
    if norm is not None and norm["mode"] == "global":
        norm_mean = tf.constant(norm["mean"], tf.float32)
        norm_std = tf.constant(norm["std"], tf.float32)

    def classify(inputs):
        checks = _check_batch(inputs, modalities)
        with tf.control_dependencies(checks):
            fixed = {}
            for mod in modalities:
                fixed[mod], fixed[f"{mod}_mask"] = fit_length(
                    inputs[mod], inputs[f"{mod}_mask"], max_len[mod], crop_to_longest=crop
                )
            if FUNCTIONALS_INPUT in inputs:
                # Utterance-level values, normalised (or not) by the client as in training.
                fixed[FUNCTIONALS_INPUT] = tf.identity(inputs[FUNCTIONALS_INPUT])
        if norm is not None and norm["mode"] == "global":
            # Training-set statistics, applied to real steps only (as data.py does).
            m = norm["modality"]
            valid = tf.cast(fixed[f"{m}_mask"], tf.float32)[:, :, None]
            fixed[m] = (fixed[m] - norm_mean) / norm_std * valid
        logits = model(fixed, training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {
            "probabilities": probabilities,
            "class_id": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        }

    # Traced once; `serving_waveform` calls this graph instead of tracing the model again.
    classify = tf.function(
        classify, input_signature=[feature_input_specs(metadata)], autograph=False
    )
    functions = {DEFAULT_SIGNATURE: classify}
    if audio_config is not None:
        logmel_tf = _logmel_graph_fn(audio_config)

        def classify_waveform(inputs):
            features, mask = logmel_tf(inputs["waveform"], inputs["waveform_length"])
            request = {k: v for k, v in inputs.items() if not k.startswith("waveform")}
            request["audio"] = tf.cast(features, tf.float32)
            request["audio_mask"] = tf.cast(mask, tf.int32)
            return classify(request)

        functions[WAVEFORM_SIGNATURE] = classify_waveform
    return functions


def _logmel_graph_fn(audio_config):
    """`(waveforms [B, N], lengths [B]) -> (features [B, T, n_mels], mask [B, T])` in-graph."""
    from ks_keras.features.logmel import LogMelExtractor

    return LogMelExtractor(audio_config).logmel_tf


def _signature_metadata(specs: dict, num_classes: int) -> dict:
    return {
        "inputs": {
            name: {"dtype": spec.dtype.name, "shape": [d for d in spec.shape.as_list()]}
            for name, spec in specs.items()
        },
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, num_classes]},
            "class_id": {"dtype": "int32", "shape": [None]},
        },
    }


# ---------------------------------------------------------------------------------------------
# Export.


def export_model(
    model,
    cfg: Config,
    labels: list[str],
    feature_metadata: dict,
    base_dir: str | Path | None = None,
    name: str | None = None,
    version: int | None = None,
    verify: bool = True,
    norm_stats: Any = None,
) -> Path:
    """Export a trained model as a TF Serving SavedModel version.

    Args:
        model: the trained Keras model (from `build_model`, possibly reloaded from `.keras`).
        cfg: its resolved config (inputs, max lengths, audio front-end, export defaults).
        labels: class names in output order.
        feature_metadata: `{modality: extractor.metadata}` of the extractors that made the
            training features; clients check their extractor against it.
        base_dir: root of the exports; default `cfg.export.base_dir` (`saved_models`).
        name: model name (TF Serving's `MODEL_NAME`); default `cfg.export.name`.
        version: integer version; default `cfg.export.version`, and when that is None the
            next free number. An existing version is never overwritten.
        verify: reload in a fresh Python process and compare with `model` at batch sizes 1
            and 3 (max abs diff <= 1e-5) and check `saved_model_cli show --all`, before the
            version becomes visible (see `verify_export`).
        norm_stats: training-set statistics when `features.audio.normalize` is `global`
            (applied in the graph; see `normalization_metadata`).

    Returns:
        The version folder, e.g. `saved_models/ks_keras/3`.

    Example:

    >>> export_model(model, cfg, ["angry", "happy", "neutral", "sad"], feature_metadata)
    PosixPath('saved_models/ks_keras/1')
    """
    import keras

    labels = _check_labels(labels, cfg.model.num_classes)
    _check_model_matches(model, cfg, labels)
    check_finite_weights(model, "export_model")
    audio = cfg.features.audio
    if "audio" in cfg.model.modalities and audio.type == "logmel":
        if audio.n_mels != cfg.model.audio_dim:
            raise ValueError(
                f"features.audio.n_mels={audio.n_mels} but model.audio_dim="
                f"{cfg.model.audio_dim}: the config does not describe the features this model "
                "was trained on"
            )
    name = name or cfg.export.name
    if not _NAME_RE.match(name):
        raise ValueError(
            f"export name {name!r}: expected letters, digits, '_', '-' or '.' (it becomes "
            "part of TF Serving's URL /v1/models/<name>)"
        )
    base_dir = Path(base_dir if base_dir is not None else cfg.export.base_dir)
    model_dir = base_dir / name
    version = version if version is not None else cfg.export.version
    if version is None:
        version = next_version(model_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"export version: expected an integer >= 1, got {version!r}")
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise ValueError(
            f"{final_dir} already exists; exports are never overwritten (choose another "
            "version or leave it unset for the next free one)"
        )

    metadata = build_metadata(cfg, labels, feature_metadata, norm_stats)
    metadata.update(name=name, version=version)
    no_waveform = waveform_signature_problem(cfg)
    if no_waveform and "audio" in cfg.model.modalities:
        metadata["notes"] = [f"no {WAVEFORM_SIGNATURE} signature: {no_waveform}"]
    audio_config = cfg.features.audio if no_waveform is None else None
    functions = make_serving_functions(model, metadata, audio_config)
    specs = {DEFAULT_SIGNATURE: feature_input_specs(metadata)}
    if WAVEFORM_SIGNATURE in functions:
        specs[WAVEFORM_SIGNATURE] = waveform_input_specs(metadata)
    metadata["signatures"] = {
        sig: _signature_metadata(spec, len(labels)) for sig, spec in specs.items()
    }

    archive = keras.export.ExportArchive()
    archive.track(model)
    for sig, fn in functions.items():
        archive.add_endpoint(sig, fn, input_signature=[specs[sig]])

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{version}-", dir=model_dir))
    try:
        archive.write_out(str(tmp_dir), verbose=False)
        assets = tmp_dir / "assets"
        assets.mkdir(exist_ok=True)
        (assets / LABELS_FILE).write_text("".join(f"{lab}\n" for lab in labels))
        (assets / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if verify:
            verify_export(tmp_dir, model)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as e:
            raise ValueError(f"cannot move the export into place at {final_dir} ({e})") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


# ---------------------------------------------------------------------------------------------
# Verification in a fresh process.

_VERIFY_SCRIPT = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

export_dir, in_path, out_path = sys.argv[1:4]
cases = json.loads(open(in_path + ".json").read())
arrays = np.load(in_path)
loaded = tf.saved_model.load(export_dir)
out = {}
for i, case in enumerate(cases):
    fn = loaded.signatures[case["signature"]]
    kwargs = {k: tf.constant(arrays[f"{i}/{k}"]) for k in case["inputs"]}
    result = fn(**kwargs)
    for k, v in result.items():
        out[f"{i}/{k}"] = v.numpy()
np.savez(out_path, **out)
print("signatures:", sorted(loaded.signatures.keys()))
"""


@dataclass
class VerificationReport:
    """What `verify_export` compared and found."""

    path: str
    cases: list[dict] = field(default_factory=list)
    max_abs_diff: float = 0.0
    signatures: list[str] = field(default_factory=list)


def _random_case(
    metadata: dict,
    batch: int,
    rng: np.random.Generator,
    longer: bool = False,
    shorter: bool = False,
):
    """Random features/masks: `request` goes to the export, `reference` to the Keras model.

    By default both get the same arrays at the trained length. With `longer` the first sample
    runs 5 steps past the trained maximum (the export must crop, at the end, like training);
    with `shorter` the batch is padded only to its longest sample, which is shorter than the
    trained maximum (the export must pad).
    """
    request = {}
    for mod in metadata["modalities"]:
        dim, max_len = metadata["inputs"][mod]["dim"], metadata["inputs"][mod]["max_len"]
        if longer:
            lengths = rng.integers(1, max_len + 6, size=batch)
            lengths[0] = max_len + 5
        elif shorter:
            lengths = rng.integers(1, max(2, max_len), size=batch)
        else:
            lengths = rng.integers(1, max_len + 1, size=batch)
            lengths[0] = max_len
        t_req = int(lengths.max())
        x = rng.standard_normal((batch, t_req, dim)).astype("float32")
        mask = (np.arange(t_req)[None, :] < lengths[:, None]).astype("int32")
        x *= mask[:, :, None]
        request[mod], request[f"{mod}_mask"] = x, mask
    functionals = metadata_functionals(metadata)
    if functionals is not None:
        # Utterance-level values pass through the graph unchanged: both sides get the same.
        request[FUNCTIONALS_INPUT] = rng.standard_normal((batch, functionals["dim"])).astype(
            "float32"
        )
    return request, _fit_numpy(request, metadata)


def normalize_numpy(fixed: dict[str, np.ndarray], metadata: dict) -> dict[str, np.ndarray]:
    """Apply global normalisation (if any) to cropped/padded inputs, as the graph does."""
    norm = metadata.get("normalization")
    if norm is None or norm["mode"] != "global" or norm["modality"] not in fixed:
        return fixed
    m = norm["modality"]
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    valid = fixed[f"{m}_mask"][:, :, None].astype(np.float32)
    return {**fixed, m: ((fixed[m] - mean) / std * valid).astype(np.float32)}


def _reference_probabilities(model, inputs: dict) -> np.ndarray:
    import keras

    logits = model(inputs, training=False)
    return np.asarray(
        keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=-1))
    )


def _saved_model_cli() -> list[str]:
    exe = Path(sys.executable).parent / "saved_model_cli"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("saved_model_cli")
    if found:
        return [found]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def verify_export(
    path: str | Path,
    model,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-5,
    seed: int = 0,
    timeout: float = 600.0,
    check_cli: bool = True,
) -> VerificationReport:
    """Check an export against its Keras model in a fresh Python process.

    The export is loaded with `tf.saved_model.load` in a new interpreter (nothing cached from
    this one) and its signatures are called on random inputs at each batch size; the Keras
    model gets the same inputs. Also checked: inputs longer than the trained maximum give the
    Keras result on the cropped inputs, a batch padded only to its longest sample gives the
    result at the trained length, the `functionals` input (when the model has one) reaches
    the model unchanged, `serving_waveform` (when present) agrees with the Keras
    model on in-process log-mel features, and `saved_model_cli show --all` lists every
    signature with its named inputs and outputs.

    Args:
        path: the version folder (or a temporary folder before it is moved into place).
        model: the Keras model that was exported.
        batch_sizes: batch sizes compared at the trained length.
        atol: the largest absolute difference allowed on `probabilities`.
        seed: seed of the random inputs.
        timeout: seconds allowed for each subprocess.
        check_cli: also run `saved_model_cli show --all` (default on).

    Returns:
        A `VerificationReport`.

    Raises:
        ValueError: a difference above `atol`, a wrong `class_id`, a missing signature, or a
            subprocess that failed (its stderr tail is in the message).
    """
    path = Path(path)
    meta_path = path / "assets" / METADATA_FILE
    metadata = _read_json(meta_path) if meta_path.is_file() else None
    if metadata is None or metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a ks_keras export (no valid assets/{METADATA_FILE})")
    rng = np.random.default_rng(seed)

    cases, references = [], []
    for batch in batch_sizes:
        cases.append(("default", batch, *_random_case(metadata, batch, rng)))
    top = max(batch_sizes)
    cases.append(("cropped", top, *_random_case(metadata, top, rng, longer=True)))
    cases.append(("padded", top, *_random_case(metadata, top, rng, shorter=True)))
    case_specs = [{"signature": DEFAULT_SIGNATURE, "inputs": sorted(c[2])} for c in cases]
    for _, _, _, reference in cases:
        references.append(_reference_probabilities(model, normalize_numpy(reference, metadata)))
    arrays = {f"{i}/{k}": v for i, c in enumerate(cases) for k, v in c[2].items()}

    if WAVEFORM_SIGNATURE in metadata["signatures"]:
        waveform_case = _waveform_case(metadata, top, rng)
        if waveform_case is not None:
            request, reference = waveform_case
            i = len(cases)
            cases.append(("waveform", top, request, reference))
            case_specs.append({"signature": WAVEFORM_SIGNATURE, "inputs": sorted(request)})
            references.append(_reference_probabilities(model, normalize_numpy(reference, metadata)))
            arrays.update({f"{i}/{k}": v for k, v in request.items()})

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory(prefix="ks_keras_verify_") as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(in_path, **arrays)
        Path(in_path + ".json").write_text(json.dumps(case_specs))
        # Both subprocesses import TensorFlow (seconds each): run them side by side.
        commands = {"load": [sys.executable, "-c", _VERIFY_SCRIPT, str(path), in_path, out_path]}
        if check_cli:
            commands["cli"] = [*_saved_model_cli(), "show", "--dir", str(path), "--all"]
        procs = {
            k: subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for k, cmd in commands.items()
        }
        results = {}
        try:
            for key, proc in procs.items():
                what = "saved_model_cli show --all" if key == "cli" else "the reload check"
                results[key] = _communicate(proc, timeout, what)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        if procs["load"].returncode != 0:
            raise ValueError(
                f"{path}: reloading the export in a fresh process failed:\n"
                f"{_tail(results['load'][1])}"
            )
        if check_cli and procs["cli"].returncode != 0:
            raise ValueError(
                f"{path}: saved_model_cli show --all failed:\n{_tail(results['cli'][1])}"
            )
        outputs = dict(np.load(out_path))

    report = VerificationReport(path=str(path))
    for i, ((kind, batch, _, _), expected) in enumerate(zip(cases, references)):
        got = outputs[f"{i}/probabilities"]
        class_id = outputs[f"{i}/class_id"]
        if got.shape != expected.shape:
            raise ValueError(
                f"{path}: {case_specs[i]['signature']} ({kind}, batch {batch}) returned "
                f"probabilities of shape {got.shape}, expected {expected.shape}"
            )
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= atol:
            raise ValueError(
                f"{path}: {case_specs[i]['signature']} ({kind}, batch {batch}) differs from "
                f"the Keras model by {diff:.3g} (allowed {atol:g})"
            )
        if not np.array_equal(class_id, np.argmax(got, axis=-1)):
            raise ValueError(f"{path}: class_id is not the argmax of probabilities ({kind})")
        report.cases.append(
            {
                "signature": case_specs[i]["signature"],
                "case": kind,
                "batch": batch,
                "max_abs_diff": diff,
            }
        )
        report.max_abs_diff = max(report.max_abs_diff, diff)

    if check_cli:
        report.signatures = _check_cli_listing(results["cli"][0], metadata, path)
    return report


def _waveform_case(metadata: dict, batch: int, rng: np.random.Generator):
    """Random waveforms for `serving_waveform`; the reference runs log-mel in this process."""
    import tensorflow as tf

    cfg = metadata_config(metadata)
    logmel_tf = _logmel_graph_fn(cfg.features.audio)
    sr = metadata["sample_rate"]
    lengths = rng.integers(sr // 4, sr, size=batch).astype("int32")
    waves = np.zeros((batch, int(lengths.max())), "float32")
    for b, n in enumerate(lengths):
        waves[b, :n] = 0.1 * rng.standard_normal(n).astype("float32")
    feats, mask = logmel_tf(tf.constant(waves), tf.constant(lengths))
    request = {"waveform": waves, "waveform_length": lengths}
    features = {"audio": np.asarray(feats, "float32"), "audio_mask": np.asarray(mask, "int32")}
    # The other inputs (text, functionals) as in `serving_default`.
    others = [m for m in metadata["modalities"] if m != "audio"]
    other_req, _ = _random_case({**metadata, "modalities": others}, batch, rng)
    request.update(other_req)
    features.update(other_req)
    return request, _fit_numpy(features, metadata)


def _fit_numpy(inputs: dict, metadata: dict) -> dict:
    """numpy twin of `fit_length` for every modality in `inputs` (`functionals`, which has
    no time axis, passes unchanged)."""
    fixed = {}
    if FUNCTIONALS_INPUT in inputs:
        fixed[FUNCTIONALS_INPUT] = np.asarray(inputs[FUNCTIONALS_INPUT], "float32")
    for mod in metadata["modalities"]:
        if mod not in inputs:
            continue
        max_len = metadata["inputs"][mod]["max_len"]
        x, mask = inputs[mod], (np.asarray(inputs[f"{mod}_mask"]) != 0).astype("int32")
        b, t, d = x.shape
        out_x = np.zeros((b, max_len, d), "float32")
        out_m = np.zeros((b, max_len), "int32")
        keep = min(t, max_len)
        out_x[:, :keep], out_m[:, :keep] = x[:, :keep], mask[:, :keep]
        out_x *= out_m[:, :, None]
        fixed[mod], fixed[f"{mod}_mask"] = out_x, out_m
    return fixed


def _communicate(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{what} did not finish within {timeout:g} s") from None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _check_cli_listing(cli_out: str, metadata: dict, path: Path) -> list[str]:
    """`saved_model_cli show --all` lists each signature with its named inputs/outputs."""
    blocks = re.split(r"^signature_def\['", cli_out, flags=re.MULTILINE)
    listed = {}
    for block in blocks[1:]:
        name, _, body = block.partition("']")
        listed[name] = body
    for sig, spec in metadata["signatures"].items():
        if sig not in listed:
            raise ValueError(
                f"{path}: saved_model_cli show --all does not list signature {sig!r} "
                f"(lists {sorted(listed)})"
            )
        body = listed[sig]
        for kind in ("inputs", "outputs"):
            for tensor in spec[kind]:
                if f"{kind}['{tensor}']" not in body:
                    raise ValueError(
                        f"{path}: saved_model_cli lists no {kind[:-1]} {tensor!r} for "
                        f"signature {sig!r}"
                    )
    return sorted(s for s in listed if not s.startswith("__"))


# ---------------------------------------------------------------------------------------------
# Loading an export.


@dataclass
class ExportedModel:
    """A loaded export: its metadata and a `predict` over the SavedModel signatures."""

    path: Path
    metadata: dict
    loaded: Any = None

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def signatures(self) -> list[str]:
        return sorted(self.metadata["signatures"])

    def predict(
        self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE
    ) -> dict[str, np.ndarray]:
        """Run a signature on numpy inputs; returns `probabilities` and `class_id` arrays."""
        import tensorflow as tf

        if signature not in self.metadata["signatures"]:
            raise ValueError(f"{self.path}: no signature {signature!r} (has {self.signatures})")
        expected = self.metadata["signatures"][signature]["inputs"]
        check_request(inputs, expected, f"{self.path} [{signature}]")
        fn = self.loaded.signatures[signature]
        kwargs = {
            k: tf.constant(np.asarray(inputs[k], dtype=expected[k]["dtype"])) for k in expected
        }
        try:
            result = fn(**kwargs)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise ValueError(
                f"{self.path} [{signature}]: bad request ({tf_error_summary(e)})"
            ) from None
        return {k: result[k].numpy() for k in OUTPUT_NAMES}


def tf_error_summary(error: Exception) -> str:
    """The informative line of a TensorFlow error (its assertion text), not the node dump."""
    text = getattr(error, "message", None) or str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("assertion failed:"):
            match = re.search(r"assertion failed: \[(.*?)\] \[Condition", line) or re.search(
                r"assertion failed: \[(.*?)\]", line
            )
            return (match.group(1) if match else line).replace("\\'", "'")
    useful = [ln for ln in lines if not ln.startswith(("[[", "Detected at", "<stack", "Graph"))]
    return (useful or lines or [type(error).__name__])[-1]


def check_request(inputs: dict, expected: dict, where: str) -> None:
    """Names, ranks, widths and batch sizes of a request, before TensorFlow sees it."""
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: expected inputs {sorted(expected)}; missing {missing}, unexpected {extra}"
        )
    batches = set()
    for name, spec in expected.items():
        shape = np.shape(inputs[name])
        want = spec["shape"]
        if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
            pretty = ["None" if w is None else w for w in want]
            raise ValueError(f"{where}: input {name!r} has shape {shape}, expected {pretty}")
        batches.add(shape[0])
    if len(batches) > 1:
        raise ValueError(f"{where}: inputs disagree on the batch size {sorted(batches)}")
    if FUNCTIONALS_INPUT in expected:
        try:
            values = np.asarray(inputs[FUNCTIONALS_INPUT], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: input 'functionals' is not a numeric array") from None
        bad = np.flatnonzero(~np.isfinite(values).all(axis=-1)).tolist()
        if bad:
            raise ValueError(
                f"{where}: input 'functionals' holds NaN/inf in row(s) {bad[:10]}; every "
                "value must be finite (openSMILE gives NaN for audio that is too short)"
            )
    for name in expected:
        if name.endswith("_mask") and name[: -len("_mask")] in expected:
            t_x, t_m = np.shape(inputs[name[: -len("_mask")]])[1], np.shape(inputs[name])[1]
            if t_x != t_m:
                raise ValueError(
                    f"{where}: {name[: -len('_mask')]!r} has {t_x} steps but {name!r} has {t_m}"
                )


def load_exported(path: str | Path) -> ExportedModel:
    """Load an export (a version folder, or a base folder → its latest version).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a ks_keras export, or a SavedModel that does not load.
    """
    import tensorflow as tf

    version_dir, metadata = load_export_metadata(path)
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as e:  # corrupt protobuf / missing variables
        raise ValueError(
            f"{version_dir}: the SavedModel does not load ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    missing = [s for s in metadata["signatures"] if s not in loaded.signatures]
    if missing:
        raise ValueError(f"{version_dir}: signatures {missing} named in its metadata are missing")
    return ExportedModel(path=version_dir, metadata=metadata, loaded=loaded)


# ---------------------------------------------------------------------------------------------
# CLI: ks-keras export.


def run_export(args) -> int:
    """`ks-keras export --model run/best.keras [--config cfg.yaml] [--name] [--version]`."""
    from ks_keras.config import apply_overrides, from_dict, load_config, validate_config

    model_path = Path(args.model)
    if model_path.suffix != ".keras":
        raise ValueError(f"--model {model_path}: expected a .keras file saved by training")
    check_keras_archive(model_path)
    sidecar = read_model_sidecar(model_path)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif sidecar is not None:
        data = apply_overrides(sidecar["config"], args.overrides)
        cfg = from_dict(Config, data)
        validate_config(cfg)
    else:
        raise ValueError(
            f"--model {model_path}: no sidecar {sidecar_path(model_path).name} next to it; pass "
            "--config with the training config (and --labels if data.labels is empty)"
        )
    if args.labels:
        labels = [lab.strip() for lab in args.labels.split(",")]
    elif sidecar is not None:
        labels = sidecar["labels"]
    elif cfg.data.labels:
        labels = list(cfg.data.labels)
    else:
        raise ValueError("no class labels: pass --labels a,b,c (in the model's output order)")
    norm_stats = sidecar.get("normalization") if sidecar is not None else None
    trained_global = "audio" in cfg.model.modalities and cfg.features.audio.normalize == "global"
    if trained_global and norm_stats is None:
        raise ValueError(
            f"--model {model_path}: trained with features.audio.normalize=global, but there "
            f"is no sidecar ({sidecar_path(model_path).name}) holding the training statistics"
        )
    if sidecar is not None and not args.config:
        feature_metadata = sidecar["features"]
    else:
        feature_metadata = config_feature_metadata(cfg)
        print(
            "note: the export records the extractors the config names (features.*) as the "
            "ones that made the training features",
            file=sys.stderr,
        )

    model = load_keras_model(model_path)
    path = export_model(
        model,
        cfg,
        labels,
        feature_metadata,
        base_dir=args.base_dir,
        name=args.name,
        version=args.version,
        verify=not args.no_verify,
        norm_stats=norm_stats,
    )
    print(f"exported {model_path} -> {path}")
    print(f"signatures: {', '.join(_read_json(path / 'assets' / METADATA_FILE)['signatures'])}")
    print(
        "verified: reload in a fresh process matches (batch 1 and 3), saved_model_cli lists "
        "the signatures"
        if not args.no_verify
        else "not verified (--no-verify)"
    )
    return 0


def config_feature_metadata(cfg: Config) -> dict[str, dict]:
    """`{modality: extractor.metadata}` of the extractors `cfg.features` names (no weights load;
    Hugging Face folders are fingerprinted)."""
    from ks_keras.features import get_audio_extractor, get_text_extractor

    getters = {"audio": get_audio_extractor, "text": get_text_extractor}
    return {mod: getters[mod](getattr(cfg.features, mod)).metadata for mod in cfg.model.modalities}
