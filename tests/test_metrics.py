"""UA metric (Keras) and the numpy metric helpers, checked against scikit-learn."""

import keras
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from ks_keras.metrics import UnweightedAverageRecall, compute_metrics, normalize_confusion

# The scikit-learn reference warns about predicted classes absent from the labels: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")


def _random_case(seed, n=57, c=4, drop_class=None):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, size=n)
    if drop_class is not None:  # a class never in the labels (but possibly predicted)
        y_true[y_true == drop_class] = (drop_class + 1) % c
    logits = rng.normal(size=(n, c)).astype("float32")
    # Make predictions better than chance so recalls differ between classes.
    logits[np.arange(n), y_true] += rng.uniform(0, 2, size=n).astype("float32")
    return y_true, logits


@pytest.mark.parametrize("seed,drop_class", [(0, None), (1, None), (2, 3), (3, 0)])
def test_ua_metric_matches_sklearn_balanced_accuracy(seed, drop_class):
    y_true, logits = _random_case(seed, drop_class=drop_class)
    metric = UnweightedAverageRecall(num_classes=4)
    metric.update_state(y_true, logits)
    expected = balanced_accuracy_score(y_true, logits.argmax(-1))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_ua_metric_same_for_logits_and_probabilities_and_over_batches():
    y_true, logits = _random_case(5, n=40)
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    whole = UnweightedAverageRecall(4)
    whole.update_state(y_true, logits)
    batched = UnweightedAverageRecall(4)
    for start in range(0, 40, 7):  # uneven batches, labels given as [B, 1]
        batched.update_state(y_true[start : start + 7, None], probs[start : start + 7])
    assert float(batched.result()) == pytest.approx(float(whole.result()), abs=1e-6)
    assert float(whole.result()) != pytest.approx(accuracy_score(y_true, logits.argmax(-1)))


def test_ua_metric_known_value_and_reset():
    metric = UnweightedAverageRecall(3)
    metric.update_state([0, 0, 1, 2], [[2, 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 1]])
    assert float(metric.result()) == pytest.approx((0.5 + 1 + 1) / 3)
    metric.reset_state()
    assert float(metric.result()) == 0.0  # no examples yet


def test_ua_metric_class_constant_sample_weights_do_not_change_ua():
    # Keras turns class_weight into per-sample weights; UA must stay UA.
    y_true, logits = _random_case(7, n=30, c=3)
    weights = np.array([0.5, 2.0, 3.0])[y_true]
    plain = UnweightedAverageRecall(3)
    plain.update_state(y_true, logits)
    weighted = UnweightedAverageRecall(3)
    weighted.update_state(y_true, logits, sample_weight=weights)
    assert float(weighted.result()) == pytest.approx(float(plain.result()), abs=1e-6)


def test_ua_metric_config_round_trip_and_in_compile():
    metric = UnweightedAverageRecall(5, name="val_like")
    clone = UnweightedAverageRecall.from_config(metric.get_config())
    assert clone.num_classes == 5 and clone.name == "val_like"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(restored, UnweightedAverageRecall) and restored.num_classes == 5

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(loss="sparse_categorical_crossentropy", metrics=[UnweightedAverageRecall(3)])
    x = np.random.default_rng(0).normal(size=(12, 2)).astype("float32")
    y = np.arange(12) % 3
    logs = model.evaluate(x, y, verbose=0, return_dict=True, batch_size=5)
    expected = balanced_accuracy_score(y, model.predict(x, verbose=0).argmax(-1))
    assert logs["ua"] == pytest.approx(expected, abs=1e-6)


def test_ua_metric_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        UnweightedAverageRecall(1)
    metric = UnweightedAverageRecall(3)
    with pytest.raises(ValueError, match="3 classes"):
        metric.update_state([0, 1], np.zeros((2, 4), "float32"))


def test_compute_metrics_matches_sklearn():
    y_true, logits = _random_case(11, n=80, c=4, drop_class=2)
    y_pred = logits.argmax(-1)
    out = compute_metrics(y_true, y_pred, 4)
    assert out["wa"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert out["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert out["macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    confusion = out["confusion"]
    assert confusion.shape == (4, 4) and confusion.sum() == 80
    assert confusion[2].sum() == 0  # class 2 never true
    assert np.trace(confusion) == (y_true == y_pred).sum()
    # Scores are accepted too (argmax), with the same result.
    assert compute_metrics(y_true, logits, 4)["ua"] == out["ua"]


def test_compute_metrics_small_known_case():
    out = compute_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert out["wa"] == pytest.approx(0.75)
    assert out["ua"] == pytest.approx((0.5 + 1 + 1) / 3)
    np.testing.assert_array_equal(out["confusion"], [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(
        normalize_confusion(out["confusion"]), [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]]
    )
    np.testing.assert_array_equal(normalize_confusion(np.zeros((2, 2))), np.zeros((2, 2)))


@pytest.mark.parametrize(
    "y_true,y_pred,n,match",
    [
        ([0, 1], [0], 3, "same number"),
        ([], [], 3, "no examples"),
        ([0, 3], [0, 1], 3, r"y_true: class ids must be in \[0, 3\)"),
        ([0, 1], [0, -1], 3, "y_pred: class ids"),
        ([0, 1], np.zeros((2, 4)), 3, r"shape \[N, 3\]"),
        ([0.5, 1], [0, 1], 3, "integer class ids"),
        ([0, 1], [0, 1], 1, "n_classes"),
    ],
)
def test_compute_metrics_rejects_bad_input(y_true, y_pred, n, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, y_pred, n)
