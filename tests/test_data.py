"""ks_keras.data: crop/pad, masks, shapes, ordering, shuffling, weights, normalisation."""

import json

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf
from _tiny import tiny_config

from ks_keras.config import DataConfig, config_from_dict
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.data import (
    NormStats,
    class_weights,
    compute_norm_stats,
    length_order,
    load_arrays,
    make_dataset,
    pad_or_crop,
    restore_order,
)
from ks_keras.features import get_audio_extractor
from ks_keras.features.base import FeatureExtractor
from ks_keras.features.cache import extract_corpus

N = 10
DATA = DataConfig(audio_max_len=30, text_max_len=4, shuffle_buffer=64)


class WordText(FeatureExtractor):
    """One deterministic 8-d row per word."""

    modality, name, dim, frame_rate = "text", "words", 8, None
    metadata = {"type": "words"}

    def extract(self, batch):
        return [
            np.stack([np.full(8, len(w) + i, np.float32) for i, w in enumerate(t.split())])
            for t in batch
        ]


class NoFrames(FeatureExtractor):
    """Gives utterance audio shorter than 0.1 s no frames at all (to test all-padding)."""

    modality, name, dim, frame_rate = "audio", "noframes", 8, 100.0
    metadata = {"type": "noframes"}

    def extract(self, batch):
        return [np.ones((len(w) // 1600 - 1, 8), np.float32) for w in batch]


def build(tmp, audio_extractor=None):
    rng = np.random.default_rng(0)
    utts = []
    for i in range(N):
        path = tmp / f"u{i}.wav"
        # 0.1 … 0.55 s → 8 … 53 log-mel frames: some cropped to 30, some padded.
        wave = (0.05 * (1 + i % 3) * rng.standard_normal(1600 + 800 * i)).astype(np.float32)
        sf.write(str(path), wave, 16000)
        words = " ".join(["w" * (1 + k) for k in range(1 + i % 6)])  # 1 … 6 words
        utts.append(Utterance(f"u{i}", str(path), f"s{i % 3}", "abc"[i % 3], words))
    corpus = Corpus(utts, ["a", "b", "c"])
    cfg = config_from_dict(
        {"features": {"cache_dir": str(tmp / "cache"), "audio": {"n_mels": 8}, "shard_size": 4}}
    )
    audio = audio_extractor or get_audio_extractor(cfg.features.audio)
    cache = extract_corpus(
        cfg, corpus, progress=False, extractors={"audio": audio, "text": WordText()}
    )
    return corpus, cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("data"))


def as_numpy(ds):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds]


def test_pad_or_crop():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    cropped, m = pad_or_crop(x, 4)
    np.testing.assert_array_equal(cropped, x[:4])  # the end is cut
    assert m.dtype == np.int32 and m.tolist() == [1, 1, 1, 1]
    padded, m = pad_or_crop(x, 8)
    np.testing.assert_array_equal(padded[:6], x)
    assert not padded[6:].any() and m.tolist() == [1] * 6 + [0, 0]
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        pad_or_crop(np.zeros(3), 4)
    with pytest.raises(ValueError, match="max_len"):
        pad_or_crop(x, 0)


def test_class_weights():
    w = class_weights([0, 0, 0, 1], 3)
    np.testing.assert_allclose(w, [4 / 9, 4 / 3, 1.0])
    assert w.dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_weights([0, 2], 2)
    with pytest.raises(ValueError, match="non-empty"):
        class_weights([], 2)


def test_ordered_dataset_shapes_values_and_order(built):
    corpus, cache = built
    ids = ["u7", "u0", "u3", "u9", "u1"]
    labels = corpus.label_ids(ids)
    ds = make_dataset(cache, ids, labels, DATA, batch_size=2)
    spec_inputs, spec_label = ds.element_spec
    assert set(spec_inputs) == {"audio", "audio_mask", "text", "text_mask"}
    assert spec_inputs["audio"].shape.as_list() == [None, 30, 8]
    assert spec_inputs["text"].shape.as_list() == [None, 4, 8]
    assert spec_inputs["audio_mask"].dtype == tf.int32 and spec_label.dtype == tf.int32
    batches = as_numpy(ds)
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    got = {k: np.concatenate([b[0][k] for b in batches]) for k in spec_inputs}
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)
    arrays = load_arrays(cache, ids, DATA)
    for k in got:
        np.testing.assert_array_equal(got[k], arrays[k])
    for row, utt_id in enumerate(ids):
        audio, text = cache.get(utt_id)
        x, m = pad_or_crop(audio, 30)
        np.testing.assert_array_equal(got["audio"][row], x)
        np.testing.assert_array_equal(got["audio_mask"][row], m)
        assert got["text_mask"][row].sum() == min(4, text.shape[0])
    assert got["audio_mask"].sum(1).tolist() == [30, 8, 23, 30, 13]  # cropped and padded


def test_shuffled_stream_is_deterministic_and_complete(built):
    corpus, cache = built
    ids = corpus.ids
    labels = corpus.label_ids()

    def epoch_orders(seed, epochs=2):
        ds = make_dataset(
            cache, ids, labels, DATA, batch_size=3, shuffle=True, seed=seed, with_ids=True
        )
        return [[i.decode() for b in ds for i in b[0]["id"].numpy()] for _ in range(epochs)]

    a, b, c = epoch_orders(1), epoch_orders(1), epoch_orders(2)
    assert a == b  # same seed, same orders (each epoch)
    assert a[0] != a[1]  # reshuffled between epochs
    assert a != c
    assert sorted(a[0]) == sorted(ids)
    # Every element carries its own label and the same arrays as the ordered pipeline.
    ordered = load_arrays(cache, ids, DATA)
    ds = make_dataset(cache, ids, labels, DATA, batch_size=4, shuffle=True, seed=3, with_ids=True)
    for inputs, y in as_numpy(ds):
        for row, utt_id in enumerate(inputs["id"]):
            k = ids.index(utt_id.decode())
            assert y[row] == labels[k]
            for key in ("audio", "audio_mask", "text", "text_mask"):
                np.testing.assert_array_equal(inputs[key][row], ordered[key][k])


def test_drop_remainder_repeat_modalities_and_weights(built):
    corpus, cache = built
    ids, labels = corpus.ids, corpus.label_ids()
    weights = class_weights(labels, 3)
    ds = make_dataset(
        cache,
        ids,
        labels,
        DATA,
        batch_size=4,
        shuffle=True,
        seed=0,
        drop_remainder=True,
        repeat=True,
        modalities=["audio"],
        class_weight=weights,
    )
    inputs, y, w = next(iter(ds))
    assert set(inputs) == {"audio", "audio_mask"} and inputs["audio"].shape == (4, 30, 8)
    np.testing.assert_allclose(w.numpy(), weights[y.numpy()])
    assert len(list(ds.take(5))) == 5  # repeats past the 10 utterances
    ordered = make_dataset(cache, ids, labels, DATA, batch_size=10, class_weight=weights)
    _, y, w = next(iter(ordered))
    np.testing.assert_allclose(w.numpy(), weights[labels])


def test_global_normalisation_from_training_ids_only(built):
    corpus, cache = built
    train = corpus.ids[:6]
    stats = compute_norm_stats(cache, train, "global")
    frames = np.concatenate([cache.get(i)[0] for i in train])
    np.testing.assert_allclose(stats.mean, frames.mean(0), rtol=1e-5, atol=1e-5)
    assert compute_norm_stats(cache, train, "none") is None
    stats = NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))  # JSON round-trip
    arrays = load_arrays(cache, corpus.ids, DATA, normalizer=stats)
    ds = make_dataset(
        cache,
        corpus.ids,
        corpus.label_ids(),
        DATA,
        batch_size=10,
        shuffle=True,
        seed=0,
        normalizer=stats,
        with_ids=True,
    )
    inputs, _ = next(iter(ds))
    for row, utt_id in enumerate(inputs["id"].numpy()):
        k = corpus.ids.index(utt_id.decode())
        np.testing.assert_allclose(inputs["audio"][row].numpy(), arrays["audio"][k], atol=1e-5)
    mask = arrays["audio_mask"].astype(bool)
    assert not arrays["audio"][~mask].any()  # padding stays exactly zero
    raw = load_arrays(cache, corpus.ids, DATA)
    np.testing.assert_allclose(
        arrays["audio"][mask], (raw["audio"][mask] - stats.mean) / stats.std, atol=1e-5
    )


def test_speaker_normalisation(built):
    corpus, cache = built
    speaker_of = corpus.speaker_of()
    stats = compute_norm_stats(cache, corpus.ids, "speaker", speaker_of)
    assert sorted(stats.speakers) == ["s0", "s1", "s2"]
    ids = [i for i in corpus.ids if speaker_of[i] == "s1"]
    full = np.concatenate(
        [(cache.get(i)[0] - stats.speakers["s1"][0]) / stats.speakers["s1"][1] for i in ids]
    )
    np.testing.assert_allclose(full.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(full.std(0), 1, atol=1e-3)
    ds = make_dataset(
        cache, ids, corpus.label_ids(ids), DATA, 4, normalizer=stats, speaker_of=speaker_of
    )
    assert len(as_numpy(ds)) == 1
    partial = compute_norm_stats(cache, ids, "speaker", speaker_of)
    with pytest.raises(ValueError, match="no statistics for speaker 's0' \\(utterance u0\\)"):
        make_dataset(cache, ["u0"], [0], DATA, 1, normalizer=partial, speaker_of=speaker_of)
    with pytest.raises(ValueError, match="speaker_of"):
        make_dataset(cache, ["u0"], [0], DATA, 1, normalizer=partial)
    with pytest.raises(ValueError, match="speaker_of"):
        compute_norm_stats(cache, ids, "speaker")
    with pytest.raises(ValueError, match="normalize"):
        compute_norm_stats(cache, ids, "minmax")


def test_bad_requests(built):
    corpus, cache = built
    ids, labels = corpus.ids, corpus.label_ids()
    with pytest.raises(ValueError, match=r"not in the feature cache.*: x1, x2"):
        make_dataset(cache, ["u0", "x1", "x2"], [0, 0, 0], DATA, 2)
    with pytest.raises(ValueError, match="duplicate utterance id"):
        make_dataset(cache, ["u0", "u0"], [0, 0], DATA, 2)
    with pytest.raises(ValueError, match="10 integer class indices"):
        make_dataset(cache, ids, labels[:3], DATA, 2)
    with pytest.raises(ValueError, match="integer class indices"):
        make_dataset(cache, ids, labels.astype(float), DATA, 2)
    with pytest.raises(ValueError, match=r"out of range \[0, 2\).*\('u2', 2\)"):
        make_dataset(cache, ids, labels, DATA, 2, num_classes=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(cache, ids, labels, DATA, 0)
    with pytest.raises(ValueError, match="one weight per class"):
        make_dataset(cache, ids, labels, DATA, 2, class_weight=[1.0, 1.0])
    with pytest.raises(ValueError, match="no utterance ids"):
        make_dataset(cache, [], [], DATA, 2)


def test_all_padding_sample_rejected_with_its_id(tmp_path):
    corpus, cache = build(tmp_path, audio_extractor=NoFrames())
    assert cache.lengths(["u0", "u1"], "audio").tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"\['u0', 'u1'\] have no audio frames"):
        make_dataset(cache, corpus.ids, corpus.label_ids(), DATA, 2)
    with pytest.raises(ValueError, match="u0"):
        load_arrays(cache, ["u0"], DATA)
    ok = [i for i in corpus.ids if i not in ("u0", "u1")]
    assert len(as_numpy(make_dataset(cache, ok, corpus.label_ids(ok), DATA, 8))) == 1


# The suite's tiny config (tests/_tiny.py) on this file's 8-band features.
TINY = {"model": {"audio_dim": 8, "head_units": [8]}, "features": {"audio": {"n_mels": 8}}}


def test_feeds_the_model(built):
    from ks_keras.model import build_model

    corpus, cache = built
    cfg = tiny_config(TINY)
    model = build_model(cfg)
    ds = make_dataset(cache, corpus.ids, corpus.label_ids(), DATA, 4, shuffle=True, seed=0)
    assert ds.cardinality().numpy() == 3  # known, so Keras sees the epoch length
    inputs, labels = next(iter(ds))
    logits = model(inputs, training=False)  # keys, dtypes and shapes match the model inputs
    assert logits.shape == (4, 3) and np.isfinite(logits.numpy()).all()


def test_functionals_input_follows_each_utterance_in_both_pipelines(built):
    corpus, cache = built
    ids, labels = corpus.ids, corpus.label_ids()
    functionals = {u: np.full(5, k, np.float32) + np.arange(5) for k, u in enumerate(ids)}
    ordered = load_arrays(cache, ids, DATA, functionals=functionals)
    assert ordered["functionals"].shape == (len(ids), 5)
    np.testing.assert_array_equal(ordered["functionals"][3], functionals[ids[3]])
    for shuffle in (False, True):
        ds = make_dataset(
            cache,
            ids,
            labels,
            DATA,
            batch_size=4,
            shuffle=shuffle,
            seed=3,
            with_ids=True,
            functionals=functionals,
        )
        seen = 0
        for inputs, _ in as_numpy(ds):
            for row, utt_id in enumerate(inputs["id"]):
                np.testing.assert_array_equal(
                    inputs["functionals"][row], functionals[utt_id.decode()]
                )
                seen += 1
        assert seen == len(ids)
    missing = dict(functionals)
    del missing[ids[0]]
    with pytest.raises(ValueError, match="no openSMILE functionals for 1 utterance"):
        make_dataset(cache, ids, labels, DATA, batch_size=4, functionals=missing)


def test_bucketed_batches_cut_padding_keep_every_sample_and_the_arrays(built):
    corpus, cache = built
    ids, labels = corpus.ids, corpus.label_ids()
    ordered = load_arrays(cache, ids, DATA)

    def epoch(seed):
        ds = make_dataset(
            cache,
            ids,
            labels,
            DATA,
            batch_size=3,
            shuffle=True,
            seed=seed,
            with_ids=True,
            bucket_by_length=True,
        )
        return as_numpy(ds)

    batches = epoch(5)
    got = [i.decode() for inputs, _ in batches for i in inputs["id"]]
    assert sorted(got) == sorted(ids)  # every sample once
    assert len(batches) == len(epoch(5)) == len(epoch(6))  # a fixed number of batches
    assert [i for b, _ in epoch(5) for i in b["id"]] == [i for b, _ in batches for i in b["id"]]
    shorter = False
    for inputs, y in batches:
        for key in ("audio", "text"):
            width = inputs[key].shape[1]
            assert inputs[f"{key}_mask"].sum(axis=1).max() == width  # cut after the longest
            shorter |= key == "audio" and width < DATA.audio_max_len
        for row, utt_id in enumerate(inputs["id"]):
            k = ids.index(utt_id.decode())
            assert y[row] == labels[k]
            for key in ("audio", "text"):
                width = inputs[key].shape[1]
                np.testing.assert_array_equal(inputs[key][row], ordered[key][k][:width])
                assert not ordered[f"{key}_mask"][k][width:].any()  # only padding was cut
    assert shorter  # some batches really are shorter than the padded length


def test_length_order_and_restore_order():
    x = np.arange(12).reshape(6, 2)
    order = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_array_equal(restore_order(x[order], order), x)
    with pytest.raises(ValueError, match="5 rows for an order of 6"):
        restore_order(x[:5], order)


def test_bucketed_prediction_keeps_the_order_and_the_values_of_padded_batches(built):
    """Inference batches sorted by length and cut after their longest real step give the
    padded batches' predictions, row for row, once put back in the order given."""
    from ks_keras.config import padding_invariant
    from ks_keras.data import bucketing
    from ks_keras.model import build_model

    corpus, cache = built
    cfg = tiny_config(TINY)
    assert padding_invariant(cfg.model) and bucketing(cfg)
    model = build_model(cfg)
    ids = corpus.ids[::-1]  # not the cache's order
    labels = corpus.label_ids(ids)
    order = length_order(cache, ids, DATA)
    audio_len = np.minimum(cache.lengths(ids, "audio"), DATA.audio_max_len)
    assert sorted(order.tolist()) == list(range(len(ids)))
    assert (np.diff(audio_len[order]) >= 0).all()
    assert length_order(cache, ids, DATA).tolist() == order.tolist()  # deterministic

    padded = make_dataset(cache, ids, labels, DATA, batch_size=3, with_ids=True)
    bucketed = make_dataset(
        cache, ids, labels, DATA, batch_size=3, with_ids=True, bucket_by_length=True
    )
    seen = [i.decode() for inputs, _ in as_numpy(bucketed) for i in inputs["id"]]
    assert seen == [ids[k] for k in order]
    widths = [inputs["audio"].shape[1] for inputs, _ in as_numpy(bucketed)]
    assert min(widths) < DATA.audio_max_len  # batches really are cut
    y_bucketed = np.concatenate([y for _, y in as_numpy(bucketed)])
    np.testing.assert_array_equal(restore_order(y_bucketed, order), labels)

    def predict(ds):
        ds = ds.map(lambda inputs, y: {k: v for k, v in inputs.items() if k != "id"})
        return model.predict(ds, verbose=0)

    want = predict(padded)
    got = restore_order(predict(bucketed), order)
    assert got.shape == want.shape == (len(ids), 3)
    # Different batch shapes change the float32 rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(predict(bucketed), want, rtol=1e-5, atol=1e-6)  # order matters
