"""evaluate_corpus end to end on a tiny synthetic corpus (audio-only, log-mel, 1-2 epochs)."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
from _tiny import tiny_config_dict

from ks_keras.cli import main
from ks_keras.config import config_from_dict
from ks_keras.evaluation import evaluate_corpus

LABELS = ["high", "low"]


def _corpus(tmp_path, speakers=("s1", "s2", "s3", "s4"), per_class=3):
    rng = np.random.default_rng(0)
    rows = []
    for s_i, speaker in enumerate(speakers):
        for label in LABELS:
            for k in range(per_class):
                t = np.arange(int(16000 * 0.4)) / 16000
                freq = 300 if label == "low" else 2500
                wave = 0.3 * np.sin(2 * np.pi * (freq + 20 * s_i) * t)
                wave += 0.01 * rng.standard_normal(len(t))
                name = f"{speaker}_{label}_{k}.wav"
                sf.write(str(tmp_path / name), wave.astype(np.float32), 16000)
                rows.append(
                    {
                        "path": name,
                        "speaker": speaker,
                        "label": label,
                        "text": "some words",
                        "gender": "mf"[s_i % 2],
                    }
                )
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _cfg(tmp_path, manifest, *extra):
    # The suite's tiny config (tests/_tiny.py), audio only, 2 classes.
    base = tiny_config_dict(
        model={"modalities": ["audio"], "audio_ffn_dim": 8, "head_units": [8], "num_classes": 2}
    )
    return config_from_dict(
        base,
        [
            f"features.cache_dir={tmp_path / 'cache'}",
            "data.corpus=manifest",
            f"data.manifest={manifest}",
            "data.audio_max_len=48",
            "train.epochs=2",
            "train.batch_size=8",
            "train.lr=3e-3",
            "train.schedule=constant",
            "eval.val_speakers=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    manifest = _corpus(tmp)
    cfg = _cfg(tmp, manifest)
    cv, report = evaluate_corpus(
        cfg, tmp / "report", max_folds=2, progress=False, verbose=0, log=lambda *_: None
    )
    return cv, report


def test_report_and_results(honest):
    cv, report = honest
    assert len(cv.results) == 2 and cv.protocol == "honest"
    for r in cv.results:
        fold = r.fold
        assert fold.val_speakers and not set(fold.val_speakers) & set(fold.test_speakers)
        assert len(r.y_true) == len(fold.test_ids) == 6
        assert r.best_epoch is not None
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.0 <= metrics["pooled"]["ua"]["mean"] <= 1.0
    assert metrics["git_commit"] is None or len(metrics["git_commit"]) == 40
    for name in ("folds.csv", "confusion_matrix.png", "curves.png", "attention.png", "config.yaml"):
        assert (report / name).is_file(), name
    baseline = metrics["baseline"]
    assert "ua" in baseline or "skipped" in baseline


def test_paper_protocol_via_cli(tmp_path, capsys):
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    cfg_path = tmp_path / "cfg.yaml"
    from ks_keras.config import save_config

    save_config(_cfg(tmp_path, manifest, "train.epochs=1"), cfg_path)
    rc = main(
        [
            "evaluate",
            "--config",
            str(cfg_path),
            "--protocol",
            "paper",
            "--max-folds",
            "1",
            "--no-baseline",
            "--no-progress",
            "--report-dir",
            str(tmp_path / "rep"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "PAPER PROTOCOL" in out
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["protocol"] == "paper" and "PAPER PROTOCOL" in metrics["title"]
    assert metrics["folds"][0]["val_speakers"] == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.num_classes=3", "num_classes"),
        ("eval.val_speakers=5", "val_speakers"),
        ("train.strategy=multiworker", "TF_CONFIG"),
        ("data.labels=[high]", "data.labels"),
    ],
)
def test_bad_setups_fail_before_training(tmp_path, capsys, override, message, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=1)
    cfg_path = tmp_path / "cfg.yaml"
    from ks_keras.config import save_config

    try:
        save_config(_cfg(tmp_path, manifest), cfg_path)
        rc = main(
            [
                "evaluate",
                "--config",
                str(cfg_path),
                "--set",
                override,
                "--no-baseline",
                "--no-progress",
                "--report-dir",
                str(tmp_path / "rep"),
            ]
        )
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 1, err
    assert message in err
    assert not (tmp_path / "rep" / "metrics.json").exists()


def _first_fold_again(config, report_dir, logs):
    """Evaluate the first fold into `report_dir` (re-runs reuse what finished there); `logs`
    gets this run's progress lines only. Returns its `FoldResult`."""
    logs.clear()
    cv, _ = evaluate_corpus(
        config,
        report_dir,
        max_folds=1,
        baseline=False,
        progress=False,
        verbose=0,
        log=logs.append,
    )
    return cv.results[0]


def test_a_rerun_reuses_finished_members_and_retrains_changed_ones(tmp_path):
    """A killed multi-hour evaluation re-run in the same folder keeps its finished trainings."""
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    cfg = _cfg(tmp_path, manifest, "train.epochs=1")
    logs = []

    def run(config):
        return _first_fold_again(config, tmp_path / "rep", logs)

    first = run(cfg)
    assert not any("reused" in line for line in logs)
    again = run(cfg)
    assert any("finished training reused" in line for line in logs)
    np.testing.assert_allclose(again.probs, first.probs, rtol=1e-5, atol=1e-6)
    assert again.best_epoch == first.best_epoch
    changed = run(_cfg(tmp_path, manifest, "train.epochs=1", "train.lr=1e-3"))
    assert not any("reused" in line for line in logs)
    assert changed.y_true.tolist() == first.y_true.tolist()


def test_checkpoint_ensemble_averages_the_best_epochs_probabilities(tmp_path):
    """`train.checkpoint_ensemble: 2`: test probabilities are the mean over the two best
    epochs' checkpoints (kept per checkpoint in probabilities.npz); a re-run reuses them."""
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    cfg = _cfg(tmp_path, manifest, "train.epochs=3", "train.checkpoint_ensemble=2")
    logs = []

    def run(config=cfg):
        return _first_fold_again(config, tmp_path / "rep", logs)

    result = run()
    checkpoints = tmp_path / "rep" / "runs" / "repeat0_fold0" / "checkpoints"
    top = json.loads((checkpoints / "top.json").read_text())
    assert len(top) == 2 and len(list(checkpoints.glob("*.h5"))) == 2
    assert top[0]["epoch"] == result.best_epoch and top[0]["value"] >= top[1]["value"]
    saved = np.load(checkpoints / "probabilities.npz")
    assert saved["test"].shape == (2, len(result.fold.test_ids), 2)
    assert saved["val"].shape == (2, len(result.fold.val_ids), 2)
    assert saved["test_ids"].tolist() == list(result.fold.test_ids)
    assert saved["test_labels"].tolist() == result.y_true.tolist()
    assert set(saved["val_speakers"].tolist()) == set(result.fold.val_speakers)
    np.testing.assert_allclose(result.probs, saved["test"].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(result.y_pred, saved["test"].mean(0).argmax(-1))
    # The ensemble's validation UA is reported next to the best epoch's.
    assert len(result.ensemble_val_values) == 1
    assert any("2-checkpoint ensemble" in line for line in logs)
    assert "2 best epochs averaged" in (tmp_path / "rep" / "results.txt").read_text()

    again = run()
    assert any("finished training reused" in line for line in logs)
    np.testing.assert_allclose(again.probs, result.probs, rtol=1e-5, atol=1e-6)

    # More checkpoints than were kept: trained again. Then fewer checkpoints and a second
    # seed: member 1 is reused (its two best of three), only member 2 trains.
    run(_cfg(tmp_path, manifest, "train.epochs=3", "train.checkpoint_ensemble=3"))
    assert not any("reused" in line for line in logs)
    assert len(json.loads((checkpoints / "top.json").read_text())) == 3
    grown = run(
        _cfg(
            tmp_path, manifest, "train.epochs=3", "train.checkpoint_ensemble=2", "train.ensemble=2"
        )
    )
    assert sum("finished training reused" in line for line in logs) == 1
    first = np.load(checkpoints / "probabilities.npz")["test"]
    second = np.load(
        checkpoints.parent.parent / "repeat0_fold0_member1" / "checkpoints" / "probabilities.npz"
    )["test"]
    assert first.shape[0] == second.shape[0] == 2
    np.testing.assert_allclose(grown.probs, (first.mean(0) + second.mean(0)) / 2, rtol=1e-6)


def test_no_validation_speakers_trains_the_fixed_schedule_and_keeps_the_last_epochs(tmp_path):
    """`eval.val_speakers: 0` (honest): every non-test speaker trains, nothing is chosen on
    held-out speakers; the last epoch (the last k for a checkpoint ensemble) is kept."""
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    cfg = _cfg(
        tmp_path, manifest, "eval.val_speakers=0", "train.epochs=3", "train.checkpoint_ensemble=2"
    )
    logs = []
    result = _first_fold_again(cfg, tmp_path / "rep", logs)
    fold = result.fold
    assert fold.val_speakers == [] and fold.val_ids == []
    assert sorted(fold.train_speakers + fold.test_speakers) == ["a", "b", "c"]
    assert result.best_epoch == 2 and result.val_values == []
    run = tmp_path / "rep" / "runs" / "repeat0_fold0"
    assert json.loads((run / "best.json").read_text())["monitor"] == "epoch"
    top = json.loads((run / "checkpoints" / "top.json").read_text())
    assert [e["epoch"] for e in top] == [2, 1]
    saved = np.load(run / "checkpoints" / "probabilities.npz")
    assert "val" not in saved.files and saved["test"].shape[0] == 2
    np.testing.assert_allclose(result.probs, saved["test"].mean(0), rtol=1e-6)
    assert any("none: fixed schedule, last epoch" in line for line in logs)
    assert any("no validation speakers: last epoch" in line for line in logs)
    text = (tmp_path / "rep" / "results.txt").read_text()
    assert "fixed schedule, last epoch" in text and "last 2 epochs averaged" in text
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert "eval.val_speakers: 0" in metrics["protocol_note"]
    # A re-run reuses the finished training.
    again = _first_fold_again(cfg, tmp_path / "rep", logs)
    assert any("finished training reused" in line for line in logs)
    np.testing.assert_allclose(again.probs, result.probs, rtol=1e-5, atol=1e-6)
