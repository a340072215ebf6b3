"""KerasTuner search: YAML spaces, the HyperModel, a tiny resumable search, retrain + export."""

from __future__ import annotations

import csv
import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_tuner as kt  # noqa: E402
import tensorflow as tf  # noqa: E402
import yaml  # noqa: E402
from _tiny import tiny_config as shared_tiny_config  # noqa: E402

from ks_keras import tuning  # noqa: E402
from ks_keras.cli import main  # noqa: E402
from ks_keras.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["angry", "happy", "sad"]
AUDIO_DIM, TEXT_DIM, TA, TT = 8, 6, 10, 4

TINY_SPACE = {
    "hyperparameters": {
        "model.n_ccab": {"type": "choice", "values": [0, 1]},
        "model.sparsity": {"type": "float", "min": 0.0, "max": 0.9, "step": 0.1},
        "train.lr": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"},
        "train.schedule": {"type": "choice", "values": ["step", "cosine", "constant"]},
        "train.step_epochs": {
            "type": "int",
            "min": 1,
            "max": 3,
            "when": {"train.schedule": "step"},
        },
        "train.cosine_final_ratio": {
            "type": "float",
            "min": 1e-3,
            "max": 1e-1,
            "sampling": "log",
            "when": {"train.schedule": "cosine"},
        },
        "model.dropout": {"type": "float", "min": 0.0, "max": 0.3},
    }
}


def tiny_config(**train):
    # The suite's tiny config (tests/_tiny.py) without FEM/DFM and CCAB at the default point:
    # tracing attention layers dominates the run time of these 1-epoch trials on 2 shared cores.
    return shared_tiny_config(
        model={
            "audio_dim": AUDIO_DIM,
            "text_dim": TEXT_DIM,
            "audio_d_model": 16,
            "text_d_model": 16,
            "n_fem": 0,
            "n_ccab": 0,
            "n_dfm": 0,
            "head_units": [8],
        },
        features={"audio": {"n_mels": AUDIO_DIM}},
        data={"labels": LABELS, "audio_max_len": TA, "text_max_len": TT},
        train={
            "epochs": 1,
            "batch_size": 8,
            "schedule": "constant",
            "lr": 3e-3,
            "strategy": "default",
            **train,
        },
    )


def synthetic_ds(n: int, seed: int, shuffle: bool = False, batch: int = 8):
    """Learnable toy batches: the class shifts the features."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3).astype("int32")
    rng.shuffle(labels)
    audio = rng.normal(size=(n, TA, AUDIO_DIM)).astype("float32") + labels[:, None, None]
    text = rng.normal(size=(n, TT, TEXT_DIM)).astype("float32") - labels[:, None, None]
    a_len = rng.integers(TA // 2, TA + 1, size=n)
    t_len = rng.integers(2, TT + 1, size=n)
    a_mask = (np.arange(TA)[None] < a_len[:, None]).astype("int32")
    t_mask = (np.arange(TT)[None] < t_len[:, None]).astype("int32")
    inputs = {
        "audio": audio * a_mask[..., None],
        "audio_mask": a_mask,
        "text": text * t_mask[..., None],
        "text_mask": t_mask,
    }
    ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch)


def fold_data():
    meta = {
        "audio": {"type": "synthetic", "dim": AUDIO_DIM},
        "text": {"type": "synthetic", "dim": TEXT_DIM},
    }
    return tuning.FoldData(
        train_ds=lambda: synthetic_ds(24, 0, shuffle=True),  # fresh per trial
        val_ds=synthetic_ds(16, 1),
        test_ds=synthetic_ds(16, 2),
        labels=LABELS,
        feature_metadata=meta,
        fold_info={
            "index": 0,
            "name": "synthetic",
            "train_speakers": ["a"],
            "val_speakers": ["b"],
            "test_speakers": ["c"],
        },
    )


def write_space(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Spaces


@pytest.mark.parametrize(
    "config, space",
    [
        ("configs/paper.yaml", "tuning/paper_space.yaml"),
        ("configs/emodb_demo.yaml", "tuning/emodb_demo_space.yaml"),
        ("configs/emodb_accurate.yaml", "tuning/accurate_space.yaml"),
    ],
)
def test_shipped_spaces_default_to_the_config(config, space):
    cfg = load_config(ROOT / config)
    sp = tuning.load_space(ROOT / space)
    assert tuning.check_space(sp, cfg) == []
    values = tuning.KSTHyperModel(cfg, sp, steps_per_epoch=10).declare(kt.HyperParameters())
    # Every active default is the config's own value (the paper's values for paper.yaml).
    for name, value in values.items():
        assert value == tuning._get_dotted(cfg, name), name
    assert {"model.n_ccab", "model.sparsity", "train.lr", "train.schedule"} <= set(values)


def test_paper_space_declares_the_issue_ranges():
    sp = tuning.load_space(ROOT / "tuning/paper_space.yaml")
    assert sp["model.n_ccab"].values == [0, 1, 2, 3]
    assert (sp["model.sparsity"].min, sp["model.sparsity"].max) == (0.0, 0.9)
    assert sp["train.lr"].sampling == "log"
    assert sp["train.schedule"].values == ["step", "cosine", "constant"]
    assert sp["train.step_epochs"].when == {"train.schedule": ["step"]}
    assert sp["train.cosine_final_ratio"].when == {"train.schedule": ["cosine"]}


def test_paper_defaults_are_the_paper_values():
    cfg = load_config(ROOT / "configs/paper.yaml")
    sp = tuning.load_space(ROOT / "tuning/paper_space.yaml")
    values = tuning.KSTHyperModel(cfg, sp, 10).declare(kt.HyperParameters())
    assert values == {
        "model.n_ccab": 3,
        "model.sparsity": 0.5,
        "model.dropout": 0.1,
        "model.head_dropout": 0.5,
        "train.lr": 5e-4,
        "train.schedule": "step",
        "train.step_epochs": 30,
        "train.step_factor": 0.5,
    }


def test_conditional_parameters_follow_the_schedule():
    cfg = tiny_config()
    sp = tuning.space_from_dict(TINY_SPACE)
    tuning.check_space(sp, cfg)
    hm = tuning.KSTHyperModel(cfg, sp, 3)
    hp = kt.HyperParameters()
    hm.declare(hp)
    hp.values["train.schedule"] = "cosine"
    hp.ensure_active_values()  # as KerasTuner does for a new trial
    values = hm.declare(hp)
    assert "train.cosine_final_ratio" in values and "train.step_epochs" not in values
    trial_cfg = hm.trial_config(hp)
    assert trial_cfg.train.schedule == "cosine"
    assert trial_cfg.train.step_epochs == cfg.train.step_epochs  # inactive: config value kept


def test_encoded_choices_for_list_fields():
    cfg = tiny_config()
    sp = tuning.space_from_dict(
        {
            "hyperparameters": {
                "model.head_units": {"type": "choice", "values": [[8], [16, 8]]},
                "model.audio_d_model": {"type": "choice", "values": [None, 16]},
            }
        }
    )
    tuning.check_space(sp, cfg)
    hm = tuning.KSTHyperModel(cfg, sp, 3)
    hp = kt.HyperParameters()
    hm.declare(hp)
    hp.values["model.head_units"] = json.dumps([16, 8])
    hp.values["model.audio_d_model"] = json.dumps(None)
    trial_cfg = hm.trial_config(hp)
    assert trial_cfg.model.head_units == [16, 8] and trial_cfg.model.audio_d_model is None


@pytest.mark.parametrize(
    "hyperparameters, expected",
    [
        ({"model.n_cab": {"type": "choice", "values": [1]}}, "unknown config field 'model.n_cab'"),
        ({"model": {"type": "choice", "values": [1]}}, "'model' is a config section, not a field"),
        ({"data.audio_max_len": {"type": "int", "min": 10, "max": 20}}, "data.* fields cannot"),
        ({"model.num_classes": {"type": "int", "min": 2, "max": 4}}, "cannot be tuned"),
        ({"model.sparsity": {"type": "float", "min": 0.5, "max": 0.1}}, "greater than max"),
        (
            {"model.sparsity": {"type": "float", "min": 0.0, "max": 1.0}},
            "the value 1.0 gives an invalid config (model.sparsity: expected a fraction",
        ),
        (
            {"model.n_ccab": {"type": "float", "min": 0, "max": 3}},
            "model.n_ccab: expected an integer",
        ),
        (
            {"train.lr": {"type": "float", "min": 0.0, "max": 1e-3, "sampling": "log"}},
            "log sampling needs min > 0",
        ),
        (
            {"train.schedule": {"type": "choice", "values": ["step", "linear"]}},
            "train.schedule: expected one of",
        ),
        ({"train.lr": {"type": "uniform", "min": 1e-4, "max": 1e-3}}, ".type: expected one of"),
        (
            {"train.lr": {"type": "float", "min": 1e-4, "max": 1e-3, "smapling": "log"}},
            "unknown key(s) smapling",
        ),
        (
            {
                "train.step_epochs": {
                    "type": "int",
                    "min": 1,
                    "max": 3,
                    "when": {"train.schedule": "step"},
                }
            },
            "'train.schedule' is not a hyperparameter declared before",
        ),
        (
            {
                "train.schedule": {"type": "choice", "values": ["step", "constant"]},
                "train.cosine_final_ratio": {
                    "type": "float",
                    "min": 1e-3,
                    "max": 1e-1,
                    "when": {"train.schedule": "cosine"},
                },
            },
            "are not in the space of train.schedule",
        ),
        (
            {
                "train.epochs": {"type": "int", "min": 1, "max": 4},
                "train.warmup_epochs": {"type": "int", "min": 0, "max": 4},
            },
            "train.warmup_epochs: expected fewer than train.epochs",
        ),
        ({"model.n_ccab": {"type": "choice", "values": []}}, "expected a non-empty list"),
    ],
)
def test_bad_space_files_give_clear_errors(tmp_path, hyperparameters, expected):
    path = write_space(tmp_path, {"hyperparameters": hyperparameters})
    with pytest.raises(ValueError) as info:
        tuning.check_space(tuning.load_space(path), tiny_config())
    message = str(info.value)
    assert expected in message
    assert str(path) in message  # the file is named


def test_bad_space_structure(tmp_path):
    with pytest.raises(FileNotFoundError, match="search space file not found"):
        tuning.load_space(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown top-level key"):
        tuning.load_space(write_space(tmp_path, {"hyperparams": {}}))
    with pytest.raises(ValueError, match="'hyperparameters' must be a non-empty mapping"):
        tuning.load_space(write_space(tmp_path, {"hyperparameters": {}}))
    (tmp_path / "bad.yaml").write_text("hyperparameters: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        tuning.load_space(tmp_path / "bad.yaml")


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_tuners_get_the_training_strategy(tmp_path, kind):
    cfg = tiny_config(epochs=2)
    strategy = tf.distribute.get_strategy()
    hm = tuning.KSTHyperModel(cfg, tuning.space_from_dict(TINY_SPACE), steps_per_epoch=3)
    tuner = tuning.make_tuner(kind, hm, tmp_path / kind, trials=2, strategy=strategy, seed=1)
    assert tuner.distribution_strategy is strategy
    assert tuner.oracle.objective.name == "val_ua" and tuner.oracle.objective.direction == "max"
    assert tuner.oracle.max_trials == 2
    # The space is declared without building a model (declare-only during construction).
    assert set(tuner.oracle.get_space().values) >= {"model.n_ccab", "train.schedule"}
    assert not hm.declare_only


def test_hyperband_rejects_tuning_epochs():
    sp = tuning.space_from_dict(
        {"hyperparameters": {"train.epochs": {"type": "int", "min": 1, "max": 3}}}
    )
    with pytest.raises(ValueError, match="Hyperband chooses the number of epochs"):
        tuning.check_space(sp, tiny_config(), tuner="hyperband")


# ---------------------------------------------------------------------------------------------
# A tiny search, resumed, then retrained, tested and exported.


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    project = tmp_path_factory.mktemp("tune") / "project"
    cfg = tiny_config()
    data = fold_data()
    space = tuning.space_from_dict(TINY_SPACE, "tiny")
    result = tuning.run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        project,
        trials=3,
        fold_info=data.fold_info,
        verbose=0,
    )
    return cfg, data, space, project, result


def test_tiny_search_completes_inside_the_space(searched):
    cfg, _, space, project, result = searched
    assert len(result.rows) == 3 and result.new_trials == 3
    assert [r.status for r in result.failed] == []
    assert len(result.completed) >= 1
    for row in result.rows:
        assert 0.0 <= row.val_ua <= 1.0 and row.best_epoch == 1
        for name, value in row.values.items():
            assert space[name].contains(value), (name, value)
        # Conditional parameters are set only under their schedule.
        assert ("train.step_epochs" in row.values) == (row.values["train.schedule"] == "step")
        assert ("train.cosine_final_ratio" in row.values) == (
            row.values["train.schedule"] == "cosine"
        )
    # Trial 0 evaluates the config's own point.
    first = result.rows[0].values
    assert first["model.n_ccab"] == cfg.model.n_ccab and first["train.lr"] == cfg.train.lr
    assert first["train.schedule"] == "constant"
    # The tuner explored: not all trials are the default point.
    assert len({json.dumps(r.values, sort_keys=True) for r in result.rows}) == 3


def test_summary_tables_and_best_config(searched):
    cfg, _, space, project, result = searched
    with open(project / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [r.trial_id for r in result.rows]
    assert {r["status"] for r in rows} == {"COMPLETED"}
    assert set(space.names) <= set(rows[0])
    best = max(result.completed, key=lambda r: r.val_ua)
    assert result.best.val_ua == best.val_ua
    md = (project / "summary.md").read_text()
    assert f"best: trial {result.best.trial_id}" in md and "| trial | status | val_ua" in md
    # The best config is a full config that load_config (train/evaluate) accepts.
    loaded = load_config(project / "best_config.yaml")
    assert loaded == result.best_config
    for name, value in result.best.values.items():
        assert tuning._get_dotted(loaded, name) == value
    assert loaded.model.audio_dim == cfg.model.audio_dim  # untouched fields kept
    assert (project / "tensorboard").is_dir()


def test_rerun_resumes_without_repeating_trials(searched, capsys):
    cfg, data, space, project, first = searched
    before = sorted(p.name for p in (project / "keras_tuner").glob("trial_*"))
    again = tuning.run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        project,
        trials=3,
        fold_info=data.fold_info,
        verbose=0,
    )
    assert again.new_trials == 0
    assert sorted(p.name for p in (project / "keras_tuner").glob("trial_*")) == before
    assert [(r.trial_id, r.values, r.val_ua) for r in again.rows] == [
        (r.trial_id, r.values, r.val_ua) for r in first.rows
    ]
    # A changed space or base config is not silently mixed into the old project.
    with pytest.raises(ValueError, match="different settings"):
        tuning.run_search(
            tiny_config(lr=1e-3),
            space,
            data.train_ds,
            data.val_ds,
            project,
            trials=3,
            fold_info=data.fold_info,
            verbose=0,
        )


def test_best_model_retrained_tested_and_exported(searched, tmp_path):
    from ks_keras.export import load_exported

    _, data, _, project, result = searched
    final = tuning.finish_search(
        result,
        data,
        export_dir=tmp_path / "saved_models",
        export_name="tuned",
        verify_export=False,
        verbose=0,
    )
    assert final.trial_id == result.best.trial_id
    assert set(final.test_metrics) >= {"wa", "ua", "macro_f1", "confusion"}
    assert final.test_metrics["n"] == 16
    assert final.export_path == tmp_path / "saved_models" / "tuned" / "1"
    exported = load_exported(final.export_path)
    assert exported.labels == LABELS
    inputs, _ = next(iter(data.test_ds))
    out = exported.predict({k: v.numpy() for k, v in inputs.items()})
    assert out["probabilities"].shape == (8, 3)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert exported.metadata["config"] == result.best_config.to_dict()
    record = json.loads((project / "final.json").read_text())
    # Same seed, same config, same (fresh) shuffle order: the retraining reproduces the trial.
    assert record["retrained_val_ua"] == pytest.approx(result.best.val_ua, abs=1e-6)
    assert record["trial_id"] == result.best.trial_id and record["export_path"] == str(
        final.export_path
    )
    # Same best trial again: reused, not retrained or exported twice.
    again = tuning.finish_search(
        result,
        data,
        export_dir=tmp_path / "saved_models",
        export_name="tuned",
        verify_export=False,
        verbose=0,
    )
    assert again.reused and again.export_path == final.export_path
    assert not (tmp_path / "saved_models" / "tuned" / "2").exists()


def test_final_model_averages_the_kept_checkpoints(searched, tmp_path):
    """`train.checkpoint_ensemble: 2` in the best config: the retrained model that is tested
    and saved averages its two best epochs."""
    from dataclasses import replace

    import keras

    from ks_keras.ensemble import ensemble_members

    _, data, _, _, result = searched
    cfg = result.best_config
    cfg = replace(cfg, train=replace(cfg.train, epochs=2, checkpoint_ensemble=2))
    moved = replace(result, project_dir=tmp_path / "project", best_config=cfg)
    moved.project_dir.mkdir()
    final = tuning.finish_search(moved, data, export=False, verbose=0)
    model = keras.saving.load_model(final.model_path)
    names = sorted(m.name for m in ensemble_members(model))
    assert names == ["ks_transformer_epoch_1", "ks_transformer_epoch_2"]


def test_hyperband_search_continues_trials_and_resumes(tmp_path):
    space = {
        "hyperparameters": {
            "train.lr": {"type": "float", "min": 1e-3, "max": 1e-2, "sampling": "log"},
            "model.dropout": {"type": "float", "min": 0.0, "max": 0.3},
        }
    }
    cfg, data = tiny_config(epochs=3), fold_data()
    args = (cfg, tuning.space_from_dict(space), data.train_ds, data.val_ds, tmp_path / "hb")
    result = tuning.run_search(*args, tuner="hyperband", trials=4, verbose=0)
    assert len(result.rows) == 4 and not result.failed
    for row in result.rows:
        assert row.extra["tuner/epochs"] <= 3  # Hyperband's epochs, at most train.epochs
        assert row.extra["tuner/initial_epoch"] < row.best_epoch <= row.extra["tuner/epochs"]
    # Its second round continues a first-round trial from that trial's checkpoint.
    continued = [r for r in result.rows if r.extra["tuner/initial_epoch"] > 0]
    assert continued and continued[0].extra["tuner/trial_id"] in {r.trial_id for r in result.rows}
    assert load_config(result.best_config_path).train.epochs == 3
    assert tuning.run_search(*args, tuner="hyperband", trials=4, verbose=0).new_trials == 0


_MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
(cpu,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import importlib.util
spec = importlib.util.spec_from_file_location("tt", sys.argv[1])
tt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tt)
from ks_keras import tuning
cfg, data = tt.tiny_config(strategy="mirrored"), tt.fold_data()
space = tuning.space_from_dict(tt.TINY_SPACE)
r = tuning.run_search(cfg, space, data.train_ds, data.val_ds, sys.argv[2], trials=2, verbose=0)
f = tuning.finish_search(r, data, export=False, verbose=0)
print("RESULT", r.strategy.num_replicas_in_sync, len(r.completed), f.test_metrics["n"])
"""


@pytest.mark.large
def test_search_under_mirrored_strategy_on_two_logical_cpus(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, __file__, str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    assert lines[0].split()[1:] == ["2", "2", "16"]  # 2 replicas, 2 trials, 16 test rows


def test_failed_trials_are_reported_and_no_best(tmp_path, monkeypatch, capsys):
    def broken(cfg, *args, **kwargs):
        raise RuntimeError("boom: the model cannot be built")

    monkeypatch.setattr(tuning.hypermodel, "build_model", broken)
    data = fold_data()
    result = tuning.run_search(
        tiny_config(),
        tuning.space_from_dict(TINY_SPACE),
        synthetic_ds(24, 0, shuffle=True),  # a dataset object works too
        data.val_ds,
        tmp_path / "p",
        trials=3,
        verbose=0,
    )
    err = capsys.readouterr().err
    assert result.best is None and result.completed == []
    assert [r.status for r in result.rows] == ["FAILED"] * 3
    assert all("boom" in r.error for r in result.rows)
    assert "FAILED" in err and "boom" in err
    assert "**FAILED**" in (tmp_path / "p" / "summary.md").read_text()
    assert not (tmp_path / "p" / "best_config.yaml").exists()
    with pytest.raises(ValueError, match="no trial of the search"):
        tuning.finish_search(result, data)


def test_overwrite_starts_afresh_only_when_asked(tmp_path, monkeypatch):
    def broken(cfg, *args, **kwargs):  # fast trials: this test is about the project folder
        raise RuntimeError("boom")

    monkeypatch.setattr(tuning.hypermodel, "build_model", broken)
    data, project = fold_data(), tmp_path / "p"
    space = tuning.space_from_dict(TINY_SPACE)
    (tmp_path / "p").mkdir()
    (project / "notes.txt").write_text("mine")
    first = tuning.run_search(tiny_config(), space, data.train_ds, data.val_ds, project, trials=2)
    assert len(first.rows) == 2
    # Without overwrite, a different space is refused, naming the way out.
    other = tuning.space_from_dict(
        {"hyperparameters": {"model.n_ccab": TINY_SPACE["hyperparameters"]["model.n_ccab"]}}
    )
    with pytest.raises(ValueError, match="--overwrite"):
        tuning.run_search(tiny_config(), other, data.train_ds, data.val_ds, project, trials=1)
    again = tuning.run_search(
        tiny_config(), other, data.train_ds, data.val_ds, project, trials=1, overwrite=True
    )
    assert [r.trial_id for r in again.rows] == ["0"] and set(again.rows[0].values) == {
        "model.n_ccab"
    }
    assert (project / "notes.txt").read_text() == "mine"  # only the search's own files go


# ---------------------------------------------------------------------------------------------
# CLI: corpus → features → fold datasets → search.


def _write_wav(path: Path, seconds: float, freq: float, seed: int) -> None:
    rate = 16000
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(seed).normal(scale=0.05, size=t.size)
    x = (0.3 * np.sin(2 * np.pi * freq * t) + noise).clip(-1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """4 speakers × 3 classes × 2 utterances of synthetic audio; an audio-only config."""
    root = tmp_path_factory.mktemp("corpus")
    rows = ["path,speaker,label,text"]
    k = 0
    for speaker in ("s1", "s2", "s3", "s4"):
        for c, label in enumerate(LABELS):
            for j in range(2):
                name = f"{speaker}_{label}_{j}.wav"
                _write_wav(root / name, 0.3 + 0.05 * j, 200.0 * (c + 1), k)
                rows.append(f"{name},{speaker},{label},")
                k += 1
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = {
        "model": {
            "modalities": ["audio"],
            "audio_dim": 16,
            "audio_d_model": 16,
            "num_heads": 2,
            "audio_ffn_dim": 16,
            "n_fem": 0,
            "n_ccab": 0,
            "n_dfm": 0,
            "head_units": [8],
            "num_classes": 3,
        },
        "features": {"audio": {"type": "logmel", "n_mels": 16}, "cache_dir": str(root / "cache")},
        "data": {
            "corpus": "manifest",
            "manifest": str(root / "manifest.csv"),
            "labels": LABELS,
            "audio_max_len": 20,
        },
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "schedule": "constant",
            "strategy": "default",
            "output_dir": str(root / "runs"),
        },
        "eval": {"folds": "loso", "val_speakers": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_prepare_fold_data_holds_out_validation_and_test_speakers(tiny_corpus):
    _, config_path = tiny_corpus
    cfg = load_config(config_path)
    data = tuning.prepare_fold_data(cfg, fold=1, progress=False)
    info = data.fold_info
    assert info["index"] == 1 and info["test_speakers"] == ["s2"]
    assert len(info["val_speakers"]) == 1
    assert not set(info["val_speakers"]) & set(info["train_speakers"])
    assert not set(info["test_speakers"]) & (
        set(info["train_speakers"]) | set(info["val_speakers"])
    )
    assert (info["n_train"], info["n_val"], info["n_test"]) == (12, 6, 6)
    inputs, labels = next(iter(data.val_ds))
    assert set(inputs) == {"audio", "audio_mask"} and inputs["audio"].shape[1:] == (20, 16)
    assert data.labels == LABELS and set(data.feature_metadata) == {"audio"}
    with pytest.raises(ValueError, match=r"--fold: expected an integer in \[0, 4\)"):
        tuning.prepare_fold_data(cfg, fold=4, progress=False)


def test_global_normalisation_statistics_reach_the_retrained_model(tiny_corpus):
    """Regression: finish_search wrote the sidecar/export without `global` statistics."""
    _, config_path = tiny_corpus
    cfg = load_config(config_path, ["features.audio.normalize=global"])
    data = tuning.prepare_fold_data(cfg, fold=0, progress=False)
    stats = data.norm_stats.to_dict()
    assert stats["mode"] == "global" and len(stats["mean"]) == 16
    from ks_keras.export import normalization_metadata

    assert normalization_metadata(cfg, data.norm_stats)["mode"] == "global"
    speaker = tuning.prepare_fold_data(load_config(config_path), fold=0, progress=False)
    assert speaker.norm_stats is None


def test_a_tuned_batch_size_rebatches_length_bucketed_batches(tiny_corpus):
    """Regression: unbatch().batch() failed on bucketed batches of different lengths."""
    _, config_path = tiny_corpus
    cfg = load_config(config_path, ["data.audio_max_len=400"])  # lengths differ
    data = tuning.prepare_fold_data(cfg, fold=0, progress=False)
    space = tuning.space_from_dict(
        {"hyperparameters": {"train.batch_size": {"type": "fixed", "value": 3}}}
    )
    hypermodel = tuning.KSTHyperModel(cfg, space, steps_per_epoch=10)
    train = data.train_ds() if callable(data.train_ds) else data.train_ds
    lengths = {int(x["audio"].shape[1]) for x, *_ in train}
    rebatched = list(hypermodel._rebatch(train, 3))
    assert sum(int(x["audio_mask"].numpy().sum()) for x, *_ in rebatched) == sum(
        int(x["audio_mask"].numpy().sum()) for x, *_ in train
    )
    assert all(x["audio"].shape[0] <= 3 for x, *_ in rebatched)
    assert len(lengths) > 1  # the bucketed batches really differ in length


def test_cli_tune_exits_nonzero_when_no_trial_completes(tiny_corpus, tmp_path, monkeypatch, capsys):
    _, config_path = tiny_corpus

    def broken(cfg, *args, **kwargs):
        raise RuntimeError("boom in every trial")

    monkeypatch.setattr(tuning.hypermodel, "build_model", broken)
    space = write_space(
        tmp_path,
        {
            "hyperparameters": {
                "model.sparsity": {"type": "float", "min": 0.0, "max": 0.9, "step": 0.1}
            }
        },
    )
    rc = main(
        [
            "tune",
            "--config",
            str(config_path),
            "--space",
            str(space),
            "--trials",
            "2",
            "--project-dir",
            str(tmp_path / "proj"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert "no trial completed" in err and "boom in every trial" in err
    with open(tmp_path / "proj" / "summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["FAILED", "FAILED"]


def test_cli_tune_bad_space_is_a_clean_error(tiny_corpus, tmp_path, capsys):
    _, config_path = tiny_corpus
    space = write_space(
        tmp_path, {"hyperparameters": {"model.sparsity": {"type": "float", "min": 0.0, "max": 1.5}}}
    )
    rc = main(
        [
            "tune",
            "--config",
            str(config_path),
            "--space",
            str(space),
            "--trials",
            "1",
            "--project-dir",
            str(tmp_path / "proj"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "model.sparsity" in err and "Traceback" not in err
    assert not (tmp_path / "proj").exists()  # rejected before any work


def test_tensorboard_is_an_install_requirement():
    setup = (ROOT / "setup.cfg").read_text()
    requires = setup.split("install_requires =", 1)[1].split("\n[", 1)[0]
    assert "\n    tensorboard" in requires and "keras-tuner" in requires
    tuning._require_tensorboard()
