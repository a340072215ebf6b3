"""Speed perturbation: `audio.change_speed`, cached variants (`features.audio.speed_perturb`)
and the training draw in `make_dataset` (seeded, one variant per utterance per epoch, off
without shuffling)."""

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from ks_keras.audio import change_speed
from ks_keras.config import DataConfig, config_from_dict
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.data import compute_norm_stats, make_dataset
from ks_keras.features.base import FeatureExtractor
from ks_keras.features.cache import FeatureCache, extract_corpus

N = 12
DATA = DataConfig(audio_max_len=400, text_max_len=4, shuffle_buffer=64)
FACTORS = [0.8, 1.25]


class LengthAudio(FeatureExtractor):
    """One frame per 10 ms; every frame holds the utterance's sample count (so a test can
    tell which speed variant an element came from)."""

    modality, name, dim, frame_rate = "audio", "length", 2, 100.0
    metadata = {"type": "length"}

    def extract(self, batch):
        return [np.full((max(1, len(w) // 160), 2), float(len(w)), np.float32) for w in batch]


class OneText(FeatureExtractor):
    modality, name, dim, frame_rate = "text", "one", 3, None
    metadata = {"type": "one"}

    def extract(self, batch):
        return [np.ones((len(t.split()), 3), np.float32) for t in batch]


def test_change_speed_length_and_identity():
    wave = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.5
    np.testing.assert_array_equal(change_speed(wave, 1.0), wave)
    for factor in (0.9, 1.1, 0.5, 2.0):
        out = change_speed(wave, factor)
        assert out.dtype == np.float32 and out.ndim == 1
        assert abs(len(out) - len(wave) / factor) <= 2
        assert np.abs(out).max() <= 1.0
    # Slower speech is lower: the dominant frequency scales with the factor.
    slow = change_speed(wave, 0.8)
    peak = lambda x: np.argmax(np.abs(np.fft.rfft(x))) / len(x)  # noqa: E731
    assert peak(slow) == pytest.approx(0.8 * peak(wave), rel=0.02)


@pytest.mark.parametrize("factor", [0.4, 2.5, float("nan")])
def test_change_speed_rejects_bad_factor(factor):
    with pytest.raises(ValueError, match="speed factor"):
        change_speed(np.zeros(1600, np.float32), factor)


@pytest.mark.parametrize(
    "value, match",
    [
        ([1.0], "other than 1.0"),
        ([0.9, 0.9], "distinct"),
        ([0.3], r"\[0.5, 2.0\]"),
        ("fast", "expected a list"),
    ],
)
def test_config_rejects_bad_factors(value, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({"features": {"audio": {"speed_perturb": value}}})


def test_config_needs_audio_modality():
    with pytest.raises(ValueError, match="features.audio.speed_perturb"):
        config_from_dict(
            {
                "features": {"audio": {"speed_perturb": [0.9]}},
                "model": {"modalities": ["text"]},
            }
        )


def build(tmp, factors=FACTORS):
    rng = np.random.default_rng(0)
    utts = []
    for i in range(N):
        path = tmp / f"u{i}.wav"
        wave = (0.1 * rng.standard_normal(3200 + 400 * i)).astype(np.float32)
        sf.write(str(path), wave, 16000)
        utts.append(Utterance(f"u{i}", str(path), f"s{i % 3}", "abc"[i % 3], "one two"))
    corpus = Corpus(utts, ["a", "b", "c"])
    cfg = config_from_dict(
        {
            "features": {
                "cache_dir": str(tmp / "cache"),
                "shard_size": 5,
                "audio": {"speed_perturb": factors},
            }
        }
    )
    cache = extract_corpus(
        cfg, corpus, progress=False, extractors={"audio": LengthAudio(), "text": OneText()}
    )
    return cfg, corpus, cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("speed"))


def samples_of(cache, utt_id):
    return float(cache.get(utt_id)[0][0, 0])


def test_variants_are_cached_next_to_the_original(built, tmp_path):
    cfg, corpus, cache = built
    assert [v.speed for v in cache.variants] == FACTORS and cache.speed == 1.0
    for v in cache.variants:
        assert v.cache_dir.parent == cache.cache_dir
        assert v.cache_dir.name == f"speed-{v.speed:g}"
        assert sorted(v.ids) == sorted(cache.ids)
        for u in corpus.ids:
            original = samples_of(cache, u)
            assert abs(samples_of(v, u) - original / v.speed) <= 2
        # Reopened from disk, a variant knows its factor.
        assert FeatureCache.open(v.cache_dir).speed == v.speed
    # A second run extracts nothing more, variants included.
    again = extract_corpus(
        cfg, corpus, progress=False, extractors={"audio": LengthAudio(), "text": OneText()}
    )
    assert again.last_run["extracted"] == 0
    assert all(v.last_run["extracted"] == 0 for v in again.variants)


def test_no_variants_when_off(tmp_path):
    _, _, cache = build(tmp_path, factors=[])
    assert cache.variants == []
    assert not any(p.name.startswith("speed-") for p in cache.cache_dir.iterdir())


def epoch_variants(ds, cache, corpus):
    """{utt id: speed factor} of one pass over a training dataset (with ids)."""
    speeds = [1.0] + [v.speed for v in cache.variants]
    out = {}
    for inputs, _ in ds:
        for utt_id, audio in zip(inputs["id"].numpy(), inputs["audio"].numpy()):
            utt_id = utt_id.decode()
            got = audio[0, 0]
            original = samples_of(cache, utt_id)
            factor = min(speeds, key=lambda f: abs(original / f - got))
            assert abs(original / factor - got) <= 2
            assert utt_id not in out, "one element per utterance and epoch"
            out[utt_id] = factor
    assert sorted(out) == sorted(corpus.ids)
    return out


def training_set(cache, corpus, seed, **kw):
    return make_dataset(
        cache,
        corpus.ids,
        corpus.label_ids(),
        DATA,
        batch_size=4,
        shuffle=True,
        seed=seed,
        **{"with_ids": True, **kw},
    )


def test_training_draws_one_variant_per_utterance_per_epoch(built):
    _, corpus, cache = built
    tf.random.set_seed(0)
    ds = training_set(cache, corpus, seed=3)
    assert int(ds.cardinality()) == 3  # 12 utterances, batches of 4: same epoch length
    epochs = [epoch_variants(ds, cache, corpus) for _ in range(4)]
    used = {f for e in epochs for f in e.values()}
    assert used == {1.0, *FACTORS}  # every variant is used
    assert len({tuple(sorted(e.items())) for e in epochs}) > 1  # redrawn every epoch


def test_training_draw_is_seeded(built):
    _, corpus, cache = built

    def run(seed):
        tf.random.set_seed(0)
        ds = training_set(cache, corpus, seed=seed)
        return [epoch_variants(ds, cache, corpus) for _ in range(2)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_evaluation_and_opt_out_use_the_original(built):
    _, corpus, cache = built
    ordered = make_dataset(
        cache, corpus.ids, corpus.label_ids(), DATA, batch_size=4, shuffle=False, with_ids=True
    )
    assert set(epoch_variants(ordered, cache, corpus).values()) == {1.0}
    off = training_set(cache, corpus, seed=3, speed_variants=False)
    for _ in range(2):
        assert set(epoch_variants(off, cache, corpus).values()) == {1.0}


def test_variants_use_the_original_normalisation(built):
    _, corpus, cache = built
    speaker_of = corpus.speaker_of()
    norm = compute_norm_stats(cache, corpus.ids, "speaker", speaker_of)
    ds = training_set(cache, corpus, seed=1, normalizer=norm, speaker_of=speaker_of)
    for inputs, _ in ds:
        for utt_id, audio, mask in zip(
            inputs["id"].numpy(), inputs["audio"].numpy(), inputs["audio_mask"].numpy()
        ):
            mean, std = norm.stats_for(utt_id.decode(), speaker_of)
            raw = audio[mask == 1] * std + mean
            assert np.ptp(raw[:, 0]) < 1e-2  # constant frames: normalised by the same stats
            assert np.all(audio[mask == 0] == 0)


def test_bucketed_training_with_variants(built):
    _, corpus, cache = built
    ds = training_set(cache, corpus, seed=2, bucket_by_length=True)
    counts = set()
    for _ in range(4):
        assert len(epoch_variants(ds, cache, corpus)) == N
        counts.add(sum(1 for _ in ds))
    # Buckets go by the original length: the same number of batches every epoch (Keras
    # counts the batches of the first epoch).
    assert len(counts) == 1
    plain = training_set(cache, corpus, seed=2, bucket_by_length=True, with_ids=False)
    assert "id" not in plain.element_spec[0]
