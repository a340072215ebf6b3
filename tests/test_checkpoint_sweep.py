"""scripts/checkpoint_ensemble_sweep.py on a synthetic report folder (no training)."""

import json

import numpy as np
import pytest
from _scripts import load_script


def _script():
    return load_script("checkpoint_ensemble_sweep")


def _onehot(pred, n=3, sure=0.8):
    probs = np.full((len(pred), n), (1 - sure) / (n - 1))
    probs[np.arange(len(pred)), pred] = sure
    return probs


def _write(report, tag, test_preds, val_preds, labels, val_labels):
    folder = report / "runs" / tag / "checkpoints"
    folder.mkdir(parents=True)
    np.savez(
        folder / "probabilities.npz",
        test=np.stack([_onehot(p) for p in test_preds]),
        test_ids=np.array([f"u{i}" for i in range(len(labels))]),
        test_labels=np.array(labels),
        val=np.stack([_onehot(p) for p in val_preds]),
        val_ids=np.array([f"v{i}" for i in range(len(val_labels))]),
        val_labels=np.array(val_labels),
    )


def test_sweep_averages_the_k_best_checkpoints(tmp_path, capsys):
    labels, val_labels = [0, 1, 2, 0], [0, 1, 2]
    # Checkpoint 1 (the best epoch) gets one test utterance wrong; checkpoints 2 and 3 are
    # right there, so k = 3 (a majority of the mean) fixes it; k = 2 ties 0.8/0.8 -> argmax.
    best = [0, 1, 2, 1]
    right = [0, 1, 2, 0]
    for r in (0, 1):
        for f in (0, 1):
            _write(
                tmp_path,
                f"repeat{r}_fold{f}",
                [best, right, right],
                [[0, 1, 2]] * 3,
                labels,
                val_labels,
            )
    baseline = {
        "folds": {"0": {"ua": 0.9}, "1": {"ua": 0.9}},
        "predictions": {"0": [0, 1, 2, 2], "1": [0, 1, 2, 2]},
    }
    (tmp_path / "metrics.json").write_text(
        json.dumps({"labels": ["a", "b", "c"], "baseline": baseline})
    )
    module = _script()
    rows = module.sweep(tmp_path)
    assert [row["k"] for row in rows] == [1, 2, 3]
    ua_best = np.mean([1.0, 0.5, 1.0])  # class 0: 1 of 2 right
    assert rows[0]["ua"] == pytest.approx([ua_best, ua_best])
    assert rows[2]["ua"] == pytest.approx([1.0, 1.0])
    assert rows[0]["val_ua"] == pytest.approx(1.0)
    assert rows[0]["wins"] == 0 and rows[2]["wins"] == 2 and rows[2]["n_folds"] == 2
    assert rows[2]["bootstrap"]["diff"] > 0
    assert module.run([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 3 | - | 1.000 | 1.000 ± 0.000 | 2/2 |" in out


def test_sweep_without_kept_checkpoints_says_what_to_do(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit, match="checkpoint_ensemble"):
        _script().sweep(tmp_path)


def test_cross_fitted_validation_ranks_on_one_speaker_and_scores_on_the_other():
    # Speaker a's utterances say checkpoint 0 is best; speaker b's say checkpoint 1.
    labels = np.array([0, 1, 0, 1])
    speakers = np.array(["a", "a", "b", "b"])
    right = [0, 1, 0, 1]
    ckpt0 = _onehot([0, 1, 1, 0])  # right on a, wrong on b
    ckpt1 = _onehot([1, 0, 0, 1])  # wrong on a, right on b
    member = {
        "val": np.stack([ckpt0, ckpt1, _onehot(right)]),
        "val_labels": labels,
        "val_speakers": speakers,
    }
    module = _script()
    # k = 1: ranked on a -> ckpt0 (and ckpt2, tie: earlier first) scored on b: wrong (UA 0);
    # ranked on b -> ckpt1 scored on a: wrong. Cross-fitting exposes the overfit choice.
    assert module.cross_fitted_ua(member, 1, 3) == pytest.approx(0.0)
    # k = 3 averages all three: ckpt2 breaks the ties towards the right classes.
    assert module.cross_fitted_ua(member, 3, 3) == pytest.approx(1.0)
    assert module.cross_fitted_ua({**member, "val_speakers": np.array(["a"] * 4)}, 1, 3) is None


def test_members_are_read_in_ensemble_order_and_can_be_limited(tmp_path, capsys):
    # Fold 0 of repeat 0 has 11 members; member j predicts class j % 3 for every utterance.
    labels, val_labels = [0, 1, 2], [0, 1, 2]
    for j in range(11):
        tag = "repeat0_fold0" + (f"_member{j}" if j else "")
        _write(tmp_path, tag, [[j % 3] * 3], [[j % 3] * 3], labels, val_labels)
    module = _script()
    members = module.load_members(tmp_path)[(0, 0)]
    # Numeric order (member10 last), not the path's alphabetical order (member10 after member1).
    assert [int(m["test"][0, 0].argmax()) for m in members] == [j % 3 for j in range(11)]
    assert len(module.load_members(tmp_path, max_members=3)[(0, 0)]) == 3
    # One member predicts class 0 for all: UA 1/3. Three members: a mean of one-hots for
    # classes 0, 1, 2 ties -> argmax picks class 0 again; two members 0 and 1 tie likewise.
    rows = module.sweep(tmp_path, max_members=1)
    assert rows[0]["ua"] == pytest.approx([1 / 3])
    assert module.run([str(tmp_path), "--members", "2"]) == 0
    assert "| 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.run([str(tmp_path), "--members", "0"])


def test_order_last_averages_the_latest_epochs_and_scores_validation_per_speaker(tmp_path):
    labels, val_labels = [0, 1, 2, 0], [0, 1, 2, 0]
    # Kept best first: epochs 4, 0, 9 (top.json). Latest first: 9, 4, 0.
    epoch9, epoch4, epoch0 = [0, 1, 2, 0], [0, 1, 2, 1], [1, 1, 1, 1]
    _write(
        tmp_path,
        "repeat0_fold0",
        [epoch4, epoch0, epoch9],
        [epoch4, epoch0, [0, 1, 2, 2]],
        labels,
        val_labels,
    )
    folder = tmp_path / "runs" / "repeat0_fold0" / "checkpoints"
    record = [{"epoch": e, "value": v, "file": f"e{e}"} for e, v in ((4, 0.9), (0, 0.5), (9, 0.4))]
    (folder / "top.json").write_text(json.dumps(record))
    data = dict(np.load(folder / "probabilities.npz"))
    data["val_speakers"] = np.array(["s1", "s1", "s2", "s2"])
    np.savez(folder / "probabilities.npz", **data)
    module = _script()
    last = module.sweep(tmp_path, order="last")
    best = module.sweep(tmp_path)
    # k = 1: the latest epoch (9) alone is right on every test utterance; the best (4) is not.
    assert last[0]["ua"] == pytest.approx([1.0]) and best[0]["ua"][0] < 1.0
    assert last[0]["order"] == "last" and best[0]["order"] == "best"
    # Epoch 9 on validation: s1 (labels 0, 1) right -> 1.0; s2 (labels 2, 0) predicts 2, 2 ->
    # recall 1 on class 2, 0 on class 0 -> 0.5. Per-speaker mean 0.75.
    assert last[0]["val_ua_cross"] == pytest.approx(0.75)
    assert "latest checkpoints averaged" in module.markdown(last)
    # Without top.json the latest epochs are unknown: a clear error.
    (folder / "top.json").unlink()
    with pytest.raises(SystemExit, match="top.json"):
        module.sweep(tmp_path, order="last")
