"""Honest comparisons of two classifiers on the same test utterances.

- `paired_bootstrap_ua`: a confidence interval for the difference in pooled UA between the model
  (averaged over its repeats) and a baseline, resampling test utterances with replacement
  **within each speaker** (so every bootstrap set keeps the corpus's speaker make-up) and
  scoring both systems on the same resampled set (paired).
- `sign_test`: the exact two-sided sign test over speakers (or folds): on how many the model
  is better vs worse, ignoring ties, and how likely such a split is if neither were better.

Example:

```python
ci = paired_bootstrap_ua(y_true, model_preds, base_pred, n_classes=7, groups=speakers)
ci["diff"], ci["low"], ci["high"]     # +0.031, -0.004, +0.066
sign_test(7, 3)                       # 0.34375
```
"""

from __future__ import annotations

import math

import numpy as np


def unweighted_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """UA: mean recall over the classes present in `y_true`."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [
        float(np.mean(y_pred[y_true == c] == c)) for c in range(n_classes) if np.any(y_true == c)
    ]
    return float(np.mean(recalls)) if recalls else float("nan")


def _bootstrap_ua(correct: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """UA per bootstrap row. correct: [B, N] float; onehot: [B, N, C] float."""
    hits = np.einsum("bn,bnc->bc", correct, onehot)
    counts = onehot.sum(axis=1)
    present = counts > 0
    recall = np.where(present, hits / np.maximum(counts, 1), 0.0)
    return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def paired_bootstrap_ua(
    y_true,
    model_preds,
    base_pred,
    n_classes: int,
    groups=None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Bootstrap interval of `UA(model) - UA(baseline)` on the same utterances.

    Args:
        y_true: `[N]` class ids of the pooled test utterances.
        model_preds: `[R, N]` (or `[N]`) model predictions, one row per repeat; the model's UA
            on a resampled set is the mean of its repeats' UAs.
        base_pred: `[N]` baseline predictions.
        n_classes: number of classes.
        groups: `[N]` speaker (or fold) of each utterance; resampling stays within groups.
        n_boot: bootstrap sets.
        confidence: interval coverage.
        seed: resampling seed.

    Returns:
        `{"diff", "low", "high", "p_not_better", "n_boot", "confidence"}`: the observed
        difference, the percentile interval, and the fraction of bootstrap sets where the
        model is not better (a one-sided bootstrap p-value).
    """
    y_true = np.asarray(y_true)
    model_preds = np.atleast_2d(np.asarray(model_preds))
    base_pred = np.asarray(base_pred)
    n = y_true.shape[0]
    if model_preds.shape[1] != n or base_pred.shape != (n,):
        raise ValueError(
            f"paired_bootstrap_ua: {n} labels but model predictions {model_preds.shape} and "
            f"baseline predictions {base_pred.shape}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    observed = float(
        np.mean([unweighted_recall(y_true, p, n_classes) for p in model_preds])
        - unweighted_recall(y_true, base_pred, n_classes)
    )
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    eye = np.eye(n_classes)
    model_correct = (model_preds == y_true[None]).astype(np.float64)
    base_correct = (base_pred == y_true).astype(np.float64)
    diffs = []
    chunk = max(1, min(n_boot, 2_000_000 // max(1, n * n_classes)))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        idx = np.concatenate([rng.choice(m, size=(size, m.size)) for m in members], axis=1)
        onehot = eye[y_true[idx]]
        model_ua = np.mean([_bootstrap_ua(c[idx], onehot) for c in model_correct], axis=0)
        diffs.append(model_ua - _bootstrap_ua(base_correct[idx], onehot))
        done += size
    # Round away float noise so an exact tie in UA is a tie (not a 1e-17 win or loss).
    diffs = np.round(np.concatenate(diffs), 12)
    observed = round(observed, 12)
    tail = (1 - confidence) / 2
    return {
        "diff": observed,
        "low": float(np.quantile(diffs, tail)),
        "high": float(np.quantile(diffs, 1 - tail)),
        "p_not_better": float(np.mean(diffs <= 0)),
        "n_boot": int(n_boot),
        "confidence": float(confidence),
    }


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value for `wins` vs `losses` (ties left out)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {wins}, {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return float(min(1.0, 2 * tail))
