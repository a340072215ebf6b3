"""build_model options beyond the paper: audio functionals in the head, audio augmentation."""

import keras
import numpy as np
import pytest
from _tiny import MODEL_TESTS, model_overrides, random_batch

from ks_keras.config import config_from_dict, padding_invariant
from ks_keras.layers import FeatureAugment, UtteranceFunctionals
from ks_keras.model import build_model

DA, DT = 16, 24
SMALL = model_overrides(MODEL_TESTS, n_ccab=0, n_dfm=0, head_dropout=0.0)  # tests/_tiny.py
FUNCTIONALS = "model.audio_functionals=[mean, std, p10, p50, p90, delta_abs_mean]"
AUGMENT = [
    "model.augment.time_masks=2",
    "model.augment.time_mask_frames=3",
    "model.augment.freq_masks=1",
    "model.augment.freq_mask_bins=4",
    "model.augment.noise_std=0.1",
]


def small_config(*extra):
    return config_from_dict({}, SMALL + list(extra))


def batch(b=3, ta=20, tt=5, seed=0, lengths=([20, 11, 6], [5, 2, 4])):
    return random_batch(b, ta, tt, da=DA, dt=DT, lengths=lengths, seed=seed)


def test_default_model_has_neither_option():
    names = [layer.name for layer in build_model(small_config()).layers]
    assert "audio_functionals" not in names
    assert "functionals_norm" not in names
    assert "audio_augment" not in names


def test_functionals_layers_and_head_width():
    model = build_model(small_config(FUNCTIONALS, "model.functionals_dropout=0.2"))
    layer = model.get_layer("audio_functionals")
    assert isinstance(layer, UtteranceFunctionals)
    assert layer.stats == ["mean", "std", "p10", "p50", "p90", "delta_abs_mean"]
    assert isinstance(model.get_layer("functionals_norm"), keras.layers.BatchNormalization)
    assert model.get_layer("functionals_dropout").rate == pytest.approx(0.2)
    # The head sees both pooled branches (16 + 24) plus 6 statistics of the 16 audio channels.
    assert model.get_layer("head_dense_1").kernel.shape == (DA + DT + 6 * DA, 8)
    assert model(batch()).shape == (3, 3)


def test_functionals_in_an_audio_only_model():
    model = build_model(small_config("model.modalities=[audio]", "model.audio_functionals=[max]"))
    assert model.get_layer("head_dense_1").kernel.shape == (DA + DA, 8)
    data = {k: v for k, v in batch().items() if k.startswith("audio")}
    assert np.isfinite(model(data).numpy()).all()


def test_augment_layer_from_config():
    model = build_model(small_config(*AUGMENT))
    layer = model.get_layer("audio_augment")
    assert isinstance(layer, FeatureAugment)
    assert (layer.time_masks, layer.time_mask_frames) == (2, 3)
    assert (layer.freq_masks, layer.freq_mask_bins) == (1, 4)
    assert layer.noise_std == pytest.approx(0.1)


def test_inactive_augment_config_adds_no_layer():
    model = build_model(small_config("model.augment.time_masks=2"))  # width 0: nothing to do
    assert "audio_augment" not in [layer.name for layer in model.layers]


@pytest.mark.parametrize("extra", [[FUNCTIONALS], AUGMENT, [FUNCTIONALS, *AUGMENT]])
def test_padding_values_do_not_change_predictions(extra):
    model = build_model(small_config(*extra))
    data = batch()
    logits = model(data, training=False).numpy()
    moved = dict(data)
    moved["audio"] = np.where(data["audio_mask"][..., None] == 1, data["audio"], 1e3)
    moved["text"] = np.where(data["text_mask"][..., None] == 1, data["text"], -1e3)
    np.testing.assert_allclose(model(moved, training=False).numpy(), logits, atol=1e-4)


@pytest.mark.parametrize("extra", [[FUNCTIONALS], [FUNCTIONALS, *AUGMENT]])
def test_options_keep_the_model_padding_invariant(extra):
    # Export and `predict` crop requests after their last real step when padding_invariant.
    cfg = small_config(*extra)
    assert padding_invariant(cfg.model)
    model = build_model(cfg)
    data = batch(lengths=([9, 4, 7], [3, 2, 1]))
    cropped = {k: v[:, : (9 if k.startswith("audio") else 3)] for k, v in data.items()}
    np.testing.assert_allclose(
        model(cropped, training=False).numpy(), model(data, training=False).numpy(), atol=1e-4
    )


def test_augment_changes_training_outputs_only():
    data = batch()
    plain = build_model(small_config())
    # Without augmentation (and no dropout), training and inference agree: the control.
    np.testing.assert_allclose(
        plain(data, training=True).numpy(), plain(data, training=False).numpy(), atol=1e-5
    )
    model = build_model(small_config(*AUGMENT))
    inference = model(data, training=False).numpy()
    np.testing.assert_array_equal(model(data).numpy(), inference)
    assert not np.allclose(model(data, training=True).numpy(), inference, atol=1e-4)


def test_training_step_with_both_options():
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    cfg = small_config("model.modalities=[audio]", FUNCTIONALS, "model.functionals_dropout=0.1")
    model = build_model(config_from_dict(cfg.to_dict(), AUGMENT))
    data = batch(b=8, lengths=([20, 18, 15, 11, 9, 6, 4, 1], [5, 4, 3, 2, 1, 5, 4, 3]))
    data = {k: v for k, v in data.items() if k.startswith("audio")}
    labels = np.arange(8) % 3
    norm = model.get_layer("functionals_norm")
    moving_mean = np.array(norm.moving_mean)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(data, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    assert np.isfinite(float(loss))
    assert all(g is not None and np.isfinite(np.asarray(g)).all() for g in grads)
    # The statistics' normalisation learns (gamma/beta get gradients) and tracks batches.
    [gamma] = [g for w, g in zip(model.trainable_weights, grads) if w is norm.gamma]
    assert np.abs(np.asarray(gamma)).sum() > 0
    assert not np.allclose(np.array(norm.moving_mean), moving_mean)


def test_save_and_load_with_both_options(tmp_path):
    model = build_model(small_config(FUNCTIONALS, *AUGMENT))
    data = batch()
    before = model(data, training=False).numpy()
    path = tmp_path / "options.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("audio_functionals").stats == model.get_layer("audio_functionals").stats
    assert loaded.get_layer("audio_augment").get_config()["freq_mask_bins"] == 4
    np.testing.assert_allclose(loaded(data, training=False).numpy(), before, atol=1e-6)


def test_mixed_float16_model_with_options_runs():
    keras.config.set_dtype_policy("mixed_float16")
    model = build_model(small_config(FUNCTIONALS, *AUGMENT))
    out = model(batch(), training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.audio_functionals=[mean, kurtosis]"], "model.audio_functionals"),
        (["model.audio_functionals=[p100]"], "model.audio_functionals"),
        (["model.audio_functionals=[std, std]"], "model.audio_functionals"),
        (
            ["model.modalities=[text]", "model.audio_functionals=[mean]"],
            "model.audio_functionals",
        ),
        (["model.functionals_dropout=1.0"], "model.functionals_dropout"),
        (["model.augment.time_masks=-1"], "model.augment.time_masks"),
        (["model.augment.time_mask_frames=-3"], "model.augment.time_mask_frames"),
        (["model.augment.freq_masks=-1"], "model.augment.freq_masks"),
        (["model.augment.freq_mask_bins=-1"], "model.augment.freq_mask_bins"),
        (["model.augment.noise_std=-0.5"], "model.augment.noise_std"),
        (["model.augment.time_masks=1.5"], "model.augment.time_masks"),
        (["model.augment.warp=2"], "model.augment.warp"),
    ],
)
def test_config_validation_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        small_config(*overrides)


def test_config_accepts_options():
    cfg = small_config(FUNCTIONALS, *AUGMENT)
    assert cfg.model.audio_functionals == ["mean", "std", "p10", "p50", "p90", "delta_abs_mean"]
    assert cfg.model.augment.noise_std == pytest.approx(0.1)
    assert isinstance(cfg.model.augment.noise_std, float)


def test_opensmile_functionals_input_joins_the_head(tmp_path):
    cfg = small_config("model.functionals_dim=7", "model.functionals_dropout=0.2")
    model = build_model(cfg)
    assert "functionals" in {t.name for t in model.inputs}
    assert model.get_layer("opensmile_functionals_norm") is not None
    inputs = batch()
    inputs["functionals"] = np.random.default_rng(1).normal(size=(3, 7)).astype("float32")
    out = np.asarray(model(inputs, training=False))
    changed = dict(inputs, functionals=inputs["functionals"] + 1.0)
    assert not np.allclose(out, np.asarray(model(changed, training=False)))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(again(inputs, training=False)), out, atol=1e-5)


def test_functionals_widths_must_match_the_feature_set():
    from ks_keras.features import check_model_dims

    cfg = config_from_dict(
        {},
        [
            "model.modalities=[audio]",
            "model.audio_dim=80",
            "features.functionals=compare",
            "model.functionals_dim=88",
        ],
    )
    with pytest.raises(ValueError, match="model.functionals_dim=88 but features.functionals"):
        check_model_dims(cfg)
    cfg = config_from_dict({}, ["model.modalities=[audio]", "model.audio_dim=80"])
    check_model_dims(cfg)  # no functionals either side: fine
    with pytest.raises(ValueError, match="model.functionals_dim"):
        config_from_dict({}, ["model.functionals_dim=-1"])


def test_model_functionals_are_z_normalised_per_speaker(monkeypatch, tmp_path):
    import ks_keras.features.functionals as F
    from ks_keras.corpora.manifest import Corpus, Utterance

    utts = [
        Utterance(f"{s}{k}", f"/x/{s}{k}.wav", s, "ab"[k % 2], "t") for s in "xy" for k in range(4)
    ]
    corpus = Corpus(utts, ["a", "b"])
    raw = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5
    monkeypatch.setattr(F, "corpus_functionals", lambda *a, **k: raw)
    base = [f"features.cache_dir={tmp_path}", "features.functionals=egemaps"]
    speaker = F.model_functionals(
        config_from_dict({}, [*base, "features.audio.normalize=speaker"]), corpus
    )
    rows = np.stack([speaker[u.id] for u in utts])
    for s in (slice(0, 4), slice(4, 8)):
        np.testing.assert_allclose(rows[s].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(rows[s].std(0), 1, atol=1e-4)
    plain = F.model_functionals(config_from_dict({}, base), corpus)
    np.testing.assert_array_equal(np.stack([plain[u.id] for u in utts]), raw)
    assert F.model_functionals(config_from_dict({}, []), corpus) is None
