"""Utterance-level functionals of a frame sequence, computed in the graph.

Classical SER describes an utterance by statistics ("functionals") of its frame-level
descriptors: means, spreads, percentiles, slopes (openSMILE's eGeMAPS/ComParE functionals).
`UtteranceFunctionals` computes such statistics of the model's (normalised) input frames, over
real frames only, so they can feed the classifier head next to the pooled Transformer outputs.
Being part of the graph, they need no extra input and are exported with the model.
"""

from __future__ import annotations

import re

import keras
from keras import ops

from ks_keras.config import check_functionals
from ks_keras.layers.masks import check_sequence_mask

_PERCENTILE = re.compile(r"^p(\d{1,2})$")


@keras.saving.register_keras_serializable(package="ks_keras")
class UtteranceFunctionals(keras.layers.Layer):
    """Statistics over time of a `[B, T, D]` sequence's real steps → `[B, D * len(stats)]`.

    Args:
        stats: functional names, in output order: `mean`, `std`, `min`, `max`, `pNN` (the
            NN-th percentile, nearest rank), `delta_abs_mean` and `delta_std` (mean absolute
            value and standard deviation of the frame-to-frame differences).
        **kwargs: base layer arguments.

    Call args:
        inputs: `[B, T, D]`.
        padding_mask: `[B, T]` int/bool, 1 for real steps. Padded steps never change the
            output; a sample without real steps gives zeros.

    Computed in float32 whatever the dtype policy.
    """

    def __init__(self, stats=("mean", "std"), **kwargs):
        # Statistics are float32 whatever the policy (also what the symbolic output says).
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.stats = check_functionals(stats)
        if not self.stats:
            raise ValueError("UtteranceFunctionals: stats must name at least one functional")

    def call(self, inputs, padding_mask=None):
        x = ops.cast(inputs, "float32")
        if padding_mask is None:
            mask = ops.ones(ops.shape(x)[:2], "float32")
        else:
            check_sequence_mask(inputs, padding_mask, "padding_mask")
            mask = ops.cast(padding_mask, "float32")
        weights = mask[:, :, None]
        # Padded steps hold anything (even inf): zero them before any arithmetic.
        x = ops.where(weights > 0, x, 0.0)
        count = ops.sum(mask, axis=1, keepdims=True)  # [B, 1]
        any_real = ops.cast(count > 0, "float32")
        safe = ops.maximum(count, 1.0)
        mean = ops.sum(x * weights, axis=1) / safe
        out = []
        needs_sort = any(_PERCENTILE.match(s) for s in self.stats)
        ordered = None
        if needs_sort:
            big = ops.cast(3.0e38, "float32")
            ordered = ops.sort(ops.where(weights > 0, x, big), axis=1)
        for name in self.stats:
            if name == "mean":
                value = mean
            elif name == "std":
                var = ops.sum(ops.square(x - mean[:, None, :]) * weights, axis=1) / safe
                value = ops.sqrt(var + 1e-8) * any_real
            elif name in ("min", "max"):
                sign = 1.0 if name == "max" else -1.0
                masked = ops.where(weights > 0, sign * x, -3.0e38)
                value = sign * ops.max(masked, axis=1) * any_real
            elif name in ("delta_abs_mean", "delta_std"):
                delta = x[:, 1:] - x[:, :-1]
                dmask = (mask[:, 1:] * mask[:, :-1])[:, :, None]
                dcount = ops.maximum(ops.sum(dmask, axis=1), 1.0)
                if name == "delta_abs_mean":
                    value = ops.sum(ops.abs(delta) * dmask, axis=1) / dcount
                else:
                    dmean = ops.sum(delta * dmask, axis=1) / dcount
                    dvar = ops.sum(ops.square(delta - dmean[:, None, :]) * dmask, axis=1) / dcount
                    value = ops.sqrt(dvar + 1e-8) * ops.cast(ops.sum(dmask, axis=1) > 0, "float32")
            else:
                q = int(_PERCENTILE.match(name).group(1)) / 100.0
                rank = ops.cast(ops.floor(q * ops.maximum(count - 1.0, 0.0)), "int32")  # [B, 1]
                index = ops.broadcast_to(rank[:, :, None], (ops.shape(x)[0], 1, ops.shape(x)[2]))
                value = ops.take_along_axis(ordered, index, axis=1)[:, 0, :] * any_real
            out.append(value)
        return ops.concatenate(out, axis=-1) if len(out) > 1 else out[0]

    def compute_output_shape(self, input_shape):
        dim = input_shape[-1]
        return (input_shape[0], None if dim is None else dim * len(self.stats))

    def compute_mask(self, inputs, padding_mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update({"stats": list(self.stats)})
        return config
