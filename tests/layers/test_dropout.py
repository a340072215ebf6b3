"""16-bit dropout masks: rate, independence, scale, fallbacks, dynamic shapes, XLA, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ks_keras.layers.dropout import FastDropout, drop_threshold, keep_mask, keep_scale


def test_threshold_and_scale_are_exact():
    assert drop_threshold(0.1) == 6554 and drop_threshold(0.0) == 0
    assert drop_threshold(0.999999) == 65535
    for rate in (0.1, 0.3, 0.5):
        p_drop = drop_threshold(rate) / 65536
        assert abs(p_drop - rate) <= 0.5 / 65536
        assert keep_scale(rate) * (1 - p_drop) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("size", [7, 512])
def test_keep_mask_rate_and_independence(size):
    seed = keras.random.SeedGenerator(5)
    shape = (64, 33, size)
    first = np.asarray(keep_mask(shape, 0.3, seed))
    second = np.asarray(keep_mask(shape, 0.3, seed))
    assert first.shape == shape and first.dtype == bool
    assert not np.array_equal(first, second)  # a new mask per call
    p_drop, n = drop_threshold(0.3) / 65536, first.size
    assert abs((1 - first.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
    # The two 16-bit halves of each 32-bit draw are independent.
    pairs = first[..., : 2 * (size // 2)].reshape(-1, 2)
    both = np.mean(~pairs[:, 0] & ~pairs[:, 1])
    assert abs(both - p_drop**2) < 5 * np.sqrt(p_drop**2 / pairs.shape[0])
    # Neighbours along every axis are not correlated (no repeated blocks of bits).
    for axis in range(3):
        a = np.moveaxis(first, axis, 0)
        same = a[1:] == a[:-1]
        expected = p_drop**2 + (1 - p_drop) ** 2
        assert abs(same.mean() - expected) < 5 * np.sqrt(expected * (1 - expected) / same.size)


def test_fast_dropout_scales_kept_values_and_passes_through_outside_training():
    layer = FastDropout(0.25, seed=3)
    x = np.random.default_rng(0).normal(size=(8, 50, 16)).astype("float32") + 3.0
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    out = np.asarray(layer(x, training=True))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] * keep_scale(0.25), rtol=1e-6)
    p_drop = drop_threshold(0.25) / 65536
    assert abs((1 - kept.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / x.size)
    # Expected output equals the input: the mean over many draws.
    run = tf.function(lambda: layer(x, training=True), autograph=False)
    mean = np.mean([np.asarray(run()) for _ in range(300)], axis=0)
    assert abs(mean.mean() - x.mean()) < 0.01


def test_fast_dropout_same_seed_same_masks_and_noise_shape_falls_back():
    x = np.ones((4, 10, 6), "float32")
    a, b = FastDropout(0.5, seed=9), FastDropout(0.5, seed=9)
    for _ in range(2):
        np.testing.assert_array_equal(
            np.asarray(a(x, training=True)), np.asarray(b(x, training=True))
        )
    shared = np.asarray(FastDropout(0.5, noise_shape=(4, 1, 6), seed=1)(x, training=True))
    assert (shared == shared[:, :1]).all()  # one mask per (sample, channel), as in Keras


def test_fast_dropout_with_dynamic_shapes_gradient_and_xla():
    layer = FastDropout(0.2, seed=4)
    spec = tf.TensorSpec([None, None, 5])

    @tf.function(input_signature=[spec], autograph=False)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    for t in (3, 8):
        x = np.ones((2, t, 5), "float32")
        y, g = grad(x)
        # The gradient is the mask times the scale.
        np.testing.assert_allclose(g.numpy(), y.numpy(), rtol=1e-6)
    xla = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    out = np.asarray(xla(np.ones((2, 9, 5), "float32")))
    assert set(np.round(np.unique(out), 5)) <= {0.0, round(keep_scale(0.2), 5)}


def test_fast_dropout_config_round_trip():
    layer = FastDropout(0.3, seed=2, name="drop")
    again = FastDropout.from_config(layer.get_config())
    assert again.rate == 0.3 and again.seed == 2
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, FastDropout)
