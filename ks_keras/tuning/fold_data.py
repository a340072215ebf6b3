"""Corpus → features → one fold's datasets (for `ks-keras tune`, `ks_keras.commands.tune`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tensorflow as tf

from ks_keras.config import Config
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
            "objective is UA on held-out validation speakers), got 0 (configs that train "
            "without validation speakers, such as configs/emodb_accurate.yaml, are tuned "
            "with --set eval.val_speakers=2)"
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
    from ks_keras.experiment import Experiment, check_classes
    from ks_keras.features import check_model_dims

    corpus = load_corpus(cfg.data)
    check_classes(cfg, corpus, hint="; set model.num_classes or data.labels")
    chosen = select_fold(corpus, cfg, fold)
    check_model_dims(cfg)
    log(
        f"{corpus!r}; tuning on fold {chosen.index} ({chosen.name}): train "
        f"{len(chosen.train_ids)} ({', '.join(chosen.train_speakers)}), validation "
        f"{len(chosen.val_ids)} ({', '.join(chosen.val_speakers)}), test {len(chosen.test_ids)} "
        f"({', '.join(chosen.test_speakers)}, used once after the search)"
    )
    exp = Experiment.prepare(cfg, corpus, progress=progress)
    exp = exp.with_normalizer(chosen.train_ids, chosen.val_ids + chosen.test_ids)

    def dataset(ids: list[str], shuffle: bool) -> tf.data.Dataset:
        # Validation and test batches in id order (the tuner scores them as they come).
        return exp.dataset(ids, shuffle, bucket=shuffle and exp.bucket)

    return FoldData(
        train_ds=lambda: dataset(chosen.train_ids, True),
        val_ds=dataset(chosen.val_ids, False),
        test_ds=dataset(chosen.test_ids, False),
        labels=list(corpus.labels),
        feature_metadata=exp.feature_metadata(),
        class_weight=exp.class_weight(chosen.train_ids),
        norm_stats=exp.norm_stats,
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
