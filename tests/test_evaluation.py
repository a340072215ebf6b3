"""Reports: summary statistics, tables, files and the paper-protocol label."""

import csv
import json

import numpy as np
import pytest

from ks_keras.config import Config, config_from_dict
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.evaluation import (
    PAPER_PROTOCOL_NOTE,
    CVResult,
    FoldResult,
    results_table,
    summarize,
    write_report,
)
from ks_keras.folds import make_folds
from ks_keras.metrics import compute_metrics

LABELS = ["angry", "happy", "sad"]


def _corpus():
    utts = [
        Utterance(
            id=f"{s}_{k}",
            path=f"/x/{s}_{k}.wav",
            speaker=s,
            label=LABELS[k % 3],
            text="t",
            gender="m" if s in ("a", "c") else "f",
        )
        for s in ("a", "b", "c", "d")
        for k in range(6)
    ]
    return Corpus(utts, LABELS, name="toy")


def _cv(protocol="honest", repeats=2, seed=0):
    corpus = _corpus()
    cfg: Config = config_from_dict({}, ["model.num_classes=3", f"eval.protocol={protocol}"])
    folds = make_folds(corpus, cfg.eval)
    rng = np.random.default_rng(seed)
    results = []
    for r in range(repeats):
        for fold in folds:
            y_true = corpus.label_ids(fold.test_ids)
            y_pred = np.where(rng.random(len(y_true)) < 0.7, y_true, (y_true + 1) % 3)
            history = {
                "loss": [1.0, 0.8, 0.7],
                "ua": [0.4, 0.5, 0.6],
                "val_loss": [1.1, 0.9, 1.0],
                "val_ua": [0.3, 0.5, 0.4],
            }
            results.append(
                FoldResult(
                    r,
                    100 + r,
                    fold,
                    y_true,
                    y_pred,
                    compute_metrics(y_true, y_pred, 3),
                    1,
                    history,
                    1.0,
                )
            )
    return CVResult(cfg, LABELS, "toy", protocol, folds, results, repeats)


def test_summary_pools_folds_and_averages_repeats():
    cv = _cv()
    summary = summarize(cv)
    per_repeat = []
    for r in range(2):
        rows = [x for x in cv.results if x.repeat == r]
        truth = np.concatenate([x.y_true for x in rows])
        pred = np.concatenate([x.y_pred for x in rows])
        per_repeat.append(compute_metrics(truth, pred, 3)["ua"])
    assert summary["pooled"]["ua"]["mean"] == pytest.approx(np.mean(per_repeat))
    assert summary["pooled"]["ua"]["std"] == pytest.approx(np.std(per_repeat))
    conf = np.array(summary["confusion_normalized"])
    np.testing.assert_allclose(conf.sum(axis=1), 1.0)


def test_report_files(tmp_path):
    cv = _cv()
    cv.baseline = {
        "method": "eGeMAPS + SVM",
        "wa": 0.5,
        "ua": 0.5,
        "macro_f1": 0.5,
        "folds": {0: {"wa": 0.5, "ua": 0.5, "macro_f1": 0.5}},
    }
    out = write_report(cv, tmp_path / "report")
    for name in (
        "metrics.json",
        "folds.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "curves.png",
        "config.yaml",
        "results.txt",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "honest" and "validation speakers" in metrics["protocol_note"]
    assert metrics["labels"] == LABELS and "versions" in metrics and "git_commit" in metrics
    rows = list(csv.DictReader(open(out / "folds.csv")))
    assert len(rows) == len(cv.results)
    assert {r["val_speakers"] for r in rows} != {""}
    table = (out / "results.txt").read_text()
    assert "baseline" in table and "UA" in table


def _baseline_for(cv, right_fraction, seed=1):
    """A baseline row with predictions on the report's folds (a given share right)."""
    rng = np.random.default_rng(seed)
    folds, predictions = {}, {}
    for fold in cv.folds:
        y_true = next(r.y_true for r in cv.results if r.fold.index == fold.index)
        pred = np.where(rng.random(len(y_true)) < right_fraction, y_true, (y_true + 2) % 3)
        predictions[fold.index] = pred.tolist()
        folds[fold.index] = compute_metrics(y_true, pred, 3)
    return {
        "method": "eGeMAPSv02 functionals + linear SVM (per-speaker z-normalised)",
        "normalize": "speaker",
        "wa": 0.4,
        "ua": 0.4,
        "macro_f1": 0.4,
        "folds": folds,
        "predictions": predictions,
        "unnormalized": {
            "method": "eGeMAPSv02 functionals + linear SVM (no speaker normalisation)",
            "wa": 0.3,
            "ua": 0.3,
            "macro_f1": 0.3,
        },
    }


def test_comparison_with_the_fair_baseline_counts_folds_and_bootstraps(tmp_path):
    cv = _cv(repeats=3)
    cv.baseline = _baseline_for(cv, right_fraction=0.0)  # always wrong: the model must win
    summary = summarize(cv)
    comparison = summary["comparison"]
    assert comparison["wins"] == len(cv.folds) and comparison["losses"] == 0
    assert comparison["sign_test_p"] == pytest.approx(2 / 2 ** len(cv.folds))
    boot = comparison["bootstrap"]
    assert boot["low"] > 0 and boot["p_not_better"] == 0.0
    assert boot["diff"] == pytest.approx(summary["pooled"]["ua"]["mean"] - 0.0)
    per_fold = {row["fold"]: row for row in comparison["per_fold"]}
    for fold in cv.folds:
        uas = [r.metrics["ua"] for r in cv.results if r.fold.index == fold.index]
        assert per_fold[fold.index]["model_ua_mean"] == pytest.approx(np.mean(uas))
        assert per_fold[fold.index]["model_ua_std"] == pytest.approx(np.std(uas))
    table = results_table(cv, summary)
    assert f"better on {len(cv.folds)} of {len(cv.folds)} folds" in table
    assert "bootstrap interval" in table and "UA ± sd" in table
    assert "per-speaker z-normalised" in table and "no speaker normalisation" in table
    # The report keeps the comparison and the per-fold baseline predictions out of the summary.
    metrics = json.loads((write_report(cv, tmp_path / "r") / "metrics.json").read_text())
    assert metrics["comparison"]["wins"] == len(cv.folds)
    assert "predictions" not in metrics["pooled"] and "predictions" in metrics["baseline"]


def test_a_baseline_that_is_always_right_wins_every_fold():
    cv = _cv(repeats=2)
    cv.baseline = _baseline_for(cv, right_fraction=1.0)
    comparison = summarize(cv)["comparison"]
    assert comparison["wins"] == 0 and comparison["losses"] == len(cv.folds)
    assert comparison["bootstrap"]["high"] < 0


def test_paper_protocol_is_labelled_everywhere(tmp_path):
    cv = _cv(protocol="paper", repeats=1)
    out = write_report(cv, tmp_path / "paper")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "PAPER PROTOCOL" in metrics["title"]
    assert metrics["protocol_note"] == PAPER_PROTOCOL_NOTE
    assert "PAPER PROTOCOL" in results_table(cv)
    assert "PAPER PROTOCOL" in (out / "results.txt").read_text()


def test_attention_plot(tmp_path):
    from ks_keras.evaluation import plot_attention

    rng = np.random.default_rng(0)
    dense = rng.random((2, 6, 6))
    att = {
        "layer": "audio_dfm_1",
        "sparsity": 0.5,
        "ids": ["u1", "u2"],
        "lengths": [6, 4],
        "dense": dense,
        "sparse": dense * (rng.random((2, 1, 6)) > 0.5),
        "kept": rng.random((2, 6)),
    }
    plot_attention(att, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_only_the_honest_protocol_without_validation_speakers_reads_as_a_fixed_schedule():
    from dataclasses import replace

    for protocol, fixed in (("honest", True), ("paper", False)):
        cv = _cv(protocol=protocol, repeats=1)
        cfg = config_from_dict(
            cv.config.to_dict(), ["eval.val_speakers=0", "train.checkpoint_ensemble=2"]
        )
        cv = replace(cv, config=cfg)
        table = results_table(cv)
        assert ("fixed schedule, last epoch" in cv.title) is fixed
        assert ("last 2 epochs averaged" in table) is fixed
        assert ("2 best epochs averaged" in table) is not fixed
        assert ("eval.val_speakers: 0" in cv.protocol_note) is fixed
