"""Crop, pad and normalise feature sequences: the one rule, once per runtime.

Training (`ks_keras.data`), prediction (`ks_keras.predict`), the exported graph and its
verification (`ks_keras.export`) all fit a `[T, D]` sequence (or a batch of them) to the
model's length the same way: **crop at the end** to `max_len` steps, **zero-pad at the end**,
an int32 mask with 1 on real steps, and zeros on every masked step. Normalisation subtracts
the mean and divides by the standard deviation on real steps only (padding stays zero).

numpy and TensorFlow versions stand side by side; `tests/test_sequences.py` checks that they
agree. TensorFlow is imported only by the TF functions.

| | numpy | TensorFlow |
|---|---|---|
| one `[T, D]` sequence | `pad_or_crop` | `pad_or_crop_tf` |
| a batch `[B, T, D]` + mask | `fit_length_np` | `fit_length` |
| normalisation | `normalize_np` | `normalize_tf` |
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# numpy


def pad_or_crop(x: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop or zero-pad `[T, D]` at the end to `[max_len, D]`; mask `[max_len]` int32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"pad_or_crop: expected a [T, D] array, got shape {x.shape}")
    if max_len < 1:
        raise ValueError(f"pad_or_crop: max_len must be >= 1, got {max_len}")
    n = min(x.shape[0], max_len)
    out = np.zeros((max_len, x.shape[1]), np.float32)
    out[:n] = x[:n]
    mask = np.zeros((max_len,), np.int32)
    mask[:n] = 1
    return out, mask


def fit_length_np(
    x: np.ndarray, mask: np.ndarray, max_len: int, crop_to_longest: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `fit_length`: a batch `[B, T, D]` with its mask `[B, T]` (any nonzero =
    real) cropped/zero-padded at the end to `max_len` steps (or, with `crop_to_longest`, cut
    after the last real step of any row, at least 1), masked steps zeroed."""
    x = np.asarray(x, np.float32)
    mask = (np.asarray(mask) != 0).astype(np.int32)
    target = max_len
    if crop_to_longest:
        steps = np.arange(1, min(mask.shape[1], max_len) + 1)
        real = mask[:, : steps.size] * steps[None, :]
        target = max(int(real.max(initial=0)), 1)
    keep = min(x.shape[1], target)
    out_x = np.zeros((x.shape[0], target, x.shape[2]), np.float32)
    out_m = np.zeros((x.shape[0], target), np.int32)
    out_x[:, :keep], out_m[:, :keep] = x[:, :keep], mask[:, :keep]
    out_x *= out_m[:, :, None]
    return out_x, out_m


def normalize_np(x: np.ndarray, mask: np.ndarray, mean, std) -> np.ndarray:
    """`(x - mean) / std` on real steps (`mask` != 0), zero on masked ones; `x` is `[..., T, D]`,
    `mask` `[..., T]`, `mean`/`std` `[D]`."""
    valid = (np.asarray(mask) != 0).astype(np.float32)[..., None]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((np.asarray(x, np.float32) - mean) / std * valid).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# TensorFlow (graph-friendly: dynamic lengths, static max_len)


def pad_or_crop_tf(x, max_len: int):
    """`pad_or_crop` in TF for one `[T, D]` tensor: `([max_len, D] float, [max_len] int32)`."""
    import tensorflow as tf

    x = x[:max_len]
    n = tf.shape(x)[0]
    mask = tf.sequence_mask(n, max_len, dtype=tf.int32)
    x = tf.pad(x, [[0, max_len - n], [0, 0]])
    return x, mask


def fit_length(x, mask, max_len: int, crop_to_longest: bool = False):
    """Crop at the end / zero-pad at the end to `max_len` steps and zero masked steps (tf ops).

    This is the training pipeline's `pad_or_crop` for a whole batch inside the graph. With
    `crop_to_longest` (for models whose output ignores trailing padding, see
    `ks_keras.config.padding_invariant`) the batch is then cut after its last real step instead
    of being padded to `max_len`: the same result for less work (a single short request no
    longer pays for `max_len` steps).
    """
    import tensorflow as tf

    mask = tf.cast(tf.not_equal(mask, 0), tf.int32)
    x = x[:, :max_len]
    mask = mask[:, :max_len]
    target = max_len
    if crop_to_longest:
        # One past the last real step of any row (at least 1 step, so shapes stay valid).
        steps = tf.range(1, tf.shape(mask)[1] + 1, dtype=tf.int32)
        target = tf.maximum(tf.reduce_max(mask * steps[None, :]), 1)
        x = x[:, :target]
        mask = mask[:, :target]
    pad = tf.maximum(target - tf.shape(mask)[1], 0)
    x = tf.pad(x, [[0, 0], [0, pad], [0, 0]])
    mask = tf.pad(mask, [[0, 0], [0, pad]])
    x = x * tf.cast(mask, x.dtype)[:, :, None]
    length = None if crop_to_longest else max_len
    x = tf.ensure_shape(x, [None, length, x.shape[-1]])
    mask = tf.ensure_shape(mask, [None, length])
    return x, mask


def normalize_tf(x, mask, mean, std):
    """`normalize_np` in TF (same shapes; `mean`/`std` tensors or arrays `[D]`)."""
    import tensorflow as tf

    valid = tf.cast(tf.not_equal(mask, 0), tf.float32)[..., None]
    return (x - mean) / std * valid
