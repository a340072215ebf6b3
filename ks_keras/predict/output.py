"""Model outputs → predictions: the probability check every runner's answer goes through
(`check_probabilities`, also used by the TF Serving clients) and `Prediction` records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


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
