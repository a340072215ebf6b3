"""SinusoidalPositionalEncoding and MaskedMeanPooling against numpy references."""

import numpy as np
import pytest

from ks_keras.layers import MaskedMeanPooling, SinusoidalPositionalEncoding, sinusoid_table


def numpy_sinusoids(length, dim):
    pe = np.zeros((length, dim))
    for p in range(length):
        for i in range(0, dim, 2):
            angle = p / 10000 ** (i / dim)
            pe[p, i] = np.sin(angle)
            if i + 1 < dim:
                pe[p, i + 1] = np.cos(angle)
    return pe


@pytest.mark.parametrize("length,dim", [(5, 8), (50, 16), (3, 7)])
def test_sinusoid_table_matches_vaswani(length, dim):
    np.testing.assert_allclose(
        np.asarray(sinusoid_table(length, dim)), numpy_sinusoids(length, dim), atol=1e-5
    )


def test_positional_layer_adds_table_for_any_length():
    layer = SinusoidalPositionalEncoding()
    for length in (4, 11):
        x = np.random.default_rng(0).normal(size=(2, length, 6)).astype("float32")
        np.testing.assert_allclose(
            layer(x).numpy() - x, np.broadcast_to(numpy_sinusoids(length, 6), x.shape), atol=1e-5
        )
    assert layer.count_params() == 0


def test_masked_mean_pooling_real_steps_only():
    x = np.random.default_rng(1).normal(size=(3, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], "int32")
    got = MaskedMeanPooling()(x, padding_mask=mask).numpy()
    np.testing.assert_allclose(got[0], x[0].mean(0), atol=1e-6)
    np.testing.assert_allclose(got[1], x[1, :2].mean(0), atol=1e-6)
    np.testing.assert_array_equal(got[2], np.zeros(4))  # no real step: zeros, not NaN
    padded = MaskedMeanPooling(include_padding=True)(x, padding_mask=mask).numpy()
    np.testing.assert_allclose(padded, x.mean(1), atol=1e-6)


def test_pooling_rejects_mismatched_mask():
    x = np.zeros((2, 5, 4), "float32")
    with pytest.raises(ValueError, match="padding_mask"):
        MaskedMeanPooling()(x, padding_mask=np.ones((2, 6), "int32"))
