"""Seed ensembles: mean-probability logits, one saved model, member seeds, input checks."""

import keras
import numpy as np
import pytest
from _tiny import MODEL_TESTS, model_overrides, random_batch

from ks_keras.config import config_from_dict
from ks_keras.ensemble import (
    MEMBER_SEED_STRIDE,
    MeanProbabilityLogits,
    ensemble_members,
    ensemble_model,
    member_seed,
)
from ks_keras.model import build_model

DA, DT = 16, 24
SMALL = model_overrides(MODEL_TESTS, n_ccab=0, n_dfm=0)  # tests/_tiny.py


def small_config(*extra):
    return config_from_dict({}, SMALL + list(extra))


def tiny(name, dim=DA, classes=3, extra_input=False):
    """A small dict-input model (fast to build) for the input checks."""
    inputs = {"audio": keras.Input((None, dim), name="audio")}
    if extra_input:
        inputs["text"] = keras.Input((None, DT), name="text")
    pooled = keras.layers.GlobalAveragePooling1D()(inputs["audio"])
    return keras.Model(inputs, keras.layers.Dense(classes)(pooled), name=name)


def members(n, *extra):
    out = []
    for j in range(n):
        keras.utils.set_random_seed(member_seed(123, j))
        out.append(build_model(small_config(*extra), name=f"member_{j + 1}"))
    return out


def batch(b=4, ta=9, tt=5, seed=0):
    return random_batch(b, ta, tt, da=DA, dt=DT, seed=seed)


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_ensemble_softmax_is_mean_member_probability(f32_close):
    ms = members(3)
    model = ensemble_model(ms)
    data = batch()
    probs = [softmax(m(data).numpy()) for m in ms]
    # The members really differ (else a mean would prove little).
    assert not np.allclose(probs[0], probs[1], atol=1e-3)
    out = model(data).numpy()
    assert out.shape == (4, 3) and out.dtype == np.float32
    f32_close(softmax(out), np.mean(probs, axis=0), scale=1.0)
    np.testing.assert_array_equal(out.argmax(-1), np.mean(probs, axis=0).argmax(-1))


def test_ensemble_model_interface():
    ms = members(2)
    model = ensemble_model(ms, name="ens")
    assert model.name == "ens"
    assert sorted(model.input.keys()) == ["audio", "audio_mask", "text", "text_mask"]
    assert isinstance(model.get_layer("logits"), MeanProbabilityLogits)
    found = ensemble_members(model)
    assert [m.name for m in found] == ["member_1", "member_2"]
    assert all(a is b for a, b in zip(found, ms, strict=True))
    # A plain model is its own single member.
    assert ensemble_members(ms[0]) == [ms[0]]


def test_argmax_is_the_mean_probability_vote_not_the_majority():
    # Two members lean weakly to class 0, one is sure of class 1: the mean probability picks 1
    # while a majority vote of the members' argmax would pick 0.
    probs = np.array([[[0.40, 0.35, 0.25]], [[0.40, 0.35, 0.25]], [[0.01, 0.98, 0.01]]], np.float32)
    out = MeanProbabilityLogits()([np.log(p) for p in probs]).numpy()
    assert out.argmax(-1).tolist() == [1]
    np.testing.assert_allclose(np.exp(out), probs.mean(0), rtol=1e-5)


def test_logits_are_shift_invariant_per_member(f32_close):
    # softmax ignores a constant added to a member's logits; so must the ensemble.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 5, 4)).astype("float32")
    layer = MeanProbabilityLogits()
    f32_close(layer([a + 30.0, b - 7.0]).numpy(), layer([a, b]).numpy(), scale=40.0)


def test_class_without_probability_gets_a_finite_logit():
    logits = np.array([[0.0, 0.0, -1e4]], np.float32)
    out = MeanProbabilityLogits()([logits, logits]).numpy()
    assert np.isfinite(out).all()
    assert out[0, 2] < -80 and out.argmax(-1).tolist() == [0]


def test_single_member_ensemble_is_the_members_probability(f32_close):
    [member] = members(1)
    data = batch(seed=2)
    out = ensemble_model([member])(data).numpy()
    f32_close(softmax(out), softmax(member(data).numpy()), scale=1.0)
    f32_close(np.exp(out), softmax(member(data).numpy()), scale=1.0)


def test_save_and_load_gives_the_same_outputs(tmp_path):
    model = ensemble_model(members(2, "model.audio_functionals=[mean, p50]"))
    data = batch(seed=3)
    before = model(data).numpy()
    path = tmp_path / "ensemble.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(data).numpy(), before)
    assert [m.name for m in ensemble_members(loaded)] == ["member_1", "member_2"]
    assert isinstance(loaded.get_layer("logits"), MeanProbabilityLogits)


def test_duplicate_member_names_raise():
    with pytest.raises(ValueError, match="names"):
        ensemble_model([tiny("same"), tiny("other"), tiny("same")])


def test_no_members_raise():
    with pytest.raises(ValueError, match="no members"):
        ensemble_model([])
    with pytest.raises(ValueError, match="non-empty"):
        MeanProbabilityLogits()([])


@pytest.mark.parametrize(
    "other",
    [
        {"dim": DA + 2},  # another input width
        {"extra_input": True},  # other inputs
        {"classes": 4},  # other output width
    ],
)
def test_mismatched_members_raise(other):
    with pytest.raises(ValueError, match="'b'"):
        ensemble_model([tiny("a"), tiny("b", **other)])


def test_mismatched_build_model_members_raise():
    first = build_model(small_config(), name="a")
    second = build_model(small_config("model.modalities=[audio]"), name="b")
    with pytest.raises(ValueError, match="'b'"):
        ensemble_model([first, second])


def test_member_seeds_are_distinct_and_do_not_meet_repeats():
    seeds = [member_seed(123, j) for j in range(10)]
    assert seeds[0] == 123
    assert len(set(seeds)) == 10
    assert seeds[3] - seeds[2] == MEMBER_SEED_STRIDE
    # Repeats use seed + r: they never hit another member's seed while r < the stride.
    repeats = {123 + r for r in range(1, MEMBER_SEED_STRIDE)}
    assert not repeats & set(seeds)
    assert len({member_seed(s, j) for s in (0, 1, 2) for j in range(5)}) == 15


def test_the_mean_layer_is_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer = MeanProbabilityLogits()
    out = layer([keras.Input((3,)), keras.Input((3,))])
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
