"""FastLayerNormalization: same output and gradients as keras.layers.LayerNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ks_keras.layers.encoder import FastLayerNormalization


def _pair(policy=None):
    kwargs = {"epsilon": 1e-5}
    if policy:
        kwargs["dtype"] = policy
    fast, ref = FastLayerNormalization(**kwargs), keras.layers.LayerNormalization(**kwargs)
    fast.build((None, 7, 12))
    ref.build((None, 7, 12))
    rng = np.random.default_rng(0)
    gamma = rng.normal(1.0, 0.3, 12).astype("float32")
    beta = rng.normal(0.0, 0.3, 12).astype("float32")
    for layer in (fast, ref):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    x = tf.constant(rng.normal(2.0, 3.0, (3, 7, 12)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(3, 7, 12)).astype("float32"))
    return fast, ref, x, upstream


def _grads(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
    return y, tape.gradient(loss, [x, layer.gamma, layer.beta])


def test_output_and_gradients_match_keras():
    fast, ref, x, up = _pair()
    y_f, g_f = _grads(fast, x, up)
    y_r, g_r = _grads(ref, x, up)
    np.testing.assert_allclose(y_f, y_r, atol=1e-5)
    for a, b in zip(g_f, g_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradients_under_xla():
    fast, ref, x, up = _pair()
    fn = tf.function(lambda x: _grads(fast, x, up), jit_compile=True)
    y_f, g_f = fn(x)
    y_r, g_r = _grads(ref, x, up)
    np.testing.assert_allclose(y_f, y_r, atol=1e-5)
    for a, b in zip(g_f, g_r):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_compute_dtype(policy):
    fast, ref, x, up = _pair(policy)
    y_f, g_f = _grads(fast, x, up)
    y_r, g_r = _grads(ref, x, up)
    assert y_f.dtype == y_r.dtype
    tol = 2e-2 if policy == "mixed_float16" else 6e-2
    np.testing.assert_allclose(tf.cast(y_f, "float32"), tf.cast(y_r, "float32"), atol=tol)
    for a, b in zip(g_f, g_r):
        a, b = (np.asarray(tf.cast(v, "float32")) for v in (a, b))
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=tol * (1 + np.abs(b).max()))


def test_serialises_and_falls_back_for_other_axes():
    layer = FastLayerNormalization(axis=[1, 2])
    clone = FastLayerNormalization.from_config(layer.get_config())
    x = tf.random.normal((2, 4, 5))
    np.testing.assert_allclose(clone(x), keras.layers.LayerNormalization(axis=[1, 2])(x), atol=1e-5)
