"""ks_keras.audio: decoding, mono mix, resampling, and every bad-input case."""

import warnings

import numpy as np
import pytest
import soundfile as sf

from ks_keras.audio import AudioQualityWarning, load_audio, read_audio

SR = 16000


def tone(freq=440.0, seconds=0.5, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, data, sr=SR, **kw):
    sf.write(str(path), data, sr, **kw)
    return path


def dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_formats_decode_to_float32_mono(tmp_path, fmt):
    x = tone()
    path = write(tmp_path / f"a.{fmt}", x)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 0.01 * len(x)
    assert abs(dominant_freq(y, SR) - 440) < 5
    assert np.abs(y).max() <= 1.0


def test_wav_values_match_pcm16(tmp_path):
    x = tone()
    y = load_audio(write(tmp_path / "a.wav", x, subtype="PCM_16"))
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(440), tone(440, amp=0.1)
    y = load_audio(write(tmp_path / "s.wav", np.stack([left, right], 1), subtype="FLOAT"))
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_resampled_with_soxr(tmp_path):
    x = tone(1000, seconds=1.0, sr=8000)
    y = load_audio(write(tmp_path / "a.wav", x, sr=8000), sample_rate=SR)
    assert len(y) == SR
    assert abs(dominant_freq(y, SR) - 1000) < 3
    wave, rate = read_audio(tmp_path / "a.wav")
    assert rate == 8000 and len(wave) == 8000


def test_float_file_is_clamped_and_warns(tmp_path):
    x = tone(amp=1.5)
    with pytest.warns(AudioQualityWarning, match="clipping"):
        y = load_audio(write(tmp_path / "loud.wav", x, subtype="FLOAT"))
    assert y.max() <= 1.0 and y.min() >= -1.0


def test_clipping_warns_but_loads(tmp_path):
    x = np.clip(tone(amp=3.0), -1, 1)
    with pytest.warns(AudioQualityWarning, match="clipping"):
        y = load_audio(write(tmp_path / "clip.wav", x))
    assert len(y) == len(x)


def test_silence_warns_but_loads(tmp_path):
    with pytest.warns(AudioQualityWarning, match="silence"):
        y = load_audio(write(tmp_path / "quiet.wav", np.zeros(SR, np.float32)))
    assert len(y) == SR and not y.any()


def test_normal_file_does_not_warn(tmp_path):
    path = write(tmp_path / "a.wav", tone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "junk.wav"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match=r"junk\.wav.*cannot decode"):
        load_audio(path)


def test_header_only_file(tmp_path):
    data = write(tmp_path / "a.wav", tone()).read_bytes()
    (tmp_path / "hdr.wav").write_bytes(data[:30])
    with pytest.raises(ValueError, match=r"hdr\.wav"):
        load_audio(tmp_path / "hdr.wav")


def test_truncated_wav(tmp_path):
    data = write(tmp_path / "a.wav", tone()).read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.wav: truncated"):
        load_audio(tmp_path / "cut.wav")


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_truncated_compressed(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = write(
        tmp_path / f"a.{fmt}", (0.1 * rng.standard_normal(SR)).astype(np.float32)
    ).read_bytes()
    (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cut\.{fmt}"):
        load_audio(tmp_path / f"cut.{fmt}")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.wav"):
        load_audio(tmp_path / "empty.wav")


def test_zero_length_audio(tmp_path):
    path = write(tmp_path / "zero.wav", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"zero\.wav.*zero length"):
        load_audio(path)


def test_shorter_than_minimum(tmp_path):
    path = write(tmp_path / "short.wav", tone(seconds=0.05))
    with pytest.raises(ValueError, match=r"short\.wav.*shorter than the minimum 0.1 s"):
        load_audio(path, min_seconds=0.1)
    assert len(load_audio(path, min_seconds=0.01)) == 800


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_samples(tmp_path, bad):
    x = tone()
    x[100] = bad
    path = write(tmp_path / "bad.wav", x, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"bad\.wav.*NaN/inf"):
        load_audio(path)


def test_bad_sample_rate_argument(tmp_path):
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(write(tmp_path / "a.wav", tone()), sample_rate=0)
