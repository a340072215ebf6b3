"""The layer that averages an ensemble's members (see `ks_keras.ensemble`)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ks_keras")
class MeanProbabilityLogits(keras.layers.Layer):
    """`log(mean_i softmax(logits_i))` of a list of `[B, C]` logits (float32).

    Its softmax is the mean of the members' probabilities; its argmax is the ensemble's vote.
    """

    def __init__(self, **kwargs):
        # Averaging probabilities needs float32 (float16 would round the members' logits).
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs):
        if not isinstance(inputs, list | tuple) or not inputs:
            raise ValueError("MeanProbabilityLogits: expected a non-empty list of logits")
        probs = [ops.softmax(ops.cast(x, "float32"), axis=-1) for x in inputs]
        mean = probs[0] if len(probs) == 1 else ops.mean(ops.stack(probs, axis=0), axis=0)
        # The smallest normal float32 is ~1.2e-38: a class no member gives any probability
        # gets a very negative, finite logit.
        return ops.log(ops.maximum(mean, 1e-37))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return super().get_config()
