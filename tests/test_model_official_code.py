"""build_model: the authors'-code switches (SPEC §8) and configs/official_code.yaml."""

import keras
import numpy as np
import pytest
from _tiny import MODEL_TESTS, model_overrides, random_batch

from ks_keras.config import config_from_dict, load_config, padding_invariant
from ks_keras.layers import TransformerLayer
from ks_keras.model import build_model, count_trainable_params

DA, DT = 16, 24
SMALL = model_overrides(MODEL_TESTS, n_fem=3, n_ccab=2, n_dfm=2, num_classes=4)  # tests/_tiny.py
WIDTH = {"audio": DA, "text": DT}
OTHER = {"audio": "text", "text": "audio"}


def small_config(*extra, path=None):
    if path is None:
        return config_from_dict({}, SMALL + list(extra))
    return load_config(path, SMALL + list(extra))


def batch(b=3, ta=12, tt=5, seed=0, lengths=([12, 7, 3], [5, 2, 4])):
    return random_batch(b, ta, tt, da=DA, dt=DT, lengths=lengths, seed=seed)


def transformer_layers(model):
    return [la for la in model._flatten_layers() if isinstance(la, TransformerLayer)]


def stack(model, modality, section, n):
    return [model.get_layer(f"{modality}_{section}_{i + 1}") for i in range(n)]


# ---------------------------------------------------------------------------------------------
# LayerNorm placement


def test_per_block_layer_norms_sit_where_the_authors_code_has_them():
    model = build_model(small_config("model.input_layer_norm=per_block"))
    for mod in ("audio", "text"):
        for section, n in (("fem", 3), ("dfm", 2)):
            layers = stack(model, mod, section, n)
            # One LayerNorm on the block input: the stack's first layer.
            assert [la.input_norm is not None for la in layers] == [True] + [False] * (n - 1)
            assert all(la.context_norm is None for la in layers)
        for block in model.get_layer(f"{mod}_mim").blocks:
            # Each CCAB layer is a block; the cross layer also normalises its K/V source.
            assert block.cross_layer.input_norm is not None
            assert block.cross_layer.context_norm.gamma.shape == (WIDTH[OTHER[mod]],)
            assert block.self_layer.input_norm is not None
            assert block.self_layer.context_norm is None


@pytest.mark.parametrize("value", ["true", "every_layer"])
def test_every_layer_norm_keeps_its_old_structure(value):
    model = build_model(small_config(f"model.input_layer_norm={value}"))
    layers = transformer_layers(model)
    assert len(layers) == 2 * (3 + 2 * 2 + 2)
    assert all(la.input_norm is not None and la.context_norm is None for la in layers)


def test_layer_norm_placements_add_exactly_their_parameters():
    counts = {
        value: count_trainable_params(build_model(small_config(f"model.input_layer_norm={value}")))
        for value in ("false", "true", "per_block")
    }
    # Per branch: one norm (gamma + beta) of the branch width per layer (every_layer: 3 FEM +
    # 2 x 2 CCAB + 2 DFM) or per block (per_block: 1 FEM + 2 x 2 CCAB + 1 DFM), plus per_block's
    # one norm of the other branch's width per CCAB cross-attention.
    every = sum(2 * WIDTH[mod] * (3 + 4 + 2) for mod in WIDTH)
    per_block = sum(2 * WIDTH[mod] * (1 + 4 + 1) + 2 * WIDTH[OTHER[mod]] * 2 for mod in WIDTH)
    assert counts["true"] - counts["false"] == every == 720
    assert counts["per_block"] - counts["false"] == per_block == 640


# ---------------------------------------------------------------------------------------------
# Positions, masks, dropout, initialisation


@pytest.mark.parametrize(
    "value,at_input,every,attention",
    [
        ("input", True, False, False),
        ("every_layer", False, True, False),
        ("attention_input", False, False, True),
        ("none", False, False, False),
    ],
)
def test_positional_modes(value, at_input, every, attention):
    model = build_model(small_config(f"model.positional={value}"))
    names = [layer.name for layer in model.layers]
    assert ("audio_positional" in names) == at_input and ("text_positional" in names) == at_input
    layers = transformer_layers(model)
    assert {la.add_positional for la in layers} == {every}
    assert {la.attention_positional for la in layers} == {attention}


def _moved(data):
    moved = dict(data)
    moved["audio"] = np.where(data["audio_mask"][..., None] == 1, data["audio"], 1e3)
    moved["text"] = np.where(data["text_mask"][..., None] == 1, data["text"], -1e3)
    return moved


@pytest.mark.parametrize("n_ccab,n_dfm", [(2, 0), (0, 2)])
def test_fusion_self_attention_without_mask_lets_padding_change_the_logits(n_ccab, n_dfm):
    # Dense attention and masked pooling: the unmasked self-attention (CCAB or DFM) is the only
    # way padding can reach the logits.
    sizes = [f"model.n_ccab={n_ccab}", f"model.n_dfm={n_dfm}", "model.sparsity=0.0"]
    data = batch()
    masked = build_model(small_config(*sizes))
    np.testing.assert_allclose(masked(_moved(data)), masked(data), atol=1e-4)
    cfg = small_config(*sizes, "model.fusion_self_attention_mask=false")
    assert not padding_invariant(cfg.model)
    free = build_model(cfg)
    assert not np.allclose(free(_moved(data)), free(data), atol=1e-4)


def test_fusion_mask_switch_leaves_the_fem_and_cross_attention_masked():
    cfg = small_config("model.n_ccab=0", "model.n_dfm=0", "model.fusion_self_attention_mask=false")
    model = build_model(cfg)
    data = batch()
    np.testing.assert_allclose(model(_moved(data)), model(data), atol=1e-4)


def test_ffn_activation_dropout_in_every_layer():
    model = build_model(small_config("model.ffn_activation_dropout=true", "model.dropout=0.1"))
    layers = transformer_layers(model)
    assert len(layers) == 18
    assert all(
        la.ffn_inner_dropout is not None and la.ffn_inner_dropout.rate == 0.1 for la in layers
    )
    assert all(
        la.ffn_inner_dropout is None for la in transformer_layers(build_model(small_config()))
    )


def test_official_code_initializer_in_layers_and_head():
    keras.utils.set_random_seed(1)
    model = build_model(small_config("model.initializer=official_code", "model.head_units=[32]"))
    assert {la.initializer for la in transformer_layers(model)} == {"official_code"}
    # The head keeps PyTorch's default nn.Linear init: U(+-1/sqrt(fan_in)), biases too.
    for name, fan_in in (("head_dense_1", DA + DT), ("logits", 32)):
        kernel, bias = (w.numpy() for w in model.get_layer(name).weights)
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
        assert np.abs(bias).max() <= bound and np.any(bias)
    default = build_model(small_config())
    assert not np.any(default.get_layer("head_dense_1").bias.numpy())


# ---------------------------------------------------------------------------------------------
# configs/official_code.yaml


def test_official_code_parameter_count():
    # The authors' PyTorch model has 85,324,676 trainable parameters. paper.yaml's 85,290,884
    # plus their LayerNorms: per branch one per block input (FEM, 3 x 2 CCAB layers, DFM: 8 of
    # the branch width) and one per cross-attention K/V source (3 of the other width):
    # 2 x (8 x 512 + 3 x 1024) + 2 x (8 x 1024 + 3 x 512) = 33,792.
    model = build_model(load_config("configs/official_code.yaml"))
    assert count_trainable_params(model) == 85_324_676 == 85_290_884 + 33_792


def _ln(x, layer):
    gamma, beta = (w.numpy().astype("float64") for w in layer.weights)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta


def _sinusoids(length, dim):
    angles = np.arange(length)[:, None] * 10000.0 ** (-2.0 * (np.arange(dim) // 2) / dim)
    return np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))


def _dense(x, dense, flat_in=1):
    kernel, bias = (w.numpy().astype("float64") for w in dense.weights)
    n_in = int(np.prod(kernel.shape[:flat_in]))
    return x.reshape(*x.shape[: x.ndim - flat_in], n_in) @ kernel.reshape(n_in, -1) + bias.ravel()


def _reference_attention(layer, q_in, k_in, v_in, key_valid, sparse):
    """Multi-head attention as the authors' code computes it: padded keys (if masked) get -inf,
    every query row votes, k = int(0.5 x padded key length), weights of dropped keys zeroed."""
    att = layer.attention
    heads = att.num_heads
    q = _dense(q_in, att._query_dense).reshape(*q_in.shape[:2], heads, -1)
    k = _dense(k_in, att._key_dense).reshape(*k_in.shape[:2], heads, -1)
    v = _dense(v_in, att._value_dense).reshape(*v_in.shape[:2], heads, -1)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if key_valid is not None:
        logits = np.where(key_valid[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if sparse:
        scores = weights.sum(axis=2)  # [B, N, S]
        kth = int(0.5 * scores.shape[-1])
        threshold = -np.sort(-scores, axis=-1)[..., kth - 1 : kth]
        weights = weights * (scores >= threshold)[:, :, None, :]
    out = np.einsum("bnts,bsnh->btnh", weights, v)
    return _dense(out, att._output_dense, flat_in=2)


def _reference_block(layers, x, context=None, key_valid=None, sparse=True):
    """A block of the authors' code: LayerNorm on its input (and its K/V source), then layers
    that add positions to the attention input only."""
    x = _ln(x, layers[0].input_norm)
    if context is not None:
        context = _ln(context, layers[0].context_norm)
    for layer in layers:
        q_in = x + _sinusoids(x.shape[1], x.shape[2])
        if context is None:
            k_in = v_in = q_in
        else:
            k_in, v_in = context + _sinusoids(context.shape[1], context.shape[2]), context
        x = _ln(
            x + _reference_attention(layer, q_in, k_in, v_in, key_valid, sparse),
            layer.attention_norm,
        )
        hidden = np.maximum(_dense(x, layer.ffn_inner), 0.0)
        x = _ln(x + _dense(hidden, layer.ffn_outer), layer.ffn_norm)
    return x


def _reference_logits(model, data):
    x = {mod: data[mod].astype("float64") for mod in ("audio", "text")}
    valid = {mod: data[f"{mod}_mask"].astype(bool) for mod in ("audio", "text")}
    fem = {
        mod: _reference_block(
            stack(model, mod, "fem", 3), x[mod], key_valid=valid[mod], sparse=False
        )
        for mod in x
    }
    pooled = []
    for mod in ("audio", "text"):
        h = fem[mod]
        for block in model.get_layer(f"{mod}_mim").blocks:
            h = _reference_block([block.cross_layer], h, fem[OTHER[mod]], valid[OTHER[mod]])
            h = _reference_block([block.self_layer], h)  # no padding mask
        h = fem[mod] + (h + fem[mod])  # the CCAB stack's residual, then the model's
        h = _reference_block(stack(model, mod, "dfm", 2), h)  # no padding mask
        pooled.append(h.mean(axis=1))  # padding included
    h = np.maximum(_dense(np.concatenate(pooled, -1), model.get_layer("head_dense_1")), 0.0)
    return _dense(h, model.get_layer("logits"))


def test_official_code_model_computes_what_the_authors_code_computes():
    keras.utils.set_random_seed(2)
    cfg = small_config("model.dropout=0.1", path="configs/official_code.yaml")
    model = build_model(cfg)
    data = batch(b=3, ta=12, tt=5, lengths=([12, 7, 3], [5, 2, 4]))
    np.testing.assert_allclose(model(data).numpy(), _reference_logits(model, data), atol=1e-4)


def test_official_code_model_saves_and_loads(tmp_path):
    model = build_model(small_config(path="configs/official_code.yaml"))
    data = batch()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(data).numpy(), model(data).numpy(), atol=1e-6)
    assert count_trainable_params(loaded) == count_trainable_params(model)
