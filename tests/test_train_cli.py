"""`ks-keras train`: corpus → features → speaker split → fit → run folder (audio-only, tiny)."""

import csv
import json

import keras
import numpy as np
import pytest
import soundfile as sf
import yaml

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
    cfg = {
        "model": {
            "modalities": ["audio"],
            "audio_dim": 16,
            "num_heads": 2,
            "audio_ffn_dim": 16,
            "n_fem": 1,
            "n_ccab": 0,
            "n_dfm": 1,
            "head_units": [8],
            "num_classes": 2,
        },
        "features": {"audio": {"n_mels": 16}, "cache_dir": str(tmp_path / "cache")},
        "data": {"corpus": "manifest", "manifest": str(manifest), "audio_max_len": 40},
        "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "schedule": "constant", **train},
        "eval": {"val_speakers": 1},
    }
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
