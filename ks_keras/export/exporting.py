"""Export: write a model as a TF Serving SavedModel version (`export_model`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ks_keras.config import Config
from ks_keras.export.layout import next_version
from ks_keras.export.metadata import (
    DEFAULT_SIGNATURE,
    LABELS_FILE,
    METADATA_FILE,
    WAVEFORM_SIGNATURE,
    _check_labels,
    _check_model_matches,
    build_metadata,
)
from ks_keras.export.sidecar import check_finite_weights
from ks_keras.export.signatures import (
    _signature_metadata,
    feature_input_specs,
    make_serving_functions,
    waveform_input_specs,
    waveform_signature_problem,
)
from ks_keras.export.verification import verify_export

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"

# `export_model(weights=...)`: the dtype the export stores its weights in. bfloat16 halves
# the bytes a request reads and runs the matmuls on AMX / AVX512-BF16 units: 0.65x of the
# float32 request time on such a CPU (docs/performance.md); elsewhere expect no gain
# (TensorFlow's generic bfloat16 kernels: 1.16x slower than float32 under AVX2 limits).
WEIGHT_DTYPES = ("float32", "bfloat16")
# The reload check of a bfloat16 export compares two bfloat16 computations (eager Keras and
# the reloaded graph, which may crop the request): they differ by bfloat16 rounding.
BFLOAT16_ATOL = 0.05


def bfloat16_copy(model):
    """`model` rebuilt with every float32 layer under the `bfloat16` dtype policy (weights
    and matmuls in bfloat16; the attention softmax, top-k and LayerNorm statistics stay
    float32 inside the layers), its weights copied in (rounded to bfloat16)."""

    def to_bfloat16(value):
        if isinstance(value, dict):
            if value.get("class_name") == "DTypePolicy" and isinstance(value.get("config"), dict):
                if value["config"].get("name") == "float32":
                    return {**value, "config": {**value["config"], "name": "bfloat16"}}
                return value
            return {k: to_bfloat16(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_bfloat16(v) for v in value]
        return value

    copy = model.__class__.from_config(to_bfloat16(model.get_config()))
    copy.set_weights(model.get_weights())
    if not any(w.dtype == "bfloat16" for w in copy.weights):
        raise ValueError(
            f"weights=bfloat16: no layer of {model.name!r} took the bfloat16 policy (its "
            "layers are not float32)"
        )
    return copy


def _bfloat16_agreement(model, copy, metadata: dict, seed: int = 0) -> dict[str, float]:
    """Largest probability difference between `model` and its bfloat16 `copy`, and the share
    of samples with the same class, on the random requests of the reload check."""
    import numpy as np

    from ks_keras.export.verification import (
        _random_case,
        _reference_probabilities,
        normalize_numpy,
    )

    rng = np.random.default_rng(seed)
    diffs, same = [], []
    for _ in range(4):
        _, reference = _random_case(metadata, 4, rng)
        inputs = normalize_numpy(reference, metadata)
        p32 = _reference_probabilities(model, inputs)
        p16 = _reference_probabilities(copy, inputs)
        diffs.append(float(np.max(np.abs(p32 - p16))))
        same.extend((p32.argmax(-1) == p16.argmax(-1)).tolist())
    return {"max_abs_diff": round(max(diffs), 6), "same_class": round(float(np.mean(same)), 4)}


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
    weights: str = "float32",
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
        weights: `float32` (default) or `bfloat16`: a copy of the model with its weights and
            matmuls in bfloat16 (`bfloat16_copy`), for CPUs with AMX or AVX512-BF16. The
            reload check then compares with that copy (within `BFLOAT16_ATOL`), and the
            metadata records the dtype and how far the copy is from the float32 model on the
            check's random requests (`weights.vs_float32`).

    Returns:
        The version folder, e.g. `saved_models/ks_keras/3`.

    Example:

    >>> export_model(model, cfg, ["angry", "happy", "neutral", "sad"], feature_metadata)
    PosixPath('saved_models/ks_keras/1')
    """
    import keras

    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights: expected one of {WEIGHT_DTYPES}, got {weights!r}")
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
    served = model
    metadata["weights"] = {"dtype": weights}
    if weights == "bfloat16":
        served = bfloat16_copy(model)
        metadata["weights"]["vs_float32"] = _bfloat16_agreement(model, served, metadata)
    functions = make_serving_functions(served, metadata, audio_config)
    specs = {DEFAULT_SIGNATURE: feature_input_specs(metadata)}
    if WAVEFORM_SIGNATURE in functions:
        specs[WAVEFORM_SIGNATURE] = waveform_input_specs(metadata)
    metadata["signatures"] = {
        sig: _signature_metadata(spec, len(labels)) for sig, spec in specs.items()
    }

    archive = keras.export.ExportArchive()
    archive.track(served)
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
            atol = BFLOAT16_ATOL if weights == "bfloat16" else 1e-5
            verify_export(tmp_dir, served, atol=atol)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError as e:
            raise ValueError(f"cannot move the export into place at {final_dir} ({e})") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir
