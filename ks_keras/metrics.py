"""Speech-emotion metrics: UA (unweighted average recall) as a Keras metric, plus numpy helpers.

- WA ("weighted accuracy") is plain accuracy: every utterance counts once, so frequent
  classes weigh more.
- UA ("unweighted accuracy") is the mean of per-class recalls, i.e. scikit-learn's
  `balanced_accuracy_score`: classes without any true example are left out of the mean.
- Macro-F1 is scikit-learn's `f1_score(average="macro")` over the classes that occur in the
  labels or the predictions.

`UnweightedAverageRecall` keeps two per-class counters (examples seen, examples recalled)
as sum-aggregated metric variables, so it is exact under `tf.distribute` strategies: the
replicas' counts add up before the recall is computed.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="ks_keras")
class UnweightedAverageRecall(keras.metrics.Metric):
    """Mean per-class recall (UA) for sparse integer labels and `[B, C]` scores.

    The predicted class is the argmax of `y_pred`, so logits and probabilities give the same
    value. Classes with no true example so far are excluded from the mean (as
    `sklearn.metrics.balanced_accuracy_score`); with no examples at all the result is 0.

    Args:
        num_classes: number of classes C (width of `y_pred`).
        name: metric name (`"ua"` in `compile_model`).
        dtype: dtype of the counters and result.

    Example:

    >>> m = UnweightedAverageRecall(num_classes=3)
    >>> m.update_state([0, 0, 1, 2], [[2, 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 1]])
    >>> float(m.result())  # recalls 0.5, 1, 1
    0.8333...
    """

    def __init__(self, num_classes: int, name: str = "ua", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.support = self.add_variable(
            shape=(num_classes,), initializer="zeros", dtype=self.dtype, name="support"
        )
        self.recalled = self.add_variable(
            shape=(num_classes,), initializer="zeros", dtype=self.dtype, name="recalled"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        if y_pred.shape[-1] is not None and y_pred.shape[-1] != self.num_classes:
            raise ValueError(
                f"{self.name}: expected predictions with {self.num_classes} classes in the "
                f"last axis, got shape {tuple(y_pred.shape)}"
            )
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == 2 and y_true.shape[-1] == 3:  # packed mixup rows: [y, y', lam]
            y_true = y_true[:, 0]
        y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        predicted = ops.reshape(ops.argmax(ops.reshape(y_pred, (-1, self.num_classes)), -1), (-1,))
        true_one_hot = ops.one_hot(y_true, self.num_classes, dtype=self.dtype)
        hit = ops.cast(ops.equal(ops.cast(predicted, "int32"), y_true), self.dtype)
        if sample_weight is None:
            weights = ops.ones_like(hit)
        else:
            weights = ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
            weights = ops.broadcast_to(weights, ops.shape(hit))
        self.support.assign_add(ops.sum(true_one_hot * weights[:, None], axis=0))
        self.recalled.assign_add(ops.sum(true_one_hot * (hit * weights)[:, None], axis=0))

    def result(self):
        present = ops.cast(self.support > 0, self.dtype)
        recall = ops.divide_no_nan(self.recalled, self.support)
        return ops.divide_no_nan(ops.sum(recall * present), ops.sum(present))

    def reset_state(self):
        self.support.assign(ops.zeros_like(self.support))
        self.recalled.assign(ops.zeros_like(self.recalled))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def _as_labels(values, name: str, n_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 2:  # scores [N, C] → predicted class
        if array.shape[1] != n_classes:
            raise ValueError(
                f"{name}: expected scores of shape [N, {n_classes}], got {array.shape}"
            )
        array = array.argmax(axis=1)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name}: expected integer class ids, got {array.dtype} values")
        array = array.astype(np.int64)
    bad = (array < 0) | (array >= n_classes)
    if np.any(bad):
        raise ValueError(
            f"{name}: class ids must be in [0, {n_classes}), got {sorted(set(array[bad].tolist()))}"
        )
    return array.astype(np.int64)


def compute_metrics(y_true, y_pred, n_classes: int) -> dict:
    """WA, UA, macro-F1 and the confusion matrix of one set of predictions.

    Args:
        y_true: true class ids `[N]`.
        y_pred: predicted class ids `[N]`, or scores/logits/probabilities `[N, C]` (argmax).
        n_classes: number of classes C; ids must lie in `[0, C)`.

    Returns:
        `{"wa": float, "ua": float, "macro_f1": float, "confusion": int array [C, C]}`, where
        `confusion[i, j]` counts examples of true class i predicted as j (rows = truth).

    Example:

    >>> compute_metrics([0, 0, 1, 2], [0, 1, 1, 2], n_classes=3)["ua"]
    0.8333...
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes: expected an integer >= 2, got {n_classes!r}")
    truth = _as_labels(y_true, "y_true", n_classes)
    pred = _as_labels(y_pred, "y_pred", n_classes)
    if truth.size == 0:
        raise ValueError("y_true: no examples to score")
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred: expected the same number of examples, got {truth.size} "
            f"and {pred.size}"
        )
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected in small folds; those classes
        # are left out of UA by definition.
        warnings.simplefilter("ignore", UserWarning)
        ua = balanced_accuracy_score(truth, pred)
    return {
        "wa": float(accuracy_score(truth, pred)),
        "ua": float(ua),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "confusion": confusion,
    }


def normalize_confusion(confusion) -> np.ndarray:
    """Row-normalise a confusion matrix (each true class sums to 1; empty rows stay 0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
