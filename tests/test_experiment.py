"""ks_keras.experiment: the one pipeline train, evaluate and tune share."""

import numpy as np
import pytest
import soundfile as sf

from ks_keras.config import config_from_dict
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.data import compute_norm_stats
from ks_keras.experiment import Experiment, audio_normalizer, check_classes, softmax_rows
from ks_keras.features import get_audio_extractor
from ks_keras.features.base import FeatureExtractor
from ks_keras.features.cache import extract_corpus
from ks_keras.training import balanced_class_weights

N = 12


class WordText(FeatureExtractor):
    """One deterministic 8-d row per word."""

    modality, name, dim, frame_rate = "text", "words", 8, None
    metadata = {"type": "words"}

    def extract(self, batch):
        return [np.stack([np.full(8, len(w), np.float32) for w in t.split()]) for t in batch]


def _config(tmp, **sections):
    tree = {
        "model": {"audio_dim": 8, "text_dim": 8, "num_classes": 3},
        "features": {"cache_dir": str(tmp / "cache"), "audio": {"n_mels": 8}},
        "data": {"audio_max_len": 30, "text_max_len": 4, "bucket_by_length": True},
        "train": {"batch_size": 4},
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return config_from_dict(tree)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    rng = np.random.default_rng(0)
    utts = []
    for i in range(N):
        path = tmp / f"u{i}.wav"
        # Lengths differ (8 … 60 frames) so bucketing reorders the batches.
        wave = ((1 + i % 4) * 0.05 * rng.standard_normal(1600 + 1200 * (i * 5 % N))).astype(
            np.float32
        )
        sf.write(str(path), wave, 16000)
        words = " ".join(["w" * (1 + k) for k in range(1 + i % 3)])
        utts.append(Utterance(f"u{i}", str(path), f"s{i % 4}", "abc"[i % 3], words))
    corpus = Corpus(utts, ["a", "b", "c"])
    cfg = _config(tmp)
    cache = extract_corpus(
        cfg,
        corpus,
        progress=False,
        extractors={"audio": get_audio_extractor(cfg.features.audio), "text": WordText()},
    )
    return tmp, corpus, cache


def test_class_check_names_both_counts(built):
    tmp, corpus, _ = built
    cfg = _config(tmp, model={"num_classes": 4})
    with pytest.raises(ValueError, match=r"model.num_classes=4.*3 classes.*data.labels"):
        check_classes(cfg, corpus, hint="; set model.num_classes or data.labels")
    check_classes(_config(tmp), corpus)


@pytest.mark.parametrize("mode", ["global", "speaker", "none"])
def test_normaliser_statistics_come_from_the_right_speakers(built, mode):
    tmp, corpus, cache = built
    cfg = _config(tmp, features={"audio": {"n_mels": 8, "normalize": mode}})
    speaker_of = corpus.speaker_of()
    train = [i for i in corpus.ids if speaker_of[i] in ("s0", "s1")]
    other = [i for i in corpus.ids if speaker_of[i] in ("s2", "s3")]
    exp = Experiment(cfg, corpus, cache).with_normalizer(train, other)
    if mode == "none":
        assert exp.normalizer is None and exp.norm_stats is None
        return
    # global: training speakers only (and it travels with a saved model); speaker: every
    # speaker that will be normalised, labels unused (nothing travels: new speakers differ).
    ids = train if mode == "global" else train + other
    expected = compute_norm_stats(cache, ids, mode, speaker_of=speaker_of)
    assert exp.normalizer.to_dict() == expected.to_dict()
    assert (exp.norm_stats is exp.normalizer) == (mode == "global")
    assert audio_normalizer(cfg, cache, speaker_of, train, other).to_dict() == expected.to_dict()


def test_text_only_models_get_no_audio_normaliser(built):
    tmp, corpus, cache = built
    cfg = _config(
        tmp,
        model={"modalities": ["text"]},
        features={"audio": {"n_mels": 8, "normalize": "global"}},
    )
    assert Experiment(cfg, corpus, cache).with_normalizer(corpus.ids).normalizer is None


def test_class_weights_follow_the_training_labels(built):
    tmp, corpus, cache = built
    train = corpus.ids[:7]
    on = Experiment(_config(tmp, data={"class_weights": True}), corpus, cache)
    expected = balanced_class_weights(corpus.label_ids(train), 3)
    assert on.class_weight(train) == expected
    assert (
        Experiment(_config(tmp, data={"class_weights": False}), corpus, cache).class_weight(train)
        is None
    )


class _LengthModel:
    """Stands in for a Keras model: one row per utterance holding its audio length."""

    def predict(self, dataset, verbose=0):
        rows = [np.asarray(batch[0]["audio_mask"]).sum(axis=1, keepdims=True) for batch in dataset]
        return np.concatenate(rows).astype(np.float32)


@pytest.mark.parametrize("bucket", [True, False])
def test_predictions_come_back_in_id_order(built, bucket):
    tmp, corpus, cache = built
    cfg = _config(tmp, data={"bucket_by_length": bucket, "audio_max_len": 30})
    exp = Experiment(cfg, corpus, cache)
    ids = list(reversed(corpus.ids))
    rows = exp.predict(_LengthModel(), ids)
    expected = np.minimum(cache.lengths(ids, "audio"), 30)
    np.testing.assert_array_equal(rows[:, 0], expected)
    # Bucketing really reorders the batches here, so the test can fail.
    order = [int(r) for b in exp.dataset(ids, False) for r in np.asarray(b[0]["audio_mask"]).sum(1)]
    assert (order != expected.tolist()) == bucket


def test_feature_metadata_lists_the_model_modalities(built):
    tmp, corpus, cache = built
    exp = Experiment(_config(tmp), corpus, cache)
    assert set(exp.feature_metadata()) == {"audio", "text"}
    assert exp.feature_metadata()["text"] == cache.metadata["extractors"]["text"]


def test_softmax_rows():
    probs = softmax_rows(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]], atol=1e-12)
