"""Key-sparse multi-head attention (paper Fig. 3, SPEC §2).

After the softmax, each head of each sample scores every key by the total weight all queries
give it (the column sum of the weight matrix), keeps the `k = floor((1 - sparsity) * L)` keys
with the highest scores and zeroes the other columns before multiplying with the values.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from ks_keras.layers.dropout import drop_threshold, keep_mask, keep_scale

# Precision of the keep ratio in the integer computation of k: k = (keep_num * L) // SCALE.
# Integer arithmetic means 0.7 * 10 keeps 7 keys, never 6 (float32 gives 6.9999995).
_KEEP_SCALE = 1_000_000
_LARGE_NEGATIVE = -1e9
K_FROM_CHOICES = ("valid", "padded")
# MultiHeadAttention's einsum equations for [B, T, N, H] inputs (the only layout the
# hand-written gradient handles): scores [B, N, T, S] = K·Q, output [B, T, N, H] = W·V.
_EQUATIONS = ("aecd,abcd->acbe", "acbe,aecd->abcd")


def num_kept_keys(sparsity: float, length: int) -> int:
    """Python twin of the in-graph k: how many of `length` keys survive.

    Args:
        sparsity: fraction of keys zeroed, in [0, 1).
        length: number of keys the ratio applies to.

    Returns:
        `floor((1 - sparsity) * length)`, computed exactly, and at least 1 when `length >= 1`
        (a layer never zeroes every key of a sample).
    """
    keep_num = round((1.0 - sparsity) * _KEEP_SCALE)
    if length <= 0:
        return 0
    return max(1, (keep_num * length) // _KEEP_SCALE)


@keras.saving.register_keras_serializable(package="ks_keras")
class KeySparseAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention that keeps only the most attended keys.

    With `sparsity=0` this is exactly `keras.layers.MultiHeadAttention` (same weights, same
    outputs). Padding is passed as an explicit `attention_mask` `[B, T, S]` (True/1 where query
    t may attend key s), built from the query and key padding masks; key and query validity are
    read back from it (key s is real when any query may attend it, query t is real when it may
    attend any key), so no other mask argument is needed.

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head for query and key.
        sparsity: fraction of keys zeroed per sample and head, in [0, 1); paper 0.5.
        k_from: `"valid"` (default): k counts the sample's real keys; `"padded"`: k counts the
            padded length, as the authors' code does (short inputs are then barely sparsified).
        renormalize: rescale the kept weights of each query row to sum to 1 (default off, as in
            the paper and the authors' code).
        query_mask_in_scores: padded queries get no vote in the key scores and attend nothing
            (default). With False every query row, padding included, attends over the real keys
            and votes with that distribution, as in the authors' code (only outputs at padded
            query positions differ).
        recompute_softmax: in training, recompute the softmax in the backward pass instead of
            keeping it from the forward pass: one `[B, N, T, S]` float32 tensor less per
            layer between the passes for one more scores matmul (same results; default on).
        **kwargs: everything `keras.layers.MultiHeadAttention` accepts (value_dim, dropout,
            output_shape, ...).

    Example:

    >>> layer = KeySparseAttention(num_heads=2, key_dim=8, sparsity=0.5)
    >>> x = np.random.rand(2, 10, 16).astype("float32")
    >>> mask = np.ones((2, 10, 10), bool)
    >>> layer(x, x, attention_mask=mask).shape
    (2, 10, 16)
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        sparsity=0.5,
        k_from="valid",
        renormalize=False,
        query_mask_in_scores=True,
        recompute_softmax=True,
        **kwargs,
    ):
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
            raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(
                f"sparsity: expected the fraction of keys zeroed, in [0, 1), got {sparsity!r}"
            )
        if k_from not in K_FROM_CHOICES:
            raise ValueError(f"k_from: expected one of {K_FROM_CHOICES}, got {k_from!r}")
        if kwargs.get("flash_attention"):
            raise ValueError("flash_attention: not supported by key-sparse attention")
        kwargs["flash_attention"] = False
        super().__init__(num_heads=num_heads, key_dim=key_dim, **kwargs)
        self.sparsity = float(sparsity)
        self.k_from = k_from
        self.renormalize = bool(renormalize)
        self.query_mask_in_scores = bool(query_mask_in_scores)
        self._keep_num = round((1.0 - self.sparsity) * _KEEP_SCALE)
        # Hand-written attention gradient (less memory, fewer ops); False = autodiff (tests).
        self._fused_gradient = True
        # Recompute the softmax in the backward pass instead of keeping it until then: one
        # `[B, N, T, S]` float32 tensor less per layer for one more scores matmul + softmax
        # (at paper size: peak memory -21 %, step time +4 %; docs/performance.md).
        self.recompute_softmax = bool(recompute_softmax)
        # Draw the attention-dropout mask exactly as keras.layers.Dropout (float32 uniforms)
        # instead of from 16-bit random integers (default off: see `_dropout_keep_mask`).
        self._exact_dropout_mask = False
        # Set by `TransformerLayer`, which always passes the outer product of a query and a
        # key padding mask: the key part of the mask then goes into the scores matmul as a
        # bias column instead of a masked copy of the scores (see `_fused_attention`). A
        # caller's arbitrary `[B, T, S]` mask keeps the general path.
        self._separable_mask = False

    def get_config(self):
        config = super().get_config()
        config.pop("flash_attention", None)
        config.update(
            {
                "sparsity": self.sparsity,
                "k_from": self.k_from,
                "renormalize": self.renormalize,
                "query_mask_in_scores": self.query_mask_in_scores,
                "recompute_softmax": self.recompute_softmax,
            }
        )
        return config

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
        gradient is one small matmul per sample plus a sum (measured in docs/performance.md,
        "plain projection matmuls"). Here the inputs
        are flattened to `[B*T, D]` and the kernels read as `[D, N*H]` (`[N*H, D]` for the
        output): the same weights and results, one matmul each way. This route is taken
        when nothing else is asked for (an explicit `attention_mask` or none; no Keras masks,
        scores, causal mask, gate, LoRA or quantisation); anything else takes the stock call.
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
        query_p = _project(self._query_dense, query)  # [B, T, N, H]
        key_p = _project(self._key_dense, key)  # [B, S, N, H]
        value_p = _project(self._value_dense, value)  # [B, S, N, H]
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")
        out, _ = self._compute_attention(query_p, key_p, value_p, attention_mask, training)
        return _project(self._output_dense, out)  # [B, T, D]

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
        equations = ("abc,cde->abde",) * 3 + ("abcd,cde->abe",)
        for dense, equation in zip(layers, equations):
            if dense.equation != equation or dense.activation is not keras.activations.linear:
                return False
            if getattr(dense, "lora_enabled", False) or getattr(dense, "quantization_mode", None):
                return False
        return True

    # -----------------------------------------------------------------------------------------
    # The attention-score step (the only part that differs from stock MultiHeadAttention).
    #
    # Two equivalent routes. `_attention_weights` materialises the dense and key-sparse weight
    # matrices (for `return_attention_scores` and `attention_details`). The default call never
    # builds the sparse matrix: zeroing column s of the weights is the same as zeroing value
    # row s of that head (`W_sparse V = W (kept * V)`), and zeroing a fully masked query row
    # of the weights is the same as zeroing that row of the output; both act on tensors
    # N·T/H times smaller than the `[B, N, T, S]` weights. See docs/performance.md.

    def _masks(self, attention_mask):
        """`(softmax_mask, key_valid [B, S], row_valid [B, T], voters [B, T])`, or Nones.

        `softmax_mask` broadcasts against the `[B, N, T, S]` logits; `row_valid` marks the
        query rows with at least one allowed key (the others get zero weight); `voters` marks
        the rows whose weights count in the column scores (None: every row).
        """
        if attention_mask is None:
            return None, None, None, None
        pair_mask = ops.cast(attention_mask, "bool")  # [B, T, S]
        key_valid = ops.any(pair_mask, axis=1)  # [B, S]
        query_valid = ops.any(pair_mask, axis=2)  # [B, T]
        if self.query_mask_in_scores:
            return ops.expand_dims(pair_mask, 1), key_valid, query_valid, query_valid
        # Authors' behaviour: every query row (padding included) distributes its weight over
        # the real keys and votes with it; only a sample without any real key has empty rows.
        softmax_mask = key_valid[:, None, None, :]  # [B, 1, 1, S]
        any_key = ops.any(key_valid, axis=-1, keepdims=True)  # [B, 1]
        row_valid = ops.broadcast_to(any_key, ops.shape(query_valid))
        return softmax_mask, key_valid, row_valid, None

    def _masked_probs(self, query, key, softmax_mask):
        """Softmax over the keys in float32, whatever the compute dtype; `[B, N, T, S]`.

        Masked keys get weight 0; a row without any allowed key comes out uniform here and is
        zeroed by the caller.
        """
        if query.dtype != "float32":
            query = ops.cast(query, "float32")
        if key.dtype != "float32":
            key = ops.cast(key, "float32")
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, "float32"))
        logits = ops.einsum(self._dot_product_equation, key, query)  # [B, N, T, S]
        if softmax_mask is not None:
            logits = ops.where(softmax_mask, logits, _LARGE_NEGATIVE)
        return ops.softmax(logits, axis=-1)

    def _kept_keys(self, probs, key_valid, voters):
        """Bool `[B, N, S]`: the keys whose column score reaches the sample's k-th largest.

        `probs` must have zero rows wherever `voters` is False, or `voters` must be given.
        """
        with keras.name_scope("key_selection"):
            # No gradient flows through the choice of keys (it is a comparison); saying so keeps
            # the column-score computation out of the backward pass.
            probs = ops.stop_gradient(probs)
            # Column scores: the total weight the voting queries give each key. A batched
            # mat-vec reads the weights once instead of writing a masked copy.
            if voters is not None:
                row_weights = ops.cast(voters, "float32")[:, None, None, :]  # [B, 1, 1, T]
                col_scores = ops.squeeze(ops.matmul(row_weights, probs), axis=2)  # [B, N, S]
            else:
                col_scores = ops.sum(probs, axis=2)

            num_keys = ops.shape(col_scores)[-1]
            if key_valid is not None:
                # Padded keys can never be picked: they rank below every real key (scores >= 0).
                col_scores = ops.where(key_valid[:, None, :], col_scores, -1.0)
                n_valid = ops.sum(ops.cast(key_valid, "int32"), axis=-1)  # [B]
            else:
                n_valid = None

            # k per sample, by integer arithmetic so float rounding cannot drop a key.
            k_max = self._k_from_length(num_keys)
            if self.k_from == "valid" and n_valid is not None:
                k = self._k_from_length(n_valid)  # [B]
            else:
                k = None

            # A threshold from top_k (static k_max when the key length is static; no full sort).
            top_values, _ = ops.top_k(col_scores, k_max, sorted=True)  # [B, N, k_max]
            if k is None:
                threshold = top_values[..., -1:]  # [B, N, 1]
            else:
                # Each sample's k-th largest score; top_k sorted the k_max best, and k <= k_max.
                index = ops.clip(k - 1, 0, k_max - 1)[:, None, None]  # [B, 1, 1]
                threshold = ops.take_along_axis(top_values, index, axis=-1)  # [B, N, 1]
            # Ties at the threshold keep more keys, never fewer.
            kept = ops.greater_equal(col_scores, threshold)
            if key_valid is not None:
                kept = ops.logical_and(kept, key_valid[:, None, :])
            return kept

    def _attention_weights(self, query, key, attention_mask):
        """Dense and key-sparse weights plus the kept-key mask, all float32 (materialised).

        Args:
            query: projected queries `[B, T, N, H]`.
            key: projected keys `[B, S, N, H]`.
            attention_mask: bool `[B, T, S]` or None.

        Returns:
            `(dense [B, N, T, S], sparse [B, N, T, S], kept [B, N, S] bool or None)`.
        """
        softmax_mask, key_valid, row_valid, voters = self._masks(attention_mask)
        dense = self._masked_probs(query, key, softmax_mask)
        if row_valid is not None:
            # A row with no valid key gets zeros, not a uniform distribution over padding.
            dense = dense * ops.cast(row_valid, "float32")[:, None, :, None]
        if self.sparsity == 0.0:
            return dense, dense, None
        # Rows of non-voters are zero in `dense` already, so no voter weighting is needed.
        kept = self._kept_keys(dense, key_valid, None)
        sparse = dense * ops.cast(kept, "float32")[:, :, None, :]
        if self.renormalize:
            total = ops.sum(sparse, axis=-1, keepdims=True)
            sparse = sparse / ops.maximum(total, 1e-12)
        return dense, sparse, kept

    def _k_from_length(self, length):
        """`max(1, floor(keep * length))` for a Python int or an int tensor (exact)."""
        if isinstance(length, int):
            return max(1, (self._keep_num * length) // _KEEP_SCALE)
        length = ops.cast(length, "int64")
        k = ops.floor_divide(length * self._keep_num, _KEEP_SCALE)
        return ops.cast(ops.maximum(k, 1), "int32")

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
            raise ValueError("use_causal_mask: not supported by key-sparse attention")
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
        standard = (self._dot_product_equation, self._combine_equation) == _EQUATIONS
        if self.renormalize or not standard or not self._fused_gradient:
            return self._autodiff_attention(query, key, value, masks, keep), None
        return self._fused_attention(query, key, value, masks, keep), None

    def _dropout_keep_mask(self, shape, dtype):
        """Bool keep mask of the attention-weight dropout, `[B, N, T, S]`.

        Default: 16 random bits per weight (`ks_keras.layers.dropout.keep_mask`): the drop
        probability is the rate rounded to 1/65536 and `_dropout_scale` uses it exactly. With
        `_exact_dropout_mask` the mask is drawn as `keras.layers.Dropout` draws it (a float32
        uniform >= rate), the same mask as stock `MultiHeadAttention` with the same seed.
        """
        seed = self._dropout_layer.seed_generator
        if self._exact_dropout_mask:
            noise = keras.random.uniform(shape, dtype=dtype, seed=seed)
            return ops.greater_equal(noise, ops.cast(self._dropout, dtype))
        return keep_mask(shape, self._dropout, seed)

    @property
    def _drop_threshold(self):
        """The 16-bit threshold below which a weight is dropped (fast mask)."""
        return drop_threshold(self._dropout)

    def _dropout_scale(self):
        """Inverted-dropout factor: 1 / P(keep) of the mask `_dropout_keep_mask` draws."""
        if self._exact_dropout_mask:
            return 1.0 / (1.0 - self._dropout)
        return keep_scale(self._dropout)

    def _kept_values(self, kept, dtype):
        """`[B, N, S]` kept keys as a `[B, S, N, 1]` factor for the values."""
        return ops.cast(ops.transpose(kept, (0, 2, 1)), dtype)[..., None]

    def _dropped(self, weights, keep):
        """Inverted dropout with a given keep mask (as `keras.layers.Dropout` computes it)."""
        if keep is None:
            return weights
        scale = ops.cast(self._dropout_scale(), weights.dtype)
        return ops.where(keep, weights * scale, ops.zeros((), weights.dtype))

    def _autodiff_attention(self, query, key, value, masks, keep):
        """Attention output `[B, T, N, H]` with gradients by automatic differentiation."""
        softmax_mask, key_valid, row_valid, voters = masks
        probs = self._masked_probs(query, key, softmax_mask)
        out_scale = None  # per (sample, query, head) factor applied to the output rows
        if self.sparsity > 0.0:
            kept = self._kept_keys(probs, key_valid, voters)  # [B, N, S]
            value = value * self._kept_values(kept, value.dtype)
            if self.renormalize:
                kept_f = ops.cast(kept, "float32")[..., None]  # [B, N, S, 1]
                total = ops.matmul(probs, kept_f)  # [B, N, T, 1]
                total = ops.transpose(total[..., 0], (0, 2, 1))  # [B, T, N]
                out_scale = 1.0 / ops.maximum(total, 1e-12)
        if row_valid is not None:
            rows = ops.cast(row_valid, "float32")[:, :, None]  # [B, T, 1]
            out_scale = rows if out_scale is None else out_scale * rows
        weights = self._dropped(ops.cast(probs, value.dtype), keep)
        attention_output = ops.einsum(self._combine_equation, weights, value)  # [B, T, N, H]
        if out_scale is not None:
            attention_output = attention_output * ops.cast(out_scale, value.dtype)[..., None]
        return attention_output

    def _fused_attention(self, query, key, value, masks, keep):
        """The same output as `_autodiff_attention`, with a hand-written gradient.

        Automatic differentiation keeps three `[B, N, T, S]` tensors per layer until the
        backward pass (softmax output, dropout mask, dropped weights) and runs about eight
        element-wise passes over such tensors there. Here only the boolean dropout mask is
        kept (and the softmax output with `recompute_softmax` off; by default the backward pass
        recomputes it), and the backward pass makes three passes: the dropout scale is applied
        to `[B, T, N, H]` tensors instead of the weights (the attention product is linear),
        the softmax gradient's row term `sum_s P dP` is computed as `g · output` per query and
        head, and masked keys need no mask (their weight is exactly 0).

        Two more `[B, N, T, S]` passes are folded into the matmuls (each pass over such a
        tensor costs about as much as the scores matmul itself on CPU, which is memory-bound):
        when the mask depends on the key only (the authors' variant, or a separable mask from
        `TransformerLayer`), queries get an extra component 1 and keys the component 0 (real)
        or -1e9 (padding), so the scores matmul yields the masked logits directly; padded
        query rows are zeroed on the output and get no vote, as before. In float32 the
        gradient matmul gets the extra components -`sum_s P dP` and 1, so it yields
        `dP - sum_s P dP` directly.
        """
        softmax_mask, key_valid, row_valid, voters = masks
        key_bias = None
        if softmax_mask is not None and (self._separable_mask or not self.query_mask_in_scores):
            # Only rows without any allowed key differ from the pair mask's softmax; they are
            # zeroed through `row_valid` (and give no vote through `voters`) either way.
            key_bias = ops.where(key_valid, 0.0, _LARGE_NEGATIVE)[:, None, :, None]
        scale = ops.cast(self._inverse_sqrt_key_dim, "float32")
        dtype = value.dtype
        # Per-row output factor: 0 for query rows without any allowed key, times the
        # inverted-dropout scale 1 / (1 - rate).
        factor = None
        if row_valid is not None:
            factor = ops.cast(row_valid, dtype)[:, :, None, None]  # [B, T, 1, 1]
        if keep is not None:
            inv_keep = ops.cast(self._dropout_scale(), dtype)
            factor = inv_keep if factor is None else factor * inv_keep
        zero = ops.zeros((), dtype)

        def heads_first(x):  # [B, T, N, H] <-> [B, N, T, H] (small tensors)
            return ops.transpose(x, (0, 2, 1, 3))

        def softmax_of(qh, kh):
            # Plain batched matmuls in the [B, N, T, *] layout: the [B, N, T, S] tensors are
            # never transposed (Grappler folds the swapaxes below into the matmul's adjoint
            # flags; XLA takes them as dot dimensions). einsum transposed them on CPU.
            logits = ops.matmul(qh, ops.swapaxes(kh, -1, -2))  # [B, N, T, S]
            if softmax_mask is not None and key_bias is None:
                logits = ops.where(softmax_mask, logits, _LARGE_NEGATIVE)
            return ops.softmax(logits, axis=-1)

        def with_key_bias(qh, kh, later=0.0):
            # [B, N, T, H+1] and [B, N, S, H+1]: the extra product is the key's mask bias.
            # Built again in the backward pass (`later`: see `grad`) rather than kept from the
            # forward pass: two [B, N, *, H+1] tensors less per layer between the passes.
            if key_bias is None:
                return qh, kh
            qa = ops.concatenate([qh, ops.ones_like(qh[..., :1])], axis=-1)
            bias = ops.zeros_like(kh[..., :1]) + (key_bias + later)
            return qa, ops.concatenate([kh, bias], axis=-1)

        def kept_weights(probs, fill=zero):
            weights = ops.cast(probs, dtype)
            return weights if keep is None else ops.where(keep, weights, fill)

        @ops.custom_gradient
        def attend(query, key, value):
            q32 = query if query.dtype == "float32" else ops.cast(query, "float32")
            k32 = key if key.dtype == "float32" else ops.cast(key, "float32")
            qh = heads_first(q32 * scale)  # [B, N, T, H]
            kh = heads_first(k32)  # [B, N, S, H]
            probs = softmax_of(*with_key_bias(qh, kh))
            vh = heads_first(value)  # [B, N, S, H]
            kept_f = None
            if self.sparsity > 0.0:
                kept = self._kept_keys(probs, key_valid, voters)  # [B, N, S]
                kept_f = ops.cast(kept, dtype)[..., None]  # [B, N, S, 1]
                vh = vh * kept_f
            out = heads_first(ops.matmul(kept_weights(probs), vh))  # [B, T, N, H]
            if factor is not None:
                out = out * factor
            saved_probs = None if self.recompute_softmax else probs

            def grad(d_out, variables=None):
                with keras.name_scope("ks_attention_grad"):
                    # A zero computed from the incoming gradient. TF runs an op as soon as its
                    # inputs exist, so backward work that reads only forward tensors (the
                    # dropped weights, a recomputed softmax) would run during the forward pass
                    # and hold a [B, N, T, S] tensor per layer until the backward pass reaches
                    # it. Adding this zero makes that work wait for the gradient. (0 for any
                    # finite or infinite gradient; NaN only where the gradient is NaN anyway.)
                    later = ops.minimum(ops.min(ops.abs(ops.cast(d_out, "float32"))), 0.0)
                    if saved_probs is not None:
                        probs = saved_probs
                    else:
                        qa, ka = with_key_bias(qh + later, kh, later)
                        probs = softmax_of(qa, ka)
                    g = d_out if factor is None else d_out * factor
                    gh = heads_first(g)  # [B, N, T, H]
                    weights = kept_weights(probs, ops.cast(later, dtype))
                    d_vh = ops.matmul(ops.swapaxes(weights, -1, -2), gh)  # [B, N, S, H]
                    if kept_f is not None:
                        d_vh = d_vh * kept_f
                    # Softmax: dL = P * (dP - sum_s P dP). In float32 the sum is computed as
                    # d_out · out per query and head (out is linear in P), on tensors H/S
                    # times smaller, and subtracted inside the matmul that gives dP; in half
                    # precision `out` is too coarse for that.
                    if dtype == "float32":
                        row_dot = ops.sum(d_out * out, axis=-1)  # [B, T, N]
                        row_dot = ops.transpose(row_dot, (0, 2, 1))[..., None]  # [B, N, T, 1]
                        ga = ops.concatenate([gh, -row_dot], axis=-1)  # [B, N, T, H+1]
                        ones = ops.ones_like(vh[..., :1]) + ops.cast(later, dtype)
                        va = ops.concatenate([vh, ones], axis=-1)
                        shifted = ops.matmul(ga, ops.swapaxes(va, -1, -2))  # dP - row_dot
                        if keep is not None:
                            # A dropped weight has dP = 0.
                            shifted = ops.where(keep, shifted, -row_dot)
                    else:
                        d_weights = ops.matmul(gh, ops.swapaxes(vh, -1, -2))  # [B, N, T, S]
                        if keep is not None:
                            d_weights = ops.where(keep, d_weights, zero)
                        d_probs = ops.cast(d_weights, "float32")
                        row_dot = ops.sum(d_probs * probs, axis=-1, keepdims=True)
                        shifted = d_probs - row_dot
                    d_logits = probs * shifted  # [B, N, T, S]
                    d_qh = ops.matmul(d_logits, kh) * scale  # [B, N, T, H]
                    d_kh = ops.matmul(ops.swapaxes(d_logits, -1, -2), qh)  # [B, N, S, H]
                    grads = (
                        ops.cast(heads_first(d_qh), query.dtype),
                        ops.cast(heads_first(d_kh), key.dtype),
                        ops.cast(heads_first(d_vh), dtype),
                    )
                if variables is not None:
                    return grads, [None] * len(variables)
                return grads

            return out, grad

        return attend(query, key, value)

    # -----------------------------------------------------------------------------------------
    # Inspection (for plots such as paper Fig. 7).

    def attention_details(self, query, value, key=None, attention_mask=None):
        """Dense weights, key-sparse weights, kept keys and column scores for inspection.

        Args:
            query: `[B, T, dim]` query input (before projection).
            value: `[B, S, dim]` value input.
            key: optional key input, defaults to `value`.
            attention_mask: bool/int `[B, T, S]`, True where attention is allowed.

        Returns:
            dict with `dense` and `sparse` `[B, N, T, S]` and `kept` `[B, N, S]` (bool; all True
            where sparsity is 0).
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


def _project(dense, x):
    """`dense(x)` for an `EinsumDense` that maps the last (`abc,cde->abde`) or the last two
    (`abcd,cde->abe`) axes of `x`, as one 2-D matmul on the flattened input."""
    kernel = dense.kernel
    n_in = 1 if dense.equation == "abc,cde->abde" else 2  # kernel axes read from `x`
    in_shape = tuple(kernel.shape[:n_in])
    out_shape = tuple(kernel.shape[n_in:])
    lead = ops.shape(x)[: len(x.shape) - n_in]
    flat_in = math.prod(in_shape)
    y = ops.matmul(ops.reshape(x, (-1, flat_in)), ops.reshape(kernel, (flat_in, -1)))
    if dense.bias is not None:
        y = y + ops.reshape(dense.bias, (-1,))
    return ops.reshape(y, (*lead, *out_shape))
