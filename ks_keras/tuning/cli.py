"""Corpus → features → one fold's datasets, and the `ks-keras tune` CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import tensorflow as tf

from ks_keras.config import Config
from ks_keras.training import balanced_class_weights, get_strategy
from ks_keras.tuning.finish import FoldData, finish_search
from ks_keras.tuning.search import _check_strategy, _require_tensorboard, run_search
from ks_keras.tuning.space import check_space, load_space

# ---------------------------------------------------------------------------------------------
# Corpus → features → one fold's datasets, and the CLI.


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


def run_tune(args) -> int:
    """`ks-keras tune --config C --space S --tuner random|bayesian|hyperband --trials N`."""
    from ks_keras.config import load_config

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    check_space(space, cfg, args.tuner)  # before any feature extraction
    _require_tensorboard()
    strategy = get_strategy(cfg.train)
    _check_strategy(strategy)
    project_dir = Path(
        args.project_dir or default_project_dir(cfg, args.config, args.space, args.tuner)
    )
    verbose = 0 if args.no_progress else "auto"
    data = prepare_fold_data(cfg, args.fold, progress=not args.no_progress)
    result = run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        project_dir,
        tuner=args.tuner,
        trials=args.trials,
        overwrite=args.overwrite,
        class_weight=data.class_weight,
        strategy=strategy,
        fold_info=data.fold_info,
        max_consecutive_failures=args.max_failures,
        verbose=verbose,
    )
    if result.best is None:
        print(
            f"ks-keras tune: error: no trial completed ({len(result.failed)} failed); see "
            f"{result.summary_md}",
            file=sys.stderr,
        )
        return 1
    print(f"best config: {result.best_config_path}")
    if args.no_retrain:
        return 0
    final = finish_search(
        result,
        data,
        export=not args.no_export,
        export_dir=args.export_dir,
        export_name=args.export_name,
        verify_export=not args.no_verify,
        verbose=verbose,
    )
    print(
        f"test speakers ({', '.join((result.fold_info or {}).get('test_speakers', []))}): "
        f"WA {final.test_metrics['wa']:.4f} UA {final.test_metrics['ua']:.4f} "
        f"macro-F1 {final.test_metrics['macro_f1']:.4f}"
    )
    if final.export_path is not None:
        print(f"SavedModel: {final.export_path}")
    return 0
