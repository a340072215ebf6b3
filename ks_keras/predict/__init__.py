"""Prediction from raw files: `ks-keras predict path.wav --text "..." --model ...`.

The model is either an export (`saved_models/<name>` → its latest version, or
`saved_models/<name>/<version>`) or a `.keras` file with its sidecar `<file>.keras.json`
(written by training via `ks_keras.export.write_model_sidecar`; without one, pass `--config`
with the training config whose `data.labels` names the classes in output order).

Raw inputs become model inputs exactly as in training: `load_audio` (mono, resampled to the
extractor's rate, with a note when the file had another rate), the extractors named by the
model's config, crop/pad at the end to the trained max lengths (`data.pad_or_crop`). Before
any extraction the request's extractors are compared with the fingerprints stored in the
model: a different model folder, layer, log-mel setting, … is an error, not a silent wrong
number.

A model with an openSMILE functionals input (`features.functionals`, export metadata
`functionals`) gets them computed for the request's audio files (one openSMILE child process per
call, `ks_keras.features.functionals.extract_files`) and, when it was trained with
`features.audio.normalize: speaker`, z-normalised per speaker from the request's utterances of
each speaker (`speaker_normalize`, training's rule), as the audio frames are.

Example:

```python
predictor = Predictor.load("saved_models/ks_keras")
[p] = predictor.predict_files(["a.wav"], ["I can't believe it"])
p.label, p.probabilities
```
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    metadata_functionals,
    model_input_names,
    read_model_sidecar,
    sidecar_path,
)

# Extractor metadata keys that may differ between machines without changing the features:
# where the model folder lives (its files' hashes identify it) and package versions.
_MACHINE_KEYS = {"model_path", "packages"}


@dataclass
class Prediction:
    """One utterance's prediction."""

    label: str
    class_id: int
    probabilities: dict[str, float]
    path: str | None = None
    text: str | None = None
    id: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Features for a request.


def compare_extractor_metadata(trained: dict, request: dict, modality: str) -> list[str]:
    """Differences between the model's stored extractor metadata and the request's.

    Returns:
        Notes about harmless differences (package versions, folder location).

    Raises:
        ValueError: a difference that changes the features, listing every differing field.
    """
    problems, notes = [], []
    for key in sorted(set(trained) | set(request)):
        a, b = trained.get(key), request.get(key)
        if a == b:
            continue
        if key in _MACHINE_KEYS:
            if key == "packages":
                notes.append(
                    f"{modality} extractor package versions differ from training ({a} vs {b})"
                )
            continue
        if key == "files" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            problems.append(
                f"model files differ ({', '.join(changed[:5])}{', …' if len(changed) > 5 else ''})"
            )
        else:
            problems.append(f"{key}: model trained with {a!r}, request gives {b!r}")
    if problems:
        raise ValueError(
            f"feature extractor mismatch for {modality}: "
            + "; ".join(problems)
            + f". The features.{modality} settings must be those the model was trained with "
            "(leave out --config to use the model's own, or fix features.* with --set)"
        )
    return notes


class RequestFeaturizer:
    """Audio files and transcripts → model inputs, the way the model's training data was made.

    Args:
        metadata: export or sidecar metadata (`build_metadata`).
        config: the request's config (its `features` section picks the extractors); default
            the model's own config.

    Example:

    >>> featurizer = RequestFeaturizer(metadata)
    >>> inputs, notes = featurizer.inputs(["a.wav"], ["hello"])
    """

    def __init__(self, metadata: dict, config: Config | None = None):
        self.metadata = metadata
        self.config = config if config is not None else metadata_config(metadata)
        self.modalities = list(metadata["modalities"])
        self.sample_rate = int(metadata["sample_rate"])
        self.max_len = {m: metadata["inputs"][m]["max_len"] for m in self.modalities}
        self.notes: list[str] = []
        self._extractors: dict[str, Any] = {}
        # Global statistics are applied by the model runner (in the exported graph); per-speaker
        # statistics can only come from the request's own utterances, so they are applied here.
        self.normalization = metadata.get("normalization")
        self.audio_per_speaker = bool(
            self.normalization and self.normalization["mode"] == "speaker"
        )
        # openSMILE functionals input (None when the model has none): computed here.
        self.functionals = metadata_functionals(metadata)
        self.functionals_per_speaker = bool(
            self.functionals and self.functionals["normalize"] == "speaker"
        )
        # Any per-speaker step: a manifest's rows of one speaker are then featurised together.
        self.per_speaker = self.audio_per_speaker or self.functionals_per_speaker
        self._functionals_checked = False

    def extractor(self, modality: str):
        """The request's extractor for `modality`, checked against the model's (built once)."""
        if modality not in self._extractors:
            from ks_keras.features import get_audio_extractor, get_text_extractor

            section = getattr(self.config.features, modality)
            ex = (get_audio_extractor if modality == "audio" else get_text_extractor)(section)
            trained_dim = self.metadata["inputs"][modality]["dim"]
            if ex.dim != trained_dim:
                raise ValueError(
                    f"feature extractor mismatch for {modality}: the model expects "
                    f"{trained_dim}-d features, features.{modality} ({ex.name}) gives {ex.dim}-d"
                )
            self.notes += compare_extractor_metadata(
                self.metadata["features"][modality], ex.metadata, modality
            )
            self._extractors[modality] = ex
        return self._extractors[modality]

    def check_extractors(self) -> None:
        """Build and check every extractor now (fail before reading any file)."""
        for modality in self.modalities:
            self.extractor(modality)
        self.check_functionals()

    def check_functionals(self) -> None:
        """The request's `features.functionals` is the model's and openSMILE is installed
        (a model without a functionals input needs neither)."""
        if self.functionals is None or self._functionals_checked:
            return
        import importlib.metadata

        from ks_keras.features.functionals import (
            FEATURE_SETS,
            FUNCTIONAL_DIMS,
            opensmile_available,
        )

        trained = self.functionals
        requested = self.config.features.functionals
        try:
            version = importlib.metadata.version("opensmile")
        except importlib.metadata.PackageNotFoundError:
            version = None
        request = {
            **trained,
            "set": requested,
            "opensmile_set": FEATURE_SETS.get(requested),
            "dim": FUNCTIONAL_DIMS.get(requested, 0),
            "packages": {"opensmile": version},
        }
        self.notes += compare_extractor_metadata(trained, request, "functionals")
        if not opensmile_available():
            raise ValueError(
                f"the model reads openSMILE {trained.get('opensmile_set', trained['set'])} "
                "functionals (features.functionals="
                f"{trained['set']!r}): install the opensmile package (pip install -e "
                "'.[baseline]')"
            )
        self._functionals_checked = True

    def load_waveforms(self, paths: list[str | Path]) -> tuple[list[np.ndarray], list[list[str]]]:
        """Decode, mix to mono and resample; per-file notes (resampling, quality warnings)."""
        import soundfile as sf

        from ks_keras.audio import load_audio

        min_seconds = self.config.features.audio.min_seconds
        waves, notes, bad = [], [], []
        for path in paths:
            file_notes = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    wave = load_audio(path, sample_rate=self.sample_rate, min_seconds=min_seconds)
                except (ValueError, FileNotFoundError) as e:
                    bad.append(e)  # every bad file is named, not only the first
                    continue
            file_notes += [f"{w.message}" for w in caught]
            rate = sf.info(str(path)).samplerate
            if rate != self.sample_rate:
                file_notes.append(
                    f"{path}: resampled from {rate} Hz to {self.sample_rate} Hz (the model's rate)"
                )
            waves.append(wave)
            notes.append(file_notes)
        if bad:
            raise BadAudioError([str(e) for e in bad])
        return waves, notes

    def check_texts(self, texts: list[str | None], names: list[str]) -> list[str]:
        """Every item has a transcript when the model reads text (unless a placeholder is
        configured); the error lists every offending item."""
        if "text" not in self.modalities:
            return []
        allow_empty = self.config.features.text.empty_text == "placeholder"
        bad = [
            name
            for name, t in zip(names, texts)
            if t is None or (not t.strip() and not allow_empty)
        ]
        if bad:
            raise ValueError(
                f"empty or missing transcript for {', '.join(bad)}: the model reads text, so "
                "give a transcript (--text / a 'text' column)"
            )
        return [t or "" for t in texts]

    def features(
        self,
        paths: list | None,
        texts: list | None,
        names: list[str] | None = None,
        modalities: list[str] | None = None,
    ) -> tuple[dict[str, list], list]:
        """Unpadded `[T, D]` features per modality, plus per-item notes."""
        modalities = self.modalities if modalities is None else modalities
        n = len(paths) if paths is not None else len(texts or [])
        names = names or [f"item {i}" if paths is None else str(paths[i]) for i in range(n)]
        out: dict[str, list[np.ndarray]] = {}
        notes: list[list[str]] = [[] for _ in range(n)]
        if "text" in modalities:
            texts = self.check_texts(list(texts if texts is not None else [None] * n), names)
        if "audio" in modalities:
            waves, notes = self.load_waveforms(self._audio_paths(paths, n))
            out["audio"] = self.extractor("audio").extract(waves)
        if "text" in modalities:
            out["text"] = self.extractor("text").extract(texts)
        return out, notes

    def normalize_speakers(
        self, feats: list[np.ndarray], speakers: list[str | None] | None, names: list[str]
    ) -> tuple[list[np.ndarray], list[list[str]]]:
        """Per-speaker normalisation (`features.audio.normalize: speaker`), as in training:
        each speaker's mean/std over all real frames of that speaker's utterances here.

        Utterances without a speaker are normalised with their own statistics (noted).
        """
        from ks_keras.data import STD_FLOOR

        groups = speaker_groups(speakers, len(feats))
        out: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
        notes: list[list[str]] = [[] for _ in feats]
        for key, idx in groups.items():
            frames = np.concatenate([feats[i] for i in idx]).astype(np.float64)
            mean = frames.mean(axis=0)
            std = np.maximum(frames.std(axis=0), STD_FLOOR)
            for i in idx:
                out[i] = ((feats[i] - mean) / std).astype(np.float32)
                if isinstance(key, tuple):
                    notes[i].append(
                        f"{names[i]}: the model was trained with per-speaker normalisation; "
                        "with no speaker given, this utterance's own statistics were used "
                        "(give a manifest with a 'speaker' column and several utterances per "
                        "speaker for the trained behaviour)"
                    )
                elif len(idx) < 2:
                    notes[i].append(
                        f"{names[i]}: per-speaker normalisation from a single utterance of "
                        f"speaker {key!r}"
                    )
        return out, notes

    def functionals_matrix(
        self,
        paths: list,
        speakers: list[str | None] | None = None,
        names: list[str] | None = None,
    ) -> tuple[np.ndarray, list[list[str]]]:
        """`[N, D]` openSMILE functionals of audio files, as the model's training made them.

        One child process extracts the whole list (`extract_files`); with per-speaker
        normalisation (metadata `functionals.normalize: speaker`) each speaker's rows are then
        z-normalised with the statistics of that speaker's files here (`speaker_normalize`,
        training's function). A file without a speaker is normalised alone; like a speaker's
        only file (in training too) it then gets all-zero functionals; both are noted.

        Raises:
            BadAudioError: files openSMILE cannot process or whose functionals are NaN/inf
                (e.g. too short), one message per file.
        """
        from ks_keras.features.functionals import speaker_normalize

        self.check_functionals()
        spec = self.functionals
        names = names or [str(p) for p in paths]
        matrix = self._extract_functionals(paths)
        notes: list[list[str]] = [[] for _ in paths]
        if self.functionals_per_speaker:
            groups = speaker_groups(speakers, len(paths))
            keys = np.zeros(len(paths), np.int64)
            for g, idx in enumerate(groups.values()):
                keys[idx] = g
            matrix = speaker_normalize(matrix, keys)
            for key, idx in groups.items():
                if len(idx) > 1:
                    continue
                i = idx[0]
                if isinstance(key, tuple):
                    who = "with no speaker given"
                else:
                    who = f"as the only utterance of speaker {key!r}"
                notes[i].append(
                    f"{names[i]}: the model was trained with per-speaker normalisation of its "
                    f"openSMILE {spec.get('opensmile_set', spec['set'])} functionals; {who}, "
                    "they are normalised with this utterance's own statistics, which makes "
                    "them all zero (give several utterances per speaker for the trained "
                    "behaviour)"
                )
        return matrix.astype(np.float32), notes

    def _extract_functionals(self, paths: list) -> np.ndarray:
        """Raw `[N, D]` functionals; every file openSMILE fails on is named."""
        from ks_keras.features.functionals import extract_files

        spec = self.functionals
        label = f"openSMILE {spec.get('opensmile_set', spec['set'])} functionals"

        def extract(batch):
            return extract_files(
                batch, spec["set"], sample_rate=int(spec.get("sample_rate", 16000))
            )

        try:
            matrix = extract(paths)
        except RuntimeError as e:
            if len(paths) == 1:
                raise BadAudioError([f"{paths[0]}: {e}"]) from None
            # The batch failed as a whole: one process per file names the culprit(s).
            rows, errors = [], []
            for path in paths:
                try:
                    rows.append(extract([path])[0])
                except RuntimeError as err:
                    errors.append(f"{path}: {err}")
            if errors:
                raise BadAudioError(errors) from None
            matrix = np.stack(rows)
        if matrix.shape != (len(paths), spec["dim"]):
            raise ValueError(
                f"{label}: expected [{len(paths)}, {spec['dim']}] values (the model's input), "
                f"got {list(matrix.shape)}"
            )
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if bad.size:
            raise BadAudioError(
                [
                    f"{paths[i]}: its {label} are NaN/inf (is the recording too short or silent?)"
                    for i in bad
                ]
            )
        return matrix

    def _add_functionals(
        self,
        request: dict[str, np.ndarray],
        notes: list[list[str]],
        paths: list | None,
        speakers: list[str | None] | None,
        names: list[str] | None,
    ) -> list[list[str]]:
        """Add the `functionals` input to `request` (if the model has one); per-item notes."""
        if self.functionals is None:
            return notes
        n = len(notes)
        paths = self._audio_paths(paths, n)
        if "audio" not in self.modalities:
            # The model reads no audio frames, but the files must still be valid audio.
            _, file_notes = self.load_waveforms(paths)
            notes = [notes[i] + file_notes[i] for i in range(n)]
        request["functionals"], extra = self.functionals_matrix(paths, speakers, names)
        return [notes[i] + extra[i] for i in range(n)]

    @staticmethod
    def _audio_paths(paths: list | None, n: int) -> list:
        if paths is None or len(paths) != n or any(p is None for p in paths):
            raise ValueError("the model reads audio: give an audio file for every item")
        return list(paths)

    def batch(self, features: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Crop/pad each item at the end to the trained length and stack (training's rule)."""
        from ks_keras.data import pad_or_crop

        inputs = {}
        for mod, items in features.items():
            fixed = [pad_or_crop(x, self.max_len[mod]) for x in items]
            inputs[mod] = np.stack([x for x, _ in fixed]).astype(np.float32)
            inputs[f"{mod}_mask"] = np.stack([m for _, m in fixed]).astype(np.int32)
        return inputs

    @staticmethod
    def waveform_batch(waves: list[np.ndarray]) -> dict[str, np.ndarray]:
        """`waveform` `[B, N]` zero-padded at the end and `waveform_length` `[B]`."""
        lengths = np.array([len(w) for w in waves], np.int32)
        padded = np.zeros((len(waves), int(lengths.max())), np.float32)
        for i, w in enumerate(waves):
            padded[i, : len(w)] = w
        return {"waveform": padded, "waveform_length": lengths}

    def inputs(
        self,
        paths: list | None,
        texts: list | None,
        names: list[str] | None = None,
        signature: str = DEFAULT_SIGNATURE,
        speakers: list[str | None] | None = None,
    ) -> tuple[dict[str, np.ndarray], list]:
        """A ready request for `signature` (`serving_default` or `serving_waveform`).

        Args:
            paths: audio files (None for a text-only model).
            texts: transcripts (None for an audio-only model).
            names: how items are named in messages (default: their paths).
            signature: `serving_default` (features) or `serving_waveform` (raw audio).
            speakers: speaker of each item, used only by per-speaker normalisation.

        Returns:
            `(inputs, notes)`: named arrays and one list of notes per item.
        """
        if signature == DEFAULT_SIGNATURE:
            feats, notes = self.features(paths, texts, names)
            if self.audio_per_speaker and "audio" in feats:
                n = len(feats["audio"])
                names = names or [str(p) for p in paths]
                feats["audio"], norm_notes = self.normalize_speakers(
                    feats["audio"], speakers, names
                )
                notes = [notes[i] + norm_notes[i] for i in range(n)]
            request = self.batch(feats)
            notes = self._add_functionals(request, notes, paths, speakers, names)
            return request, notes
        if signature != WAVEFORM_SIGNATURE:
            raise ValueError(
                f"unknown signature {signature!r}; expected {DEFAULT_SIGNATURE!r} "
                f"or {WAVEFORM_SIGNATURE!r}"
            )
        if WAVEFORM_SIGNATURE not in self.metadata.get("signatures", {}):
            from ks_keras.export import waveform_signature_problem

            try:
                why = waveform_signature_problem(metadata_config(self.metadata))
            except ValueError:  # metadata without a config
                why = None
            raise ValueError(
                f"this model has no {WAVEFORM_SIGNATURE} signature ("
                + (why or "only models with the built-in log-mel audio front-end have one")
                + f"); use {DEFAULT_SIGNATURE}"
            )
        # The graph computes the audio features; only text is extracted here.
        others = [m for m in self.modalities if m != "audio"]
        n = len(paths) if paths is not None else 0
        feats, _ = self.features(paths, texts, names, modalities=others)
        waves, notes = self.load_waveforms(self._audio_paths(paths, n))
        request = self.batch(feats)
        request.update(self.waveform_batch(waves))
        notes = self._add_functionals(request, notes, paths, speakers, names)
        return request, notes


# ---------------------------------------------------------------------------------------------
# Predictor: a model (export or .keras) + the featurizer.


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


def speaker_groups(speakers: list[str | None] | None, n: int) -> dict[Any, list[int]]:
    """Item indices per speaker, in first-seen order; an item without a speaker is a group of
    its own, keyed `("utterance", i)`."""
    speakers = list(speakers) if speakers is not None else [None] * n
    groups: dict[Any, list[int]] = {}
    for i, speaker in enumerate(speakers):
        groups.setdefault(speaker if speaker else ("utterance", i), []).append(i)
    return groups


class BadAudioError(ValueError):
    """Audio files that cannot be used, all of them (`errors`: one message per file)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            super().__init__(self.errors[0])
        else:
            shown = self.errors[:20] + (
                [f"… and {len(errors) - 20} more"] if len(errors) > 20 else []
            )
            super().__init__(
                f"{len(self.errors)} audio file(s) cannot be used:\n  " + "\n  ".join(shown)
            )


def check_probabilities(probs: Any, labels: list[str], batch: int, where: str) -> np.ndarray:
    """Model outputs must be `[batch, len(labels)]` rows of a probability distribution.

    Raises:
        ValueError: wrong shape, NaN/inf (a model with non-finite weights, e.g. from a
            diverged training run), or rows that are not probabilities (negative, above 1,
            not summing to 1).
    """
    probs = np.asarray(probs)
    n = len(labels)
    if probs.ndim != 2 or probs.shape != (batch, n):
        raise ValueError(
            f"{where}: the model answered probabilities of shape {probs.shape}, expected "
            f"[{batch}, {n}] ({batch} item(s) × the {n} labels {labels}); is it the model "
            "these labels belong to?"
        )
    if not np.issubdtype(probs.dtype, np.number):
        raise ValueError(f"{where}: the model answered non-numeric probabilities ({probs.dtype})")
    probs = probs.astype(np.float64)
    finite = np.isfinite(probs).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite).tolist()
        raise ValueError(
            f"{where}: the model answered NaN/inf probabilities for item(s) {rows[:10]}; its "
            "weights are probably not finite (a diverged training run): retrain it"
        )
    tolerance = 1e-3
    bad = (probs < -tolerance).any(axis=1) | (probs > 1 + tolerance).any(axis=1)
    bad |= np.abs(probs.sum(axis=1) - 1.0) > tolerance
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: the answer for item(s) {np.flatnonzero(bad).tolist()[:10]} is not a "
            f"probability distribution over {n} labels (item {row}: "
            f"{np.round(probs[row], 4).tolist()}, sum {probs[row].sum():.4f})"
        )
    return probs


def predictions_from_probabilities(
    probs: np.ndarray, labels: list[str], paths, texts, ids, notes
) -> list[Prediction]:
    out = []
    for i, row in enumerate(np.asarray(probs)):
        k = int(np.argmax(row))
        out.append(
            Prediction(
                label=labels[k],
                class_id=k,
                probabilities={lab: float(p) for lab, p in zip(labels, row)},
                path=str(paths[i]) if paths is not None and paths[i] is not None else None,
                text=texts[i] if texts is not None else None,
                id=ids[i] if ids is not None else None,
                notes=list(notes[i]) if notes and i < len(notes) else [],
            )
        )
    return out


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


# ---------------------------------------------------------------------------------------------
# Manifests.


def read_prediction_manifest(path: str | Path, modalities: list[str]) -> list[dict[str, Any]]:
    """Rows of a CSV to predict: `path` (audio, relative to the CSV) and/or `text`, optional
    `id`, `speaker` (pools per-speaker normalisation) and `label` (then accuracy is
    reported). The training manifest format works as is. The error lists every bad row."""
    from ks_keras.corpora.manifest import extra_fields_problem, read_csv_rows

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    columns, numbered = read_csv_rows(path)
    need = [c for c, mod in (("path", "audio"), ("text", "text")) if mod in modalities]
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} (has {columns}); the model reads {modalities}"
        )
    if not numbered:
        raise ValueError(f"{path}: no rows to predict")
    extra = [
        f"line {i}: {problem}"
        for i, row in numbered
        if (problem := extra_fields_problem(row, len(columns)))
    ]
    if extra:
        raise ValueError(
            f"{path}: {len(extra)} row(s) with more fields than the header: " + "; ".join(extra)
        )
    out, absent = [], []
    for i, raw in numbered:
        row = {k.strip(): v for k, v in raw.items() if isinstance(k, str)}
        item = {
            "id": (row.get("id") or "").strip() or None,
            "speaker": (row.get("speaker") or "").strip() or None,
            "line": i,
            "label": (row.get("label") or "").strip() or None,
            "text": row.get("text") if "text" in columns else None,
            "path": None,
        }
        if "path" in columns and (row.get("path") or "").strip():
            audio = Path(row["path"].strip())
            audio = audio if audio.is_absolute() else path.parent / audio
            item["path"] = audio
            if "audio" in modalities and not audio.is_file():
                absent.append(f"line {i}: {audio}")
        elif "audio" in modalities:
            absent.append(f"line {i}: empty path")
        out.append(item)
    if absent:
        raise ValueError(f"{path}: {len(absent)} audio file(s) not found: " + "; ".join(absent))
    return out


# ---------------------------------------------------------------------------------------------
# CLI.


def _print_notes(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):  # unique, in order
        print(f"note: {note}", file=sys.stderr)


def run_predict(args) -> int:
    """`ks-keras predict` (see `ks_keras.cli`)."""
    if args.manifest and args.audio:
        raise ValueError("give either an audio file or --manifest, not both")
    if args.output:
        check_output_path(args.output, "--output")
    predictor = _make_predictor(args)
    signature = args.signature
    modalities = predictor.metadata["modalities"]
    if args.manifest:
        return _predict_manifest(predictor, args, signature)
    if "audio" in modalities and not args.audio:
        raise ValueError("the model reads audio: give an audio file (or --manifest)")
    if "text" in modalities and args.text is None:
        raise ValueError("the model reads text: give the transcript with --text")
    if args.audio and not Path(args.audio).is_file():
        raise FileNotFoundError(f"audio file not found: {args.audio}")
    paths = [args.audio] if "audio" in modalities else None
    texts = [args.text] if "text" in modalities else None
    [pred] = predictor.predict_files(paths, texts, signature=signature)
    ignored = [
        f"the model does not read {mod}; the given {what} was ignored"
        for mod, what, given in (("audio", "audio file", args.audio), ("text", "--text", args.text))
        if given is not None and mod not in modalities
    ]
    notes = predictor.featurizer.notes + ignored + pred.notes
    if args.json:
        print(
            json.dumps(
                {
                    **pred.to_dict(),
                    "notes": list(dict.fromkeys(notes)),
                    "model": predictor.source,
                    "signature": signature,
                },
                indent=2,
                allow_nan=False,  # NaN is not JSON; outputs were checked to be finite
            )
        )
        return 0
    _print_notes(notes)
    where = pred.path or "text"
    print(f"{where}: {pred.label} ({pred.probabilities[pred.label]:.3f})")
    width = max(len(lab) for lab in predictor.labels)
    for lab in predictor.labels:
        p = pred.probabilities[lab]
        print(f"  {lab:<{width}}  {p:6.3f}  {'#' * int(round(p * 30))}")
    return 0


def check_output_path(path: str | Path, what: str) -> None:
    """Fail before any work if `path` cannot be written: its folder is missing or read-only,
    or it is a folder itself."""
    import os

    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder; give a file name, e.g. {path / 'out.csv'}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} {path}: the folder {folder} does not exist; create it first "
            f"(mkdir -p {folder})"
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path}: the folder {folder} is not writable")


def _make_predictor(args) -> Predictor:
    if args.rest or args.grpc:
        from ks_keras.serving import serving_predictor

        return serving_predictor(
            args.model,
            rest_url=args.rest,
            grpc_target=args.grpc,
            model_name=args.model_name,
            version=args.model_version,
            config=args.config,
            overrides=args.overrides,
            **({"timeout": args.timeout} if getattr(args, "timeout", None) is not None else {}),
        )
    return Predictor.load(args.model, args.config, args.overrides)


def _manifest_chunks(rows: list[dict], batch_size: int, per_speaker: bool) -> list[list[int]]:
    """Row indices per extraction call: fixed-size chunks, or (per-speaker normalisation)
    all rows of one speaker together so their statistics pool every utterance."""
    if not per_speaker:
        return [
            list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)
        ]
    by_speaker: dict[str, list[int]] = {}
    alone: list[int] = []
    for i, row in enumerate(rows):
        if row["speaker"]:
            by_speaker.setdefault(row["speaker"], []).append(i)
        else:
            alone.append(i)
    chunks = list(by_speaker.values())
    chunks += [alone[i : i + batch_size] for i in range(0, len(alone), batch_size)]
    return chunks


def _predict_manifest(predictor: Predictor, args, signature: str) -> int:
    from tqdm import tqdm

    modalities = predictor.metadata["modalities"]
    rows = read_prediction_manifest(args.manifest, modalities)
    if "text" in modalities:
        names = [f"line {r['line']}" + (f" ({r['id']})" if r["id"] else "") for r in rows]
        predictor.featurizer.check_texts([r["text"] for r in rows], names)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    results: list[Prediction | None] = [None] * len(rows)
    bad_audio: list[str] = []
    with tqdm(
        total=len(rows), unit="utt", desc="predict", file=sys.stderr, disable=args.no_progress
    ) as bar:
        for idx in _manifest_chunks(rows, args.batch_size, predictor.featurizer.per_speaker):
            chunk = [rows[i] for i in idx]
            paths = [r["path"] for r in chunk] if "audio" in modalities else None
            texts = [r["text"] for r in chunk] if "text" in modalities else None
            ids = [r["id"] or str(r["path"] or f"line {r['line']}") for r in chunk]
            speakers = [r["speaker"] for r in chunk]
            try:
                preds = predictor.predict_files(
                    paths, texts, ids, signature, speakers=speakers, batch_size=args.batch_size
                )
            except BadAudioError as e:
                bad_audio += e.errors  # keep going: the error names every bad file at once
                continue
            for i, pred in zip(idx, preds):
                results[i] = pred
            bar.update(len(idx))
    if bad_audio:
        raise BadAudioError(bad_audio)
    predictions: list[Prediction] = list(results)  # type: ignore[arg-type]
    labels = predictor.labels
    # Manifest labels go through the model's label map (e.g. excited → happy) as in training.
    label_map = metadata_config(predictor.metadata).data.label_map
    truth = [label_map.get(r["label"], r["label"]) if r["label"] else None for r in rows]
    notes = predictor.featurizer.notes + [n for p in predictions for n in p.notes]
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.json:
            records = [{**p.to_dict(), "true_label": t} for p, t in zip(predictions, truth)]
            json.dump(
                {
                    "model": predictor.source,
                    "signature": signature,
                    "notes": list(dict.fromkeys(notes)),
                    "predictions": records,
                },
                out,
                indent=2,
                allow_nan=False,
            )
            out.write("\n")
        else:
            writer = csv.writer(out)
            has_truth = any(t is not None for t in truth)
            writer.writerow(
                ["id", "path", "predicted", "class_id"]
                + [f"p_{lab}" for lab in labels]
                + (["label", "correct"] if has_truth else [])
            )
            for p, t in zip(predictions, truth):
                row = [p.id, p.path or "", p.label, p.class_id]
                row += [f"{p.probabilities[lab]:.6f}" for lab in labels]
                if has_truth:
                    row += [t or "", "" if t is None else int(t == p.label)]
                writer.writerow(row)
    finally:
        if args.output:
            out.close()
    if not args.json:
        _print_notes(notes)
    labelled = [(p.label, t) for p, t in zip(predictions, truth) if t is not None]
    if labelled:
        unknown = sorted({t for _, t in labelled} - set(labels))
        acc = np.mean([p == t for p, t in labelled])
        msg = f"accuracy on {len(labelled)} labelled rows: {acc:.3f}"
        if unknown:
            msg += f" (labels the model does not know: {unknown})"
        print(msg, file=sys.stderr)
    if args.output:
        print(f"wrote {len(predictions)} predictions to {args.output}", file=sys.stderr)
    return 0
