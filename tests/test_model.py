"""build_model: every variant builds and runs; padding is ignored; it can learn."""

import keras
import numpy as np
import pytest
from _tiny import MODEL_TESTS, model_overrides, random_batch

from ks_keras.config import Config, ModelConfig, config_from_dict, load_config, padding_invariant
from ks_keras.model import build_model, count_trainable_params

DA, DT = 16, 24
SMALL = model_overrides(MODEL_TESTS, n_ccab=3)  # tests/_tiny.py


def small_config(*extra):
    return config_from_dict({}, SMALL + list(extra))


def batch(b=3, ta=12, tt=5, seed=0, lengths=None):
    return random_batch(b, ta, tt, da=DA, dt=DT, lengths=lengths, seed=seed)


@pytest.mark.parametrize("n_ccab", [0, 1, 2, 3])
def test_builds_for_any_number_of_ccabs(n_ccab):
    model = build_model(small_config(f"model.n_ccab={n_ccab}"))
    out = model(batch())
    assert out.shape == (3, 3)
    n_blocks = sum(1 for layer in model.layers if layer.name.endswith("_mim"))
    assert n_blocks == (2 if n_ccab else 0)


@pytest.mark.parametrize(
    "fem,mim,dfm", [(f, m, d) for f in (True, False) for m in (True, False) for d in (True, False)]
)
def test_module_toggles(fem, mim, dfm):
    model = build_model(
        small_config(
            f"model.use_fem={fem}", f"model.use_mim={mim}", f"model.use_dfm={dfm}", "model.n_ccab=1"
        )
    )
    names = [layer.name for layer in model.layers]
    assert any("fem" in n for n in names) == fem
    assert any("mim" in n for n in names) == mim
    assert any("dfm" in n for n in names) == dfm
    assert np.isfinite(model(batch()).numpy()).all()


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_unimodal_models(modality):
    model = build_model(small_config(f"model.modalities=[{modality}]"))
    assert sorted(model.input.keys()) == sorted([modality, f"{modality}_mask"])
    data = {k: v for k, v in batch().items() if k.startswith(modality)}
    assert model(data).shape == (3, 3)
    assert not any("mim" in layer.name for layer in model.layers)


def test_projection_to_d_model():
    model = build_model(
        small_config("model.audio_d_model=32", "model.text_d_model=8", "model.num_heads=4")
    )
    assert model.get_layer("audio_projection").units == 32
    assert model(batch()).shape == (3, 3)


@pytest.mark.parametrize("b", [1, 3])
def test_batch_sizes_and_lengths(b):
    model = build_model(small_config("model.n_ccab=2"))
    for ta, tt in ((12, 5), (20, 3)):
        out = model(batch(b=b, ta=ta, tt=tt))
        assert out.shape == (b, 3) and np.isfinite(out.numpy()).all()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "model.k_from=padded",
            "model.positional=every_layer",
            "model.renormalize=true",
            "model.input_layer_norm=true",
            "model.pooling=masked",
            "model.mim_skip=official_code",
        ],
    ],
)
def test_padding_values_do_not_change_logits(extra):
    model = build_model(small_config("model.n_ccab=2", *extra))
    data = batch(b=3, lengths=([12, 7, 3], [5, 2, 4]))
    logits = model(data).numpy()
    moved = dict(data)
    moved["audio"] = np.where(data["audio_mask"][..., None] == 1, data["audio"], 1e3)
    moved["text"] = np.where(data["text_mask"][..., None] == 1, data["text"], -1e3)
    np.testing.assert_allclose(model(moved).numpy(), logits, atol=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.positional=every_layer", "model.renormalize=true", "model.input_layer_norm=true"],
        ["model.sparsity=0.0", "model.k_from=padded", "model.query_mask_in_scores=false"],
    ],
)
def test_padding_invariant_models_give_the_same_logits_cropped(extra):
    # What the export and `ks-keras predict` rely on when they cut a request after its last
    # real step instead of padding it to the trained length.
    cfg = small_config("model.n_ccab=2", *extra)
    assert padding_invariant(cfg.model)
    model = build_model(cfg)
    data = batch(b=2, ta=20, tt=7, lengths=([9, 4], [3, 2]))
    cropped = {k: v[:, : (9 if k.startswith("audio") else 3)] for k, v in data.items()}
    np.testing.assert_allclose(model(cropped).numpy(), model(data).numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        ["model.k_from=padded"],
        ["model.query_mask_in_scores=false"],
        ["model.pooling=include_padding"],
        ["model.fusion_self_attention_mask=false"],
    ],
)
def test_authors_variants_depend_on_the_padded_length(extra):
    cfg = small_config("model.n_ccab=2", *extra)
    assert not padding_invariant(cfg.model)
    model = build_model(cfg)
    data = batch(b=2, ta=20, tt=7, lengths=([9, 4], [3, 2]))
    cropped = {k: v[:, : (9 if k.startswith("audio") else 3)] for k, v in data.items()}
    assert not np.allclose(model(cropped).numpy(), model(data).numpy(), atol=1e-4)


def test_authors_variant_lets_padding_vote():
    # With query_mask_in_scores=false (the authors' code), padded query rows vote in the key
    # scores, so padding content can change the kept keys and thus the logits. This documents
    # why it is not our default.
    model = build_model(small_config("model.n_ccab=2", "model.query_mask_in_scores=false"))
    data = batch(b=3, lengths=([12, 7, 3], [5, 2, 4]))
    moved = dict(data)
    moved["audio"] = np.where(data["audio_mask"][..., None] == 1, data["audio"], 1e3)
    assert not np.allclose(model(moved).numpy(), model(data).numpy(), atol=1e-4)


def test_empty_mask_sample_is_finite():
    model = build_model(small_config("model.n_ccab=1"))
    data = batch(b=2, lengths=([0, 5], [3, 0]))
    assert np.isfinite(model(data).numpy()).all()


def test_wrong_feature_dim_is_a_clear_error():
    model = build_model(small_config())
    data = batch()
    data["audio"] = data["audio"][..., :-1]
    with pytest.raises(ValueError, match="audio"):
        model(data)


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="model.num_heads"):
        build_model(small_config("model.num_heads=5"))
    with pytest.raises(ValueError, match="model.sparsity"):
        build_model(small_config("model.sparsity=1.0"))
    with pytest.raises(ValueError, match="config"):
        build_model({"model": {}})


def test_accepts_model_config():
    cfg = small_config()
    assert isinstance(build_model(cfg.model), keras.Model)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg, Config)


def test_loss_decreases_on_a_learnable_task():
    keras.utils.set_random_seed(0)
    cfg = small_config("model.n_ccab=1", "model.num_classes=2")
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    n = 64
    data = batch(b=n, seed=1)
    labels = rng.integers(0, 2, size=n)
    # The class is written into the real audio frames' first channel.
    data["audio"][..., 0] += 3.0 * (2 * labels[:, None] - 1) * data["audio_mask"]
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(data, labels, epochs=8, batch_size=16, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["accuracy"][-1] > 0.9


def test_save_and_load_whole_model(tmp_path):
    model = build_model(small_config("model.n_ccab=2"))
    data = batch()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(data).numpy(), model(data).numpy(), atol=1e-6)


@pytest.mark.large
def test_paper_parameter_count():
    # The authors' 85,324,676 less their extra LayerNorms (configs/official_code.yaml has them).
    model = build_model(load_config("configs/paper.yaml"))
    assert count_trainable_params(model) == 85_290_884


@pytest.mark.parametrize("recompute", [True, False])
def test_attention_recompute_reaches_every_attention_layer_and_survives_saving(recompute, tmp_path):
    from ks_keras.layers import KeySparseAttention

    model = build_model(
        small_config(
            "model.n_ccab=1", "model.dropout=0.1", f"model.attention_recompute={recompute}"
        )
    )
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, KeySparseAttention)]
    assert len(layers) >= 6 and {layer.recompute_softmax for layer in layers} == {recompute}
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = [la for la in loaded._flatten_layers() if isinstance(la, KeySparseAttention)]
    assert {layer.recompute_softmax for layer in again} == {recompute}
