"""Key-sparse multi-head attention (paper Fig. 3, SPEC §2).

After the softmax, each head of each sample scores every key by the total weight all queries
give it (the column sum of the weight matrix), keeps the `k = floor((1 - sparsity) * L)` keys
with the highest scores and zeroes the other columns before multiplying with the values.

This file holds only that rule (`KeySparseAttention._kept_keys`). Everything else, the
projections, softmax, dropout and the hand-written gradient, is stock multi-head attention
computed by `FastMultiHeadAttention` (ks_keras/layers/fast_attention.py), which calls the rule
through its `_select_keys` hook.
"""

from __future__ import annotations

import keras
from keras import ops

from ks_keras.layers.fast_attention import FastMultiHeadAttention

# Precision of the keep ratio in the integer computation of k: k = (keep_num * L) // SCALE.
# Integer arithmetic means 0.7 * 10 keeps 7 keys, never 6 (float32 gives 6.9999995).
_KEEP_SCALE = 1_000_000
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
class KeySparseAttention(FastMultiHeadAttention):
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
        **kwargs: everything `FastMultiHeadAttention` accepts (`recompute_softmax`,
            `separable_mask`, ...) and `keras.layers.MultiHeadAttention` (value_dim, dropout,
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
        super().__init__(
            num_heads=num_heads,
            key_dim=key_dim,
            query_mask_in_scores=query_mask_in_scores,
            **kwargs,
        )
        self.sparsity = float(sparsity)
        self.k_from = k_from
        self.renormalize = bool(renormalize)
        self._keep_num = round((1.0 - self.sparsity) * _KEEP_SCALE)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"sparsity": self.sparsity, "k_from": self.k_from, "renormalize": self.renormalize}
        )
        return config

    def _select_keys(self, probs, key_valid, voters):
        """The paper's rule where sparsity > 0 (`_kept_keys`); all keys otherwise."""
        if self.sparsity == 0.0:
            return None
        return self._kept_keys(probs, key_valid, voters)

    def _kept_keys(self, probs, key_valid, voters):
        """Bool `[B, N, S]`: the keys whose column score reaches the sample's k-th largest.

        Args:
            probs: float32 attention weights `[B, N, T, S]` after the softmax.
            key_valid: bool `[B, S]` real keys, or None (all real).
            voters: bool `[B, T]` query rows whose weights count, or None (every row; `probs`
                must then be zero on rows that should not vote).
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

    def _k_from_length(self, length):
        """`max(1, floor(keep * length))` for a Python int or an int tensor (exact)."""
        if isinstance(length, int):
            return max(1, (self._keep_num * length) // _KEEP_SCALE)
        length = ops.cast(length, "int64")
        k = ops.floor_divide(length * self._keep_num, _KEEP_SCALE)
        return ops.cast(ops.maximum(k, 1), "int32")
