"""Corpus → features → one fold's datasets (for `ks-keras tune`, `ks_keras.commands.tune`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tensorflow as tf

from ks_keras.config import Config
from ks_keras.training import balanced_class_weights
from ks_keras.tuning.finish import FoldData

# ---------------------------------------------------------------------------------------------
# Corpus → features → one fold's datasets.


def select_fold(corpus, cfg: Config, index: int = 0):
    """Fold `index` of `eval.folds` under the honest protocol (validation speakers held out).

    Fold 0 is the first fold `make_folds` produces (LOSO: the first speaker in sorted order;
    leave-one-session-out: the first session). The search sees only its training and
    validation speakers; its test speakers score the retrained best model once.
    """
    from ks_keras.folds import make_folds

    if cfg.eval.val_speakers < 1:
        raise ValueError(
            "eval.val_speakers: tuning needs at least 1 validation speaker (the "
            "objective is UA on held-out validation speakers), got 0"
        )
    folds = make_folds(
        corpus, replace(cfg.eval, protocol="honest", max_folds=None), seed=cfg.train.seed
    )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(folds):
        raise ValueError(
            f"--fold: expected an integer in [0, {len(folds)}) (the corpus has "
            f"{len(folds)} folds under eval.folds={cfg.eval.folds}), got {index!r}"
        )
    return folds[index]


def prepare_fold_data(
    cfg: Config, fold: int = 0, progress: bool = True, log: Callable[[str], None] = print
) -> FoldData:
    """Load the corpus, extract (or reuse) its features, and build one fold's datasets.

    Everything that can be checked cheaply (corpus, labels, fold, feature widths) is checked
    before features are extracted.
    """
    from ks_keras.corpora import load_corpus
    from ks_keras.data import bucketing, compute_norm_stats, make_dataset
    from ks_keras.features import check_model_dims
    from ks_keras.features.cache import extract_corpus
    from ks_keras.features.functionals import model_functionals

    corpus = load_corpus(cfg.data)
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}; set model.num_classes or data.labels"
        )
    chosen = select_fold(corpus, cfg, fold)
    check_model_dims(cfg)
    log(
        f"{corpus!r}; tuning on fold {chosen.index} ({chosen.name}): train "
        f"{len(chosen.train_ids)} ({', '.join(chosen.train_speakers)}), validation "
        f"{len(chosen.val_ids)} ({', '.join(chosen.val_speakers)}), test {len(chosen.test_ids)} "
        f"({', '.join(chosen.test_speakers)}, used once after the search)"
    )
    cache = extract_corpus(cfg, corpus, progress=progress)
    functionals = model_functionals(cfg, corpus, progress=progress)

    label_of = dict(zip(corpus.ids, corpus.label_ids().tolist(), strict=True))
    speaker_of = corpus.speaker_of()
    mode = cfg.features.audio.normalize
    normalizer = None
    if mode != "none" and "audio" in cfg.model.modalities:
        ids = (
            chosen.train_ids
            if mode == "global"
            else (chosen.train_ids + chosen.val_ids + chosen.test_ids)
        )
        normalizer = compute_norm_stats(cache, ids, mode, speaker_of=speaker_of)

    def dataset(ids: list[str], shuffle: bool) -> tf.data.Dataset:
        return make_dataset(
            cache,
            ids,
            [label_of[i] for i in ids],
            cfg.data,
            batch_size=cfg.train.batch_size,
            shuffle=shuffle,
            bucket_by_length=shuffle and bucketing(cfg),
            seed=cfg.train.seed,
            modalities=cfg.model.modalities,
            normalizer=normalizer,
            speaker_of=speaker_of,
            num_classes=cfg.model.num_classes,
            functionals=functionals,
        )

    class_weight = None
    if cfg.data.class_weights:
        class_weight = balanced_class_weights(
            [label_of[i] for i in chosen.train_ids], cfg.model.num_classes
        )
    extractors = cache.metadata.get("extractors", {})
    return FoldData(
        train_ds=lambda: dataset(chosen.train_ids, True),
        val_ds=dataset(chosen.val_ids, False),
        test_ds=dataset(chosen.test_ids, False),
        labels=list(corpus.labels),
        feature_metadata={m: extractors[m] for m in cfg.model.modalities if m in extractors},
        class_weight=class_weight,
        norm_stats=normalizer if mode == "global" else None,
        fold_info={
            "index": chosen.index,
            "name": chosen.name,
            "folds": cfg.eval.folds,
            "train_speakers": chosen.train_speakers,
            "val_speakers": chosen.val_speakers,
            "test_speakers": chosen.test_speakers,
            "n_train": len(chosen.train_ids),
            "n_val": len(chosen.val_ids),
            "n_test": len(chosen.test_ids),
        },
    )


def default_project_dir(cfg: Config, config_path: str | None, space_path: str, tuner: str) -> Path:
    """`<train.output_dir>/tune/<config>_<space>_<tuner>`."""
    config_name = Path(config_path).stem if config_path else "default"
    return Path(cfg.train.output_dir) / "tune" / f"{config_name}_{Path(space_path).stem}_{tuner}"
