"""`ks-keras export`: a trained `.keras` model (and its sidecar) → TF Serving SavedModel."""

from __future__ import annotations

import sys
from pathlib import Path

from ks_keras.config import Config
from ks_keras.export.exporting import export_model
from ks_keras.export.metadata import METADATA_FILE, _read_json, config_feature_metadata
from ks_keras.export.sidecar import (
    check_keras_archive,
    load_keras_model,
    read_model_sidecar,
    sidecar_path,
)
from ks_keras.runtime import bfloat16_units


def run_export(args) -> int:
    """`ks-keras export --model run/best.keras [--config cfg.yaml] [--name] [--version]
    [--weights float32|bfloat16]`."""
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
        weights=args.weights,
    )
    print(f"exported {model_path} -> {path}")
    metadata = _read_json(path / "assets" / METADATA_FILE)
    weights = metadata.get("weights", {})
    if weights.get("dtype") == "bfloat16":
        agreement = weights["vs_float32"]
        print(
            "weights: bfloat16 (vs the float32 model on random requests: probabilities within "
            f"{agreement['max_abs_diff']:.3g}, same class for {100 * agreement['same_class']:.0f} %)"
        )
        if bfloat16_units() is False:
            print(
                "note: this CPU has no AMX or AVX512-BF16 units; bfloat16 weights pay only on "
                "CPUs that have them (on AVX2-only CPUs TensorFlow runs bfloat16 matmuls with "
                "generic kernels: 1.16x slower than float32 under AVX2 limits, docs/serving.md)",
                file=sys.stderr,
            )
    print(f"signatures: {', '.join(metadata['signatures'])}")
    print(
        "verified: reload in a fresh process matches (batch 1 and 3), saved_model_cli lists "
        "the signatures"
        if not args.no_verify
        else "not verified (--no-verify)"
    )
    return 0
