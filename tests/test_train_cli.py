"""`ks-keras train`: corpus → features → speaker split → fit → run folder (audio-only, tiny)."""

import csv
import json

import keras
import numpy as np
import pytest
import soundfile as sf
import yaml
from _tiny import tiny_config_dict

from ks_keras.cli import main
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.train_cli import split_speakers


def _write_corpus(folder, speakers=("f1", "m1", "f2"), labels=("calm", "loud"), per=3):
    """Tiny WAV corpus: 'loud' utterances are louder noise, so the task is learnable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for s in speakers:
        for label in labels:
            for k in range(per):
                path = folder / f"{s}_{label}_{k}.wav"
                scale = 0.15 if label == "loud" else 0.01
                wave = scale * rng.standard_normal(int(16000 * (0.3 + 0.05 * k)))
                sf.write(str(path), wave.astype(np.float32), 16000)
                rows.append(
                    {
                        "path": path.name,
                        "speaker": s,
                        "label": label,
                        "text": "some words",
                        "gender": s[0],
                    }
                )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _config(tmp_path, manifest, **train):
    """The suite's tiny config (tests/_tiny.py), audio only, 2 classes, as a YAML file."""
    cfg = tiny_config_dict(
        model={"modalities": ["audio"], "n_ccab": 0, "head_units": [8], "num_classes": 2},
        features={"cache_dir": str(tmp_path / "cache")},
        data={"corpus": "manifest", "manifest": str(manifest), "audio_max_len": 40},
        train={"epochs": 2, "batch_size": 4, "lr": 3e-3, "schedule": "constant", **train},
        eval={"val_speakers": 1},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_writes_a_usable_run_folder(tmp_path, capsys):
    config = _config(tmp_path, _write_corpus(tmp_path / "wav"))
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "best epoch" in out and "UA" in out
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["val_speakers"]) == 1
    assert not set(split["val_speakers"]) & set(split["train_speakers"])
    assert split["n_train"] == 12 and split["n_val"] == 6
    metrics = json.loads((run_dir / "val_metrics.json").read_text())
    assert 0.0 <= metrics["ua"] <= 1.0 and np.sum(metrics["confusion"]) == 6
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == [0, 1]
    model = keras.saving.load_model(run_dir / "best.keras")
    assert model.outputs[0].shape[-1] == 2
    sidecar = json.loads((run_dir / "best.keras.json").read_text())
    assert sidecar["labels"] == ["calm", "loud"]


def test_train_command_fails_before_any_work(tmp_path, capsys, monkeypatch):
    manifest = _write_corpus(tmp_path / "wav")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = _config(tmp_path, manifest, strategy="multiworker")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 1
    assert "TF_CONFIG" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # no features were extracted

    one_class = _write_corpus(tmp_path / "one", labels=("calm",))
    config = _config(tmp_path, one_class)
    assert main(["train", "--config", str(config), "--set", "model.num_classes=2"]) == 1
    assert "classes" in capsys.readouterr().err


def _corpus(speakers_genders):
    utts = [
        Utterance(id=f"{s}_{i}", path="x.wav", speaker=s, label="a", text="t", gender=g)
        for s, g in speakers_genders
        for i in range(2)
    ]
    return Corpus(utts, ["a"], name="t")


def test_split_speakers_balances_gender_and_checks_counts():
    corpus = _corpus([("f1", "F"), ("f2", "F"), ("f3", "F"), ("m1", "M"), ("m2", "M")])
    for seed in range(5):
        train, val = split_speakers(corpus, 2, seed)
        assert len(val) == 2 and sorted(train + val) == sorted(corpus.speakers)
        assert {v[0] for v in val} == {"f", "m"}  # one of each gender
    assert split_speakers(corpus, 1, 3) == split_speakers(corpus, 1, 3)  # seeded
    with pytest.raises(ValueError, match="need at least 6"):
        split_speakers(corpus, 5, 0)


def test_ensemble_training_saves_one_model_that_exports(tmp_path, capsys):
    from ks_keras.ensemble import ensemble_members
    from ks_keras.export import load_exported

    config = _config(tmp_path, _write_corpus(tmp_path / "wav"), ensemble=2)
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ensemble member 2/2" in out
    assert (run_dir / "history.json").is_file() and (
        run_dir / "member_2" / "history.json"
    ).is_file()
    model = keras.saving.load_model(run_dir / "best.keras")
    members = ensemble_members(model)
    assert [m.name for m in members] == ["member_1", "member_2"]
    # The two members trained with different seeds: different weights.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(members[0].get_weights(), members[1].get_weights(), strict=True)
    )
    rc = main(
        [
            "export",
            "--model",
            str(run_dir / "best.keras"),
            "--base-dir",
            str(tmp_path / "out"),
            "--name",
            "ens",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    exported = load_exported(tmp_path / "out" / "ens")
    rng = np.random.default_rng(0)
    inputs = {
        "audio": rng.normal(size=(3, 40, 16)).astype("float32"),
        "audio_mask": np.ones((3, 40), "int32"),
    }
    probs = exported.predict(inputs)["probabilities"]
    member_probs = np.mean(
        [keras.ops.convert_to_numpy(keras.ops.softmax(m(inputs), -1)) for m in members], axis=0
    )
    np.testing.assert_allclose(probs, member_probs, atol=1e-5)


def test_mixup_trains_on_mixed_batches_and_scores_plain_labels(tmp_path, capsys):
    import tensorflow as tf

    from ks_keras.mixup import MixupCrossentropy, mix_batches

    config = _config(tmp_path, _write_corpus(tmp_path / "wav"), mixup_alpha=0.4)
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    history = json.loads((run_dir / "history.json").read_text())
    assert all(np.isfinite(e["loss"]) and 0 <= e["val_ua"] <= 1 for e in history)

    # The mixed batches: convex combinations, union masks, packed labels, seeded.
    x = np.arange(4 * 3 * 2, dtype="float32").reshape(4, 3, 2)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], "int32")
    labels = np.array([0, 1, 0, 1], "int32")
    ds = tf.data.Dataset.from_tensors(({"audio": x, "audio_mask": mask}, labels))
    (mixed, packed), again = [
        next(iter(mix_batches(ds, 0.4, seed=7, class_weight=None))) for _ in range(2)
    ]
    np.testing.assert_array_equal(packed.numpy(), again[1].numpy())
    lam = packed.numpy()[:, 2]
    assert ((lam >= 0.5) & (lam <= 1)).all()
    np.testing.assert_array_equal(packed.numpy()[:, 0], labels)
    # Each mixed sample is lam * x[i] + (1 - lam) * x[j] for a partner j with label packed[1],
    # and its mask the union of the two masks.
    for i in range(4):
        partners = [
            j
            for j in range(4)
            if np.allclose(mixed["audio"].numpy()[i], lam[i] * x[i] + (1 - lam[i]) * x[j])
        ]
        assert partners, i
        j = partners[0]
        assert packed.numpy()[i, 1] == labels[j]
        np.testing.assert_array_equal(mixed["audio_mask"].numpy()[i], np.maximum(mask[i], mask[j]))
    # Packed labels give lam * CE(y) + (1 - lam) * CE(y'); plain labels plain CE.
    logits = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")
    packed_rows = np.array([[0, 1, 0.7], [1, 1, 1.0]], "float32")
    loss = MixupCrossentropy(reduction=None)
    ce = -np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    want = [0.7 * ce[0, 0] + 0.3 * ce[0, 1], ce[1, 1]]
    np.testing.assert_allclose(np.asarray(loss(packed_rows, logits)), want, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(loss(np.array([0, 1]), logits)), [ce[0, 0], ce[1, 1]], rtol=1e-6
    )


def test_diverging_training_fails_naming_the_epoch_and_saves_no_model(tmp_path, capsys):
    config = _config(tmp_path, _write_corpus(tmp_path / "wav"))
    run_dir = tmp_path / "run"
    argv = ["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    rc = main([*argv, "--set", "train.lr=1e30"])
    err = capsys.readouterr().err
    assert rc == 1 and "training diverged in epoch 1 of 2" in err, err
    assert "loss = nan" in err or "weights hold NaN/inf" in err
    assert "Traceback" not in err
    for name in ("best.keras", "best.keras.json", "best.weights.h5", "val_metrics.json"):
        assert not (run_dir / name).exists(), name


def test_global_normalisation_run_saves_its_statistics_and_exports(tmp_path, capsys):
    """Regression: `normalize: global` used to fail after training (sidecar without stats)."""
    config = _config(tmp_path, _write_corpus(tmp_path / "wav"))
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--set", "features.audio.normalize=global"]
    rc = main(["train", *args, "--run-dir", str(run_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (run_dir / "split.json").is_file() and (run_dir / "val_metrics.json").is_file()
    norm = json.loads((run_dir / "best.keras.json").read_text())["normalization"]
    assert norm["mode"] == "global" and len(norm["mean"]) == len(norm["std"]) == 16
    rc = main(
        ["export", "--model", str(run_dir / "best.keras"), "--base-dir", str(tmp_path / "out")]
        + ["--name", "g", "--no-verify"]
    )
    assert rc == 0, capsys.readouterr().err


def test_speed_perturbed_training_extracts_variants_and_trains(tmp_path, capsys):
    """`features.audio.speed_perturb`: variants cached once next to the features, training
    runs on them, the run's model and validation use the original audio."""
    config = _config(tmp_path, _write_corpus(tmp_path / "wav"))
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--set", "features.audio.speed_perturb=[0.9, 1.1]"]
    rc = main(["train", *args, "--run-dir", str(run_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    variants = sorted(p.name for p in (tmp_path / "cache").rglob("speed-*") if p.is_dir())
    assert variants == ["speed-0.9", "speed-1.1"]
    metrics = json.loads((run_dir / "val_metrics.json").read_text())
    assert np.sum(metrics["confusion"]) == 6  # validation: the 6 original utterances


def test_checkpoint_ensemble_training_saves_the_mean_of_the_best_epochs(tmp_path, capsys):
    from ks_keras.ensemble import ensemble_members

    config = _config(
        tmp_path, _write_corpus(tmp_path / "wav"), epochs=3, ensemble=2, checkpoint_ensemble=2
    )
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mean of epochs" in out
    model = keras.saving.load_model(run_dir / "best.keras")
    members = ensemble_members(model)
    # Two seeds x two checkpoints, flat (one mean over four models), best epoch first.
    names = [m.name for m in members]
    assert len(names) == 4 and len(set(names)) == 4
    assert [n.rsplit("_epoch_", 1)[0] for n in names] == ["member_1"] * 2 + ["member_2"] * 2
    for folder, pair in ((run_dir, members[:2]), (run_dir / "member_2", members[2:])):
        top = json.loads((folder / "checkpoints" / "top.json").read_text())
        assert [m.name.rsplit("_", 1)[1] for m in pair] == [str(e["epoch"] + 1) for e in top]
        check = keras.saving.load_model(run_dir / "best.keras").get_layer(pair[1].name)
        check.load_weights(folder / "checkpoints" / top[1]["file"])
        for a, b in zip(check.get_weights(), pair[1].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_train_without_validation_speakers_uses_every_speaker_and_keeps_the_last_epoch(
    tmp_path, capsys
):
    config = _config(tmp_path, _write_corpus(tmp_path / "wav"))
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "val_metrics.json").write_text("{}")  # a stale report of an earlier run
    rc = main(
        ["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
        + ["--set", "eval.val_speakers=0"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "last epoch 2/2 kept" in out and "all 3 speakers" in out
    split = json.loads((run_dir / "split.json").read_text())
    assert split["val_speakers"] == [] and split["n_train"] == 18 and split["n_val"] == 0
    assert not (run_dir / "val_metrics.json").exists()
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == 1
    assert (run_dir / "best.keras").is_file()


def test_seed_ensemble_without_validation_speakers_trains_every_member_on_every_speaker(
    tmp_path, capsys
):
    from ks_keras.ensemble import ensemble_members

    config = _config(tmp_path, _write_corpus(tmp_path / "wav"), ensemble=2)
    run_dir = tmp_path / "run"
    rc = main(
        ["train", "--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
        + ["--set", "eval.val_speakers=0"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("validation speakers none") == 2
    for folder in (run_dir, run_dir / "member_2"):
        # Each member keeps its own last epoch; none holds speakers out.
        assert json.loads((folder / "best.json").read_text())["epoch"] == 1
    split = json.loads((run_dir / "split.json").read_text())
    assert split["val_speakers"] == [] and split["n_train"] == 18
    assert not (run_dir / "val_metrics.json").exists()
    members = ensemble_members(keras.saving.load_model(run_dir / "best.keras"))
    assert [m.name for m in members] == ["member_1", "member_2"]
    first, second = (m.get_weights() for m in members)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))
