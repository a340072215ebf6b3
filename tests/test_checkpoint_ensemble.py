"""Checkpoint ensembles (`train.checkpoint_ensemble`): the k best epochs' weights are kept on
disk, crash-safe, and their probabilities averaged in evaluation and in `train`'s saved model."""

import numpy as np
import pytest
from _training_support import (
    N_CLASSES,
    pooled_mlp,
    synthetic_dataset,
    tiny_config,
)

from ks_keras.config import config_from_dict
from ks_keras.training import fit
from ks_keras.training.callbacks import TopCheckpoints, read_top_checkpoints


def _offer_all(top, model, values, start=0):
    for epoch, value in enumerate(values, start):
        model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
        top.offer(model, epoch, value)


def _epochs(entries):
    return [e["epoch"] for e in entries]


def test_top_checkpoints_keep_the_k_best_epochs_best_first(tmp_path):
    model = pooled_mlp(tiny_config())
    top = TopCheckpoints(tmp_path / "ck", "max", keep=3)
    # NaN is never kept; a tie keeps the earlier epoch ahead; the worst is evicted.
    _offer_all(top, model, [0.5, 0.7, 0.6, float("nan"), 0.7, 0.9, 0.4])
    assert _epochs(top.entries) == [5, 1, 4]
    assert _epochs(read_top_checkpoints(tmp_path / "ck")) == [5, 1, 4]
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.h5"))
    assert files == ["epoch_002.weights.h5", "epoch_005.weights.h5", "epoch_006.weights.h5"]
    # Each file holds its own epoch's weights.
    for entry in top.entries:
        model.load_weights(tmp_path / "ck" / entry["file"])
        assert np.all(model.get_weights()[0] == entry["epoch"])


def test_top_checkpoints_minimise_losses_and_keep_one_writes_nothing(tmp_path):
    model = pooled_mlp(tiny_config())
    top = TopCheckpoints(tmp_path / "ck", "min", keep=2)
    _offer_all(top, model, [0.9, 0.3, 0.5, 0.1])
    assert _epochs(top.entries) == [3, 1]
    single = TopCheckpoints(tmp_path / "one", "max", keep=1)
    _offer_all(single, model, [0.2, 0.4])
    assert single.entries == [] and not (tmp_path / "one").exists()


def test_top_checkpoints_resume_forgets_epochs_that_are_trained_again(tmp_path):
    model = pooled_mlp(tiny_config())
    top = TopCheckpoints(tmp_path / "ck", "max", keep=2)
    _offer_all(top, model, [0.5, 0.8, 0.6])  # epochs 1 and 2 kept
    # A kill after epoch 2's checkpoint but before its backup: the run resumes at epoch 2.
    (tmp_path / "ck" / "tmp_stray.weights.h5").write_bytes(b"half")
    resumed = TopCheckpoints(tmp_path / "ck", "max", keep=2)
    resumed.reload(2)
    assert _epochs(resumed.entries) == [1]
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.h5")) == ["epoch_002.weights.h5"]
    _offer_all(resumed, model, [0.7, 0.9], start=2)
    assert _epochs(resumed.entries) == [3, 1]
    # A fresh run (epoch 0) starts empty.
    resumed.reset()
    assert resumed.entries == [] and not list((tmp_path / "ck").glob("*"))


def test_fit_returns_the_kept_checkpoints_best_first(tmp_path):
    cfg = tiny_config(epochs=4, checkpoint_ensemble=3)
    train_ds = synthetic_dataset(24, cfg.train.batch_size)
    val_ds = synthetic_dataset(12, cfg.train.batch_size, seed=1, shuffle=False)
    result = fit(lambda: pooled_mlp(cfg), train_ds, val_ds, cfg, tmp_path / "run", verbose=0)
    epochs = [e for e, _, _ in result.checkpoints]
    values = [v for _, v, _ in result.checkpoints]
    assert len(epochs) == 3 and epochs[0] == result.best_epoch
    assert values == sorted(values, reverse=True)
    assert values == [pytest.approx(result.history["val_ua"][e]) for e in epochs]
    # Walking the checkpoints loads each file in turn, then restores the best epoch.
    best = [w.copy() for w in result.model.get_weights()]
    check = pooled_mlp(cfg)
    walked = []
    for epoch, (_, _, path) in zip(result.each_checkpoint(), result.checkpoints, strict=True):
        check.load_weights(path)
        for a, b in zip(result.model.get_weights(), check.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        walked.append(epoch)
    assert walked == epochs
    for a, b in zip(result.model.get_weights(), best, strict=True):
        np.testing.assert_array_equal(a, b)
    result.load_weights(result.checkpoints[-1][2])
    result.load_weights(result.best_weights_path)
    for a, b in zip(result.model.get_weights(), best, strict=True):
        np.testing.assert_array_equal(a, b)
    # Without the option nothing extra is kept.
    plain = fit(
        lambda: pooled_mlp(cfg),
        train_ds,
        val_ds,
        tiny_config(epochs=2),
        tmp_path / "plain",
        verbose=0,
    )
    assert plain.checkpoints == [] and list(plain.each_checkpoint()) == []
    assert not (tmp_path / "plain" / "checkpoints").exists()
    assert result.model.outputs[0].shape[-1] == N_CLASSES


@pytest.mark.parametrize("k", [0, 5])
def test_checkpoint_ensemble_must_fit_the_epochs(k):
    with pytest.raises(ValueError, match=r"train.checkpoint_ensemble: expected an integer in"):
        config_from_dict({}, ["train.epochs=4", f"train.checkpoint_ensemble={k}"])


def test_monitor_epoch_keeps_the_last_epochs_without_validation_data(tmp_path):
    cfg = tiny_config(epochs=3, checkpoint_ensemble=2)
    train_ds = synthetic_dataset(24, cfg.train.batch_size)
    result = fit(lambda: pooled_mlp(cfg), train_ds, None, cfg, tmp_path / "run", monitor="epoch")
    assert result.best_epoch == 2 and result.monitor == "epoch"
    assert [e for e, _, _ in result.checkpoints] == [2, 1]
    with pytest.raises(ValueError, match="early_stopping_patience"):
        fit(
            lambda: pooled_mlp(cfg),
            train_ds,
            None,
            tiny_config(epochs=3, early_stopping_patience=2),
            tmp_path / "stop",
            monitor="epoch",
        )
