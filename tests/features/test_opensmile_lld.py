"""openSMILE LLD front-end: frame alignment, deltas, and the extractor (child process)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ks_keras.config import AudioFeatureConfig, FeaturesConfig
from ks_keras.features import feature_dims, get_audio_extractor
from ks_keras.features.logmel import LogMelExtractor
from ks_keras.features.opensmile_lld import (
    LLD_DIMS,
    OpenSmileLLDExtractor,
    average_onto_frames,
    opensmile_available,
    regression_deltas,
)

SR = 16000

# ---------------------------------------------------------------------------------------------
# average_onto_frames


def test_average_onto_frames_hand_computed():
    # sample_rate 8, hop 1 sample, window 2 samples: target k is centred at (k + 1) / 8 s and
    # collects source centres in [centre - 1/16, centre + 1/16). All times are exact binary.
    centres = np.array([3, 5, 7, 15, 16, 29]) / 32
    values = np.array([[1.0, 10.0], [2, 20], [3, 30], [4, 40], [5, 50], [6, 60]])
    out = average_onto_frames(values, centres - 1 / 64, centres + 1 / 64, 7, 2, 1, 8)
    expected = [
        [1.5, 15],  # [2/32, 6/32): sources 0 and 1
        [3, 30],  # [6/32, 10/32): source 2
        [4, 40],  # [10/32, 14/32): none; 15/32 (3/32 away) is nearer than 7/32 (5/32)
        [4.5, 45],  # [14/32, 18/32): sources 3 and 4
        [5, 50],  # [18/32, 22/32): none; 16/32 (4/32 away) beats 29/32 (9/32)
        [6, 60],  # [22/32, 26/32): none; 29/32 (5/32 away) beats 16/32 (8/32)
        [6, 60],  # [26/32, 30/32): source 5
    ]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_average_onto_frames_before_and_after_all_sources():
    centres = np.array([0.5, 0.6])
    values = np.array([[1.0], [3.0]])
    # 10 Hz, hop 1, window 1: targets centred at 0.05, 0.15, ..., 0.95.
    out = average_onto_frames(values, centres, centres, 10, 1, 1, 10)[:, 0]
    assert out[:5].tolist() == [1.0] * 5  # nearest is the first source
    assert out[-3:].tolist() == [3.0] * 3  # nearest is the last source


def test_average_onto_frames_empty_cases():
    values = np.ones((3, 4))
    times = np.array([0.0, 0.01, 0.02])
    none = average_onto_frames(values, times, times + 0.02, 0, 400, 160, SR)
    assert none.shape == (0, 4) and none.dtype == np.float32
    zeros = average_onto_frames(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 5, 400, 160, SR)
    assert zeros.dtype == np.float32
    np.testing.assert_array_equal(zeros, np.zeros((5, 4), np.float32))


def test_average_onto_frames_one_to_one_on_the_logmel_grid():
    # eGeMAPS LLD frames: 20 ms from j * 10 ms (centres 10 ms + j * 10 ms). Log-mel frames of
    # 25 ms every 10 ms are centred 12.5 ms + k * 10 ms: exactly one LLD centre each.
    j = np.arange(50)
    values = np.stack([j, -2.0 * j], axis=1)
    out = average_onto_frames(values, 0.01 * j, 0.01 * j + 0.02, 49, 400, 160, SR)
    np.testing.assert_array_equal(out, values[:49].astype(np.float32))


# ---------------------------------------------------------------------------------------------
# regression_deltas


def numpy_deltas(x, window):
    n = x.shape[0]
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(n):
        for k in range(1, window + 1):
            out[t] += k * (x[min(t + k, n - 1)] - x[max(t - k, 0)])
    return out / (2 * sum(k * k for k in range(1, window + 1)))


@pytest.mark.parametrize("n,window", [(7, 2), (3, 2), (1, 2), (6, 1), (9, 3)])
def test_regression_deltas_formula_with_repeated_edges(n, window):
    x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
    got = regression_deltas(x, window)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_deltas(x, window), rtol=1e-6, atol=1e-6)


def test_regression_deltas_of_a_ramp_is_its_slope():
    t = np.arange(10, dtype=np.float32)
    x = np.stack([3.0 * t + 1.0, -0.5 * t], axis=1)
    got = regression_deltas(x)
    np.testing.assert_allclose(got[2:-2], np.tile([3.0, -0.5], (6, 1)), rtol=1e-6)
    # Edges repeat the end values: at t=0 (3*1 + 2*6) / 10 = 1.5 for slope 3.
    np.testing.assert_allclose(got[0], [1.5, -0.25], rtol=1e-6)
    np.testing.assert_allclose(got[-1], [1.5, -0.25], rtol=1e-6)


def test_regression_deltas_empty_and_constant():
    assert regression_deltas(np.zeros((0, 4))).shape == (0, 4)
    np.testing.assert_array_equal(regression_deltas(np.full((5, 2), 3.0)), np.zeros((5, 2)))


# ---------------------------------------------------------------------------------------------
# The extractor

needs_opensmile = pytest.mark.skipif(not opensmile_available(), reason="opensmile not installed")


def tone(seconds, seed=0):
    """A harmonic tone with vibrato (f0 around 180 Hz) and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 180.0 + 20.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wave = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
    wave = wave * np.minimum(1.0, 20 * t) + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


WAVES = [tone(0.7, 0), tone(0.5, 1), tone(0.93, 2)]

CONFIGS = {
    "egemaps": dict(type="opensmile"),
    "egemaps_deltas_hop20": dict(type="opensmile", opensmile_deltas=True, hop_ms=20.0, win_ms=40.0),
    "logmel_egemaps_deltas": dict(type="logmel+opensmile", opensmile_deltas=True, n_mels=20),
    "logmel_compare": dict(type="logmel+opensmile", opensmile_set="compare", n_mels=20),
    "compare_deltas": dict(type="opensmile", opensmile_set="compare", opensmile_deltas=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def extractor(request):
    if not opensmile_available():
        pytest.skip("opensmile not installed")
    cfg = AudioFeatureConfig(**CONFIGS[request.param])
    ext = OpenSmileLLDExtractor(cfg)
    yield ext
    ext.close()


@pytest.fixture(scope="module")
def features(extractor):
    return extractor.extract(WAVES)


@needs_opensmile
def test_shapes_dtype_and_frame_grid(extractor, features):
    cfg = extractor.cfg
    logmel = LogMelExtractor(AudioFeatureConfig(n_mels=8, win_ms=cfg.win_ms, hop_ms=cfg.hop_ms))
    lld = LLD_DIMS[cfg.opensmile_set] * (2 if cfg.opensmile_deltas else 1)
    dim = lld + (cfg.n_mels if cfg.type == "logmel+opensmile" else 0)
    assert extractor.dim == dim == feature_dims(FeaturesConfig(audio=cfg))[0]
    assert extractor.lld_dim == lld
    assert extractor.frame_rate == pytest.approx(1000.0 / cfg.hop_ms)
    mel_frames = [m.shape[0] for m in logmel.extract(WAVES)]
    for wave, x, t in zip(WAVES, features, mel_frames, strict=True):
        assert x.shape == (t, dim) == (extractor.num_frames(wave.shape[0]), dim)
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
        assert x.std(axis=0).max() > 0  # not all constant


@needs_opensmile
def test_same_wave_gives_identical_output(extractor, features, f32_close):
    # Up to float32 rounding: the log-mel part is a matmul whose kernel (oneDNN with AVX2 or
    # AVX-512 code) may block another batch, or another row of the same batch, differently.
    again = extractor.extract([WAVES[0], WAVES[0]])
    f32_close(again[0], features[0], err_msg=extractor.name)
    f32_close(again[1], features[0], err_msg=extractor.name)


@needs_opensmile
def test_batch_equals_one_at_a_time(extractor, features, f32_close):
    for wave, x in zip(WAVES, features, strict=True):
        [alone] = extractor.extract([wave])
        f32_close(alone, x, err_msg=extractor.name)


@needs_opensmile
def test_lld_part_and_deltas(extractor, features):
    base = LLD_DIMS[extractor.cfg.opensmile_set]
    for wave, x in zip(WAVES, features, strict=True):
        lld = x[:, x.shape[1] - extractor.lld_dim :]
        np.testing.assert_array_equal(lld, extractor.descriptors(wave))
        if extractor.cfg.opensmile_deltas:
            np.testing.assert_allclose(
                lld[:, base:], regression_deltas(lld[:, :base]), rtol=1e-6, atol=1e-6
            )


@needs_opensmile
def test_logmel_part_equals_logmel_extractor(extractor, features, f32_close):
    cfg = extractor.cfg
    if cfg.type != "logmel+opensmile":
        pytest.skip("no log-mel part")
    mels = LogMelExtractor(logmel_config(cfg)).extract(WAVES)
    for x, m in zip(features, mels, strict=True):
        f32_close(x[:, : cfg.n_mels], m)
    assert extractor.metadata["logmel"]["n_mels"] == cfg.n_mels


def logmel_config(cfg):
    """The plain log-mel settings of a logmel+opensmile config."""
    return AudioFeatureConfig(
        type="logmel",
        n_mels=cfg.n_mels,
        win_ms=cfg.win_ms,
        hop_ms=cfg.hop_ms,
        sample_rate=cfg.sample_rate,
        mel_fmin=cfg.mel_fmin,
        mel_fmax=cfg.mel_fmax,
        log_floor=cfg.log_floor,
    )


@needs_opensmile
def test_minimum_length_utterance_is_finite(extractor):
    # features.audio.min_seconds defaults to 0.1 s.
    [x] = extractor.extract([tone(0.1, 5)])
    assert x.shape == (extractor.num_frames(1600), extractor.dim)
    assert np.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# Metadata, factory and errors (no child process needed)


@needs_opensmile
def test_metadata_differs_between_sets_and_deltas():
    metas = {
        name: OpenSmileLLDExtractor(AudioFeatureConfig(**kwargs)).metadata
        for name, kwargs in CONFIGS.items()
    }
    assert metas["egemaps"]["opensmile_set"] == "eGeMAPSv02"
    assert metas["compare_deltas"]["opensmile_set"] == "ComParE_2016"
    assert metas["egemaps"]["opensmile_deltas"] is False
    assert metas["logmel_egemaps_deltas"]["opensmile_deltas"] is True
    assert metas["logmel_egemaps_deltas"]["delta_window"] == 2
    assert "logmel" not in metas["egemaps"]
    frozen = [repr(sorted(m.items())) for m in metas.values()]
    assert len(set(frozen)) == len(frozen)
    plain = dict(type="opensmile")
    assert (
        OpenSmileLLDExtractor(AudioFeatureConfig(**plain)).metadata
        != OpenSmileLLDExtractor(AudioFeatureConfig(**plain, opensmile_deltas=True)).metadata
    )


@needs_opensmile
def test_factory_builds_the_extractor():
    ext = get_audio_extractor(AudioFeatureConfig(type="logmel+opensmile", n_mels=20))
    assert isinstance(ext, OpenSmileLLDExtractor)
    assert ext.name == "logmel+opensmile_egemaps" and ext.dim == 45


def test_wrong_type_raises():
    with pytest.raises(ValueError, match="features.audio.type"):
        OpenSmileLLDExtractor(AudioFeatureConfig(type="logmel"))


@needs_opensmile
def test_bad_waveforms_raise():
    ext = OpenSmileLLDExtractor(AudioFeatureConfig(type="opensmile"))
    with pytest.raises(ValueError, match="NaN"):
        ext.extract([np.full(1600, np.nan, np.float32)])
    with pytest.raises(ValueError, match="1-D"):
        ext.extract([np.zeros((2, 1600), np.float32)])
    assert ext._worker._proc is None  # rejected before any child process started


def test_worker_module_does_not_load_tensorflow():
    # The child exists to keep openSMILE away from TensorFlow (heap corruption otherwise).
    code = textwrap.dedent(
        """
        import sys
        import ks_keras.features.smile_worker
        assert "tensorflow" not in sys.modules, "tensorflow imported"
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_opensmile
def test_aligned_to_raw_opensmile_lld(tmp_path):
    """With 25 ms / 10 ms frames each eGeMAPS LLD frame maps onto one log-mel frame; and the
    extractor survives close()."""
    wave = WAVES[0]
    np.save(tmp_path / "wave.npy", wave)
    code = textwrap.dedent(
        f"""
        import numpy as np
        from ks_keras.features.smile_worker import descriptors, make_smile
        wave = np.load({str(tmp_path / "wave.npy")!r})
        np.save({str(tmp_path / "raw.npy")!r}, descriptors(make_smile("egemaps"), wave, {SR}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    raw = np.load(tmp_path / "raw.npy")
    centres = raw[:, :2].mean(1)
    ext = OpenSmileLLDExtractor(AudioFeatureConfig(type="opensmile"))
    try:
        lld = ext.descriptors(wave)
        ext.close()
        assert ext._worker._proc is None
        # A new child starts on demand after close(), with the same numbers.
        np.testing.assert_array_equal(ext.descriptors(wave), lld)
    finally:
        ext.close()
    # Rows whose LLD centre lies on the regular 10 ms grid match one to one.
    regular = np.flatnonzero(np.isclose(centres, 0.01 * (np.arange(len(raw)) + 1)))
    assert len(regular) > 50
    regular = regular[regular < len(lld)]
    np.testing.assert_array_equal(lld[regular], raw[regular, 2:].astype(np.float32))
