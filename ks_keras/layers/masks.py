"""Padding-mask helpers shared by the layers (masks are int32/bool `[B, T]`, 1 = real)."""

from __future__ import annotations

from keras import ops


def check_sequence_mask(sequence, mask, name):
    """Raise ValueError when a `[B, T]` mask cannot belong to a `[B, T, D]` sequence."""
    if len(mask.shape) != 2:
        raise ValueError(f"{name}: expected a [batch, time] padding mask, got shape {mask.shape}")
    t_seq, t_mask = sequence.shape[1], mask.shape[1]
    if t_seq is not None and t_mask is not None and t_seq != t_mask:
        raise ValueError(
            f"{name}: mask length {t_mask} does not match the sequence length {t_seq} "
            f"(sequence shape {sequence.shape}, mask shape {mask.shape})"
        )


def pair_mask(query_mask, key_mask, query_len, key_len):
    """Build the `[B, T, S]` bool attention mask from query and key padding masks.

    Either mask may be None (all steps real); returns None when both are.
    """
    if query_mask is None and key_mask is None:
        return None
    if query_mask is None:
        query_mask = ops.ones((ops.shape(key_mask)[0], query_len), "bool")
    if key_mask is None:
        key_mask = ops.ones((ops.shape(query_mask)[0], key_len), "bool")
    q = ops.cast(query_mask, "bool")[:, :, None]
    k = ops.cast(key_mask, "bool")[:, None, :]
    return ops.logical_and(q, k)
