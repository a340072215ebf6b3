"""Mean pooling over time that respects padding."""

from __future__ import annotations

import keras
from keras import ops

from ks_keras.layers.masks import check_sequence_mask


@keras.saving.register_keras_serializable(package="ks_keras")
class MaskedMeanPooling(keras.layers.Layer):
    """Average a `[B, T, D]` sequence over time → `[B, D]`.

    Args:
        include_padding: False (default) averages the real steps only; True averages every
            step, padding included, as the authors' code does.
        **kwargs: base layer arguments.

    Call args:
        inputs: `[B, T, D]`.
        padding_mask: `[B, T]` int/bool, 1 for real steps. A sample without real steps pools to zeros.
    """

    def __init__(self, include_padding=False, **kwargs):
        super().__init__(**kwargs)
        self.include_padding = bool(include_padding)

    def call(self, inputs, padding_mask=None):
        if padding_mask is None or self.include_padding:
            return ops.mean(inputs, axis=1)
        check_sequence_mask(inputs, padding_mask, "padding_mask")
        weights = ops.cast(padding_mask, inputs.dtype)[:, :, None]
        total = ops.sum(inputs * weights, axis=1)
        count = ops.maximum(ops.sum(weights, axis=1), ops.cast(1.0, inputs.dtype))
        return total / count

    def compute_mask(self, inputs, padding_mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update({"include_padding": self.include_padding})
        return config
