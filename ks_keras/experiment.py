"""One experiment pipeline, shared by `ks-keras train`, cross-validation and tuning.

corpus → class check → feature cache (+ utterance functionals) → audio normaliser → datasets →
class weights → fit → predictions in id order → save (model + sidecar + normalisation
statistics). `commands/train.py`, `evaluation/running.py` and `tuning/fold_data.py` each call
these steps instead of writing them out, so a rule (which speakers the statistics come from,
which class weight an absent class gets, what travels with a saved model) lives here once.

Example:

    exp = Experiment.prepare(cfg, corpus)                  # checks, cache, functionals
    exp = exp.with_normalizer(train_ids, val_ids + test_ids)
    result = exp.fit(cfg, train_ids, exp.dataset(val_ids, shuffle=False), run_dir)
    probs = exp.predict(result.model, test_ids)            # rows in `test_ids` order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import Config
from ks_keras.corpora.manifest import Corpus


def check_classes(cfg: Config, corpus: Corpus, hint: str = "") -> None:
    """Raise one clear error when the corpus' label count differs from `model.num_classes`."""
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}{hint}"
        )


def audio_normalizer(
    cfg: Config,
    cache,
    speaker_of: dict[str, str],
    train_ids: Sequence[str],
    other_ids: Sequence[str] = (),
):
    """Audio normalisation statistics (`features.audio.normalize`), or None.

    `global`: mean/std of `train_ids` only (training speakers). `speaker`: each speaker's own
    statistics over `train_ids` and `other_ids` (validation, test: every speaker that will be
    normalised; unsupervised, labels are never used).
    """
    from ks_keras.data import compute_norm_stats

    mode = cfg.features.audio.normalize
    if mode == "none" or "audio" not in cfg.model.modalities:
        return None
    ids = list(train_ids) if mode == "global" else [*train_ids, *other_ids]
    return compute_norm_stats(cache, ids, mode, speaker_of=speaker_of)


@dataclass(frozen=True)
class Experiment:
    """A corpus with its features, ready to build datasets, train, predict and save.

    Attributes:
        cfg: the config the datasets follow (`data`, `train.batch_size`, `model`).
        corpus: the utterances; `corpus.labels` order gives the class ids.
        cache: the feature cache (`ks_keras.features.cache.FeatureCache`).
        functionals: `{id: [D]}` utterance functionals for the model's `functionals` input,
            or None.
        normalizer: audio normalisation statistics (`audio_normalizer`), or None.
    """

    cfg: Config
    corpus: Corpus
    cache: Any
    functionals: dict | None = None
    normalizer: Any = None
    label_of: dict[str, int] = field(init=False, repr=False)
    speaker_of: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        labels = self.corpus.label_ids().tolist()
        object.__setattr__(self, "label_of", dict(zip(self.corpus.ids, labels, strict=True)))
        object.__setattr__(self, "speaker_of", self.corpus.speaker_of())

    @classmethod
    def prepare(
        cls, cfg: Config, corpus: Corpus, progress: bool = True, functionals: dict | None = None
    ) -> Experiment:
        """Check the classes, then extract (or reuse) the feature cache and functionals."""
        from ks_keras.features.cache import extract_corpus
        from ks_keras.features.functionals import model_functionals

        check_classes(cfg, corpus)
        cache = extract_corpus(cfg, corpus, progress=progress)
        if functionals is None:
            functionals = model_functionals(cfg, corpus, progress=progress)
        return cls(cfg, corpus, cache, functionals)

    def with_normalizer(self, train_ids: Sequence[str], other_ids: Sequence[str] = ()):
        """A copy whose datasets normalise audio with statistics of these ids."""
        stats = audio_normalizer(self.cfg, self.cache, self.speaker_of, train_ids, other_ids)
        return replace(self, normalizer=stats)

    def labels_of(self, ids: Sequence[str]) -> list[int]:
        return [self.label_of[i] for i in ids]

    @property
    def bucket(self) -> bool:
        """Length-bucketed batches (`data.bucket_by_length`)."""
        from ks_keras.data import bucketing

        return bucketing(self.cfg)

    def dataset(self, ids: Sequence[str], shuffle: bool, seed: int | None = None, bucket=None):
        """The `tf.data` pipeline of `ids` (`ks_keras.data.make_dataset`).

        Args:
            ids: utterance ids, in the order predictions come back (see `predict`).
            shuffle: training order (reshuffled each epoch; speed-perturbed variants where
                the cache has them); False: evaluation.
            seed: shuffling seed (default `train.seed`).
            bucket: length-bucketed batches (default `data.bucket_by_length`).
        """
        from ks_keras.data import make_dataset

        cfg = self.cfg
        return make_dataset(
            self.cache,
            list(ids),
            self.labels_of(ids),
            cfg.data,
            batch_size=cfg.train.batch_size,
            shuffle=shuffle,
            bucket_by_length=self.bucket if bucket is None else bucket,
            seed=cfg.train.seed if seed is None else seed,
            modalities=cfg.model.modalities,
            normalizer=self.normalizer,
            speaker_of=self.speaker_of,
            num_classes=cfg.model.num_classes,
            functionals=self.functionals,
        )

    def class_weight(self, train_ids: Sequence[str]) -> dict[int, float] | None:
        """Balanced class weights of the training labels (`data.class_weights`), or None."""
        from ks_keras.training import balanced_class_weights

        if not self.cfg.data.class_weights:
            return None
        return balanced_class_weights(self.labels_of(train_ids), self.cfg.model.num_classes)

    def fit(
        self,
        member_cfg: Config,
        train_ids: Sequence[str],
        val_ds,
        run_dir: str | Path,
        *,
        strategy=None,
        verbose: int | str = "auto",
    ):
        """Train one model of `member_cfg` (its `train.seed` shuffles the data) on `train_ids`,
        keeping the epoch with the best validation UA; without validation data (`val_ds`
        None: `eval.val_speakers: 0`), the last epoch of the fixed schedule. Returns
        `ks_keras.training.FitResult`."""
        from ks_keras.model import build_model
        from ks_keras.training import fit
        from ks_keras.training.callbacks import LAST_EPOCH

        return fit(
            lambda: build_model(member_cfg),
            self.dataset(train_ids, True, seed=member_cfg.train.seed),
            val_ds,
            member_cfg,
            run_dir,
            class_weight=self.class_weight(train_ids),
            monitor="val_ua" if val_ds is not None else LAST_EPOCH,
            strategy=strategy,
            verbose=verbose,
        )

    def predict(self, model, ids: Sequence[str], dataset=None) -> np.ndarray:
        """Model outputs `[len(ids), C]` in the order of `ids` (bucketed batches come sorted by
        length; their rows are put back). `dataset`: one already built with
        `self.dataset(ids, shuffle=False)`."""
        from ks_keras.data import length_order, restore_order

        if dataset is None:
            dataset = self.dataset(ids, False)
        rows = model.predict(dataset, verbose=0)
        if self.bucket:
            order = length_order(self.cache, list(ids), self.cfg.data, self.cfg.model.modalities)
            rows = restore_order(rows, order)
        return rows

    def predict_probabilities(
        self, result, ids: Sequence[str], dataset=None, *, each: bool = False
    ) -> np.ndarray:
        """Class probabilities `[len(ids), C]` of a `FitResult`: the mean over its checkpoint
        ensemble (`train.checkpoint_ensemble`), or its best epoch's alone. With `each`, the
        probabilities of every checkpoint instead, best first (`[k, len(ids), C]`). The
        model holds the best epoch's weights again afterwards."""
        if not result.checkpoints:
            probs = softmax_rows(self.predict(result.model, ids, dataset))
            return probs[None] if each else probs
        if dataset is None:
            dataset = self.dataset(ids, False)
        probs = [
            softmax_rows(self.predict(result.model, ids, dataset)) for _ in result.each_checkpoint()
        ]
        return np.stack(probs) if each else np.mean(probs, axis=0)

    def feature_metadata(self) -> dict[str, dict]:
        """`{modality: extractor metadata}` of the model's modalities (for the sidecar)."""
        extractors = self.cache.metadata.get("extractors", {})
        return {m: extractors[m] for m in self.cfg.model.modalities if m in extractors}

    @property
    def norm_stats(self):
        """The statistics that travel with a saved model: `global` ones (export applies them
        in-graph); per-speaker statistics cannot (each new speaker has its own)."""
        return self.normalizer if self.cfg.features.audio.normalize == "global" else None

    def save(self, model, model_path: str | Path, cfg: Config | None = None) -> Path:
        """`model.save(model_path)` plus its sidecar (config, labels, features, statistics)."""
        from ks_keras.export.sidecar import write_model_sidecar

        model_path = Path(model_path)
        model.save(model_path)
        write_model_sidecar(
            model_path,
            cfg or self.cfg,
            list(self.corpus.labels),
            self.feature_metadata(),
            norm_stats=self.norm_stats,
        )
        return model_path


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (test probabilities of a fold member)."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)
