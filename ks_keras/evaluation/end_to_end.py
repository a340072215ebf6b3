"""End to end: corpus → features → folds → baseline → training → report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ks_keras.baseline import describe
from ks_keras.config import Config
from ks_keras.evaluation.reports import write_report
from ks_keras.evaluation.results import CVResult
from ks_keras.evaluation.running import baseline_metrics, baseline_normalization, cross_validate
from ks_keras.folds import make_folds

# ---------------------------------------------------------------------------------------------
# End to end: corpus → features → folds → baseline → training → report


def evaluate_corpus(
    cfg: Config,
    report_dir: str | Path,
    *,
    protocol: str | None = None,
    repeats: int | None = None,
    max_folds: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    verbose: int | str = "auto",
    log=print,
) -> tuple[CVResult, Path]:
    """Run the whole evaluation of `cfg` and write the report folder.

    Everything that can be checked before training is checked first (corpus, labels, folds,
    feature dims, strategy), so a bad setting fails in seconds, not after an hour.
    """
    from ks_keras.corpora import load_corpus
    from ks_keras.features import check_model_dims
    from ks_keras.features.cache import extract_corpus
    from ks_keras.training import get_strategy

    protocol = protocol or cfg.eval.protocol
    corpus = load_corpus(cfg.data)
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}; set model.num_classes or data.labels"
        )
    folds = make_folds(
        corpus, replace(cfg.eval, protocol=protocol), seed=cfg.train.seed, max_folds=max_folds
    )
    check_model_dims(cfg)
    get_strategy(cfg.train)  # fails now if the strategy is unavailable
    log(f"{corpus!r}; {len(folds)} fold(s), protocol {protocol}")
    cache = extract_corpus(cfg, corpus, progress=progress)

    base = None
    if baseline:
        b = cfg.eval.baseline
        method = describe(b.features, b.classifier, baseline_normalization(cfg))
        log(f"classical baseline ({method}) on the same folds ...")
        base = baseline_metrics(
            corpus,
            folds,
            Path(cfg.features.cache_dir) / "baseline",
            seed=cfg.train.seed,
            progress=progress,
            feature_set=b.features,
            classifier=b.classifier,
            normalize=baseline_normalization(cfg),
            unnormalized_row=b.unnormalized_row,
        )
    cv = cross_validate(
        cfg,
        corpus,
        cache,
        report_dir,
        protocol=protocol,
        repeats=repeats,
        max_folds=max_folds,
        verbose=verbose,
        log=log,
    )
    cv.baseline = base
    path = write_report(cv, report_dir)
    return cv, path
