"""ks_keras.sequences: the numpy and TensorFlow crop/pad/normalise rules agree."""

import numpy as np
import pytest
import tensorflow as tf

from ks_keras.sequences import (
    fit_length,
    fit_length_np,
    normalize_np,
    normalize_tf,
    pad_or_crop,
    pad_or_crop_tf,
)


@pytest.mark.parametrize("length", [0, 1, 7, 12, 30])
def test_one_sequence_numpy_and_tf_agree(length):
    x = np.random.default_rng(length).normal(size=(length, 5)).astype(np.float32)
    want_x, want_m = pad_or_crop(x, 12)
    got_x, got_m = pad_or_crop_tf(tf.constant(x), 12)
    np.testing.assert_array_equal(got_x.numpy(), want_x)  # copies only: exact
    np.testing.assert_array_equal(got_m.numpy(), want_m)
    assert want_m.sum() == min(length, 12) and want_x.shape == (12, 5)
    np.testing.assert_array_equal(want_x[: min(length, 12)], x[:12])


@pytest.mark.parametrize("crop_to_longest", [False, True])
@pytest.mark.parametrize("steps", [3, 9, 20])
def test_batches_numpy_and_tf_agree(steps, crop_to_longest):
    rng = np.random.default_rng(steps)
    x = rng.normal(size=(4, steps, 3)).astype(np.float32)
    lengths = np.array([0, 1, steps // 2, steps])
    mask = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.int32)
    mask[2] *= 5  # any nonzero value marks a real step
    want_x, want_m = fit_length_np(x, mask, 9, crop_to_longest)
    got_x, got_m = fit_length(tf.constant(x), tf.constant(mask), 9, crop_to_longest)
    np.testing.assert_array_equal(got_x.numpy(), want_x)
    np.testing.assert_array_equal(got_m.numpy(), want_m)
    longest = min(steps, 9)
    assert want_x.shape[1] == (longest if crop_to_longest else 9)
    assert set(np.unique(want_m)) <= {0, 1}
    assert np.all(want_x[want_m == 0] == 0)
    # Row by row, the batch rule is the single-sequence rule.
    for row, n in enumerate(lengths):
        one_x, one_m = pad_or_crop(x[row, :n], 9)
        width = want_x.shape[1]
        np.testing.assert_array_equal(want_x[row], one_x[:width])
        np.testing.assert_array_equal(want_m[row], one_m[:width])


def test_normalisation_numpy_and_tf_agree(f32_close):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(2, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    mean = rng.normal(size=4).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    want = normalize_np(x, mask, mean, std)
    got = normalize_tf(tf.constant(x), tf.constant(mask), mean, std).numpy()
    f32_close(got, want)
    assert np.all(want[0, 3:] == 0)
    f32_close(want[1], (x[1] - mean) / std)
