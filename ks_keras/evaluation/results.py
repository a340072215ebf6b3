"""What cross-validation measured (`FoldResult`, `CVResult`) and its summary statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ks_keras.config import Config
from ks_keras.folds import Fold
from ks_keras.metrics import compute_metrics, normalize_confusion

PAPER_PROTOCOL_NOTE = (
    "PAPER PROTOCOL (optimistic): the best epoch of each fold was chosen on the test fold, "
    "as in the authors' code; these numbers are not an unbiased estimate."
)
HONEST_PROTOCOL_NOTE = (
    "Honest protocol: each fold's best epoch was chosen on validation speakers held out from "
    "its training speakers; the test speakers were used once, for the final score."
)
FIXED_SCHEDULE_NOTE = (
    "Honest protocol without validation speakers (eval.val_speakers: 0): each fold's model "
    "trained on all its training speakers for the fixed schedule and kept its last epoch "
    "(its last k epochs for a checkpoint ensemble); nothing was chosen on held-out speakers, "
    "and the test speakers were used once, for the final score."
)


@dataclass
class FoldResult:
    repeat: int
    seed: int
    fold: Fold
    y_true: np.ndarray
    y_pred: np.ndarray
    metrics: dict
    best_epoch: int | None
    history: dict[str, list[float]]
    seconds: float
    # Best monitored validation value of each ensemble member (empty if never finite).
    val_values: list[float] = field(default_factory=list)
    # Test-fold class probabilities [n_test, C] (the ensemble's mean).
    probs: np.ndarray | None = field(default=None, repr=False)
    # Validation UA of each member's checkpoint ensemble (`train.checkpoint_ensemble` > 1,
    # honest protocol), on the validation speakers its epochs were chosen on; else empty.
    ensemble_val_values: list[float] = field(default_factory=list)


@dataclass
class CVResult:
    """Everything `cross_validate` measured."""

    config: Config
    labels: list[str]
    corpus_name: str
    protocol: str
    folds: list[Fold]
    results: list[FoldResult]
    repeats: int
    baseline: dict | None = None
    attention: dict | None = field(default=None, repr=False)

    @property
    def title(self) -> str:
        base = f"KS-T + CCAB on {self.corpus_name} ({len(self.labels)} classes)"
        if self.protocol == "paper":
            return f"{base} - PAPER PROTOCOL (best epoch chosen on the test fold)"
        if self.config.eval.fixed_schedule:
            return f"{base} - speaker-independent, fixed schedule, last epoch"
        return f"{base} - speaker-independent, validation speakers held out"

    @property
    def protocol_note(self) -> str:
        if self.protocol == "paper":
            return PAPER_PROTOCOL_NOTE
        if self.config.eval.fixed_schedule:
            return FIXED_SCHEDULE_NOTE
        return HONEST_PROTOCOL_NOTE


def _pooled(results: list[FoldResult], n_classes: int) -> dict:
    truth = np.concatenate([r.y_true for r in results])
    pred = np.concatenate([r.y_pred for r in results])
    return compute_metrics(truth, pred, n_classes)


def summarize(cv: CVResult) -> dict:
    """Per-repeat pooled metrics and their mean ± std; fold-averaged metrics too."""
    n = len(cv.labels)
    per_repeat = []
    for r in range(cv.repeats):
        rows = [x for x in cv.results if x.repeat == r]
        if not rows:
            continue
        pooled = _pooled(rows, n)
        fold_mean = {
            k: float(np.mean([x.metrics[k] for x in rows])) for k in ("wa", "ua", "macro_f1")
        }
        per_repeat.append({"repeat": r, "pooled": pooled, "fold_mean": fold_mean})

    def stats(getter):
        values = np.array([getter(p) for p in per_repeat], float)
        return {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}

    confusion = sum(p["pooled"]["confusion"] for p in per_repeat)
    out = {
        "pooled": {k: stats(lambda p, k=k: p["pooled"][k]) for k in ("wa", "ua", "macro_f1")},
        "fold_mean": {k: stats(lambda p, k=k: p["fold_mean"][k]) for k in ("wa", "ua", "macro_f1")},
        "confusion": np.asarray(confusion).tolist(),
        "confusion_normalized": normalize_confusion(confusion).tolist(),
    }
    if cv.baseline is not None and cv.baseline.get("folds"):
        out["baseline"] = {
            k: v for k, v in cv.baseline.items() if k not in ("folds", "predictions", "C")
        }
        comparison = compare_with_baseline(cv)
        if comparison is not None:
            out["comparison"] = comparison
    return out


def compare_with_baseline(cv: CVResult) -> dict | None:
    """Model vs the (fair) baseline on the same folds and utterances.

    Per fold (speaker): the model's UA as mean ± std over repeats next to the baseline's UA;
    how many folds the model wins / loses / ties, with the exact sign test; and a paired
    bootstrap interval of the pooled UA difference (utterances resampled within folds).
    None when the report has no baseline predictions.
    """
    from ks_keras.stats import paired_bootstrap_ua, sign_test

    base = cv.baseline or {}
    predictions = base.get("predictions")
    if "skipped" in base or not predictions or not cv.results:
        return None
    predictions = {int(k): v for k, v in predictions.items()}
    base_folds = {int(k): v for k, v in base["folds"].items()}
    folds = [f for f in cv.folds if f.index in predictions and f.index in base_folds]
    per_fold, wins, losses = [], 0, 0
    for fold in folds:
        uas = [r.metrics["ua"] for r in cv.results if r.fold.index == fold.index]
        if not uas:
            continue
        mean, base_ua = float(np.mean(uas)), float(base_folds[fold.index]["ua"])
        wins += mean > base_ua + 1e-9
        losses += mean < base_ua - 1e-9
        per_fold.append(
            {
                "fold": fold.index,
                "name": fold.name,
                "model_ua_mean": mean,
                "model_ua_std": float(np.std(uas)),
                "baseline_ua": base_ua,
            }
        )
    repeats = sorted({r.repeat for r in cv.results})
    by_key = {(r.repeat, r.fold.index): r for r in cv.results}
    complete = [rep for rep in repeats if all((rep, f.index) in by_key for f in folds)]
    out = {
        "per_fold": per_fold,
        "wins": int(wins),
        "losses": int(losses),
        "ties": len(per_fold) - int(wins) - int(losses),
        "sign_test_p": sign_test(int(wins), int(losses)),
    }
    if complete and folds:
        y_true = np.concatenate([by_key[(complete[0], f.index)].y_true for f in folds])
        model_preds = np.stack(
            [np.concatenate([by_key[(rep, f.index)].y_pred for f in folds]) for rep in complete]
        )
        base_pred = np.concatenate([np.asarray(predictions[f.index]) for f in folds])
        groups = np.concatenate([np.full(len(f.test_ids), f.index) for f in folds])
        out["bootstrap"] = paired_bootstrap_ua(
            y_true, model_preds, base_pred, len(cv.labels), groups=groups, seed=cv.config.train.seed
        )
    return out
