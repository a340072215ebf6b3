"""Hugging Face extractors on tiny random models saved to tmp, plus the real MiniLM offline."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ks_keras.config import AudioFeatureConfig, FeaturesConfig, TextFeatureConfig  # noqa: E402
from ks_keras.features import feature_dims, get_audio_extractor, get_text_extractor  # noqa: E402
from ks_keras.features.hf import HFAudioExtractor, default_text_model_path  # noqa: E402

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    ".",
    ",",
]


def save_wav2vec2(folder, norm="layer", seed=0, preprocessor=None):
    torch.manual_seed(seed)
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 2),
        conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
        vocab_size=10,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def save_bert(folder, seed=0):
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def w2v_layer(tmp_path_factory):
    return save_wav2vec2(tmp_path_factory.mktemp("w2v_layer"), "layer")


@pytest.fixture(scope="module")
def w2v_group(tmp_path_factory):
    return save_wav2vec2(tmp_path_factory.mktemp("w2v_group"), "group")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def conv_frames(n, kernels=(10, 8, 4), strides=(5, 4, 2)):
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


def waves(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def audio_cfg(folder, **kw):
    return AudioFeatureConfig(type="hf", model_path=str(folder), **kw)


# -- audio ------------------------------------------------------------------------------------


def test_audio_interface_and_frames(w2v_layer):
    ext = get_audio_extractor(audio_cfg(w2v_layer))
    assert isinstance(ext, HFAudioExtractor)
    assert ext.dim == 32 and ext.frame_rate == 16000 / 40
    assert ext.min_samples == 10 + 7 * 5 + 3 * 20 == 105  # receptive field of the convs
    feats = ext.extract(waves(4000, 1000, 105))
    assert [f.shape for f in feats] == [(conv_frames(n), 32) for n in (4000, 1000, 105)]
    assert [f.shape[0] for f in feats] == [98, 23, 1]
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in feats)
    assert ext.batch_with_mask
    assert feature_dims(FeaturesConfig(audio=audio_cfg(w2v_layer)))[0] == 32


@pytest.mark.parametrize("which", ["w2v_layer", "w2v_group"])
def test_batched_equals_one_by_one(which, request):
    folder = request.getfixturevalue(which)
    ext = get_audio_extractor(audio_cfg(folder, batch_size=4))
    batch = waves(3000, 1200, 3000, 500)
    together = ext.extract(batch)
    for w, t in zip(batch, together):
        np.testing.assert_allclose(ext.extract([w])[0], t, atol=1e-5)
    assert ext.batch_with_mask == (which == "w2v_layer")


def test_layer_choice_and_mean_of_layers(w2v_layer):
    [w] = waves(2000)
    first = get_audio_extractor(audio_cfg(w2v_layer, layer=1)).extract([w])[0]
    second = get_audio_extractor(audio_cfg(w2v_layer, layer=2)).extract([w])[0]
    last = get_audio_extractor(audio_cfg(w2v_layer, layer=-1)).extract([w])[0]
    mean = get_audio_extractor(audio_cfg(w2v_layer, layer=[1, 2])).extract([w])[0]
    np.testing.assert_array_equal(second, last)
    assert not np.allclose(first, second)
    np.testing.assert_allclose(mean, (first + second) / 2, atol=1e-6)


def test_long_audio_is_chunked(tmp_path):
    folder = save_wav2vec2(
        tmp_path / "m", preprocessor={"do_normalize": False, "sampling_rate": 16000}
    )
    ext = get_audio_extractor(audio_cfg(folder, chunk_seconds=0.05))  # 800 samples
    assert ext.chunk_samples == 800
    [w] = waves(800 * 3 + 100)  # tail of 100 < receptive field 105: joins the last chunk
    [feats] = ext.extract([w])
    pieces = [w[:800], w[800:1600], w[1600:]]
    expected = np.concatenate([ext.extract([p])[0] for p in pieces])
    assert feats.shape == expected.shape == (2 * conv_frames(800) + conv_frames(900), 32)
    np.testing.assert_allclose(feats, expected, atol=1e-5)


def test_metadata_identifies_weights(tmp_path, w2v_layer):
    a = get_audio_extractor(audio_cfg(w2v_layer)).metadata
    other = save_wav2vec2(tmp_path / "other", seed=1)
    b = get_audio_extractor(audio_cfg(other)).metadata
    json.dumps(a)
    assert a["files"]["config.json"] == b["files"]["config.json"]
    assert a["files"]["model.safetensors"] != b["files"]["model.safetensors"]
    assert a["layers"] == [2] and a["sample_rate"] == 16000
    assert set(a["packages"]) == {"torch", "transformers"}


def test_audio_bad_inputs(tmp_path, w2v_layer, bert):
    with pytest.raises(ValueError, match="features.audio.model_path: required"):
        get_audio_extractor(AudioFeatureConfig(type="hf"))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        get_audio_extractor(audio_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        get_audio_extractor(audio_cfg(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a wav2vec2-style"):
        get_audio_extractor(audio_cfg(bert))
    with pytest.raises(ValueError, match=r"features.audio.layer: layer\(s\) \[3\] out of range"):
        get_audio_extractor(audio_cfg(w2v_layer, layer=3))
    with pytest.raises(ValueError, match="features.audio.layer"):
        get_audio_extractor(audio_cfg(w2v_layer, layer=[]))
    with pytest.raises(ValueError, match="receptive field"):
        get_audio_extractor(audio_cfg(w2v_layer, chunk_seconds=0.001))
    ext = get_audio_extractor(audio_cfg(w2v_layer))
    with pytest.raises(ValueError, match="item 1: 50 samples, need at least 105"):
        ext.extract(waves(1000, 50))
    rate = save_wav2vec2(tmp_path / "sr", preprocessor={"sampling_rate": 8000})
    with pytest.raises(ValueError, match="expects 8000 Hz"):
        get_audio_extractor(audio_cfg(rate))
    broken = tmp_path / "broken"
    shutil.copytree(w2v_layer, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="cannot load a model"):
        get_audio_extractor(audio_cfg(broken)).extract(waves(1000))


# -- text -------------------------------------------------------------------------------------


def text_cfg(folder, **kw):
    return TextFeatureConfig(model_path=str(folder), **kw)


def test_text_tokens_and_special_token_policy(bert):
    keep = get_text_extractor(text_cfg(bert))
    drop = get_text_extractor(text_cfg(bert, special_tokens="drop"))
    assert keep.dim == 16 and keep.frame_rate is None and keep.name == f"hf_text:{bert.name}"
    [k] = keep.extract(["Hello world, the cat"])
    [d] = drop.extract(["Hello world, the cat"])
    assert k.shape == (7, 16) and d.shape == (5, 16)  # [CLS] hello world , the cat [SEP]
    np.testing.assert_allclose(k[1:-1], d, atol=1e-6)
    assert keep.metadata != drop.metadata


def test_text_matches_direct_model_and_batching(bert):
    ext = get_text_extractor(text_cfg(bert, batch_size=2))
    texts = ["hello", "the cat sat on the mat .", "world world", "cat"]
    together = ext.extract(texts)
    tok = transformers.AutoTokenizer.from_pretrained(str(bert))
    model = transformers.AutoModel.from_pretrained(str(bert)).eval()
    for text, feats in zip(texts, together):
        with torch.inference_mode():
            ref = model(**tok(text, return_tensors="pt")).last_hidden_state[0].numpy()
        np.testing.assert_allclose(feats, ref, atol=1e-5)


def test_text_layer_zero_is_embeddings(bert):
    emb = get_text_extractor(text_cfg(bert, layer=0)).extract(["cat"])[0]
    last = get_text_extractor(text_cfg(bert)).extract(["cat"])[0]
    assert emb.shape == last.shape and not np.allclose(emb, last)
    with pytest.raises(ValueError, match="features.text.layer"):
        get_text_extractor(text_cfg(bert, layer=-4))


def test_empty_text_policy(bert):
    with pytest.raises(ValueError, match=r"item\(s\) \[1, 2\]: empty transcript"):
        get_text_extractor(text_cfg(bert)).extract(["cat", "", "  "])
    for policy in ("keep", "drop"):
        ext = get_text_extractor(text_cfg(bert, empty_text="placeholder", special_tokens=policy))
        [empty, cat] = ext.extract(["", "cat"])
        assert empty.shape == (2, 16) and np.isfinite(empty).all()  # [CLS] [SEP]
        assert cat.shape[0] == (3 if policy == "keep" else 1)


def test_text_bad_inputs(bert):
    ext = get_text_extractor(text_cfg(bert))
    with pytest.raises(ValueError, match="list of strings"):
        ext.extract(["ok", 3])


# -- the real default text encoder --------------------------------------------------------------


def test_real_minilm_offline():
    ext = get_text_extractor(TextFeatureConfig())
    assert ext.dim == 384 and ext.name == "hf_text:all-MiniLM-L6-v2"
    assert ext.folder == default_text_model_path()
    meta = ext.metadata
    assert meta["default_model"] and meta["model_type"] == "bert"
    assert "model.safetensors" in meta["files"]
    texts = ["I am so happy today", "I feel glad and cheerful", "The stock market fell sharply"]
    feats = ext.extract(texts)
    assert feats[0].shape[1] == 384 and all(np.isfinite(f).all() for f in feats)
    # Real weights: sentence meaning shows in mean-pooled embeddings (random weights would not).
    emb = [f.mean(0) / np.linalg.norm(f.mean(0)) for f in feats]
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1
    np.testing.assert_allclose(ext.extract(texts[:1])[0], feats[0], atol=1e-5)
