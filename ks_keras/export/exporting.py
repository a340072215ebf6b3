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
