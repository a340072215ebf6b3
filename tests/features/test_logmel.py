"""Built-in log-mel: shapes, framing, in-graph parity, numbers, metadata, bad input."""

import numpy as np
import pytest
import tensorflow as tf

from ks_keras.config import AudioFeatureConfig, FeaturesConfig, TextFeatureConfig
from ks_keras.features import feature_dims, get_audio_extractor
from ks_keras.features.logmel import LogMelExtractor, logmel_tf, num_frames

SR = 16000


def tone(freq, seconds, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def ext():
    return get_audio_extractor(AudioFeatureConfig())


def test_interface(ext):
    assert isinstance(ext, LogMelExtractor)
    assert ext.name == "logmel" and ext.dim == 80 and ext.frame_rate == 100.0
    assert (ext.frame_length, ext.frame_step, ext.fft_length) == (400, 160, 512)


def test_frame_counts_and_shapes(ext):
    lengths = [400, 401, 559, 560, 16000, 100]
    feats = ext.extract([np.full(n, 0.1, np.float32) for n in lengths])
    assert [f.shape for f in feats] == [(num_frames(n, 400, 160), 80) for n in lengths]
    assert [f.shape[0] for f in feats] == [1, 1, 1, 2, 98, 1]
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in feats)


def test_tone_peaks_in_the_right_mel_band(ext):
    low, high = ext.extract([tone(300, 0.5), tone(3000, 0.5)])
    assert low.mean(0).argmax() < high.mean(0).argmax()
    # The 3 kHz band: mel(3000) / mel(8000) of the 80 bands (fmin 20 Hz).
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    expected = (mel(3000) - mel(20)) / (mel(8000) - mel(20)) * 81 - 1
    assert abs(high.mean(0).argmax() - expected) <= 1.5


def test_log_floor_on_silence(ext):
    [f] = ext.extract([np.zeros(1600, np.float32)])
    np.testing.assert_allclose(f, np.log(1e-6), rtol=1e-6)


def test_batch_padding_never_changes_valid_frames_and_graph_matches(ext, f32_close):
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 7000, 1234)]
    single = [ext.extract([w])[0] for w in waves]
    batched = ext.extract(waves)
    # Same values up to float32 rounding: a padded batch may take other kernel paths.
    for a, b in zip(single, batched):
        f32_close(a, b)
    # The pure-TF function inside a tf.function (as in a SavedModel signature), on a padded
    # batch, gives the numbers of `extract` (up to rounding); padded frames and mask are zero.
    padded = np.zeros((3, 16000), np.float32)
    for i, w in enumerate(waves):
        padded[i, : len(w)] = w
    fn = tf.function(
        lambda w, n: logmel_tf(w, n),
        input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)],
    )
    feats, mask = fn(tf.constant(padded), tf.constant([16000, 7000, 1234], tf.int32))
    assert feats.shape == (3, 98, 80) and mask.dtype == tf.int32
    feats, mask = feats.numpy(), mask.numpy()
    for i, s in enumerate(single):
        n = s.shape[0]
        assert mask[i].sum() == n and mask[i, :n].all()
        f32_close(feats[i, :n], s)
        assert not feats[i, n:].any()


def test_bound_method_and_zero_length_rows(ext):
    feats, mask = ext.logmel_tf(tf.zeros([2, 300]), tf.constant([300, 0]))
    assert feats.shape == (2, 1, 80)
    assert mask.numpy().tolist() == [[1], [0]]


def test_settings_change_dims_and_metadata():
    a = get_audio_extractor(AudioFeatureConfig(n_mels=40, hop_ms=20.0))
    b = get_audio_extractor(AudioFeatureConfig())
    assert a.dim == 40 and a.frame_rate == 50.0
    assert a.extract([np.zeros(16000, np.float32)])[0].shape == (49, 40)
    assert a.metadata != b.metadata
    assert b.metadata["n_mels"] == 80 and "tensorflow" in b.metadata["packages"]
    import json

    json.dumps(b.metadata)  # JSON-able


def test_feature_dims_without_loading_models():
    cfg = FeaturesConfig(audio=AudioFeatureConfig(n_mels=64), text=TextFeatureConfig())
    assert feature_dims(cfg) == (64, 384)


@pytest.mark.parametrize(
    "batch, match",
    [
        ([np.zeros(0, np.float32)], "item 0: 0 samples"),
        ([np.zeros((2, 100), np.float32)], "item 0: expected a 1-D waveform"),
        ([np.array([0.1, np.nan] * 300, np.float32)], "item 0: contains NaN"),
        (np.zeros(100, np.float32), "expected a list"),
    ],
)
def test_bad_batches(ext, batch, match):
    with pytest.raises(ValueError, match=match):
        ext.extract(batch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_mels=0), "n_mels"),
        (dict(log_floor=0.0), "log_floor"),
        (dict(mel_fmin=9000.0), "mel_fmin"),
        (dict(mel_fmax=9000.0), "mel_fmax"),
        (dict(win_ms=0.01), "win_ms"),
        (dict(sample_rate=0), "sample_rate"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_audio_extractor(AudioFeatureConfig(**kwargs))
