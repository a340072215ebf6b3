"""Mixup for sequence batches with sparse labels (`train.mixup_alpha`).

Each training batch is mixed with a seeded permutation of itself: features become
`lam * x + (1 - lam) * x[perm]` (every modality, the same `lam` per sample), masks the union of
the two samples' real steps, and the label a packed row `[y, y[perm], lam]` with
`lam = max(l, 1 - l)`, `l ~ Beta(alpha, alpha)`, so the first label dominates. `MixupCrossentropy`
reads packed rows as `lam * CE(y) + (1 - lam) * CE(y[perm])` and plain integer labels (validation,
test) as ordinary sparse cross-entropy; the accuracy and UA metrics score the dominant label.
Only the training dataset is mixed, so validation, test and exported models never see it.

Draws are stateless and seeded per batch from `tf.data.Dataset.random(seed)`, which draws anew
each epoch: the same seed gives the same run.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


def mix_batches(
    dataset: tf.data.Dataset, alpha: float, seed: int, class_weight: dict | None = None
) -> tf.data.Dataset:
    """Mix every `(inputs, labels[, weights])` batch of `dataset` (see the module docstring).

    Args:
        dataset: batched training data with int labels `[B]`.
        alpha: Beta(alpha, alpha) concentration, > 0 (0.2–0.4 is usual).
        seed: draw seed.
        class_weight: optional `{class id: weight}`; each mixed sample then weighs
            `lam * w[y] + (1 - lam) * w[y[perm]]` (Keras cannot apply class weights to packed
            labels itself).

    Returns:
        Batches `(mixed inputs, packed labels [B, 3] float32[, sample weights [B]])`.
    """
    if not alpha > 0:
        raise ValueError(f"train.mixup_alpha: expected a number > 0, got {alpha!r}")
    weights = None
    if class_weight:
        n = max(class_weight) + 1
        weights = tf.constant([float(class_weight.get(c, 1.0)) for c in range(n)], tf.float32)
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def mix(element, draw):
        inputs, labels = element[0], element[1]
        batch = tf.shape(labels)[0]
        key = tf.stack([draw, tf.cast(seed, tf.int64)])
        key_a, key_b, key_p = tf.unstack(tf.random.experimental.stateless_split(key, num=3), axis=0)
        g1 = tf.random.stateless_gamma([batch], key_a, alpha=alpha)
        g2 = tf.random.stateless_gamma([batch], key_b, alpha=alpha)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        lam = tf.maximum(lam, 1.0 - lam)
        perm = tf.random.experimental.stateless_shuffle(tf.range(batch), key_p)
        mixed = {}
        for name, value in inputs.items():
            other = tf.gather(value, perm)
            if name.endswith("_mask"):
                mixed[name] = tf.maximum(value, other)
            elif value.dtype.is_floating:
                shape = tf.concat([[batch], tf.ones([tf.rank(value) - 1], tf.int32)], 0)
                w = tf.cast(tf.reshape(lam, shape), value.dtype)
                mixed[name] = w * value + (1 - w) * other
            else:
                mixed[name] = value
        y = tf.cast(labels, tf.float32)
        packed = tf.stack([y, tf.gather(y, perm), lam], axis=1)
        if weights is not None:
            wa = tf.gather(weights, tf.cast(labels, tf.int32))
            wb = tf.gather(wa, perm)
            sample = lam * wa + (1 - lam) * wb
            if len(element) == 3:
                sample = sample * tf.cast(element[2], tf.float32)
            return mixed, packed, sample
        if len(element) == 3:
            return mixed, packed, element[2]
        return mixed, packed

    return tf.data.Dataset.zip((dataset, draws)).map(
        lambda element, draw: mix(element, draw), num_parallel_calls=tf.data.AUTOTUNE
    )


def dominant_labels(y_true):
    """Integer labels: `y_true` itself, or column 0 of packed mixup rows `[B, 3]`."""
    if len(y_true.shape) == 2 and y_true.shape[-1] == 3:
        return ops.cast(y_true[:, 0], "int32")
    return y_true


@keras.saving.register_keras_serializable(package="ks_keras")
class MixupCrossentropy(keras.losses.Loss):
    """Sparse cross-entropy on logits that also reads packed mixup labels `[B, 3]`."""

    def __init__(self, name="mixup_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        if len(y_true.shape) == 2 and y_true.shape[-1] == 3:
            lam = ops.cast(y_true[:, 2], "float32")
            first = ops.sparse_categorical_crossentropy(
                ops.cast(y_true[:, 0], "int32"), y_pred, from_logits=True
            )
            second = ops.sparse_categorical_crossentropy(
                ops.cast(y_true[:, 1], "int32"), y_pred, from_logits=True
            )
            return lam * first + (1.0 - lam) * second
        return ops.sparse_categorical_crossentropy(
            ops.cast(ops.reshape(y_true, (-1,)), "int32"), y_pred, from_logits=True
        )


@keras.saving.register_keras_serializable(package="ks_keras")
class DominantLabelAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Accuracy (WA) that scores the dominant label of packed mixup rows."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(dominant_labels(y_true), y_pred, sample_weight)
