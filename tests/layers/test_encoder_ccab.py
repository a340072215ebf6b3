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
