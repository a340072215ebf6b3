"""Classical baseline for context in every report: openSMILE functionals + SVM, on the same folds.

eGeMAPSv02 (88 per utterance, default) or ComParE_2016 (6373) functionals from openSMILE (the
optional PyPI package `opensmile`, extra `baseline`) feed a standardised linear (default) or
RBF SVM with balanced class weights.

**Fair by construction.** The functionals get the normalisation the model's audio features get
(`eval.baseline.normalize: auto` follows `features.audio.normalize`):

- `speaker`: every speaker's functionals are z-normalised with that speaker's own statistics
  (all of its utterances, labels never used; test speakers included), exactly as the model's
  frames are;
- `global` / `none`: no per-speaker step; the SVM pipeline standardises with the training
  speakers' statistics, as it always does.

The SVM's C is chosen by grouped cross-validation **on the training speakers only**
(validation speakers included, test fold never), then the model is refit on all training
speakers and scored on the test fold, fold by fold, on exactly the folds the neural model uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ks_keras.corpora.manifest import Corpus
from ks_keras.features.functionals import (
    FEATURE_SETS,
    _extract_job,
    corpus_functionals,
    opensmile_available,
    speaker_normalize,
)
from ks_keras.folds import Fold

C_GRIDS = {
    "linear_svm": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    "rbf_svm": (0.1, 1.0, 10.0, 100.0),
}
CLASSIFIERS = {"linear_svm": "linear SVM", "rbf_svm": "RBF SVM"}
# Kept for callers of the first version.
FEATURE_SET = "eGeMAPSv02 functionals"
C_GRID = C_GRIDS["linear_svm"]
__all__ = [
    "FEATURE_SETS",
    "describe",
    "egemaps_features",
    "functionals",
    "opensmile_available",
    "run_baseline",
    "speaker_normalize",
]


def describe(feature_set: str = "egemaps", classifier: str = "linear_svm", normalize="none"):
    """One line naming a baseline, e.g. 'eGeMAPSv02 functionals + linear SVM, per-speaker z'."""
    names = {
        "speaker": "per-speaker z-normalised",
        "global": "standardised on training speakers",
        "none": "no speaker normalisation",
    }
    if normalize not in names or feature_set not in FEATURE_SETS or classifier not in CLASSIFIERS:
        raise ValueError(
            f"baseline: unknown setting (features {feature_set!r}, classifier {classifier!r}, "
            f"normalize {normalize!r}); expected features in {sorted(FEATURE_SETS)}, classifier "
            f"in {sorted(CLASSIFIERS)}, normalize in {sorted(names)}"
        )
    norm = names[normalize]
    return f"{FEATURE_SETS[feature_set]} functionals + {CLASSIFIERS[classifier]} ({norm})"


def functionals(
    corpus: Corpus, cache_dir: str | Path, feature_set: str = "egemaps", progress: bool = True
) -> np.ndarray:
    """`[N, D]` openSMILE functionals in corpus order, cached under `cache_dir` (see
    `ks_keras.features.functionals.corpus_functionals`).

    Raises:
        ImportError: when `opensmile` is not installed (`pip install -e ".[baseline]"`).
        ValueError: an unknown feature set.
        RuntimeError: when the extraction process fails (its error output is included).
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(
            f"eval.baseline.features: expected one of {sorted(FEATURE_SETS)}, got {feature_set!r}"
        )
    return corpus_functionals(corpus, cache_dir, feature_set, progress=progress)


def egemaps_features(corpus: Corpus, cache_dir: str | Path, progress: bool = True) -> np.ndarray:
    """`[N, 88]` eGeMAPSv02 functionals in corpus order (see `functionals`)."""
    return functionals(corpus, cache_dir, "egemaps", progress)


def _make_classifier(kind: str, c: float, seed: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind == "linear_svm":
        clf = LinearSVC(C=c, class_weight="balanced", max_iter=20000, random_state=seed)
    elif kind == "rbf_svm":
        clf = SVC(C=c, kernel="rbf", gamma="scale", class_weight="balanced", random_state=seed)
    else:
        raise ValueError(
            f"eval.baseline.classifier: expected one of {sorted(C_GRIDS)}, got {kind!r}"
        )
    return make_pipeline(StandardScaler(), clf)


def _fit_svm(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, kind="linear_svm"):
    """Standardise + SVM; C picked by grouped CV (UA) on these speakers only."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold

    grid = C_GRIDS.get(kind)
    if grid is None:
        raise ValueError(
            f"eval.baseline.classifier: expected one of {sorted(C_GRIDS)}, got {kind!r}"
        )
    n_groups = len(set(groups.tolist()))
    best_c, best_score = grid[0], -1.0
    with warnings.catch_warnings():
        # A large C may stop at max_iter; it is then simply a worse candidate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if n_groups >= 2:
            splitter = GroupKFold(n_splits=min(5, n_groups))
            for c in grid:
                truth, pred = [], []
                for tr, va in splitter.split(x, y, groups):
                    if len(set(y[tr].tolist())) < 2:
                        continue
                    truth.append(y[va])
                    pred.append(_make_classifier(kind, c, seed).fit(x[tr], y[tr]).predict(x[va]))
                if truth:
                    score = balanced_accuracy_score(np.concatenate(truth), np.concatenate(pred))
                    if score > best_score:
                        best_c, best_score = c, score
        return _make_classifier(kind, best_c, seed).fit(x, y), best_c


def run_baseline(
    corpus: Corpus,
    folds: list[Fold],
    features: np.ndarray,
    seed: int = 0,
    classifier: str = "linear_svm",
    normalize: str = "none",
) -> list[dict]:
    """Train/score the SVM on each fold.

    Args:
        corpus: the utterances (features in corpus order).
        folds: the folds the neural model uses.
        features: `[N, D]` functionals.
        seed: classifier seed.
        classifier: `linear_svm` or `rbf_svm`.
        normalize: `speaker` z-normalises each speaker with its own statistics first (what
            `features.audio.normalize: speaker` gives the model); `global` / `none` leave the
            features as they are (the pipeline standardises on the training speakers).

    Returns:
        Per fold: `{"fold", "name", "y_true", "y_pred", "C"}` (class ids as numpy arrays).
    """
    if normalize not in ("none", "global", "speaker"):
        raise ValueError(
            f"eval.baseline.normalize: expected none, global or speaker, got {normalize!r}"
        )
    index = {utt_id: i for i, utt_id in enumerate(corpus.ids)}
    labels = corpus.label_ids()
    speaker = np.array([u.speaker for u in corpus.utterances])
    features = np.asarray(features, np.float32)
    if features.shape[0] != len(corpus.ids):
        raise ValueError(
            f"run_baseline: {features.shape[0]} feature rows for {len(corpus.ids)} utterances"
        )
    if normalize == "speaker":
        features = speaker_normalize(features, speaker)
    results = []
    for fold in folds:
        train = np.array([index[i] for i in fold.train_ids + fold.val_ids])
        test = np.array([index[i] for i in fold.test_ids])
        model, c = _fit_svm(features[train], labels[train], speaker[train], seed, classifier)
        results.append(
            {
                "fold": fold.index,
                "name": fold.name,
                "y_true": labels[test],
                "y_pred": model.predict(features[test]),
                "C": c,
            }
        )
    return results


if __name__ == "__main__":
    # Kept as an entry point: `python -m ks_keras.baseline JOB.json` extracts functionals.
    _extract_job(sys.argv[1])
