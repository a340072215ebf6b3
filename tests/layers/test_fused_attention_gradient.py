"""The hand-written gradient of KeySparseAttention equals automatic differentiation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ks_keras.layers import FastMultiHeadAttention, KeySparseAttention

B, T, S, D, HEADS = 3, 7, 9, 16, 2


def _inputs(seed):
    rng = np.random.default_rng(seed)
    query = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    value = tf.constant(rng.normal(size=(B, S, D)).astype("float32"))
    qm = (np.arange(T)[None] < np.array([T, 4, 2])[:, None]).astype(bool)
    km = (np.arange(S)[None] < np.array([S, 5, 7])[:, None]).astype(bool)
    km[2] = False  # a sample without any real key
    weights = tf.constant(rng.normal(size=(B, T, D)).astype("float32"))
    return query, value, tf.constant(qm[:, :, None] & km[:, None, :]), weights


def _fused_and_autodiff(**kwargs):
    """Two layers with the same weights and dropout seed: fused and autodiff gradients."""
    layers = []
    for fused in (True, False):
        layer = KeySparseAttention(
            num_heads=HEADS, key_dim=D // HEADS, seed=7, fused_gradient=fused, **kwargs
        )
        layer.build((None, T, D), (None, S, D))
        layers.append(layer)
    layers[1].set_weights(layers[0].get_weights())
    return layers


def _run(layer, query, value, mask, loss_weights, training, jit=False):
    @tf.function(jit_compile=jit)
    def run(query, value, mask):
        with tf.GradientTape() as tape:
            tape.watch([query, value])
            out = layer(query, value, attention_mask=mask, training=training)
            # Every output position gets its own weight in the loss.
            loss = tf.reduce_sum(tf.cast(out, "float32") * loss_weights)
        return out, tape.gradient(loss, [query, value, *layer.trainable_weights])

    out, grads = run(query, value, mask)
    return np.asarray(out, "float32"), [np.asarray(g, "float32") for g in grads]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("qmask_in_scores", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("separable", [False, True])
def test_fused_gradient_matches_autodiff(sparsity, qmask_in_scores, training, recompute, separable):
    # `separable`: the mask is declared an outer product of padding masks (it is one here, as
    # from TransformerLayer), so its key part is folded into the scores matmul.
    query, value, mask, loss_weights = _inputs(0)
    fused, auto = _fused_and_autodiff(
        sparsity=sparsity,
        query_mask_in_scores=qmask_in_scores,
        dropout=0.3,
        recompute_softmax=recompute,
        separable_mask=separable,
    )
    out_f, grads_f = _run(fused, query, value, mask, loss_weights, training)
    out_a, grads_a = _run(auto, query, value, mask, loss_weights, training)
    np.testing.assert_allclose(out_f, out_a, atol=1e-6)
    for g_f, g_a in zip(grads_f, grads_a):
        np.testing.assert_allclose(g_f, g_a, rtol=1e-4, atol=1e-5)
    if training:  # the dropout mask was really applied (and was the same in both)
        no_drop, _ = _run(fused, query, value, mask, loss_weights, False)
        assert not np.allclose(out_f, no_drop)


@pytest.mark.parametrize("separable", [False, True])
def test_fused_gradient_under_xla(separable):
    query, value, mask, loss_weights = _inputs(1)
    fused, auto = _fused_and_autodiff(sparsity=0.5, dropout=0.0, separable_mask=separable)
    out_x, grads_x = _run(fused, query, value, mask, loss_weights, True, jit=True)
    out_a, grads_a = _run(auto, query, value, mask, loss_weights, True)
    np.testing.assert_allclose(out_x, out_a, atol=1e-5)
    for g_x, g_a in zip(grads_x, grads_a):
        np.testing.assert_allclose(g_x, g_a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("separable", [False, True])
def test_fused_gradient_under_mixed_precision(policy, separable):
    keras.config.set_dtype_policy(policy)
    query, value, mask, loss_weights = _inputs(2)
    fused, auto = _fused_and_autodiff(sparsity=0.5, dropout=0.2, separable_mask=separable)
    out_f, grads_f = _run(fused, query, value, mask, loss_weights, True)
    out_a, grads_a = _run(auto, query, value, mask, loss_weights, True)
    tol = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    np.testing.assert_allclose(out_f, out_a, atol=tol)
    names = ["query", "value", *(w.path for w in fused.trainable_weights)]
    largest = max(np.abs(g).max() for g in grads_a)
    for name, g_f, g_a in zip(names, grads_f, grads_a):
        assert np.isfinite(g_f).all(), name
        if name.endswith("key/bias"):
            # Zero in exact arithmetic (a key bias adds the same q.b to every score of a row;
            # softmax and top-k ignore that), so both sides hold only 16-bit rounding noise of
            # sums of terms as large as the other gradients: its size follows the CPU's
            # kernels (Eigen's float16 matmul without AVX-512), not the fused gradient.
            assert np.abs(g_f).max() <= tol * largest and np.abs(g_a).max() <= tol * largest
            continue
        np.testing.assert_allclose(
            g_f, g_a, rtol=tol, atol=tol * (1 + np.abs(g_a).max()), err_msg=name
        )


@pytest.mark.parametrize("fast_layer", ["fast", "key_sparse_0"])
@pytest.mark.parametrize("separable", [False, True])
def test_fast_attention_with_dropout_equals_stock_attention_and_its_gradient(fast_layer, separable):
    # Vanilla Transformer layers with attention dropout use FastMultiHeadAttention; it and
    # KeySparseAttention(sparsity=0) give the same output and gradients as stock MHA; with the
    # exact (float uniform) dropout mask also the same mask for the same seed.
    query, value, mask, loss_weights = _inputs(3)
    mask = tf.constant(mask.numpy()[:2])  # stock MHA spreads a key-less row uniformly
    query, value, loss_weights = query[:2], value[:2], loss_weights[:2]
    common = dict(
        num_heads=HEADS,
        key_dim=D // HEADS,
        dropout=0.25,
        seed=11,
        exact_dropout_mask=True,
        separable_mask=separable,
    )
    if fast_layer == "fast":
        ours = FastMultiHeadAttention(**common)
    else:
        ours = KeySparseAttention(sparsity=0.0, **common)
    stock = keras.layers.MultiHeadAttention(
        num_heads=HEADS, key_dim=D // HEADS, dropout=0.25, seed=11
    )
    for layer in (ours, stock):
        layer.build((None, T, D), (None, S, D))
    stock.set_weights(ours.get_weights())
    out_o, grads_o = _run(ours, query, value, mask, loss_weights, True)
    out_s, grads_s = _run(stock, query, value, mask, loss_weights, True)
    np.testing.assert_allclose(out_o, out_s, atol=1e-5)
    for g_o, g_s in zip(grads_o, grads_s):
        np.testing.assert_allclose(g_o, g_s, rtol=1e-4, atol=1e-5)


def test_vanilla_layer_with_dropout_uses_the_lean_attention():
    from ks_keras.layers import TransformerLayer

    layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.1)
    layer.build((None, T, D))
    assert type(layer.attention) is FastMultiHeadAttention
    # TransformerLayer passes an outer product of padding masks, and says so.
    assert layer.attention.separable_mask
    assert not KeySparseAttention(num_heads=HEADS, key_dim=D // HEADS).separable_mask
    assert not FastMultiHeadAttention(num_heads=HEADS, key_dim=D // HEADS).separable_mask
    sparse = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.1, key_sparse=True)
    sparse.build((None, T, D))
    assert type(sparse.attention) is KeySparseAttention and sparse.attention.separable_mask
    plain = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.0)
    plain.build((None, T, D))
    assert type(plain.attention) is keras.layers.MultiHeadAttention


@pytest.mark.parametrize("keys", [9, 460])
def test_fast_dropout_mask_drops_the_rate_and_scales_exactly(keys):
    layer = KeySparseAttention(num_heads=HEADS, key_dim=D // HEADS, dropout=0.1, seed=5)
    layer.build((None, T, D), (None, S, D))
    shape = (4, HEADS, 300, keys)
    first = np.asarray(layer._dropout_keep_mask(shape, "float32"))
    second = np.asarray(layer._dropout_keep_mask(shape, "float32"))
    assert first.shape == shape and first.dtype == bool
    n = first.size
    # Binomial: 5 standard deviations around the 16-bit rate 6554 / 65536.
    p_drop = layer._drop_threshold / 65536
    assert abs(p_drop - 0.1) < 1e-5
    assert abs((1 - first.mean()) - p_drop) < 5 * np.sqrt(p_drop * (1 - p_drop) / n)
    assert not np.array_equal(first, second)  # a new mask per call
    # Both halves of every 32-bit draw are used and independent of each other.
    pairs = first[..., : 2 * (keys // 2)].reshape(-1, 2)
    both_dropped = np.mean(~pairs[:, 0] & ~pairs[:, 1])
    assert abs(both_dropped - p_drop**2) < 5 * np.sqrt(p_drop**2 / pairs.shape[0])
    # Inverted dropout: expected weight unchanged.
    assert layer._dropout_scale() * (1 - p_drop) == pytest.approx(1.0, abs=1e-12)


def test_fast_and_exact_masks_give_the_same_expected_output():
    query, value, mask, _ = _inputs(4)
    weights = None
    n = 400
    for exact in (False, True):
        layer = KeySparseAttention(
            num_heads=HEADS, key_dim=D // HEADS, dropout=0.3, seed=2, exact_dropout_mask=exact
        )
        layer.build((None, T, D), (None, S, D))
        if weights is None:
            weights = layer.get_weights()
        layer.set_weights(weights)
        expected = np.asarray(layer(query, value, attention_mask=mask, training=False))
        run = tf.function(
            lambda layer=layer: layer(query, value, attention_mask=mask, training=True),
            autograph=False,
        )
        samples = np.stack([np.asarray(run()) for _ in range(n)])
        # Each element's sample mean lies within 5 standard errors of the expectation (a
        # fixed tolerance fails now and then on elements whose dropout variance is large).
        stderr = samples.std(axis=0) / np.sqrt(n)
        error = np.abs(samples.mean(axis=0) - expected)
        assert np.all(error <= 5 * stderr + 1e-4), (exact, float(np.max(error / (stderr + 1e-9))))


def test_dropout_mask_with_dynamic_lengths():
    # Keras relaxes a training function to unknown lengths once batch lengths vary; the mask
    # must then still be drawn (and the gradient flow) for any length, odd ones included.
    layer = KeySparseAttention(num_heads=HEADS, key_dim=D // HEADS, dropout=0.2, seed=4)
    layer.build((None, None, D), (None, None, D))
    spec = tf.TensorSpec([None, None, D])

    @tf.function(input_signature=[spec, spec], autograph=False)
    def run(query, value):
        with tf.GradientTape() as tape:
            tape.watch(query)
            loss = tf.reduce_sum(layer(query, value, training=True) ** 2)
        return tape.gradient(loss, query)

    rng = np.random.default_rng(6)
    for t, s in ((5, 7), (3, 4), (6, 9)):
        grad = run(
            rng.normal(size=(2, t, D)).astype("float32"),
            rng.normal(size=(2, s, D)).astype("float32"),
        )
        assert grad.shape == (2, t, D) and np.isfinite(grad.numpy()).all()


def test_dropout_under_xla():
    # GPU runs use jit_compile: the 16-bit dropout mask and the deferred backward work compile.
    query, value, mask, loss_weights = _inputs(7)
    layer = KeySparseAttention(num_heads=HEADS, key_dim=D // HEADS, sparsity=0.5, dropout=0.2)
    layer.build((None, T, D), (None, S, D))
    out, grads = _run(layer, query, value, mask, loss_weights, True, jit=True)
    no_drop, _ = _run(layer, query, value, mask, loss_weights, False, jit=True)
    assert not np.allclose(out, no_drop)
    assert all(np.isfinite(g).all() for g in grads)
