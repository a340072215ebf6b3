"""UtteranceFunctionals against a numpy reference; masks, config, save/load, mixed precision."""

import keras
import numpy as np
import pytest

from ks_keras.config import check_functionals
from ks_keras.layers.functionals import UtteranceFunctionals

ALL_STATS = ["mean", "std", "min", "max", "p0", "p10", "p50", "p90", "p99"]
ALL_STATS += ["delta_abs_mean", "delta_std"]


def numpy_functionals(x, mask, stats):
    """Reference: statistics over the real steps of each sample, `[B, D * len(stats)]`."""
    b, _, d = x.shape
    out = np.zeros((b, d * len(stats)))
    for i in range(b):
        real = mask[i].astype(bool)
        v = x[i][real].astype(np.float64)  # [n, D]
        n = v.shape[0]
        # Frame-to-frame differences between neighbouring steps that are both real.
        pairs = real[1:] & real[:-1]
        delta = (x[i, 1:] - x[i, :-1]).astype(np.float64)[pairs]
        row = []
        for name in stats:
            if n == 0:
                row.append(np.zeros(d))
            elif name == "mean":
                row.append(v.mean(0))
            elif name == "std":
                row.append(v.std(0))
            elif name == "min":
                row.append(v.min(0))
            elif name == "max":
                row.append(v.max(0))
            elif name == "delta_abs_mean":
                row.append(np.abs(delta).mean(0) if len(delta) else np.zeros(d))
            elif name == "delta_std":
                row.append(delta.std(0) if len(delta) else np.zeros(d))
            else:
                q = int(name[1:])
                row.append(np.sort(v, axis=0)[(q * (n - 1)) // 100])  # nearest rank, floor
        out[i] = np.concatenate(row)
    return out


def random_batch(seed=0, b=4, t=7, d=5, lengths=(7, 4, 1, 0)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, d)).astype("float32")
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype("int32")
    return x, mask


@pytest.mark.parametrize("stat", ALL_STATS)
def test_each_stat_matches_numpy(stat):
    x, mask = random_batch(seed=1)
    got = UtteranceFunctionals([stat])(x, padding_mask=mask).numpy()
    # std adds 1e-8 under the root: negligible except for a single frame (std 1e-4 vs 0).
    np.testing.assert_allclose(got, numpy_functionals(x, mask, [stat]), rtol=1e-5, atol=2e-4)


def test_all_stats_concatenated_in_order():
    x, mask = random_batch(seed=2, lengths=(7, 6, 3, 2))
    got = UtteranceFunctionals(ALL_STATS)(x, padding_mask=mask).numpy()
    assert got.shape == (4, 5 * len(ALL_STATS))
    np.testing.assert_allclose(got, numpy_functionals(x, mask, ALL_STATS), rtol=1e-5, atol=2e-4)


def test_mask_with_holes():
    """Any 0/1 mask: statistics over the marked steps; deltas only between real neighbours."""
    x, _ = random_batch(seed=3, b=2, t=8, d=3)
    mask = np.array([[1, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 1, 0]], "int32")
    got = UtteranceFunctionals(ALL_STATS)(x, padding_mask=mask).numpy()
    np.testing.assert_allclose(got, numpy_functionals(x, mask, ALL_STATS), rtol=1e-5, atol=2e-4)


def test_percentiles_nearest_rank_floor_for_every_length():
    """p0..p99 of 0, 1, ..., n-1 is floor(q * (n - 1) / 100): no float32 off-by-one rank."""
    n_max = 41
    x = np.tile(np.arange(n_max, dtype="float32")[None, :, None], (n_max, 1, 1))
    # Shuffle the time order of the real frames: the layer must sort.
    rng = np.random.default_rng(0)
    for i in range(n_max):
        x[i, : i + 1, 0] = rng.permutation(i + 1)
    mask = (np.arange(n_max)[None] < np.arange(1, n_max + 1)[:, None]).astype("int32")
    got = UtteranceFunctionals([f"p{q}" for q in range(100)])(x, padding_mask=mask).numpy()
    ref = np.array([[(q * (n - 1)) // 100 for q in range(100)] for n in range(1, n_max + 1)])
    np.testing.assert_array_equal(got, ref)


def test_padded_values_never_change_the_output():
    x, mask = random_batch(seed=4, lengths=(7, 3, 1, 5))
    layer = UtteranceFunctionals(ALL_STATS)
    base = layer(x, padding_mask=mask).numpy()
    noisy = x.copy()
    pad = mask == 0
    noisy[pad] = np.random.default_rng(9).normal(scale=1e3, size=(pad.sum(), 5))
    np.testing.assert_array_equal(layer(noisy, padding_mask=mask).numpy(), base)
    # Trailing padding can also be cut off: same numbers (up to float32 summation order).
    for i, n in enumerate((7, 3, 1, 5)):
        alone = layer(x[i : i + 1, :n], padding_mask=mask[i : i + 1, :n]).numpy()
        np.testing.assert_allclose(alone[0], base[i], rtol=1e-6, atol=1e-6)


def test_sample_without_real_frames_gives_zeros():
    x, mask = random_batch(seed=5, lengths=(0, 0, 2, 7))
    x[:2] = 123.0  # whatever the padded values
    got = UtteranceFunctionals(ALL_STATS)(x, padding_mask=mask).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:2], np.zeros((2, 5 * len(ALL_STATS))))
    assert np.abs(got[3]).sum() > 0


def test_no_mask_means_all_frames_real():
    x, _ = random_batch(seed=6)
    layer = UtteranceFunctionals(["mean", "max", "delta_std"])
    np.testing.assert_allclose(
        layer(x).numpy(),
        layer(x, padding_mask=np.ones(x.shape[:2], "int32")).numpy(),
        rtol=0,
        atol=0,
    )


def test_single_frame_deltas_are_zero():
    x, mask = random_batch(seed=7, lengths=(1, 1, 1, 1))
    got = UtteranceFunctionals(["delta_abs_mean", "delta_std"])(x, padding_mask=mask).numpy()
    np.testing.assert_array_equal(got, np.zeros_like(got))


def test_output_shape_symbolic_and_compute_output_shape():
    layer = UtteranceFunctionals(["mean", "p50", "delta_std"])
    assert layer.compute_output_shape((None, None, 16)) == (None, 48)
    assert layer.compute_output_shape((2, 5, None)) == (2, None)
    x = keras.Input((None, 16))
    m = keras.Input((None,), dtype="int32")
    y = layer(x, padding_mask=m)
    assert tuple(y.shape) == (None, 48)
    eager = layer(np.zeros((3, 4, 16), "float32"), padding_mask=np.ones((3, 4), "int32"))
    assert tuple(eager.shape) == (3, 48)


def test_config_round_trip():
    layer = UtteranceFunctionals(["p10", "mean", "delta_abs_mean"], name="f")
    config = layer.get_config()
    assert config["stats"] == ["p10", "mean", "delta_abs_mean"]
    clone = UtteranceFunctionals.from_config(config)
    assert clone.stats == layer.stats and clone.name == "f"
    x, mask = random_batch(seed=8)
    np.testing.assert_array_equal(
        clone(x, padding_mask=mask).numpy(), layer(x, padding_mask=mask).numpy()
    )


def test_saved_model_file_round_trip(tmp_path):
    x_in = keras.Input((None, 4), name="x")
    m_in = keras.Input((None,), dtype="int32", name="m")
    f = UtteranceFunctionals(["mean", "std", "p90", "delta_std"], name="func")(
        x_in, padding_mask=m_in
    )
    y = keras.layers.Dense(3, name="out")(f)
    model = keras.Model({"x": x_in, "m": m_in}, y)
    x, mask = random_batch(seed=10, d=4)
    before = model({"x": x, "m": mask}).numpy()
    path = tmp_path / "functionals.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("func").stats == ["mean", "std", "p90", "delta_std"]
    np.testing.assert_array_equal(loaded({"x": x, "m": mask}).numpy(), before)


@pytest.mark.parametrize(
    "stats", [["median"], ["p100"], ["p5x"], ["mean", "mean"], [3], ["Mean"], []]
)
def test_invalid_names_raise(stats):
    with pytest.raises(ValueError):
        UtteranceFunctionals(stats)


def test_check_functionals():
    names = ("mean", "p5", "p95", "delta_std")
    assert check_functionals(names) == list(names)
    with pytest.raises(ValueError, match="'kurtosis'"):
        check_functionals(["mean", "kurtosis"])
    with pytest.raises(ValueError, match="twice"):
        check_functionals(["std", "std"])


def test_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="padding_mask"):
        UtteranceFunctionals(["mean"])(np.zeros((2, 5, 3), "float32"), np.ones((2, 6), "int32"))


def test_mixed_float16_policy_gives_float32():
    keras.config.set_dtype_policy("mixed_float16")
    x, mask = random_batch(seed=11)
    layer = UtteranceFunctionals(["mean", "std", "min", "p50", "delta_abs_mean"])
    got = layer(x, padding_mask=mask)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    # The inputs are cast to float16 by the policy; the statistics are those of that input.
    x16 = x.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(
        got.numpy(),
        numpy_functionals(x16, mask, ["mean", "std", "min", "p50", "delta_abs_mean"]),
        rtol=1e-3,
        atol=1e-3,
    )


def test_mixed_float16_symbolic_output_is_float32():
    keras.config.set_dtype_policy("mixed_float16")
    layer = UtteranceFunctionals(["mean", "std"])
    sym = layer(keras.Input((None, 5)), padding_mask=keras.Input((None,), dtype="int32"))
    assert keras.backend.standardize_dtype(sym.dtype) == "float32"
