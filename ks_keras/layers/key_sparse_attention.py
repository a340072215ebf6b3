"""Key-sparse multi-head attention (paper Fig. 3, SPEC §2).

After the softmax, each head of each sample scores every key by the total weight all queries
give it (the column sum of the weight matrix), keeps the `k = floor((1 - sparsity) * L)` keys
with the highest scores and zeroes the other columns before multiplying with the values.
"""

from __future__ import annotations

import keras
from keras import ops

# Precision of the keep ratio in the integer computation of k: k = (keep_num * L) // SCALE.
# Integer arithmetic means 0.7 * 10 keeps 7 keys, never 6 (float32 gives 6.9999995).
_KEEP_SCALE = 1_000_000
_LARGE_NEGATIVE = -1e9
K_FROM_CHOICES = ("valid", "padded")


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

    def get_config(self):
        config = super().get_config()
        config.pop("flash_attention", None)
        config.update(
            {
                "sparsity": self.sparsity,
                "k_from": self.k_from,
                "renormalize": self.renormalize,
                "query_mask_in_scores": self.query_mask_in_scores,
            }
        )
        return config

    # -----------------------------------------------------------------------------------------
    # The attention-score step (the only part that differs from stock MultiHeadAttention).

    def _attention_weights(self, query, key, attention_mask):
        """Dense and key-sparse weights plus the kept-key mask, all float32.

        Args:
            query: projected queries `[B, T, N, H]`.
            key: projected keys `[B, S, N, H]`.
            attention_mask: bool `[B, T, S]` or None.

        Returns:
            `(dense [B, N, T, S], sparse [B, N, T, S], kept [B, N, S] bool)`.
        """
        # Scores and softmax in float32 whatever the layer's compute dtype (mixed precision).
        query = ops.cast(query, "float32")
        key = ops.cast(key, "float32")
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, "float32"))
        logits = ops.einsum(self._dot_product_equation, key, query)  # [B, N, T, S]

        if attention_mask is None:
            pair_mask = None
            key_valid = None
            query_valid = None
        else:
            pair_mask = ops.cast(attention_mask, "bool")  # [B, T, S]
            key_valid = ops.any(pair_mask, axis=1)  # [B, S]
            query_valid = ops.any(pair_mask, axis=2)  # [B, T]

        if pair_mask is not None and not self.query_mask_in_scores:
            # Authors' behaviour: every query row (padding included) distributes its weight over
            # the real keys and votes with it.
            softmax_mask = ops.expand_dims(ops.expand_dims(key_valid, 1), 1)  # [B, 1, 1, S]
        elif pair_mask is not None:
            softmax_mask = ops.expand_dims(pair_mask, 1)  # [B, 1, T, S]
        else:
            softmax_mask = None

        if softmax_mask is not None:
            logits = ops.where(softmax_mask, logits, _LARGE_NEGATIVE)
        dense = ops.softmax(logits, axis=-1)
        if softmax_mask is not None:
            # A row with no valid key gets zeros, not a uniform distribution over padding.
            dense = ops.where(softmax_mask, dense, 0.0)

        if self.sparsity == 0.0:
            return dense, dense, None

        # Column scores: the total weight the (real) queries give each key.
        if query_valid is not None and self.query_mask_in_scores:
            row_weights = ops.cast(query_valid, "float32")[:, None, :, None]  # [B, 1, T, 1]
            col_scores = ops.sum(dense * row_weights, axis=2)  # [B, N, S]
        else:
            col_scores = ops.sum(dense, axis=2)

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
        _, weights, _ = self._attention_weights(query, key, attention_mask)
        weights_out = ops.cast(weights, value.dtype)
        if self._dropout > 0.0:
            dropped = self._dropout_layer(weights_out, training=training)
        else:
            dropped = weights_out
        attention_output = ops.einsum(self._combine_equation, dropped, value)
        return attention_output, weights_out

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
