"""KeySparseAttention against a plain numpy reference of SPEC §2, and stock-MHA parity."""

import itertools
import math
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf

from ks_keras.layers import KeySparseAttention, num_kept_keys

B, T, S, D, HEADS = 3, 7, 9, 16, 2
HEAD_DIM = D // HEADS


def _masks(rng, t=T, s=S):
    """Query/key padding masks with different real lengths per sample (at least 1)."""
    q_len = np.array([t, max(1, t - 3), 2])
    k_len = np.array([s, 5, max(2, s - 2)])
    qm = (np.arange(t)[None, :] < q_len[:, None]).astype("int32")
    km = (np.arange(s)[None, :] < k_len[:, None]).astype("int32")
    return qm, km


def _pair(qm, km):
    return (qm[:, :, None] & km[:, None, :]).astype(bool)


def _expected_k(sparsity, length):
    keep = Fraction(str(round(1.0 - sparsity, 6)))
    return max(1, math.floor(keep * length)) if length > 0 else 0


def reference(layer, query, value, qm, km, sparsity, k_from, renormalize, qmask_in_scores):
    """Plain numpy KS attention with the layer's projection weights (SPEC §2)."""
    wq, bq = (w.numpy() for w in layer._query_dense.weights)
    wk, bk = (w.numpy() for w in layer._key_dense.weights)
    wv, bv = (w.numpy() for w in layer._value_dense.weights)
    wo, bo = (w.numpy() for w in layer._output_dense.weights)
    out = np.zeros(query.shape[:2] + (wo.shape[-1],), np.float64)
    kept_all = np.zeros((query.shape[0], HEADS, value.shape[1]), bool)
    for b in range(query.shape[0]):
        q = np.einsum("td,dnh->tnh", query[b], wq) + bq
        k = np.einsum("sd,dnh->snh", value[b], wk) + bk
        v = np.einsum("sd,dnh->snh", value[b], wv) + bv
        heads = np.zeros((query.shape[1], HEADS, HEAD_DIM))
        for n in range(HEADS):
            logits = q[:, n] @ k[:, n].T / math.sqrt(HEAD_DIM)
            if qmask_in_scores:
                allowed = qm[b][:, None].astype(bool) & km[b][None, :].astype(bool)
            else:
                allowed = np.broadcast_to(km[b][None, :].astype(bool), logits.shape)
            w = np.zeros_like(logits)
            for t in range(logits.shape[0]):
                if allowed[t].any():
                    z = np.where(allowed[t], logits[t], -np.inf)
                    e = np.exp(z - z.max())
                    w[t] = e / e.sum()
            if sparsity > 0:
                voters = qm[b].astype(bool) if qmask_in_scores else np.ones(len(w), bool)
                col = w[voters].sum(axis=0)
                valid = km[b].astype(bool)
                length = valid.sum() if k_from == "valid" else len(valid)
                kk = _expected_k(sparsity, length)
                ranked = np.sort(col[valid])[::-1]
                threshold = ranked[kk - 1] if kk <= len(ranked) else -np.inf
                keep = (col >= threshold) & valid
                w = w * keep[None, :]
                kept_all[b, n] = keep
                if renormalize:
                    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
            heads[:, n] = w @ v[:, n]
        out[b] = np.einsum("tnh,nhd->td", heads, wo) + bo
    return out, kept_all


def _layer(**kwargs):
    layer = KeySparseAttention(num_heads=HEADS, key_dim=HEAD_DIM, **kwargs)
    layer.build((None, T, D), (None, S, D))
    return layer


OPTIONS = list(
    itertools.product([0.0, 0.3, 0.5, 0.7], ["valid", "padded"], [False, True], [True, False])
)


@pytest.mark.parametrize("sparsity,k_from,renormalize,qmask_in_scores", OPTIONS)
def test_matches_numpy_reference(sparsity, k_from, renormalize, qmask_in_scores):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(B, T, D)).astype("float32")
    value = rng.normal(size=(B, S, D)).astype("float32")
    qm, km = _masks(rng)
    layer = _layer(
        sparsity=sparsity,
        k_from=k_from,
        renormalize=renormalize,
        query_mask_in_scores=qmask_in_scores,
    )
    got = layer(query, value, attention_mask=_pair(qm, km)).numpy()
    want, kept = reference(
        layer, query, value, qm, km, sparsity, k_from, renormalize, qmask_in_scores
    )
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    if sparsity > 0:
        details = layer.attention_details(query, value, attention_mask=_pair(qm, km))
        np.testing.assert_array_equal(details["kept"].numpy(), kept)


def test_sparsity_zero_is_stock_multi_head_attention():
    rng = np.random.default_rng(1)
    query = rng.normal(size=(B, T, D)).astype("float32")
    value = rng.normal(size=(B, S, D)).astype("float32")
    qm, km = _masks(rng)
    ks = _layer(sparsity=0.0)
    stock = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    stock.build((None, T, D), (None, S, D))
    stock.set_weights(ks.get_weights())
    mask = _pair(qm, km)
    got = ks(query, value, attention_mask=mask).numpy()
    # Stock MHA's explicit-score path (the one our override replaces): equal everywhere.
    want, _ = stock(query, value, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    # Its fused dot-product path differs only at padded query rows (there it spreads a
    # fully masked row uniformly; we give such rows zero weight): real positions agree.
    fused = stock(query, value, attention_mask=mask).numpy()
    real = qm.astype(bool)
    np.testing.assert_allclose(got[real], fused[real], atol=1e-6)
    # And without any mask.
    np.testing.assert_allclose(ks(query, value).numpy(), stock(query, value).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "sparsity,length", [(0.5, 10), (0.7, 10), (0.3, 10), (0.5, 460), (0.9, 7), (0.25, 13)]
)
def test_exactly_floor_keys_survive(sparsity, length):
    rng = np.random.default_rng(2)
    query = rng.normal(size=(2, 5, D)).astype("float32")
    value = rng.normal(size=(2, length, D)).astype("float32")
    layer = KeySparseAttention(num_heads=HEADS, key_dim=HEAD_DIM, sparsity=sparsity)
    details = layer.attention_details(query, value)
    counts = details["kept"].numpy().sum(axis=-1)
    # floor((1 - sparsity) * L), but never zero keys (0.1 * 7 keeps 1, not 0).
    expected = max(1, math.floor(Fraction(str(round(1 - sparsity, 6))) * length))
    assert num_kept_keys(sparsity, length) == expected
    np.testing.assert_array_equal(counts, np.full((2, HEADS), expected))
    # Zeroed columns really are zero in the sparse weights.
    sparse = details["sparse"].numpy()
    dropped = ~details["kept"].numpy()
    assert np.all(sparse.transpose(0, 1, 3, 2)[dropped] == 0)


def test_k_counts_valid_keys_not_padding():
    rng = np.random.default_rng(3)
    query = rng.normal(size=(1, 4, D)).astype("float32")
    value = rng.normal(size=(1, 20, D)).astype("float32")
    km = (np.arange(20) < 8).astype("int32")[None]
    qm = np.ones((1, 4), "int32")
    for k_from, expected in (("valid", 4), ("padded", 8)):  # padded: 10 > 8 real → all kept
        layer = KeySparseAttention(num_heads=HEADS, key_dim=HEAD_DIM, sparsity=0.5, k_from=k_from)
        kept = layer.attention_details(query, value, attention_mask=_pair(qm, km))["kept"]
        np.testing.assert_array_equal(kept.numpy().sum(-1), [[expected] * HEADS])
        assert not kept.numpy()[..., 8:].any()


def test_float_rounding_cannot_drop_a_key():
    # 0.7 * 10 in float32 is 6.9999995; k must still be 7 keep-keys for sparsity 0.3.
    assert num_kept_keys(0.3, 10) == 7
    assert num_kept_keys(0.7, 10) == 3
    assert num_kept_keys(0.5, 1) == 1
    assert num_kept_keys(0.5, 0) == 0


def test_ties_keep_more_keys():
    # Identical keys give identical column scores: every tied key survives.
    query = np.random.default_rng(4).normal(size=(1, 3, D)).astype("float32")
    value = np.ones((1, 6, D), "float32")
    layer = KeySparseAttention(num_heads=HEADS, key_dim=HEAD_DIM, sparsity=0.5)
    kept = layer.attention_details(query, value)["kept"].numpy()
    assert kept.sum() == 6 * HEADS


def test_padded_values_cannot_change_real_outputs():
    rng = np.random.default_rng(5)
    query = rng.normal(size=(B, T, D)).astype("float32")
    value = rng.normal(size=(B, S, D)).astype("float32")
    qm, km = _masks(rng)
    for qmask_in_scores in (True, False):
        layer = _layer(sparsity=0.5, query_mask_in_scores=qmask_in_scores)
        base = layer(query, value, attention_mask=_pair(qm, km)).numpy()
        value2 = np.where(km[:, :, None] == 1, value, 1e3 * rng.normal(size=value.shape))
        query2 = np.where(qm[:, :, None] == 1, query, 1e3 * rng.normal(size=query.shape))
        query2 = query2.astype("float32")
        if qmask_in_scores:
            # Padded queries get no vote: changing them changes no real output.
            moved = layer(query2, value2.astype("float32"), attention_mask=_pair(qm, km)).numpy()
        else:
            # Authors' variant: padded queries vote, so only padded keys are changed here.
            moved = layer(query, value2.astype("float32"), attention_mask=_pair(qm, km)).numpy()
        real = qm.astype(bool)
        np.testing.assert_allclose(moved[real], base[real], atol=1e-5)


def test_query_padding_has_no_vote_by_default():
    # Make the padded query rows attend one key very strongly; with the default they must not
    # change which keys are kept.
    rng = np.random.default_rng(6)
    query = rng.normal(size=(1, 6, D)).astype("float32")
    value = rng.normal(size=(1, 8, D)).astype("float32")
    qm = np.array([[1, 1, 1, 0, 0, 0]], "int32")
    km = np.ones((1, 8), "int32")
    layer = _layer(sparsity=0.5)
    kept = layer.attention_details(query, value, attention_mask=_pair(qm, km))["kept"].numpy()
    query2 = query.copy()
    query2[0, 3:] = 50.0 * rng.normal(size=(3, D))
    kept2 = layer.attention_details(query2, value, attention_mask=_pair(qm, km))["kept"].numpy()
    np.testing.assert_array_equal(kept, kept2)


def test_gradients_are_finite_with_padding_and_empty_sample():
    rng = np.random.default_rng(7)
    query = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    value = tf.constant(rng.normal(size=(B, S, D)).astype("float32"))
    qm, km = _masks(rng)
    km[2] = 0  # a sample with no real key at all
    layer = _layer(sparsity=0.5, dropout=0.1)
    with tf.GradientTape() as tape:
        tape.watch([query, value])
        out = layer(query, value, attention_mask=_pair(qm, km), training=True)
        loss = tf.reduce_sum(out**2)
    grads = tape.gradient(loss, [query, value, *layer.trainable_weights])
    assert np.isfinite(out.numpy()).all()
    for g in grads:
        assert g is not None and np.isfinite(g.numpy()).all()


def test_xla_and_dynamic_shapes():
    rng = np.random.default_rng(8)
    query = rng.normal(size=(B, T, D)).astype("float32")
    value = rng.normal(size=(B, S, D)).astype("float32")
    qm, km = _masks(rng)
    layer = _layer(sparsity=0.5)
    eager = layer(query, value, attention_mask=_pair(qm, km)).numpy()

    @tf.function(jit_compile=True)
    def xla(q, v, m):
        return layer(q, v, attention_mask=m)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, D]),
            tf.TensorSpec([None, None, D]),
            tf.TensorSpec([None, None, None], tf.bool),
        ]
    )
    def dynamic(q, v, m):
        return layer(q, v, attention_mask=m)

    np.testing.assert_allclose(xla(query, value, _pair(qm, km)).numpy(), eager, atol=1e-5)
    np.testing.assert_allclose(dynamic(query, value, _pair(qm, km)).numpy(), eager, atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "half", True])
def test_bad_sparsity_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        KeySparseAttention(num_heads=2, key_dim=8, sparsity=bad)


def test_bad_k_from_is_rejected():
    with pytest.raises(ValueError, match="k_from"):
        KeySparseAttention(num_heads=2, key_dim=8, k_from="all")


def test_config_round_trip():
    layer = KeySparseAttention(
        num_heads=2,
        key_dim=8,
        sparsity=0.3,
        k_from="padded",
        renormalize=True,
        query_mask_in_scores=False,
        dropout=0.2,
    )
    clone = KeySparseAttention.from_config(layer.get_config())
    for attr in ("sparsity", "k_from", "renormalize", "query_mask_in_scores"):
        assert getattr(clone, attr) == getattr(layer, attr)
    assert clone.num_heads == 2 and clone.key_dim == 8 and clone.dropout == 0.2


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_scores_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(9)
    query = rng.normal(size=(B, T, D)).astype("float32")
    value = rng.normal(size=(B, S, D)).astype("float32")
    qm, km = _masks(rng)
    layer = _layer(sparsity=0.5)
    out = layer(query, value, attention_mask=_pair(qm, km))
    assert out.dtype == layer.compute_dtype
    assert np.isfinite(np.asarray(out, dtype="float32")).all()
    details = layer.attention_details(query, value, attention_mask=_pair(qm, km))
    assert details["dense"].dtype == "float32"
    # Still exactly floor(0.5 * L) keys per sample and head (no ties in random data).
    counts = details["kept"].numpy().sum(-1)
    expected = np.array([num_kept_keys(0.5, int(n)) for n in km.sum(-1)])
    np.testing.assert_array_equal(counts, np.repeat(expected[:, None], HEADS, axis=1))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("cross", [False, True])
def test_plain_matmul_projections_equal_the_stock_route(policy, cross, monkeypatch, f32_close):
    # `call` computes the four projections as 2-D matmuls; outputs and every gradient equal
    # the stock MultiHeadAttention route (EinsumDense), which it falls back to otherwise.
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(3)
    query = tf.constant(rng.normal(size=(3, 7, 16)).astype("float32"))
    value = tf.constant(rng.normal(size=(3, 9 if cross else 7, 12 if cross else 16)))
    value = tf.cast(value, "float32")
    mask = tf.constant(rng.random((3, 7, value.shape[1])) > 0.2)
    layer = KeySparseAttention(num_heads=2, key_dim=8, sparsity=0.5)
    layer.build(query.shape, value.shape)
    # Non-zero biases too (they start at zero).
    layer.set_weights([rng.normal(size=w.shape) * 0.3 for w in layer.get_weights()])
    routes = []

    def spy(*args, **kwargs):
        routes.append(original(*args, **kwargs))
        return routes[-1]

    original = layer._plain_projections
    monkeypatch.setattr(layer, "_plain_projections", spy)

    def run():
        with tf.GradientTape() as tape:
            tape.watch([query, value])
            out = tf.cast(layer(query, value, attention_mask=mask), "float32")
            loss = tf.reduce_sum(out * tf.range(out.shape[-1], dtype="float32"))
        grads = tape.gradient(loss, [query, value, *layer.trainable_weights])
        return [np.asarray(t, "float32") for t in (out, *grads)]

    plain = run()
    assert routes == [True]
    monkeypatch.setattr(layer, "_plain_projections", lambda *a: False)
    stock = run()
    # The two routes sum in other orders (2-D vs batched matmuls, other kernels per CPU).
    # Every array comes from one loss, so rounding is relative to the largest magnitude of
    # any of them; a gradient entry near zero is a sum of terms of that size (cancellation).
    scale = max(float(np.abs(b).max()) for b in stock)
    for a, b in zip(plain, stock):
        if policy == "float32":
            f32_close(a, b, scale=scale, ulps=256)
        else:  # float16 compute: rounding steps of 2**-10
            np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * (1 + np.abs(b).max()))


def test_requests_the_plain_route_cannot_serve_take_the_stock_call():
    layer = KeySparseAttention(num_heads=2, key_dim=8, sparsity=0.5)
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    out, scores = layer(x, x, return_attention_scores=True)
    assert out.shape == (2, 5, 16) and scores.shape == (2, 2, 5, 5)
    assert not layer._plain_projections((x, x, x), (None, None, None), True)
    assert not layer._plain_projections((x, x, x), (np.ones((2, 5), bool), None, None), False)
    assert layer._plain_projections((x, x, x), (None, None, None), False)
    masked = keras.layers.Masking()(np.pad(x, ((0, 0), (0, 2), (0, 0))))
    assert not layer._plain_projections((masked, x, x), (None, None, None), False)


def test_config_written_before_the_fast_base_still_loads():
    # `.keras` files saved before FastMultiHeadAttention existed hold these keys only; the
    # constructor arguments added with it take their defaults.
    layer = KeySparseAttention(num_heads=2, key_dim=8, sparsity=0.3, k_from="padded")
    config = layer.get_config()
    for added in ("separable_mask", "fused_gradient", "exact_dropout_mask"):
        config.pop(added)
    restored = KeySparseAttention.from_config(config)
    assert (restored.sparsity, restored.k_from, restored.recompute_softmax) == (0.3, "padded", True)
    assert not restored.separable_mask and restored.fused_gradient
    assert not restored.exact_dropout_mask
