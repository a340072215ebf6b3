"""Features for a request: audio files and transcripts → model inputs, the way the model's
training data was made (`RequestFeaturizer`), checked against the extractor fingerprints stored
in the model (`compare_extractor_metadata`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import Config
from ks_keras.export import (
    DEFAULT_SIGNATURE,
    WAVEFORM_SIGNATURE,
    metadata_config,
    metadata_functionals,
)

# Extractor metadata keys that may differ between machines without changing the features:
# where the model folder lives (its files' hashes identify it) and package versions.
_MACHINE_KEYS = {"model_path", "packages"}


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
        from ks_keras.sequences import pad_or_crop

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
