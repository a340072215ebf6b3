"""Paired bootstrap and sign test; the classical baseline's per-speaker normalisation and folds."""

import math

import numpy as np
import pytest

from ks_keras.baseline import describe, run_baseline, speaker_normalize
from ks_keras.config import EvalConfig
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.folds import make_folds
from ks_keras.stats import paired_bootstrap_ua, sign_test, unweighted_recall

# ---------------------------------------------------------------------------------------------
# sign_test


@pytest.mark.parametrize(
    "wins,losses,p",
    [
        (7, 3, 0.34375),
        (3, 7, 0.34375),
        (10, 0, 2 / 1024),
        (0, 10, 2 / 1024),
        (0, 0, 1.0),
        (5, 5, 1.0),
        (1, 0, 1.0),
        (6, 0, 2 / 64),
        (8, 2, 2 * (1 + 10 + 45) / 1024),
    ],
)
def test_sign_test_exact_values(wins, losses, p):
    assert sign_test(wins, losses) == pytest.approx(p, rel=1e-12)


def test_sign_test_matches_the_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in range(1, 16):
        for wins in range(n + 1):
            expected = scipy_stats.binomtest(wins, n, 0.5).pvalue
            assert sign_test(wins, n - wins) == pytest.approx(expected, rel=1e-9)


def test_sign_test_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts"):
        sign_test(-1, 3)


# ---------------------------------------------------------------------------------------------
# unweighted_recall


def test_unweighted_recall_hand_case():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0, 2])
    # recalls 0.5, 0.5, 1.0
    assert unweighted_recall(y_true, y_pred, 3) == pytest.approx(2 / 3)
    # A class absent from y_true (3) does not count, even if predicted.
    assert unweighted_recall(y_true, np.where(y_pred == 2, 3, y_pred), 4) == pytest.approx(1 / 3)
    assert math.isnan(unweighted_recall(np.array([], int), np.array([], int), 3))


# ---------------------------------------------------------------------------------------------
# paired_bootstrap_ua


def random_labels(n=60, classes=4, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def test_bootstrap_identical_predictions_give_zero():
    y = random_labels()
    pred = random_labels(seed=1)
    out = paired_bootstrap_ua(y, pred, pred, n_classes=4, n_boot=300)
    assert out["diff"] == 0.0
    assert out["low"] == 0.0 and out["high"] == 0.0
    assert out["p_not_better"] == 1.0  # "not better" includes ties
    assert out["n_boot"] == 300 and out["confidence"] == 0.95


def test_bootstrap_perfect_model_beats_random_baseline():
    y = random_labels(n=80)
    base = random_labels(n=80, seed=2)
    groups = np.repeat(np.arange(4), 20)
    out = paired_bootstrap_ua(y, y, base, n_classes=4, groups=groups, n_boot=500)
    assert out["diff"] == pytest.approx(1.0 - unweighted_recall(y, base, 4))
    assert 0 < out["low"] <= out["diff"] <= out["high"] <= 1.0
    assert out["p_not_better"] == 0.0


def test_bootstrap_same_seed_same_result():
    y = random_labels(n=50)
    model = np.where(np.random.default_rng(3).random(50) < 0.6, y, (y + 1) % 4)
    base = np.where(np.random.default_rng(4).random(50) < 0.5, y, (y + 2) % 4)
    a = paired_bootstrap_ua(y, model, base, 4, n_boot=400, seed=7)
    b = paired_bootstrap_ua(y, model, base, 4, n_boot=400, seed=7)
    c = paired_bootstrap_ua(y, model, base, 4, n_boot=400, seed=8)
    assert a == b
    assert (a["low"], a["high"], a["p_not_better"]) != (c["low"], c["high"], c["p_not_better"])
    assert a["diff"] == c["diff"]  # the observed difference does not depend on resampling
    assert a["low"] <= a["diff"] <= a["high"]


def reference_bootstrap(y, model, base, n_classes, n_boot, seed, confidence=0.95):
    """Row by row with `unweighted_recall`: one group, the same draws (one index row per set)."""
    idx = np.random.default_rng(seed).choice(len(y), size=(n_boot, len(y)))
    diffs = np.array(
        [
            unweighted_recall(y[i], model[i], n_classes)
            - unweighted_recall(y[i], base[i], n_classes)
            for i in idx
        ]
    )
    tail = (1 - confidence) / 2
    return np.quantile(diffs, tail), np.quantile(diffs, 1 - tail), np.mean(diffs <= 0)


@pytest.mark.parametrize("n", [40, 3000])  # 3000 utterances: drawn in several chunks
def test_bootstrap_matches_a_row_by_row_reference(n):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 4, size=n)
    y[:4] = [0, 1, 2, 3]
    model = np.where(rng.random(n) < 0.5, y, (y + 1) % 4)
    base = np.where(rng.random(n) < 0.48, y, (y + 3) % 4)
    out = paired_bootstrap_ua(y, model, base, 4, n_boot=200, seed=1)
    low, high, p = reference_bootstrap(y, model, base, 4, 200, 1)
    assert out["low"] == pytest.approx(low, abs=1e-6)
    assert out["high"] == pytest.approx(high, abs=1e-6)
    assert out["p_not_better"] == pytest.approx(p)
    assert out["low"] < out["high"]


def test_bootstrap_averages_model_repeats():
    y = np.array([0, 0, 1, 1, 2, 2])
    repeats = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 2, 0]])  # UA 1 and 0.5
    base = np.array([0, 1, 1, 0, 0, 0])  # UA 1/3
    out = paired_bootstrap_ua(y, repeats, base, n_classes=3, n_boot=50)
    assert out["diff"] == pytest.approx(0.75 - 1 / 3)


def test_bootstrap_resamples_within_groups():
    # Each speaker has one class; the model is right on speaker 0, the baseline on speaker 1.
    # Resampling within speakers keeps both classes in every set, so the difference is always
    # exactly 0; resampling the pooled set sometimes drops a class and the difference moves.
    y = np.array([0, 0, 1, 1])
    model = np.array([0, 0, 0, 0])
    base = np.array([1, 1, 1, 1])
    groups = np.array(["s0", "s0", "s1", "s1"])
    within = paired_bootstrap_ua(y, model, base, 2, groups=groups, n_boot=400)
    assert within["diff"] == 0.0 and within["low"] == 0.0 and within["high"] == 0.0
    pooled = paired_bootstrap_ua(y, model, base, 2, n_boot=400)
    assert pooled["low"] < 0.0 < pooled["high"]


def test_bootstrap_exact_tie_is_not_better():
    # 7 utterances per class, one group each, so every bootstrap set is the whole set.
    # Model: right on 1 of class 1 and 2 of class 2; baseline: right on 3 of class 2.
    # Both UAs are exactly (1/7 + 2/7) / 3 = (3/7) / 3 = 1/7: every set is a tie.
    y = np.repeat([0, 1, 2], 7)
    model = np.array([1] * 7 + [1] + [2] * 6 + [2] * 2 + [0] * 5)
    base = np.array([1] * 7 + [2] * 7 + [2] * 3 + [0] * 4)
    assert unweighted_recall(y, model, 3) == pytest.approx(unweighted_recall(y, base, 3))
    out = paired_bootstrap_ua(y, model, base, 3, groups=np.arange(21), n_boot=20)
    assert out["high"] <= 0.0
    assert out["p_not_better"] == 1.0


@pytest.mark.parametrize(
    "model,base",
    [
        (np.zeros(9, int), np.zeros(10, int)),
        (np.zeros(10, int), np.zeros(9, int)),
        (np.zeros((2, 11), int), np.zeros(10, int)),
        (np.zeros(10, int), np.zeros((10, 1), int)),
    ],
)
def test_bootstrap_shape_mismatch_raises(model, base):
    with pytest.raises(ValueError, match="paired_bootstrap_ua"):
        paired_bootstrap_ua(np.zeros(10, int), model, base, n_classes=2, n_boot=10)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5])
def test_bootstrap_bad_confidence_raises(confidence):
    y = np.zeros(4, int)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ua(y, y, y, n_classes=2, n_boot=10, confidence=confidence)


# ---------------------------------------------------------------------------------------------
# speaker_normalize


def test_speaker_normalize_zero_mean_unit_std_per_speaker():
    rng = np.random.default_rng(0)
    speakers = np.array(["a"] * 5 + ["b"] * 7 + ["c"] * 4)
    x = rng.normal(size=(16, 3)) * [1.0, 5.0, 0.1] + [0.0, 100.0, -3.0]
    x[speakers == "b"] += 50.0
    x[speakers == "c", 2] = 4.0  # constant column for speaker c
    out = speaker_normalize(x, speakers)
    assert out.dtype == np.float32 and out.shape == x.shape
    for s in ("a", "b"):
        rows = out[speakers == s]
        np.testing.assert_allclose(rows.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(rows.std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[speakers == "c", 2], 0.0)
    np.testing.assert_allclose(out[speakers == "c", :2].std(0), 1.0, atol=1e-5)


def test_speaker_normalize_single_utterance_speaker_gives_zeros():
    x = np.array([[1.0, 2.0], [3.0, 5.0], [7.0, -1.0]])
    out = speaker_normalize(x, ["a", "a", "b"])
    np.testing.assert_array_equal(out[2], [0.0, 0.0])
    np.testing.assert_allclose(out[:2], [[-1, -1], [1, 1]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# run_baseline on a synthetic corpus

LABELS = ["angry", "happy", "sad"]


def synthetic_corpus(seed=0, n_speakers=4, per_class=5, dim=6, offset=3.0, noise=0.4):
    """Features = a large per-speaker offset + a class signal (one-hot) + noise."""
    rng = np.random.default_rng(seed)
    utts, rows = [], []
    for s in range(n_speakers):
        shift = offset * rng.standard_normal(dim)
        for c, label in enumerate(LABELS):
            for k in range(per_class):
                uid = f"s{s}_{label}_{k}"
                utts.append(Utterance(uid, f"/x/{uid}.wav", f"s{s}", label, "t"))
                rows.append(shift + np.eye(3, dim)[c] + noise * rng.standard_normal(dim))
    return Corpus(utts, LABELS, name="synthetic"), np.asarray(rows, np.float32)


def pooled_ua(rows):
    y_true = np.concatenate([r["y_true"] for r in rows])
    y_pred = np.concatenate([r["y_pred"] for r in rows])
    return unweighted_recall(y_true, y_pred, len(LABELS))


@pytest.fixture(scope="module")
def setting():
    corpus, features = synthetic_corpus()
    folds = make_folds(corpus, EvalConfig(folds="loso", val_speakers=1))
    return corpus, folds, features


def test_run_baseline_rows_follow_the_folds(setting):
    corpus, folds, features = setting
    rows = run_baseline(corpus, folds, features, normalize="speaker")
    assert len(rows) == len(folds) == 4
    for row, fold in zip(rows, folds, strict=True):
        assert row["fold"] == fold.index and row["name"] == fold.name
        np.testing.assert_array_equal(row["y_true"], corpus.label_ids(fold.test_ids))
        assert row["y_pred"].shape == row["y_true"].shape
        assert set(row["y_pred"].tolist()) <= {0, 1, 2}
        assert row["C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def test_speaker_normalisation_helps_against_speaker_offsets(setting):
    corpus, folds, features = setting
    speaker = pooled_ua(run_baseline(corpus, folds, features, normalize="speaker"))
    none = pooled_ua(run_baseline(corpus, folds, features, normalize="none"))
    glob = pooled_ua(run_baseline(corpus, folds, features, normalize="global"))
    assert speaker > 0.8
    assert speaker > none + 0.2
    assert none == glob  # "global" adds no step of its own: the SVM pipeline standardises


def test_run_baseline_is_deterministic(setting):
    corpus, folds, features = setting
    a = run_baseline(corpus, folds, features, seed=3, normalize="speaker")
    b = run_baseline(corpus, folds, features, seed=3, normalize="speaker")
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra["y_pred"], rb["y_pred"])
        assert ra["C"] == rb["C"]


def test_rbf_svm_runs(setting):
    corpus, folds, features = setting
    rows = run_baseline(corpus, folds, features, classifier="rbf_svm", normalize="speaker")
    assert len(rows) == 4
    assert all(r["C"] in (0.1, 1.0, 10.0, 100.0) for r in rows)
    assert pooled_ua(rows) > 0.6


def test_run_baseline_bad_arguments(setting):
    corpus, folds, features = setting
    with pytest.raises(ValueError, match="normalize"):
        run_baseline(corpus, folds, features, normalize="auto")
    with pytest.raises(ValueError, match="classifier"):
        run_baseline(corpus, folds, features, classifier="random_forest")
    with pytest.raises(ValueError, match="feature rows"):
        run_baseline(corpus, folds, features[:-1])


def test_describe():
    assert describe() == "eGeMAPSv02 functionals + linear SVM (no speaker normalisation)"
    assert describe("compare", "rbf_svm", "speaker") == (
        "ComParE_2016 functionals + RBF SVM (per-speaker z-normalised)"
    )
    assert "training speakers" in describe("egemaps", "linear_svm", "global")
