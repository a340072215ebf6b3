"""Attention kernels as pure functions: every setting is an explicit argument.

The speed work behind `FastMultiHeadAttention` (ks_keras/layers/fast_attention.py): plain 2-D
projection matmuls, masks read back from one `[B, T, S]` attention mask, the float32 softmax,
16-bit dropout masks, and two routes to the attention output: `autodiff_attention` (gradients
by automatic differentiation) and `fused_attention` (the same output with a hand-written
gradient). Both take an optional `select_keys` step, through which `KeySparseAttention` zeroes
the keys it does not keep. Measurements: docs/performance.md.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from ks_keras.layers.dropout import keep_mask, keep_scale

LARGE_NEGATIVE = -1e9
# MultiHeadAttention's einsum equations for [B, T, N, H] inputs (the only layout the
# hand-written gradient handles): scores [B, N, T, S] = K·Q, output [B, T, N, H] = W·V.
STANDARD_EQUATIONS = ("aecd,abcd->acbe", "acbe,aecd->abcd")


def project(dense, x):
    """`dense(x)` for an `EinsumDense` that maps the last (`abc,cde->abde`) or the last two
    (`abcd,cde->abe`) axes of `x`, as one 2-D matmul on the flattened input."""
    kernel = dense.kernel
    n_in = 1 if dense.equation == "abc,cde->abde" else 2  # kernel axes read from `x`
    in_shape = tuple(kernel.shape[:n_in])
    out_shape = tuple(kernel.shape[n_in:])
    lead = ops.shape(x)[: len(x.shape) - n_in]
    flat_in = math.prod(in_shape)
    # Under the sublayer's name (`query`, `key`, `value`, `attention_output`), as stock
    # EinsumDense ops are: profiles tell projections from the attention core by it.
    with keras.name_scope(dense.name):
        y = ops.matmul(ops.reshape(x, (-1, flat_in)), ops.reshape(kernel, (flat_in, -1)))
        if dense.bias is not None:
            y = y + ops.reshape(dense.bias, (-1,))
        return ops.reshape(y, (*lead, *out_shape))


def attention_masks(attention_mask, query_mask_in_scores=True):
    """`(softmax_mask, key_valid [B, S], row_valid [B, T], voters [B, T])`, or Nones.

    Args:
        attention_mask: bool/int `[B, T, S]` (True where query t may attend key s) or None.
            Key s is real when any query may attend it, query t when it may attend any key.
        query_mask_in_scores: True: padded query rows attend nothing and (for key selection)
            give no vote. False (the authors' code): every query row, padding included,
            attends over the real keys and votes with that distribution.

    Returns:
        `softmax_mask` broadcasts against the `[B, N, T, S]` logits; `row_valid` marks the
        query rows with at least one allowed key (the others get zero weight); `voters` marks
        the rows whose weights count in key scores (None: every row).
    """
    if attention_mask is None:
        return None, None, None, None
    pair_mask = ops.cast(attention_mask, "bool")  # [B, T, S]
    key_valid = ops.any(pair_mask, axis=1)  # [B, S]
    query_valid = ops.any(pair_mask, axis=2)  # [B, T]
    if query_mask_in_scores:
        return ops.expand_dims(pair_mask, 1), key_valid, query_valid, query_valid
    softmax_mask = key_valid[:, None, None, :]  # [B, 1, 1, S]
    any_key = ops.any(key_valid, axis=-1, keepdims=True)  # [B, 1]
    row_valid = ops.broadcast_to(any_key, ops.shape(query_valid))
    return softmax_mask, key_valid, row_valid, None


def masked_softmax(query, key, scale, dot_equation, softmax_mask):
    """Attention weights `[B, N, T, S]` in float32, whatever the compute dtype.

    Masked keys get weight 0; a row without any allowed key comes out uniform here and is
    zeroed by the caller.
    """
    if query.dtype != "float32":
        query = ops.cast(query, "float32")
    if key.dtype != "float32":
        key = ops.cast(key, "float32")
    query = ops.multiply(query, ops.cast(scale, "float32"))
    logits = ops.einsum(dot_equation, key, query)  # [B, N, T, S]
    if softmax_mask is not None:
        logits = ops.where(softmax_mask, logits, LARGE_NEGATIVE)
    return ops.softmax(logits, axis=-1)


def dropout_keep_mask(shape, rate, seed_generator, dtype, exact=False):
    """Bool keep mask of the attention-weight dropout, `[B, N, T, S]`.

    Default: 16 random bits per weight (`ks_keras.layers.dropout.keep_mask`): the drop
    probability is the rate rounded to 1/65536 and `dropout_scale` uses it exactly. With
    `exact` the mask is drawn as `keras.layers.Dropout` draws it (a float32 uniform >= rate),
    the same mask as stock `MultiHeadAttention` with the same seed.
    """
    if exact:
        noise = keras.random.uniform(shape, dtype=dtype, seed=seed_generator)
        return ops.greater_equal(noise, ops.cast(rate, dtype))
    return keep_mask(shape, rate, seed_generator)


def dropout_scale(rate, exact=False):
    """Inverted-dropout factor: 1 / P(keep) of the mask `dropout_keep_mask` draws."""
    return 1.0 / (1.0 - rate) if exact else keep_scale(rate)


def kept_value_factor(kept, dtype):
    """`[B, N, S]` kept keys as a `[B, S, N, 1]` factor for the values."""
    return ops.cast(ops.transpose(kept, (0, 2, 1)), dtype)[..., None]


def apply_dropout(weights, keep, scale):
    """Inverted dropout with a given keep mask (as `keras.layers.Dropout` computes it)."""
    if keep is None:
        return weights
    scale = ops.cast(scale, weights.dtype)
    return ops.where(keep, weights * scale, ops.zeros((), weights.dtype))


def autodiff_attention(
    query,
    key,
    value,
    masks,
    keep,
    *,
    scale,
    drop_scale,
    equations,
    select_keys=None,
    renormalize=False,
):
    """Attention output `[B, T, N, H]` with gradients by automatic differentiation.

    Args:
        query, key, value: projected `[B, T, N, H]` / `[B, S, N, H]` tensors.
        masks: `attention_masks(...)`.
        keep: bool dropout keep mask `[B, N, T, S]` or None (no dropout).
        scale: `1 / sqrt(key_dim)`.
        drop_scale: inverted-dropout factor for `keep`.
        equations: `(dot_product_equation, combine_equation)` of the layer.
        select_keys: None, or `f(probs, key_valid, voters) -> bool [B, N, S]`: the keys each
            sample and head keeps (the others' weights are zeroed).
        renormalize: rescale the kept weights of each query row to sum to 1.
    """
    softmax_mask, key_valid, row_valid, voters = masks
    dot_equation, combine_equation = equations
    probs = masked_softmax(query, key, scale, dot_equation, softmax_mask)
    out_scale = None  # per (sample, query, head) factor applied to the output rows
    kept = None if select_keys is None else select_keys(probs, key_valid, voters)
    if kept is not None:
        value = value * kept_value_factor(kept, value.dtype)
        if renormalize:
            kept_f = ops.cast(kept, "float32")[..., None]  # [B, N, S, 1]
            total = ops.matmul(probs, kept_f)  # [B, N, T, 1]
            total = ops.transpose(total[..., 0], (0, 2, 1))  # [B, T, N]
            out_scale = 1.0 / ops.maximum(total, 1e-12)
    if row_valid is not None:
        rows = ops.cast(row_valid, "float32")[:, :, None]  # [B, T, 1]
        out_scale = rows if out_scale is None else out_scale * rows
    weights = apply_dropout(ops.cast(probs, value.dtype), keep, drop_scale)
    attention_output = ops.einsum(combine_equation, weights, value)  # [B, T, N, H]
    if out_scale is not None:
        attention_output = attention_output * ops.cast(out_scale, value.dtype)[..., None]
    return attention_output


def _heads_first(x):
    """`[B, T, N, H]` <-> `[B, N, T, H]` (small tensors)."""
    return ops.transpose(x, (0, 2, 1, 3))


def _softmax_of(qh, kh, logit_mask):
    """Float32 softmax of `qh · khᵀ` `[B, N, T, S]`, masked by `logit_mask` unless None.

    Plain batched matmuls in the `[B, N, T, *]` layout: the `[B, N, T, S]` tensors are never
    transposed (Grappler folds the swapaxes into the matmul's adjoint flags; XLA takes them as
    dot dimensions). einsum transposed them on CPU.
    """
    logits = ops.matmul(qh, ops.swapaxes(kh, -1, -2))  # [B, N, T, S]
    if logit_mask is not None:
        logits = ops.where(logit_mask, logits, LARGE_NEGATIVE)
    return ops.softmax(logits, axis=-1)


def _with_key_bias(qh, kh, key_bias, later=0.0):
    """`[B, N, T, H+1]` and `[B, N, S, H+1]`: the extra product is the key's mask bias.

    Built again in the backward pass (`later`: see `fused_attention`'s gradient) rather than
    kept from the forward pass: two `[B, N, *, H+1]` tensors less per layer between the passes.
    """
    if key_bias is None:
        return qh, kh
    qa = ops.concatenate([qh, ops.ones_like(qh[..., :1])], axis=-1)
    bias = ops.zeros_like(kh[..., :1]) + (key_bias + later)
    return qa, ops.concatenate([kh, bias], axis=-1)


def _kept_weights(probs, keep, dtype, fill):
    """The softmax weights in `dtype` with dropped weights set to `fill` (no scaling)."""
    weights = ops.cast(probs, dtype)
    return weights if keep is None else ops.where(keep, weights, fill)


def _softmax_logits_gradient(d_out, out, gh, vh, probs, keep, later):
    """Gradient of the logits `[B, N, T, S]`: `P * (dP - sum_s P dP)`.

    In float32 the row term `sum_s P dP` is computed as `d_out · out` per query and head (`out`
    is linear in P), on tensors H/S times smaller, and subtracted inside the matmul that gives
    dP; in half precision `out` is too coarse for that. A dropped weight has dP = 0.
    """
    dtype = vh.dtype
    if dtype == "float32":
        row_dot = ops.sum(d_out * out, axis=-1)  # [B, T, N]
        row_dot = ops.transpose(row_dot, (0, 2, 1))[..., None]  # [B, N, T, 1]
        ga = ops.concatenate([gh, -row_dot], axis=-1)  # [B, N, T, H+1]
        ones = ops.ones_like(vh[..., :1]) + ops.cast(later, dtype)
        va = ops.concatenate([vh, ones], axis=-1)
        shifted = ops.matmul(ga, ops.swapaxes(va, -1, -2))  # dP - row_dot
        if keep is not None:
            shifted = ops.where(keep, shifted, -row_dot)
    else:
        d_weights = ops.matmul(gh, ops.swapaxes(vh, -1, -2))  # [B, N, T, S]
        if keep is not None:
            d_weights = ops.where(keep, d_weights, ops.zeros((), dtype))
        d_probs = ops.cast(d_weights, "float32")
        row_dot = ops.sum(d_probs * probs, axis=-1, keepdims=True)
        shifted = d_probs - row_dot
    return probs * shifted  # [B, N, T, S]


def fused_attention(
    query,
    key,
    value,
    masks,
    keep,
    *,
    scale,
    drop_scale,
    fold_key_mask,
    recompute_softmax=True,
    select_keys=None,
):
    """The same output as `autodiff_attention` (no renormalisation), with a hand-written
    gradient.

    Automatic differentiation keeps three `[B, N, T, S]` tensors per layer until the backward
    pass (softmax output, dropout mask, dropped weights) and runs about eight element-wise
    passes over such tensors there. Here only the boolean dropout mask is kept (and the
    softmax output when `recompute_softmax` is off; by default the backward pass recomputes
    it), and the backward pass makes three passes: the dropout scale is applied to
    `[B, T, N, H]` tensors instead of the weights (the attention product is linear), the
    softmax gradient's row term `sum_s P dP` is computed as `g · output` per query and head,
    and masked keys need no mask (their weight is exactly 0).

    Two more `[B, N, T, S]` passes are folded into the matmuls (each pass over such a tensor
    costs about as much as the scores matmul itself on CPU, which is memory-bound). With
    `fold_key_mask` (allowed when the mask depends on the key only: the authors' variant, or
    an outer product of padding masks), queries get an extra component 1 and keys the
    component 0 (real) or -1e9 (padding), so the scores matmul yields the masked logits
    directly; padded query rows are zeroed on the output and get no vote, as before. In
    float32 the gradient matmul gets the extra components -`sum_s P dP` and 1, so it yields
    `dP - sum_s P dP` directly.

    Args:
        query, key, value, masks, keep, scale, drop_scale, select_keys: as for
            `autodiff_attention`; the layer's equations must be `STANDARD_EQUATIONS`.
        fold_key_mask: put the key part of the mask into the scores matmul (see above).
        recompute_softmax: recompute the softmax in the backward pass instead of keeping it.
    """
    softmax_mask, key_valid, row_valid, voters = masks
    key_bias = None
    if softmax_mask is not None and fold_key_mask:
        # Only rows without any allowed key differ from the pair mask's softmax; they are
        # zeroed through `row_valid` (and give no vote through `voters`) either way.
        key_bias = ops.where(key_valid, 0.0, LARGE_NEGATIVE)[:, None, :, None]
    scale = ops.cast(scale, "float32")
    dtype = value.dtype
    # Per-row output factor: 0 for query rows without any allowed key, times the
    # inverted-dropout scale 1 / (1 - rate).
    factor = None
    if row_valid is not None:
        factor = ops.cast(row_valid, dtype)[:, :, None, None]  # [B, T, 1, 1]
    if keep is not None:
        inv_keep = ops.cast(drop_scale, dtype)
        factor = inv_keep if factor is None else factor * inv_keep
    zero = ops.zeros((), dtype)
    # Without the folded key bias the logits are masked inside the softmax.
    logit_mask = softmax_mask if key_bias is None else None

    @ops.custom_gradient
    def attend(query, key, value):
        q32 = query if query.dtype == "float32" else ops.cast(query, "float32")
        k32 = key if key.dtype == "float32" else ops.cast(key, "float32")
        qh = _heads_first(q32 * scale)  # [B, N, T, H]
        kh = _heads_first(k32)  # [B, N, S, H]
        probs = _softmax_of(*_with_key_bias(qh, kh, key_bias), logit_mask)
        vh = _heads_first(value)  # [B, N, S, H]
        kept_f = None
        kept = None if select_keys is None else select_keys(probs, key_valid, voters)
        if kept is not None:
            kept_f = ops.cast(kept, dtype)[..., None]  # [B, N, S, 1]
            vh = vh * kept_f
        weights = _kept_weights(probs, keep, dtype, zero)
        out = _heads_first(ops.matmul(weights, vh))  # [B, T, N, H]
        if factor is not None:
            out = out * factor
        saved_probs = None if recompute_softmax else probs

        def grad(d_out, variables=None):
            with keras.name_scope("ks_attention_grad"):
                # A zero computed from the incoming gradient. TF runs an op as soon as its
                # inputs exist, so backward work that reads only forward tensors (the dropped
                # weights, a recomputed softmax) would run during the forward pass and hold a
                # [B, N, T, S] tensor per layer until the backward pass reaches it. Adding this
                # zero makes that work wait for the gradient. (0 for any finite or infinite
                # gradient; NaN only where the gradient is NaN anyway.)
                later = ops.minimum(ops.min(ops.abs(ops.cast(d_out, "float32"))), 0.0)
                if saved_probs is not None:
                    probs = saved_probs
                else:
                    qa, ka = _with_key_bias(qh + later, kh, key_bias, later)
                    probs = _softmax_of(qa, ka, logit_mask)
                g = d_out if factor is None else d_out * factor
                gh = _heads_first(g)  # [B, N, T, H]
                weights = _kept_weights(probs, keep, dtype, ops.cast(later, dtype))
                d_vh = ops.matmul(ops.swapaxes(weights, -1, -2), gh)  # [B, N, S, H]
                if kept_f is not None:
                    d_vh = d_vh * kept_f
                d_logits = _softmax_logits_gradient(d_out, out, gh, vh, probs, keep, later)
                d_qh = ops.matmul(d_logits, kh) * scale  # [B, N, T, H]
                d_kh = ops.matmul(ops.swapaxes(d_logits, -1, -2), qh)  # [B, N, S, H]
                grads = (
                    ops.cast(_heads_first(d_qh), query.dtype),
                    ops.cast(_heads_first(d_kh), key.dtype),
                    ops.cast(_heads_first(d_vh), dtype),
                )
            if variables is not None:
                return grads, [None] * len(variables)
            return grads

        return out, grad

    return attend(query, key, value)
