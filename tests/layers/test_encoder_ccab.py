"""TransformerLayer, CCAB and ModalityInteraction: structure, masks and bad input."""

import keras
import numpy as np
import pytest

from ks_keras.layers import CCAB, ModalityInteraction, TransformerLayer

D, DC, HEADS = 16, 24, 2


def _data(seed=0, b=3, t=7, s=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, D)).astype("float32")
    c = rng.normal(size=(b, s, DC)).astype("float32")
    xm = (np.arange(t)[None] < np.array([t, 4, 1])[:, None]).astype("int32")
    cm = (np.arange(s)[None] < np.array([s, 2, 3])[:, None]).astype("int32")
    return x, xm, c, cm


def _layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def test_post_norm_structure_matches_reference():
    x, xm, _, _ = _data()
    layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.0, layer_norm_eps=1e-5)
    out = layer(x, padding_mask=xm).numpy()
    pair = (xm[:, :, None] & xm[:, None, :]).astype(bool)
    attended = layer.attention(x, x, attention_mask=pair).numpy()
    g1, b1 = (w.numpy() for w in layer.attention_norm.weights)
    h = _layer_norm(x + attended, g1, b1, 1e-5)
    w1, c1 = (w.numpy() for w in layer.ffn_inner.weights)
    w2, c2 = (w.numpy() for w in layer.ffn_outer.weights)
    ffn = np.maximum(h @ w1 + c1, 0) @ w2 + c2
    g2, b2 = (w.numpy() for w in layer.ffn_norm.weights)
    np.testing.assert_allclose(out, _layer_norm(h + ffn, g2, b2, 1e-5), atol=1e-5)


@pytest.mark.parametrize("key_sparse", [False, True])
def test_cross_attention_keeps_query_length_and_ignores_padding(key_sparse):
    x, xm, c, cm = _data(1)
    layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, key_sparse=key_sparse, sparsity=0.5)
    out = layer(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    assert out.shape == x.shape
    x2 = np.where(xm[:, :, None] == 1, x, 77.0).astype("float32")
    c2 = np.where(cm[:, :, None] == 1, c, -55.0).astype("float32")
    out2 = layer(x2, padding_mask=xm, context=c2, context_mask=cm).numpy()
    real = xm.astype(bool)
    np.testing.assert_allclose(out2[real], out[real], atol=1e-5)


def test_ccab_is_cross_then_self():
    x, xm, c, cm = _data(2)
    block = CCAB(num_heads=HEADS, ffn_dim=8, dropout=0.0)
    out = block(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    step = block.cross_layer(x, padding_mask=xm, context=c, context_mask=cm)
    np.testing.assert_allclose(out, block.self_layer(step, padding_mask=xm).numpy(), atol=1e-6)
    assert block.cross_layer.key_sparse and block.self_layer.key_sparse


@pytest.mark.parametrize("skip,factor", [("paper", 1.0), ("official_code", 2.0)])
def test_mim_kv_from_fem_output_and_one_skip(skip, factor):
    x, xm, c, cm = _data(3)
    mim = ModalityInteraction(n_ccab=3, num_heads=HEADS, ffn_dim=8, dropout=0.0, skip=skip)
    out = mim(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    h = x
    for block in mim.blocks:  # every block sees the same context (not a running one)
        h = block(h, padding_mask=xm, context=c, context_mask=cm)
    np.testing.assert_allclose(out, factor * x + h.numpy(), atol=1e-5)


def test_mim_with_zero_ccabs_is_identity():
    x, xm, c, cm = _data(4)
    mim = ModalityInteraction(n_ccab=0, num_heads=HEADS, ffn_dim=8)
    np.testing.assert_array_equal(mim(x, padding_mask=xm, context=c, context_mask=cm).numpy(), x)
    assert mim.count_params() == 0


def test_heads_must_divide_width():
    layer = TransformerLayer(num_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="num_heads"):
        layer(np.zeros((1, 4, D), "float32"))


def test_mask_shape_mismatch_is_a_clear_error_at_build_time():
    x = keras.Input((7, D))
    with pytest.raises(ValueError, match="padding_mask"):
        TransformerLayer(num_heads=HEADS, ffn_dim=8)(
            x, padding_mask=keras.Input((6,), dtype="int32")
        )
    c = keras.Input((5, DC))
    with pytest.raises(ValueError, match="context_mask"):
        TransformerLayer(num_heads=HEADS, ffn_dim=8)(
            x, context=c, context_mask=keras.Input((4,), dtype="int32")
        )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_heads": 0, "ffn_dim": 8}, "num_heads"),
        ({"num_heads": 2, "ffn_dim": 0}, "ffn_dim"),
        ({"num_heads": 2, "ffn_dim": 8, "dropout": 1.0}, "dropout"),
        ({"num_heads": 2, "ffn_dim": 8, "key_sparse": True, "sparsity": 1.0}, "sparsity"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TransformerLayer(**kwargs)


def test_bad_mim_arguments():
    with pytest.raises(ValueError, match="n_ccab"):
        ModalityInteraction(n_ccab=-1, num_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="skip"):
        ModalityInteraction(n_ccab=1, num_heads=2, ffn_dim=8, skip="double")


def test_all_padding_sample_gives_finite_outputs():
    x, xm, c, cm = _data(5)
    xm[1] = 0
    cm[2] = 0
    mim = ModalityInteraction(n_ccab=2, num_heads=HEADS, ffn_dim=8)
    out = mim(x, padding_mask=xm, context=c, context_mask=cm)
    assert np.isfinite(out.numpy()).all()


def test_positional_readded_every_layer_changes_output():
    x, xm, _, _ = _data(6)
    plain = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.0)
    readd = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.0, add_positional=True)
    plain.build(x.shape)
    readd.build(x.shape)
    readd.set_weights(plain.get_weights())
    assert not np.allclose(plain(x).numpy(), readd(x).numpy())


# ---------------------------------------------------------------------------------------------
# The authors'-code options (SPEC §8)


def _copy_weights(src, dst, x, **call):
    src(x, **call)
    dst(x, **call)
    by_path = {w.path.split("/", 1)[1]: w for w in src.weights}
    for w in dst.weights:
        w.assign(by_path[w.path.split("/", 1)[1]])


def _sinusoids(length, dim):
    pos = np.arange(length)[:, None]
    inv = 10000.0 ** (-2.0 * (np.arange(dim) // 2) / dim)
    angles = pos * inv[None, :]
    return np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles)).astype("float32")


def test_attention_positional_reaches_the_attention_input_only():
    x, xm, c, cm = _data(7)
    layer = TransformerLayer(
        num_heads=HEADS, ffn_dim=8, dropout=0.0, key_sparse=True, attention_positional=True
    )
    out = layer(x, padding_mask=xm).numpy()
    pair = (xm[:, :, None] & xm[:, None, :]).astype(bool)
    xp = x + _sinusoids(x.shape[1], D)[None]
    attended = layer.attention(xp, xp, key=xp, attention_mask=pair).numpy()
    g1, b1 = (w.numpy() for w in layer.attention_norm.weights)
    h = _layer_norm(x + attended, g1, b1, 1e-5)  # residual without positions
    w1, c1 = (w.numpy() for w in layer.ffn_inner.weights)
    w2, c2 = (w.numpy() for w in layer.ffn_outer.weights)
    ffn = np.maximum(h @ w1 + c1, 0) @ w2 + c2
    g2, b2 = (w.numpy() for w in layer.ffn_norm.weights)
    np.testing.assert_allclose(out, _layer_norm(h + ffn, g2, b2, 1e-5), atol=1e-5)

    cross = TransformerLayer(
        num_heads=HEADS, ffn_dim=8, dropout=0.0, key_sparse=True, attention_positional=True
    )
    out = cross(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    pair = (xm[:, :, None] & cm[:, None, :]).astype(bool)
    cp = c + _sinusoids(c.shape[1], DC)[None]
    # Queries from x + positions, keys from context + positions, values from the context.
    attended = cross.attention(xp, c, key=cp, attention_mask=pair).numpy()
    g1, b1 = (w.numpy() for w in cross.attention_norm.weights)
    h = _layer_norm(x + attended, g1, b1, 1e-5)
    w1, c1 = (w.numpy() for w in cross.ffn_inner.weights)
    w2, c2 = (w.numpy() for w in cross.ffn_outer.weights)
    ffn = np.maximum(h @ w1 + c1, 0) @ w2 + c2
    g2, b2 = (w.numpy() for w in cross.ffn_norm.weights)
    np.testing.assert_allclose(out, _layer_norm(h + ffn, g2, b2, 1e-5), atol=1e-5)


def test_attention_positional_differs_from_add_positional():
    x, xm, _, _ = _data(8)
    kwargs = dict(num_heads=HEADS, ffn_dim=8, dropout=0.0)
    old = TransformerLayer(add_positional=True, **kwargs)
    new = TransformerLayer(attention_positional=True, **kwargs)
    _copy_weights(old, new, x, padding_mask=xm)
    assert not np.allclose(old(x, padding_mask=xm).numpy(), new(x, padding_mask=xm).numpy())
    with pytest.raises(ValueError, match="attention_positional"):
        TransformerLayer(add_positional=True, attention_positional=True, **kwargs)


def test_context_layer_norm_normalises_the_key_value_source():
    x, xm, c, cm = _data(9)
    kwargs = dict(num_heads=HEADS, ffn_dim=8, dropout=0.0, key_sparse=True)
    layer = TransformerLayer(context_layer_norm=True, **kwargs)
    out = layer(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    assert layer.context_norm is not None and layer.input_norm is None
    assert layer.context_norm.gamma.shape == (DC,)
    plain = TransformerLayer(**kwargs)
    plain(x, padding_mask=xm, context=c, context_mask=cm)
    plain.set_weights([w.numpy() for w in layer.weights if "context_norm" not in w.path])
    gamma, beta = (w.numpy() for w in layer.context_norm.weights)
    normed = _layer_norm(c, gamma, beta, 1e-5).astype("float32")
    again = plain(x, padding_mask=xm, context=normed, context_mask=cm).numpy()
    np.testing.assert_allclose(out, again, atol=1e-5)
    # A self-attention layer has no source sequence, hence no such norm.
    own = TransformerLayer(context_layer_norm=True, **kwargs)
    own(x, padding_mask=xm)
    assert own.context_norm is None


def test_ffn_activation_dropout_sits_after_the_relu(monkeypatch):
    x, xm, _, _ = _data(10)
    layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, dropout=0.1, ffn_activation_dropout=True)
    layer(x, padding_mask=xm)
    assert layer.ffn_inner_dropout.rate == 0.1
    assert layer.ffn_inner_dropout.name == "ffn_activation_dropout"
    seen = []
    call = type(layer.ffn_inner_dropout).call

    def spy(self, inputs, training=False):
        if self is layer.ffn_inner_dropout:
            seen.append((tuple(inputs.shape), bool(training), float(np.min(inputs))))
        return call(self, inputs, training=training)

    monkeypatch.setattr(type(layer.ffn_inner_dropout), "call", spy)
    layer(x, padding_mask=xm, training=True)
    # The FFN's hidden activations (width ffn_dim, after the ReLU), in training mode.
    assert seen == [((3, 7, 8), True, seen[0][2])] and seen[0][2] >= 0.0
    assert (
        TransformerLayer(num_heads=HEADS, ffn_dim=8).get_config()["ffn_activation_dropout"] is False
    )


def test_vanilla_layer_with_query_mask_off_lets_padded_queries_attend():
    x, xm, _, _ = _data(11)
    kwargs = dict(num_heads=HEADS, ffn_dim=8, dropout=0.0)
    masked = TransformerLayer(**kwargs)
    free = TransformerLayer(query_mask_in_scores=False, **kwargs)
    _copy_weights(masked, free, x, padding_mask=xm)
    a, b = masked(x, padding_mask=xm).numpy(), free(x, padding_mask=xm).numpy()
    real = xm.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=1e-5)
    assert not np.allclose(a[~real], b[~real])
    # Every query row, padding included, attends over the real keys.
    keys_only = np.broadcast_to(xm[:, None, :], (3, 7, 7)).astype(bool)
    attended = free.attention(x, x, attention_mask=keys_only).numpy()
    g1, b1 = (w.numpy() for w in free.attention_norm.weights)
    h = _layer_norm(x + attended, g1, b1, 1e-5)
    w1, c1 = (w.numpy() for w in free.ffn_inner.weights)
    w2, c2 = (w.numpy() for w in free.ffn_outer.weights)
    g2, b2 = (w.numpy() for w in free.ffn_norm.weights)
    want = _layer_norm(h + np.maximum(h @ w1 + c1, 0) @ w2 + c2, g2, b2, 1e-5)
    np.testing.assert_allclose(b, want, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_official_code_initializer_follows_pytorch_fans(cross):
    keras.utils.set_random_seed(0)
    d, dc, ffn = 64, 96, 32
    x = np.zeros((1, 3, d), "float32")
    c = np.zeros((1, 3, dc), "float32") if cross else None
    layer = TransformerLayer(num_heads=4, ffn_dim=ffn, initializer="official_code")
    layer(x, context=c)
    kv = dc if cross else d
    qkv_out = d if cross else 3 * d  # self-attention: one Linear(D, 3D) in PyTorch
    att = layer.attention
    expected = {
        "query": (att._query_dense, d, qkv_out),
        "key": (att._key_dense, kv, qkv_out),
        "value": (att._value_dense, kv, qkv_out),
        "output": (att._output_dense, d, d),
        "ffn_inner": (layer.ffn_inner, d, ffn),
        "ffn_outer": (layer.ffn_outer, ffn, d),
    }
    for name, (dense, fan_in, fan_out) in expected.items():
        kernel = dense.kernel.numpy()
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        # Uniform in [-limit, limit]: the extremes come close to it, the std is limit / sqrt(3).
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit, name
        assert abs(kernel.std() / (limit / np.sqrt(3)) - 1) < 0.1, name
        bias = dense.bias.numpy()
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.5 * bound, name
    for a, b in ((att._query_dense, att._key_dense), (layer.ffn_inner, layer.ffn_outer)):
        assert not np.allclose(a.kernel.numpy().ravel()[:16], b.kernel.numpy().ravel()[:16])
    # Keras' default: zero biases.
    plain = TransformerLayer(num_heads=4, ffn_dim=ffn)
    plain(x, context=c)
    assert not np.any(plain.attention._query_dense.bias.numpy())
    with pytest.raises(ValueError, match="initializer"):
        TransformerLayer(num_heads=4, ffn_dim=ffn, initializer="xavier")


def test_official_code_initializer_is_reproducible_with_a_seed():
    x = np.zeros((1, 3, D), "float32")
    draws = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, initializer="official_code")
        layer(x)
        draws.append([w.numpy() for w in layer.weights])
    for a, b in zip(*draws):
        np.testing.assert_array_equal(a, b)


def test_ccab_self_attention_mask_switch():
    x, xm, c, cm = _data(12)
    kwargs = dict(num_heads=HEADS, ffn_dim=8, dropout=0.0, sparsity=0.5)
    masked = CCAB(**kwargs)
    free = CCAB(self_attention_mask=False, context_layer_norm=True, **kwargs)
    out = free(x, padding_mask=xm, context=c, context_mask=cm).numpy()
    masked(x, padding_mask=xm, context=c, context_mask=cm)
    assert free.cross_layer.context_norm is not None and free.self_layer.context_norm is None
    # Without the mask, padded steps of the target take part in the self-attention.
    x2 = np.where(xm[:, :, None] == 1, x, 9.0).astype("float32")
    out2 = free(x2, padding_mask=xm, context=c, context_mask=cm).numpy()
    real = xm.astype(bool)
    assert not np.allclose(out2[real], out[real], atol=1e-4)
    step = free.cross_layer(x, padding_mask=xm, context=c, context_mask=cm)
    np.testing.assert_allclose(out, free.self_layer(step).numpy(), atol=1e-6)
    config = free.get_config()
    assert config["self_attention_mask"] is False and config["context_layer_norm"] is True
    assert CCAB.from_config(config).get_config() == config


def test_mim_passes_the_authors_options_to_every_ccab():
    mim = ModalityInteraction(
        n_ccab=2,
        num_heads=HEADS,
        ffn_dim=8,
        input_layer_norm=True,
        context_layer_norm=True,
        attention_positional=True,
        ffn_activation_dropout=True,
        initializer="official_code",
        self_attention_mask=False,
    )
    for block in mim.blocks:
        assert not block.self_attention_mask
        assert block.cross_layer.context_layer_norm and not block.self_layer.context_layer_norm
        for layer in (block.cross_layer, block.self_layer):
            assert layer.input_layer_norm and layer.attention_positional
            assert layer.ffn_activation_dropout and layer.initializer == "official_code"
    config = mim.get_config()
    assert ModalityInteraction.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="initializer"):
        ModalityInteraction(n_ccab=0, num_heads=2, ffn_dim=8, initializer="torch")


def test_configs_saved_before_the_new_options_load_unchanged():
    # A layer config from before the options existed (no new keys) keeps its old structure.
    x, xm, c, cm = _data(13)
    layer = TransformerLayer(num_heads=HEADS, ffn_dim=8, key_sparse=True, input_layer_norm=True)
    layer(x, padding_mask=xm, context=c, context_mask=cm)
    config = layer.get_config()
    for key in ("attention_positional", "context_layer_norm", "ffn_activation_dropout"):
        config.pop(key)
    config.pop("initializer")
    old = TransformerLayer.from_config(config)
    old(x, padding_mask=xm, context=c, context_mask=cm)
    assert [w.path.split("/", 1)[1] for w in old.weights] == [
        w.path.split("/", 1)[1] for w in layer.weights
    ]
    assert old.context_norm is None and old.ffn_inner_dropout is None
    block = CCAB(num_heads=HEADS, ffn_dim=8)
    config = block.get_config()
    config.pop("context_layer_norm")
    config.pop("self_attention_mask")
    assert CCAB.from_config(config).self_attention_mask
