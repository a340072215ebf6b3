"""Every layer: config round-trip, .keras save/load, symbolic + eager, mixed precision, fit."""

import keras
import numpy as np
import pytest

from ks_keras.layers import (
    CCAB,
    FastMultiHeadAttention,
    KeySparseAttention,
    MaskedMeanPooling,
    ModalityInteraction,
    SinusoidalPositionalEncoding,
    TransformerLayer,
)

D, DC, T, S = 16, 24, 6, 5

LAYERS = {
    "positional": lambda: SinusoidalPositionalEncoding(),
    "vanilla": lambda: TransformerLayer(num_heads=2, ffn_dim=8),
    "ks_self": lambda: TransformerLayer(
        num_heads=2,
        ffn_dim=8,
        key_sparse=True,
        sparsity=0.5,
        input_layer_norm=True,
        add_positional=True,
    ),
    "ks_cross": lambda: TransformerLayer(
        num_heads=2,
        ffn_dim=8,
        key_sparse=True,
        sparsity=0.3,
        k_from="padded",
        query_mask_in_scores=False,
    ),
    # Every authors'-code option at once (SPEC §8).
    "ks_cross_official": lambda: TransformerLayer(
        num_heads=2,
        ffn_dim=8,
        key_sparse=True,
        k_from="padded",
        query_mask_in_scores=False,
        input_layer_norm=True,
        context_layer_norm=True,
        attention_positional=True,
        ffn_activation_dropout=True,
        initializer="official_code",
    ),
    "ccab": lambda: CCAB(num_heads=2, ffn_dim=8, sparsity=0.5, renormalize=True),
    "ccab_official": lambda: CCAB(
        num_heads=2,
        ffn_dim=8,
        input_layer_norm=True,
        context_layer_norm=True,
        self_attention_mask=False,
        attention_positional=True,
        ffn_activation_dropout=True,
        initializer="official_code",
    ),
    "mim": lambda: ModalityInteraction(n_ccab=2, num_heads=2, ffn_dim=8, skip="official_code"),
    "ks_attention": lambda: KeySparseAttention(num_heads=2, key_dim=8, sparsity=0.5),
    "vanilla_dropout": lambda: TransformerLayer(num_heads=2, ffn_dim=8, dropout=0.2),
    "fast_attention": lambda: FastMultiHeadAttention(
        num_heads=2, key_dim=8, dropout=0.2, separable_mask=True
    ),
    "pooling": lambda: MaskedMeanPooling(),
}
NEEDS_CONTEXT = {"ks_cross", "ks_cross_official", "ccab", "ccab_official", "mim"}


def _apply(name, layer, x, xm, c, cm):
    if name == "positional":
        return layer(x)
    if name == "pooling":
        return layer(x, padding_mask=xm)
    if name in ("ks_attention", "fast_attention"):
        pair = keras.ops.logical_and(
            keras.ops.cast(xm, "bool")[:, :, None], keras.ops.cast(cm, "bool")[:, None, :]
        )
        return layer(x, c, attention_mask=pair)
    if name in NEEDS_CONTEXT:
        return layer(x, padding_mask=xm, context=c, context_mask=cm)
    return layer(x, padding_mask=xm)


def _wrap(name, layer):
    inputs = {
        "x": keras.Input((T, D), name="x"),
        "x_mask": keras.Input((T,), dtype="int32", name="x_mask"),
        "c": keras.Input((S, DC), name="c"),
        "c_mask": keras.Input((S,), dtype="int32", name="c_mask"),
    }
    y = _apply(name, layer, inputs["x"], inputs["x_mask"], inputs["c"], inputs["c_mask"])
    if len(y.shape) == 3:
        y = MaskedMeanPooling()(y, padding_mask=inputs["x_mask"])
    out = keras.layers.Dense(3, dtype="float32")(y)
    return keras.Model(inputs, out)


def _batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    xm = (np.arange(T)[None] < rng.integers(1, T + 1, size=b)[:, None]).astype("int32")
    cm = (np.arange(S)[None] < rng.integers(1, S + 1, size=b)[:, None]).astype("int32")
    return {
        "x": rng.normal(size=(b, T, D)).astype("float32"),
        "x_mask": xm,
        "c": rng.normal(size=(b, S, DC)).astype("float32"),
        "c_mask": cm,
    }


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_config_round_trip(name):
    layer = LAYERS[name]()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_save_load_identical_outputs(name, tmp_path):
    model = _wrap(name, LAYERS[name]())
    batch = _batch()
    before = model.predict(batch, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), before, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_symbolic_and_eager_agree(name):
    layer = LAYERS[name]()
    batch = _batch(1)
    eager = _apply(name, layer, batch["x"], batch["x_mask"], batch["c"], batch["c_mask"])
    model = _wrap(name, layer)  # symbolic call on the same (already built) layer
    assert model.output.shape[-1] == 3
    again = _apply(name, layer, batch["x"], batch["x_mask"], batch["c"], batch["c_mask"])
    np.testing.assert_allclose(np.asarray(again), np.asarray(eager), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_mixed_precision(name, policy):
    keras.config.set_dtype_policy(policy)
    layer = LAYERS[name]()
    batch = _batch(2)
    out = _apply(name, layer, batch["x"], batch["x_mask"], batch["c"], batch["c_mask"])
    assert keras.backend.standardize_dtype(out.dtype) == layer.compute_dtype
    assert np.isfinite(np.asarray(keras.ops.cast(out, "float32"))).all()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fit_a_few_steps(name):
    model = _wrap(name, LAYERS[name]())
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch = _batch(3, b=8)
    labels = np.arange(8) % 3
    history = model.fit(batch, labels, epochs=3, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
