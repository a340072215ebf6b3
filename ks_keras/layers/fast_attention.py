"""Stock multi-head attention, computed with fewer passes over memory (the speed work).

`FastMultiHeadAttention` gives the outputs of `keras.layers.MultiHeadAttention` (same weights,
same results up to float rounding) with:

- the four projections as plain 2-D matmuls;
- the attention-weight dropout mask drawn from 16 random bits per weight
  (`ks_keras.layers.dropout`);
- a hand-written gradient of the attention step that keeps one boolean mask between the
  passes instead of three `[B, N, T, S]` float tensors, and folds the key padding mask and the
  softmax row term into the matmuls.

The computations are pure functions in `ks_keras/layers/attention_kernels.py`; the layer reads
its settings and calls them. `KeySparseAttention` (the paper's rule) subclasses this layer and
adds one step, the choice of kept keys (`_select_keys`). Measurements: docs/performance.md.
"""

from __future__ import annotations

import keras
from keras import ops

from ks_keras.layers.attention_kernels import (
    STANDARD_EQUATIONS,
    attention_masks,
    autodiff_attention,
    dropout_keep_mask,
    dropout_scale,
    fused_attention,
    masked_softmax,
    project,
)
from ks_keras.layers.dropout import drop_threshold

_PROJECTION_EQUATIONS = ("abc,cde->abde",) * 3 + ("abcd,cde->abe",)


@keras.saving.register_keras_serializable(package="ks_keras")
class FastMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with the speed work of this module.

    Same weights and outputs as stock MultiHeadAttention (up to float rounding; the
    attention-dropout mask is drawn differently unless `exact_dropout_mask`). Padding is
    passed as an explicit `attention_mask` `[B, T, S]` (True/1 where query t may attend key s).

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for query and key.
        query_mask_in_scores: padded queries attend nothing (default). With False every query
            row, padding included, attends over the real keys, as in the authors' code (only
            outputs at padded query positions differ).
        recompute_softmax: in training, recompute the softmax in the backward pass instead of
            keeping it from the forward pass: one `[B, N, T, S]` float32 tensor less per layer
            between the passes for one more scores matmul (same results; default on).
        separable_mask: the caller promises that every `attention_mask` is the outer product
            of a query and a key padding mask (as `TransformerLayer` passes); the key part then
            goes into the scores matmul as a bias column instead of a masked copy of the scores.
            Leave off for arbitrary `[B, T, S]` masks.
        fused_gradient: hand-written attention gradient (default); False: automatic
            differentiation (same results; for tests and comparison).
        exact_dropout_mask: draw the attention-dropout mask exactly as `keras.layers.Dropout`
            (float32 uniforms; the same mask as stock MultiHeadAttention with the same seed)
            instead of from 16-bit random integers (default off).
        **kwargs: everything `keras.layers.MultiHeadAttention` accepts (value_dim, dropout,
            output_shape, ...) except `flash_attention`.
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        query_mask_in_scores=True,
        recompute_softmax=True,
        separable_mask=False,
        fused_gradient=True,
        exact_dropout_mask=False,
        **kwargs,
    ):
        if kwargs.get("flash_attention"):
            raise ValueError(f"flash_attention: not supported by {type(self).__name__}")
        kwargs["flash_attention"] = False
        super().__init__(num_heads=num_heads, key_dim=key_dim, **kwargs)
        self.query_mask_in_scores = bool(query_mask_in_scores)
        self.recompute_softmax = bool(recompute_softmax)
        self.separable_mask = bool(separable_mask)
        self.fused_gradient = bool(fused_gradient)
        self.exact_dropout_mask = bool(exact_dropout_mask)

    def get_config(self):
        config = super().get_config()
        config.pop("flash_attention", None)
        config.update(
            {
                "query_mask_in_scores": self.query_mask_in_scores,
                "recompute_softmax": self.recompute_softmax,
                "separable_mask": self.separable_mask,
                "fused_gradient": self.fused_gradient,
                "exact_dropout_mask": self.exact_dropout_mask,
            }
        )
        return config

    # Hooks for subclasses that keep only some keys (KeySparseAttention).
    renormalize = False

    def _select_keys(self, probs, key_valid, voters):
        """Bool `[B, N, S]` keys kept per sample and head, or None (all keys: plain MHA)."""
        return None

    # -----------------------------------------------------------------------------------------
    # The call: stock MultiHeadAttention's, with the projections as plain matmuls.

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        """Stock `MultiHeadAttention.call`, with the four projections as 2-D matmuls.

        Stock MultiHeadAttention projects with `EinsumDense`, and Keras' TensorFlow backend
        computes its einsum as a batched matmul broadcast over the batch, whose kernel
        gradient is one small matmul per sample plus a sum (docs/performance.md, "plain
        projection matmuls"). Here the inputs are flattened to `[B*T, D]` and the kernels read
        as `[D, N*H]` (`[N*H, D]` for the output): the same weights and results, one matmul
        each way. This route is taken when nothing else is asked for (an explicit
        `attention_mask` or none; no Keras masks, scores, causal mask, gate, LoRA or
        quantisation); anything else takes the stock call.
        """
        if key is None:
            key = value
        if not self._plain_projections(
            (query, value, key),
            (query_mask, value_mask, key_mask),
            return_attention_scores or use_causal_mask,
        ):
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        query_p = project(self._query_dense, query)  # [B, T, N, H]
        key_p = project(self._key_dense, key)  # [B, S, N, H]
        value_p = project(self._value_dense, value)  # [B, S, N, H]
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")
        out, _ = self._compute_attention(query_p, key_p, value_p, attention_mask, training)
        return project(self._output_dense, out)  # [B, T, D]

    def _plain_projections(self, inputs, masks, other_requests):
        """True when `call` may compute the projections as plain matmuls (see `call`)."""
        if other_requests or any(m is not None for m in masks):
            return False
        if any(getattr(x, "_keras_mask", None) is not None for x in inputs):
            return False
        if any(len(x.shape) != 3 for x in inputs) or self._use_gate:
            return False
        if getattr(self, "_sliding_window", None) is not None:
            return False
        layers = (self._query_dense, self._key_dense, self._value_dense, self._output_dense)
        for dense, equation in zip(layers, _PROJECTION_EQUATIONS):
            if dense.equation != equation or dense.activation is not keras.activations.linear:
                return False
            if getattr(dense, "lora_enabled", False) or getattr(dense, "quantization_mode", None):
                return False
        return True

    # -----------------------------------------------------------------------------------------
    # The attention step.
    #
    # Two equivalent routes. `_attention_weights` materialises the dense and (with key
    # selection) sparse weight matrices, for `return_attention_scores` and
    # `attention_details`. The default call never builds the sparse matrix: zeroing column s
    # of the weights is the same as zeroing value row s of that head (`W_sparse V = W (kept *
    # V)`), and zeroing a fully masked query row of the weights is the same as zeroing that
    # row of the output; both act on tensors N·T/H times smaller than the `[B, N, T, S]`
    # weights. See docs/performance.md.

    def _masks(self, attention_mask):
        return attention_masks(attention_mask, self.query_mask_in_scores)

    def _attention_weights(self, query, key, attention_mask):
        """Dense and kept-key weights plus the kept-key mask, all float32 (materialised).

        Args:
            query: projected queries `[B, T, N, H]`.
            key: projected keys `[B, S, N, H]`.
            attention_mask: bool `[B, T, S]` or None.

        Returns:
            `(dense [B, N, T, S], sparse [B, N, T, S], kept [B, N, S] bool or None)`; without
            key selection `sparse` is `dense` and `kept` None.
        """
        softmax_mask, key_valid, row_valid, _ = self._masks(attention_mask)
        dense = masked_softmax(
            query, key, self._inverse_sqrt_key_dim, self._dot_product_equation, softmax_mask
        )
        if row_valid is not None:
            # A row with no valid key gets zeros, not a uniform distribution over padding.
            dense = dense * ops.cast(row_valid, "float32")[:, None, :, None]
        # Rows of non-voters are zero in `dense` already, so no voter weighting is needed.
        kept = self._select_keys(dense, key_valid, None)
        if kept is None:
            return dense, dense, None
        sparse = dense * ops.cast(kept, "float32")[:, :, None, :]
        if self.renormalize:
            total = ops.sum(sparse, axis=-1, keepdims=True)
            sparse = sparse / ops.maximum(total, 1e-12)
        return dense, sparse, kept

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if use_causal_mask:
            raise ValueError(f"use_causal_mask: not supported by {type(self).__name__}")
        if return_attention_scores:
            _, weights, _ = self._attention_weights(query, key, attention_mask)
            weights_out = ops.cast(weights, value.dtype)
            dropped = self._dropout_layer(weights_out, training=training)
            return ops.einsum(self._combine_equation, dropped, value), weights_out

        masks = self._masks(attention_mask)
        keep = None
        if training and self._dropout > 0.0:
            shape = (ops.shape(query)[0], self._num_heads, ops.shape(query)[1], ops.shape(key)[1])
            keep = self._dropout_keep_mask(shape, value.dtype)
        common = dict(
            scale=self._inverse_sqrt_key_dim,
            drop_scale=self._dropout_scale(),
            select_keys=self._select_keys,
        )
        equations = (self._dot_product_equation, self._combine_equation)
        if self.renormalize or equations != STANDARD_EQUATIONS or not self.fused_gradient:
            return autodiff_attention(
                query,
                key,
                value,
                masks,
                keep,
                equations=equations,
                renormalize=self.renormalize,
                **common,
            ), None
        fold = self.separable_mask or not self.query_mask_in_scores
        return fused_attention(
            query,
            key,
            value,
            masks,
            keep,
            fold_key_mask=fold,
            recompute_softmax=self.recompute_softmax,
            **common,
        ), None

    def _dropout_keep_mask(self, shape, dtype):
        """Bool keep mask `[B, N, T, S]` of the attention-weight dropout (`dropout_keep_mask`)."""
        return dropout_keep_mask(
            shape,
            self._dropout,
            self._dropout_layer.seed_generator,
            dtype,
            exact=self.exact_dropout_mask,
        )

    @property
    def _drop_threshold(self):
        """The 16-bit threshold below which a weight is dropped (fast mask)."""
        return drop_threshold(self._dropout)

    def _dropout_scale(self):
        """Inverted-dropout factor: 1 / P(keep) of the mask `_dropout_keep_mask` draws."""
        return dropout_scale(self._dropout, exact=self.exact_dropout_mask)

    # -----------------------------------------------------------------------------------------
    # Inspection (for plots such as paper Fig. 7).

    def attention_details(self, query, value, key=None, attention_mask=None):
        """Dense weights, kept-key weights, kept keys for inspection.

        Args:
            query: `[B, T, dim]` query input (before projection).
            value: `[B, S, dim]` value input.
            key: optional key input, defaults to `value`.
            attention_mask: bool/int `[B, T, S]`, True where attention is allowed.

        Returns:
            dict with `dense` and `sparse` `[B, N, T, S]` and `kept` `[B, N, S]` (bool; every
            real key where no key is dropped).
        """
        if key is None:
            key = value
        if not self.built:
            self.build(ops.shape(query), ops.shape(value), ops.shape(key))
        q = self._query_dense(query)
        k = self._key_dense(key)
        dense, sparse, kept = self._attention_weights(
            q, k, None if attention_mask is None else ops.cast(attention_mask, "bool")
        )
        if kept is None:
            kept = ops.ones(ops.shape(dense)[:2] + (ops.shape(dense)[-1],), "bool")
            if attention_mask is not None:
                kept = ops.logical_and(
                    kept, ops.any(ops.cast(attention_mask, "bool"), axis=1)[:, None, :]
                )
        return {"dense": dense, "sparse": sparse, "kept": kept}
