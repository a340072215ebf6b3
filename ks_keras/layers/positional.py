"""Sinusoidal positional encoding (Vaswani et al., 2017), computed on the fly."""

from __future__ import annotations

import math

import keras
from keras import ops


def sinusoid_table(length, dim, dtype="float32"):
    """`[length, dim]` table: sin on even channels, cos on odd channels.

    `PE[p, 2i] = sin(p / 10000^(2i/dim))`, `PE[p, 2i+1] = cos(p / 10000^(2i/dim))`.
    `length` may be a tensor (dynamic sequence length); `dim` is a Python int.
    """
    positions = ops.cast(ops.arange(length), "float32")[:, None]  # [L, 1]
    pair_index = ops.cast(ops.arange(dim) // 2, "float32")  # 0,0,1,1,2,2,...
    inv_freq = ops.exp(pair_index * (-2.0 * math.log(10000.0) / dim))  # [dim]
    angles = positions * inv_freq[None, :]
    is_even = ops.equal(ops.arange(dim) % 2, 0)[None, :]
    return ops.cast(ops.where(is_even, ops.sin(angles), ops.cos(angles)), dtype)


@keras.saving.register_keras_serializable(package="ks_keras")
class SinusoidalPositionalEncoding(keras.layers.Layer):
    """Adds true sinusoidal position codes to a `[B, T, D]` sequence.

    There are no weights, so the table can never be overwritten by an initialiser (the authors'
    code's Xavier init turns its table into fixed noise; SPEC §8). The table is computed for
    the actual length `T`, so any length works.

    Args:
        scale: multiplier on the codes (1.0 = the standard encoding).
        **kwargs: base layer arguments.

    Example:

    >>> pe = SinusoidalPositionalEncoding()
    >>> pe(np.zeros((1, 4, 8), "float32")).shape
    (1, 4, 8)
    """

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.supports_masking = True

    def call(self, inputs):
        length = ops.shape(inputs)[1]
        dim = inputs.shape[-1]
        if dim is None:
            raise ValueError("SinusoidalPositionalEncoding: the feature dimension must be known")
        table = sinusoid_table(length, dim, dtype=inputs.dtype)
        return inputs + ops.cast(self.scale, inputs.dtype) * table[None, :, :]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale})
        return config
