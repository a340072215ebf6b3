"""Predictor: a model (export or .keras) + the featurizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ks_keras.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    padding_invariant,
    validate_config,
)
from ks_keras.export import (
    DEFAULT_SIGNATURE,
    WAVEFORM_SIGNATURE,
    build_metadata,
    check_keras_archive,
    config_feature_metadata,
    load_exported,
    load_keras_model,
    make_serving_functions,
    metadata_config,
    model_input_names,
    read_model_sidecar,
    sidecar_path,
)
from ks_keras.predict.featurize import RequestFeaturizer
from ks_keras.predict.output import Prediction, check_probabilities, predictions_from_probabilities


class Predictor:
    """Labels for audio files + transcripts from an export or a `.keras` model.

    Args:
        metadata: the model's metadata (labels, inputs, extractor fingerprints, config).
        run: `inputs dict -> probabilities [B, C]` for `serving_default`-style inputs.
        source: where the model came from (for messages).
        config: the request config (extractor settings); default the model's.
        run_waveform: optional runner for `serving_waveform` requests.
    """

    def __init__(
        self,
        metadata: dict,
        run: Callable[[dict], np.ndarray],
        source: str,
        config: Config | None = None,
        run_waveform: Callable[[dict], np.ndarray] | None = None,
    ):
        self.metadata = metadata
        self.labels = list(metadata["labels"])
        self.source = source
        self._run = {DEFAULT_SIGNATURE: run}
        if run_waveform is not None:
            self._run[WAVEFORM_SIGNATURE] = run_waveform
        self.featurizer = RequestFeaturizer(metadata, config)
        self.featurizer.check_extractors()

    @classmethod
    def load(
        cls, model: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
    ) -> Predictor:
        """From an export folder (base → latest version) or a `.keras` file (+ sidecar).

        Args:
            model: `saved_models/<name>`, `saved_models/<name>/<version>` or `run/best.keras`.
            config: a YAML config for the request's extractors (default: the model's own
                config); for a `.keras` file without sidecar it is also the model's config.
            overrides: `--set` style overrides applied to that config.
        """
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model not found: {path}")
        if path.is_file():
            if path.suffix != ".keras":
                raise ValueError(
                    f"{path}: expected an export folder (saved_models/<name>[/<version>]) or a "
                    ".keras file"
                )
            return cls._load_keras(path, config, overrides)
        exported = load_exported(path)
        request_cfg = request_config(exported.metadata, config, overrides)

        def run(inputs):
            return exported.predict(inputs)["probabilities"]

        def run_waveform(inputs):
            return exported.predict(inputs, WAVEFORM_SIGNATURE)["probabilities"]

        has_waveform = WAVEFORM_SIGNATURE in exported.metadata["signatures"]
        return cls(
            exported.metadata,
            run,
            str(exported.path),
            request_cfg,
            run_waveform if has_waveform else None,
        )

    @classmethod
    def _load_keras(cls, path: Path, config, overrides) -> Predictor:
        check_keras_archive(path)
        sidecar = read_model_sidecar(path)
        if sidecar is None:
            if config is None:
                raise ValueError(
                    f"{path}: no sidecar {sidecar_path(path).name} next to it; pass --config "
                    "with the training config (data.labels names the classes in output order)"
                )
            cfg = load_config(config, overrides)
            if "audio" in cfg.model.modalities and cfg.features.audio.normalize == "global":
                raise ValueError(
                    f"{path}: trained with features.audio.normalize=global, but there is no "
                    f"sidecar ({sidecar_path(path).name}) holding the training statistics"
                )
            if not cfg.data.labels:
                raise ValueError(
                    f"{config}: data.labels is empty; the class order of {path} is unknown"
                )
            metadata = build_metadata(cfg, cfg.data.labels, config_feature_metadata(cfg))
            request_cfg = cfg
        else:
            metadata = sidecar
            request_cfg = request_config(sidecar, config, overrides)
        model = load_keras_model(path)
        names = {t.name for t in model.inputs}
        expected = set(model_input_names(metadata))
        if names != expected:
            raise ValueError(
                f"{path}: model inputs {sorted(names)} do not match its metadata "
                f"({sorted(expected)})"
            )

        # The export's serving graph (same length fitting, normalisation and softmax), traced
        # once: a graph call instead of eager op-by-op execution, and a short request is cut
        # to its real length where the model allows it.
        classify = make_serving_functions(model, metadata)[DEFAULT_SIGNATURE]

        def run(inputs):
            import tensorflow as tf

            request = {k: tf.convert_to_tensor(inputs[k]) for k in expected}
            return np.asarray(classify(request)["probabilities"], np.float32)

        return cls(metadata, run, str(path), request_cfg)

    def predict_inputs(
        self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE
    ) -> np.ndarray:
        """Probabilities `[B, C]` for ready model inputs."""
        if signature not in self._run:
            raise ValueError(
                f"{self.source}: no {signature} signature (this model has {sorted(self._run)})"
            )
        probs = np.asarray(self._run[signature](inputs))
        batch = len(next(iter(inputs.values()))) if inputs else 0
        check_probabilities(probs, self.labels, batch, self.source)
        return probs

    def predict_files(
        self,
        paths: list | None,
        texts: list | None,
        ids: list[str] | None = None,
        signature: str = DEFAULT_SIGNATURE,
        speakers: list[str | None] | None = None,
        batch_size: int = 16,
    ) -> list[Prediction]:
        """Predict utterances (audio paths and/or transcripts).

        Features are extracted for all items at once (per-speaker normalisation pools a
        speaker's items); the model runs on `batch_size` items at a time.
        """
        n = len(paths) if paths is not None else len(texts or [])
        if n == 0:
            raise ValueError("nothing to predict: no audio files or transcripts given")
        names = [str(i) if i is not None else None for i in (ids or [None] * n)]
        names = [
            name or (str(paths[i]) if paths is not None else f"item {i}")
            for i, name in enumerate(names)
        ]
        inputs, notes = self.featurizer.inputs(paths, texts, names, signature, speakers)
        size = max(1, int(batch_size))
        order = self._length_order(inputs) if n > size else np.arange(n)
        inputs = {k: np.asarray(v)[order] for k, v in inputs.items()}
        probs = np.concatenate(
            [
                self.predict_inputs({k: v[i : i + size] for k, v in inputs.items()}, signature)
                for i in range(0, n, size)
            ]
        )
        probs[order] = probs.copy()  # back in the order given
        return predictions_from_probabilities(probs, self.labels, paths, texts, ids, notes)

    def _length_order(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Items from the shortest to the longest when the model's graph cuts each batch after
        its longest real step (`crop_to_longest`): batches of similar length then carry
        little padding. Otherwise the order given (nothing to gain)."""
        n = len(next(iter(inputs.values())))
        crop = self.metadata.get("crop_to_longest")
        if crop is None:  # metadata written before the flag existed (as export decides)
            crop = "config" in self.metadata and padding_invariant(
                metadata_config(self.metadata).model
            )
        if not crop:
            return np.arange(n)
        keys = [np.asarray(inputs["waveform_length"])] if "waveform_length" in inputs else []
        keys += [
            np.asarray(inputs[f"{m}_mask"]).sum(axis=1)
            for m in self.metadata["modalities"]
            if f"{m}_mask" in inputs
        ]
        return np.lexsort(keys[::-1]) if keys else np.arange(n)


def request_config(metadata: dict, config, overrides) -> Config:
    """`--config` (+ `--set`) if given, else the model's own config (+ `--set`)."""
    if config is not None:
        return load_config(config, overrides)
    base = metadata_config(metadata)
    if not overrides:
        return base
    cfg = from_dict(Config, apply_overrides(base.to_dict(), overrides))
    validate_config(cfg)
    return cfg
