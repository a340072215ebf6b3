"""Dropout from 16 random bits per element (attention weights and residual branches).

`keras.layers.Dropout` draws one float32 uniform per element. Here one 32-bit random integer
serves two elements: an element is dropped when its 16 bits are below
`round(rate * 65536)`, so the drop probability is the rate rounded to 1/65536 (0.1 →
0.100006) and the inverted-dropout scale uses that exact probability (the expected output
is unchanged). Half the random numbers, no float tensor of the input's size, and on the
TensorFlow backend full-range integers, which TensorFlow's kernel draws without the range
reduction `keras.random.randint` pays (about a fifth of the draw). docs/performance.md has
the measurements.
"""

from __future__ import annotations

import keras
from keras import ops

_BITS = 65536


def drop_threshold(rate: float) -> int:
    """The 16-bit value below which an element is dropped."""
    return min(_BITS - 1, round(float(rate) * _BITS))


def keep_scale(rate: float) -> float:
    """Inverted-dropout factor: 1 / P(keep) of the mask `keep_mask` draws for `rate`."""
    return _BITS / (_BITS - drop_threshold(rate))


def _random_int32(shape, seed_generator):
    """Uniform random int32 over the full range; a new draw per call."""
    if keras.backend.backend() == "tensorflow":
        # The only backend-specific line of the layers: full-range integers need no modulo.
        import tensorflow as tf

        seed = seed_generator.next()
        if seed.dtype != "int32":  # stateless ops under XLA want an int32 seed
            seed = ops.cast(ops.mod(seed, 2**31 - 1), "int32")
        return tf.random.stateless_uniform(
            shape, seed=seed, minval=None, maxval=None, dtype="int32"
        )
    return keras.random.randint(
        shape, minval=-(2**31), maxval=2**31 - 1, dtype="int32", seed=seed_generator
    )


def keep_mask(shape, rate: float, seed_generator):
    """Bool keep mask of the given shape (the last axis may be dynamic).

    Args:
        shape: the mask's shape (ints or scalar tensors).
        rate: dropout rate in [0, 1).
        seed_generator: a `keras.random.SeedGenerator`; each call draws a new mask.

    Returns:
        bool tensor, True with probability `1 - drop_threshold(rate) / 65536`.
    """
    *lead, size = shape
    pairs = (size + 1) // 2
    # A static trailing axis of 1, so that `view` works when the lengths are dynamic.
    bits = _random_int32((*lead, pairs, 1), seed_generator)
    halves = ops.view(bits, "uint16")  # [..., pairs, 2]
    halves = ops.reshape(halves, (*lead, 2 * pairs))
    if not isinstance(size, int) or size % 2:
        halves = halves[..., :size]  # an odd (or unknown) size drops the last spare half
    return ops.greater_equal(halves, ops.cast(drop_threshold(rate), "uint16"))


@keras.saving.register_keras_serializable(package="ks_keras")
class FastDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` with the 16-bit mask of `keep_mask` (same arguments and state).

    The drop probability is the rate rounded to 1/65536 and the scale matches it. With a
    `noise_shape`, or outside training, this is `keras.layers.Dropout` unchanged.
    """

    def call(self, inputs, training=False):
        if not training or self.rate <= 0.0 or self.noise_shape is not None:
            return super().call(inputs, training=training)
        keep = keep_mask(ops.shape(inputs), self.rate, self.seed_generator)
        scaled = inputs * ops.cast(keep_scale(self.rate), inputs.dtype)
        return ops.where(keep, scaled, ops.zeros((), inputs.dtype))
