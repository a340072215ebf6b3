"""FeatureAugment: identity outside training; masks, noise and padding in training; seeds."""

import keras
import numpy as np
import pytest

from ks_keras.layers.augment import FeatureAugment

LENGTHS = np.array([20, 20, 20, 20, 17, 15, 12, 10, 9, 5, 4, 1] * 4)
PAD_VALUE = 7.0


def batch(seed=0, t=20, d=10, lengths=LENGTHS):
    """Strictly positive real frames (a zero marks a mask), padded frames = PAD_VALUE."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype("int32")
    x = rng.uniform(0.5, 1.5, size=(len(lengths), t, d)).astype("float32")
    x[mask == 0] = PAD_VALUE
    return x, mask


def runs(flags):
    """(start, width) of each run of True in a 1-D bool array."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("training", [False, None])
def test_identity_outside_training(training):
    layer = FeatureAugment(2, 4, 2, 3, noise_std=0.5, seed=1)
    x, mask = batch()
    np.testing.assert_array_equal(layer(x, padding_mask=mask, training=training), x)
    np.testing.assert_array_equal(layer(x, padding_mask=mask), x)


def test_changes_values_in_training_and_keeps_padding():
    layer = FeatureAugment(2, 4, 2, 3, noise_std=0.1, seed=1)
    x, mask = batch()
    y = layer(x, padding_mask=mask, training=True).numpy()
    assert y.shape == x.shape and y.dtype == np.float32
    real = mask == 1
    assert not np.allclose(y[real], x[real])
    np.testing.assert_array_equal(y[~real], x[~real])  # padded frames keep their value exactly


def test_time_masks_are_zero_spans_within_limits():
    layer = FeatureAugment(time_masks=1, time_mask_frames=4, seed=2)
    x, mask = batch(seed=1)
    y = layer(x, padding_mask=mask, training=True).numpy()
    widths = []
    for i, n in enumerate(LENGTHS):
        zero_rows = (y[i] == 0).all(-1)
        changed = (y[i] != x[i]).any(-1)
        # Only whole frames are zeroed, and only those: the rest is unchanged.
        np.testing.assert_array_equal(changed, zero_rows)
        spans = runs(zero_rows)
        assert len(spans) <= 1
        for start, width in spans:
            assert start + width <= n  # inside the real frames
            assert width <= min(4, n // 5)  # never more than a fifth of the real length
            widths.append(width)
    # Something was masked, and the full width is reachable.
    assert max(widths, default=0) == 4


def test_several_time_masks_total_width():
    layer = FeatureAugment(time_masks=3, time_mask_frames=2, seed=3)
    x, mask = batch(seed=2)
    y = layer(x, padding_mask=mask, training=True).numpy()
    zero_rows = (y == 0).all(-1)
    assert zero_rows.any()
    for i, n in enumerate(LENGTHS):
        assert zero_rows[i].sum() <= 3 * min(2, n // 5)
        assert not zero_rows[i, n:].any()


def test_freq_masks_are_bands_within_limits():
    layer = FeatureAugment(freq_masks=1, freq_mask_bins=3, seed=4)
    x, mask = batch(seed=3)
    y = layer(x, padding_mask=mask, training=True).numpy()
    widths = []
    for i, n in enumerate(LENGTHS):
        zero_cols = (y[i, :n] == 0).all(0)
        # The same band in every real frame, nothing else touched.
        np.testing.assert_array_equal((y[i, :n] == 0), np.broadcast_to(zero_cols, (n, 10)))
        np.testing.assert_array_equal(y[i, :n][:, ~zero_cols], x[i, :n][:, ~zero_cols])
        np.testing.assert_array_equal(y[i, n:], x[i, n:])
        spans = runs(zero_cols)
        assert len(spans) <= 1
        widths += [w for _, w in spans]
        assert all(w <= 3 for _, w in spans)
    assert max(widths, default=0) == 3


def test_noise_on_real_frames_only():
    layer = FeatureAugment(noise_std=0.1, seed=5)
    x, mask = batch(seed=4)
    y = layer(x, padding_mask=mask, training=True).numpy()
    real = mask == 1
    diff = (y - x)[real]
    assert 0.08 < diff.std() < 0.12
    assert abs(diff.mean()) < 0.01
    np.testing.assert_array_equal(y[~real], x[~real])


def test_no_mask_means_all_frames_real():
    layer = FeatureAugment(time_masks=1, time_mask_frames=3, seed=6)
    x = np.ones((8, 20, 4), "float32")
    y = layer(x, training=True).numpy()
    zero_rows = (y == 0).all(-1)
    assert zero_rows.any()
    assert zero_rows.sum(-1).max() <= 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"time_masks": 2, "time_mask_frames": 0},
        {"time_masks": 0, "time_mask_frames": 5},
        {"freq_masks": 3, "freq_mask_bins": 0},
        {"freq_masks": 0, "freq_mask_bins": 4},
    ],
)
def test_inactive_layer_is_identity_in_training(kwargs):
    layer = FeatureAugment(**kwargs, seed=1)
    assert not layer.active
    x, mask = batch()
    np.testing.assert_array_equal(layer(x, padding_mask=mask, training=True), x)


def test_same_seed_same_draws_different_seed_different():
    x, mask = batch(seed=5)

    def first_call(seed):
        return FeatureAugment(2, 4, 2, 3, 0.1, seed=seed)(x, padding_mask=mask, training=True)

    a, b, c = first_call(11).numpy(), first_call(11).numpy(), first_call(12).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_global_seed_makes_unseeded_layers_reproducible():
    x, mask = batch(seed=6)

    def first_call(global_seed):
        keras.utils.set_random_seed(global_seed)
        layer = FeatureAugment(2, 4, 2, 3, 0.1)
        return layer(x, padding_mask=mask, training=True).numpy()

    a, b, c = first_call(3), first_call(3), first_call(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_successive_calls_draw_new_masks():
    layer = FeatureAugment(2, 4, 2, 3, 0.1, seed=7)
    x, mask = batch(seed=7)
    assert not np.array_equal(
        layer(x, padding_mask=mask, training=True), layer(x, padding_mask=mask, training=True)
    )


def test_config_round_trip():
    layer = FeatureAugment(2, 4, 1, 3, 0.25, seed=9, name="aug")
    config = layer.get_config()
    for key, value in dict(
        time_masks=2, time_mask_frames=4, freq_masks=1, freq_mask_bins=3, noise_std=0.25, seed=9
    ).items():
        assert config[key] == value
    clone = FeatureAugment.from_config(config)
    assert clone.name == "aug" and clone.active
    x, mask = batch(seed=8)
    np.testing.assert_array_equal(
        clone(x, padding_mask=mask, training=True), layer(x, padding_mask=mask, training=True)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"time_masks": -1},
        {"time_mask_frames": 1.5},
        {"freq_masks": -2},
        {"freq_mask_bins": -1},
        {"noise_std": -0.1},
        {"noise_std": float("nan")},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        FeatureAugment(**kwargs)


def test_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="padding_mask"):
        FeatureAugment(noise_std=0.1)(
            np.zeros((2, 5, 3), "float32"), padding_mask=np.ones((2, 6), "int32"), training=True
        )


def test_in_a_model_fit_and_save(tmp_path):
    x_in = keras.Input((None, 10), name="x")
    m_in = keras.Input((None,), dtype="int32", name="m")
    h = FeatureAugment(1, 3, 1, 2, 0.1, seed=1, name="aug")(x_in, padding_mask=m_in)
    y = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model({"x": x_in, "m": m_in}, y)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, mask = batch(seed=9)
    labels = (np.arange(len(x)) % 2).astype("int32")
    history = model.fit({"x": x, "m": mask}, labels, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    before = model.predict({"x": x, "m": mask}, verbose=0)
    path = tmp_path / "aug.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("aug").get_config()["time_mask_frames"] == 3
    np.testing.assert_array_equal(loaded.predict({"x": x, "m": mask}, verbose=0), before)
