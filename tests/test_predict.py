"""`ks-keras predict`: raw files → the model's inputs → labels, from exports and .keras files."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import soundfile as sf  # noqa: E402
from _tiny import tiny_config as shared_tiny_config  # noqa: E402

from ks_keras import cli  # noqa: E402
from ks_keras import export as ex  # noqa: E402
from ks_keras.config import config_from_dict  # noqa: E402
from ks_keras.data import pad_or_crop  # noqa: E402
from ks_keras.features import get_audio_extractor, get_text_extractor  # noqa: E402
from ks_keras.model import build_model  # noqa: E402
from ks_keras.predict import Predictor, RequestFeaturizer, _manifest_chunks  # noqa: E402

LABELS = ["angry", "happy", "sad"]
AUDIO_MAX, TEXT_MAX = 30, 8


def tiny_config(modalities=("audio",), **audio):
    """The suite's tiny config (tests/_tiny.py) with MiniLM text (384-d, projected to 16)."""
    return shared_tiny_config(
        model={"modalities": list(modalities), "text_dim": 384, "text_d_model": 16},
        features={"audio": audio},
        data={"audio_max_len": AUDIO_MAX, "text_max_len": TEXT_MAX, "labels": LABELS},
    )


def write_tone(path, seconds=0.5, rate=16000, freq=220.0, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
    return path


def feature_metadata(cfg):
    out = {"audio": get_audio_extractor(cfg.features.audio).metadata}
    if "text" in cfg.model.modalities:
        out["text"] = get_text_extractor(cfg.features.text).metadata
    return {m: out[m] for m in cfg.model.modalities}


def keras_reference(model, cfg, wav_paths, texts=None, stats=None):
    """The model on features made by hand from the files: the path predict must reproduce."""
    from ks_keras.audio import load_audio

    ext = get_audio_extractor(cfg.features.audio)
    feats = ext.extract([load_audio(p) for p in wav_paths])
    if stats is not None:
        feats = [(f - stats["mean"]) / stats["std"] for f in feats]
    fixed = [pad_or_crop(f, AUDIO_MAX) for f in feats]
    inputs = {
        "audio": np.stack([x for x, _ in fixed]),
        "audio_mask": np.stack([m for _, m in fixed]),
    }
    if texts is not None:
        tfeats = get_text_extractor(cfg.features.text).extract(texts)
        tfixed = [pad_or_crop(f, TEXT_MAX) for f in tfeats]
        inputs["text"] = np.stack([x for x, _ in tfixed])
        inputs["text_mask"] = np.stack([m for _, m in tfixed])
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(inputs, training=False)))


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    """An audio-only export and the same model as .keras + sidecar, plus some wav files."""
    root = tmp_path_factory.mktemp("predict")
    keras.utils.set_random_seed(7)
    cfg = tiny_config()
    model = build_model(cfg)
    export_dir = ex.export_model(
        model,
        cfg,
        LABELS,
        feature_metadata(cfg),
        base_dir=root / "saved_models",
        name="audio",
        verify=False,
    )
    keras_path = root / "run" / "best.keras"
    keras_path.parent.mkdir()
    model.save(keras_path)
    ex.write_model_sidecar(keras_path, cfg, LABELS, feature_metadata(cfg))
    wavs = root / "wavs"
    wavs.mkdir()
    files = {
        "a": write_tone(wavs / "a.wav", 0.5, freq=200.0, seed=1),
        "b": write_tone(wavs / "b.wav", 0.8, freq=700.0, seed=2),  # longer than AUDIO_MAX
        "c": write_tone(wavs / "c.wav", 0.2, freq=400.0, seed=3),
    }
    return cfg, model, export_dir, keras_path, files


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_single_file_json_matches_keras_on_hand_made_features(audio_model, capsys):
    cfg, model, export_dir, _, files = audio_model
    base = export_dir.parent  # base folder → latest version
    code, out, err = run_cli(["predict", str(files["a"]), "--model", str(base), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    want = keras_reference(model, cfg, [files["a"]])[0]
    got = np.array([result["probabilities"][lab] for lab in LABELS])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert result["label"] == LABELS[int(np.argmax(want))]
    assert result["model"] == str(export_dir)
    # Human-readable output names the label and every class.
    code, out, _ = run_cli(["predict", str(files["a"]), "--model", str(base)], capsys)
    assert code == 0 and out.startswith(f"{files['a']}: {result['label']}")
    assert all(lab in out for lab in LABELS)


def test_keras_file_and_waveform_signature_agree_with_export(audio_model):
    _, _, export_dir, keras_path, files = audio_model
    paths = [files["a"], files["b"], files["c"]]
    from_export = Predictor.load(export_dir).predict_files(paths, None)
    from_keras = Predictor.load(keras_path).predict_files(paths, None)
    waveform = Predictor.load(export_dir).predict_files(paths, None, signature="serving_waveform")
    for a, b, c in zip(from_export, from_keras, waveform):
        pa = np.array(list(a.probabilities.values()))
        np.testing.assert_allclose(pa, list(b.probabilities.values()), atol=1e-5)
        np.testing.assert_allclose(pa, list(c.probabilities.values()), atol=1e-5)
        assert a.label == b.label == c.label


def test_manifest_to_csv_with_resampling_note(audio_model, tmp_path, capsys):
    cfg, model, export_dir, _, files = audio_model
    write_tone(tmp_path / "hi_rate.wav", 0.5, rate=44100, freq=300.0, seed=4, channels=2)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,path,label\n"
        f"u1,{files['a']},angry\n"
        f"u2,{files['b']},sad\n"
        "u3,hi_rate.wav,happy\n"  # relative to the manifest
    )
    out_csv = tmp_path / "pred.csv"
    code, _, err = run_cli(
        [
            "predict",
            "--manifest",
            str(manifest),
            "--model",
            str(export_dir),
            "--output",
            str(out_csv),
            "--batch-size",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["id"] for r in rows] == ["u1", "u2", "u3"]
    assert list(rows[0]) == [
        "id",
        "path",
        "predicted",
        "class_id",
        "p_angry",
        "p_happy",
        "p_sad",
        "label",
        "correct",
    ]
    probs = np.array([[float(r[f"p_{lab}"]) for lab in LABELS] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    want = keras_reference(model, cfg, [files["a"], files["b"], tmp_path / "hi_rate.wav"])
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert [r["predicted"] for r in rows] == [LABELS[k] for k in want.argmax(axis=1)]
    assert "resampled from 44100 Hz to 16000 Hz" in err
    assert "accuracy on 3 labelled rows" in err
    assert "predict: 100%" in err  # the progress bar ran to the end


def test_bad_inputs_are_clear_errors(audio_model, tmp_path, capsys):
    _, _, export_dir, _, files = audio_model
    model = ["--model", str(export_dir)]
    cases = []
    cases.append((["predict", str(tmp_path / "missing.wav"), *model], "audio file not found"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    cases.append((["predict", str(corrupt), *model], "cannot decode audio"))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(files["a"].read_bytes()[:2000])
    cases.append((["predict", str(truncated), *model], "truncated"))
    cases.append((["predict", "--model", str(export_dir)], "the model reads audio"))
    (tmp_path / "not_export").mkdir()
    cases.append(
        (
            ["predict", str(files["a"]), "--model", str(tmp_path / "not_export")],
            "not a ks_keras export",
        )
    )
    cases.append(
        (["predict", str(files["a"]), "--model", str(tmp_path / "nothing")], "model not found")
    )
    # The request asks for other features than the model was trained with.
    cases.append(
        (
            ["predict", str(files["a"]), *model, "--set", "features.audio.hop_ms=20"],
            "hop_ms: model trained with 10.0, request gives 20.0",
        )
    )
    cases.append(
        (
            ["predict", str(files["a"]), *model, "--set", "features.audio.n_mels=20"],
            "expects 16-d features",
        )
    )
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("id,path\nx,gone1.wav\ny,gone2.wav\n")
    cases.append(
        (["predict", "--manifest", str(bad_manifest), *model], "2 audio file(s) not found")
    )
    for argv, message in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 1, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err


def test_speaker_normalisation_pools_each_speakers_frames():
    cfg = tiny_config(normalize="speaker")
    meta = ex.build_metadata(cfg, LABELS, feature_metadata(cfg))
    featurizer = RequestFeaturizer(meta)
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 16)) * 3 + 5 for n in (4, 6, 5)]
    out, notes = featurizer.normalize_speakers(feats, ["s1", "s1", None], ["a", "b", "c"])
    pooled = np.concatenate(feats[:2])
    np.testing.assert_allclose(out[0], (feats[0] - pooled.mean(0)) / pooled.std(0), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(out[:2]).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[2].std(0), 1.0, atol=1e-5)
    assert notes[0] == [] and "no speaker given" in notes[2][0]


def test_global_normalisation_keras_file_matches_export(tmp_path, audio_model):
    *_, files = audio_model
    cfg = tiny_config(normalize="global")
    keras.utils.set_random_seed(3)
    model = build_model(cfg)
    rng = np.random.default_rng(1)
    stats = {
        "mode": "global",
        "modality": "audio",
        "mean": (rng.standard_normal(16) - 5).tolist(),
        "std": (1 + rng.random(16)).tolist(),
    }
    keras_path = tmp_path / "g.keras"
    model.save(keras_path)
    ex.write_model_sidecar(keras_path, cfg, LABELS, feature_metadata(cfg), norm_stats=stats)
    export_dir = ex.export_model(
        model, cfg, LABELS, feature_metadata(cfg), base_dir=tmp_path, verify=False, norm_stats=stats
    )
    paths = [files["a"], files["b"]]
    arrays = {k: np.asarray(stats[k], np.float32) for k in ("mean", "std")}
    want = keras_reference(model, cfg, paths, stats=arrays)
    for source in (keras_path, export_dir):
        got = Predictor.load(source).predict_files(paths, None)
        np.testing.assert_allclose([list(p.probabilities.values()) for p in got], want, atol=1e-5)


def test_manifest_chunks_keep_each_speaker_together():
    rows = [{"speaker": s} for s in ["a", "b", None, "a", None, "b", "a"]]
    assert _manifest_chunks(rows, 2, per_speaker=False) == [[0, 1], [2, 3], [4, 5], [6]]
    assert _manifest_chunks(rows, 2, per_speaker=True) == [[0, 3, 6], [1, 5], [2, 4]]


@pytest.fixture(scope="module")
def multimodal_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    keras.utils.set_random_seed(11)
    cfg = tiny_config(modalities=("audio", "text"))
    model = build_model(cfg)
    export_dir = ex.export_model(
        model,
        cfg,
        LABELS,
        feature_metadata(cfg),
        base_dir=root / "saved_models",
        name="mm",
        verify=False,
    )
    wav = write_tone(root / "u.wav", 0.5, seed=5)
    return cfg, model, export_dir, wav


def test_audio_and_text_with_real_minilm(multimodal_model, tmp_path, capsys):
    cfg, model, export_dir, wav = multimodal_model
    text = "I told you not to touch my things"
    code, out, err = run_cli(
        ["predict", str(wav), "--text", text, "--model", str(export_dir), "--json"], capsys
    )
    assert code == 0, err
    got = json.loads(out)["probabilities"]
    want = keras_reference(model, cfg, [wav], texts=[text])[0]
    np.testing.assert_allclose([got[lab] for lab in LABELS], want, atol=1e-5)
    # Missing / empty transcript, and a text layer other than the trained one.
    for argv, message in [
        (["predict", str(wav), "--model", str(export_dir)], "give the transcript with --text"),
        (
            ["predict", str(wav), "--text", "  ", "--model", str(export_dir)],
            "empty or missing transcript",
        ),
        (
            [
                "predict",
                str(wav),
                "--text",
                text,
                "--model",
                str(export_dir),
                "--set",
                "features.text.layer=-2",
            ],
            "feature extractor mismatch for text: layers",
        ),
    ]:
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and message in err, (argv, err)
    # A manifest in the training format (path,speaker,label,text) works as is.
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["path", "speaker", "label", "text"],
                [str(wav), "s1", "angry", text],
                [str(wav), "s1", "sad", "hm"],
            ]
        )
    code, out, err = run_cli(
        [
            "predict",
            "--manifest",
            str(manifest),
            "--model",
            str(export_dir),
            "--json",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    preds = json.load(io.StringIO(out))["predictions"]
    assert [p["true_label"] for p in preds] == ["angry", "sad"]
    np.testing.assert_allclose([preds[0]["probabilities"][lab] for lab in LABELS], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reliability (issue 14)


def _nan_model(cfg):
    model = build_model(cfg)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])  # diverged
    return model


def test_non_finite_weights_are_refused_by_predict_and_export(audio_model, tmp_path, capsys):
    cfg, _, _, _, files = audio_model
    keras_path = tmp_path / "run" / "best.keras"
    keras_path.parent.mkdir()
    _nan_model(cfg).save(keras_path)
    ex.write_model_sidecar(keras_path, cfg, LABELS, feature_metadata(cfg))
    for argv in (
        ["predict", str(files["a"]), "--model", str(keras_path), "--json"],
        ["export", "--model", str(keras_path), "--base-dir", str(tmp_path / "out"), "--no-verify"],
    ):
        code, out, err = run_cli(argv, capsys)
        assert code == 1 and "hold NaN/inf" in err and "diverged" in err, (argv, err)
        assert "NaN" not in out
    assert not (tmp_path / "out").exists()


def test_non_finite_outputs_are_refused_and_json_never_holds_nan(
    audio_model, tmp_path, capsys, monkeypatch
):
    cfg, _, _, _, files = audio_model
    # An export whose weights are NaN (made before exports refused them).
    # export_model looks the check up in ks_keras.export.exporting.
    monkeypatch.setattr("ks_keras.export.exporting.check_finite_weights", lambda m, w: None)
    export_dir = ex.export_model(
        _nan_model(cfg), cfg, LABELS, feature_metadata(cfg), base_dir=tmp_path, verify=False
    )
    monkeypatch.undo()
    code, out, err = run_cli(["predict", str(files["a"]), "--model", str(export_dir), "--json"],
                             capsys)  # fmt: skip
    assert code == 1 and "NaN/inf probabilities" in err and "retrain" in err
    assert out == ""  # nothing printed, certainly no invalid JSON


def test_outputs_must_be_probability_rows_of_the_labels(audio_model):
    cfg = audio_model[0]
    meta = ex.build_metadata(cfg, LABELS, feature_metadata(cfg))
    inputs = {"audio": np.zeros((2, AUDIO_MAX, 16), np.float32)}
    for answer, message in [
        (np.full((2, 3), np.nan), "NaN/inf probabilities for item"),
        (np.ones((2, 4)) / 4, r"shape \(2, 4\), expected \[2, 3\]"),
        (np.array([[1.2, -0.2, 0.0], [0.2, 0.3, 0.5]]), r"item\(s\) \[0\] is not a probability"),
    ]:
        predictor = Predictor(meta, lambda x, answer=answer: answer, "fake")
        with pytest.raises(ValueError, match=message):
            predictor.predict_inputs(inputs)


def test_missing_output_folder_is_checked_before_any_work(audio_model, tmp_path, capsys):
    _, _, export_dir, _, files = audio_model
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{files['a']}\n")
    target = tmp_path / "no" / "such" / "pred.csv"
    # The model does not even exist: the output folder is checked first.
    argv = ["predict", "--manifest", str(manifest), "--model", str(tmp_path / "none")]
    code, _, err = run_cli([*argv, "--output", str(target)], capsys)
    assert code == 1 and f"the folder {target.parent} does not exist" in err
    code, _, err = run_cli([*argv, "--output", str(tmp_path)], capsys)
    assert code == 1 and "is a folder" in err


def test_a_keras_file_that_is_not_a_keras_archive_says_what_it_is(audio_model, tmp_path, capsys):
    import zipfile

    import h5py

    _, _, _, _, files = audio_model
    text = tmp_path / "text.keras"
    text.write_text("model: best\n")
    hdf5 = tmp_path / "weights.keras"
    with h5py.File(hdf5, "w") as f:
        f["x"] = np.zeros(3)
    other_zip = tmp_path / "zip.keras"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    empty = tmp_path / "empty.keras"
    empty.write_bytes(b"")
    for path, what in [
        (text, "a text file starting with 'model: best'"),
        (hdf5, "an HDF5 file"),
        (other_zip, "a zip archive without the config.json of a Keras model (readme.txt)"),
        (empty, "an empty file"),
    ]:
        code, _, err = run_cli(["predict", str(files["a"]), "--model", str(path)], capsys)
        assert code == 1 and f"not a Keras model archive: it is {what}" in err, err
        assert "File not found" not in err


def test_every_bad_audio_file_of_a_manifest_is_named(audio_model, tmp_path, capsys):
    _, _, export_dir, _, files = audio_model
    (tmp_path / "bad1.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "bad2.wav").write_bytes(files["b"].read_bytes()[:3000])
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\nbad1.wav\n{files['a']}\nbad2.wav\n")
    code, out, err = run_cli(
        ["predict", "--manifest", str(manifest), "--model", str(export_dir), "--batch-size", "1"],
        capsys,
    )
    assert code == 1 and "2 audio file(s) cannot be used" in err
    assert "bad1.wav: cannot decode" in err and "bad2.wav: truncated" in err


def test_prediction_manifest_with_an_unquoted_comma_names_the_line(audio_model, tmp_path, capsys):
    _, _, export_dir, _, files = audio_model
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'path,text\n{files["a"]},"Hallo, wie geht\'s"\n{files["b"]},Hallo, du\n')
    code, _, err = run_cli(["predict", "--manifest", str(manifest), "--model", str(export_dir)],
                           capsys)  # fmt: skip
    assert code == 1 and "line 3: 3 fields for 2 columns" in err and "line 2" not in err


# ---------------------------------------------------------------------------------------------
# openSMILE functionals input (`features.functionals`).


def functionals_config(**audio):
    cfg = tiny_config(**audio)
    data = cfg.to_dict()
    data["model"]["functionals_dim"] = 88
    data["features"]["functionals"] = "egemaps"
    return config_from_dict(data)


@pytest.fixture(scope="module")
def functionals_model(tmp_path_factory):
    """An audio + eGeMAPS model trained with per-speaker normalisation: export, .keras file
    with sidecar, and wav files of two speakers (s1: a, b; s2: c)."""
    root = tmp_path_factory.mktemp("functionals")
    keras.utils.set_random_seed(13)
    cfg = functionals_config(normalize="speaker")
    model = build_model(cfg)
    export_dir = ex.export_model(
        model, cfg, LABELS, feature_metadata(cfg), base_dir=root / "sm", name="fx", verify=False
    )
    keras_path = root / "run" / "best.keras"
    keras_path.parent.mkdir()
    model.save(keras_path)
    ex.write_model_sidecar(keras_path, cfg, LABELS, feature_metadata(cfg))
    files = [
        write_tone(root / "a.wav", 0.5, freq=180.0, seed=21),
        write_tone(root / "b.wav", 0.6, freq=330.0, seed=22),
        write_tone(root / "c.wav", 0.4, freq=520.0, seed=23),
    ]
    return cfg, model, export_dir, keras_path, files


def test_functionals_predict_keras_and_export_match_hand_made_inputs(functionals_model):
    from ks_keras.audio import load_audio
    from ks_keras.data import STD_FLOOR
    from ks_keras.features.functionals import extract_files, speaker_normalize

    cfg, model, export_dir, keras_path, files = functionals_model
    speakers = ["s1", "s1", "s2"]
    # By hand: log-mel and eGeMAPS functionals, each normalised per speaker.
    feats = get_audio_extractor(cfg.features.audio).extract([load_audio(p) for p in files])
    pooled = np.concatenate(feats[:2]).astype(np.float64)
    mean, std = pooled.mean(0), np.maximum(pooled.std(0), STD_FLOOR)
    feats = [(f - mean) / std for f in feats[:2]] + [
        (feats[2] - feats[2].mean(0)) / np.maximum(feats[2].std(0), STD_FLOOR)
    ]
    raw = extract_files(files, "egemaps")
    functionals = speaker_normalize(raw, speakers)
    assert functionals.shape == (3, 88) and not functionals[2].any()  # s2 has one utterance
    fixed = [pad_or_crop(f, AUDIO_MAX) for f in feats]
    inputs = {
        "audio": np.stack([x for x, _ in fixed]).astype(np.float32),
        "audio_mask": np.stack([m for _, m in fixed]),
        "functionals": functionals,
    }
    want = keras.ops.convert_to_numpy(keras.ops.softmax(model(inputs, training=False)))

    featurizer = RequestFeaturizer(ex.load_export_metadata(export_dir)[1])
    request, notes = featurizer.inputs(files, None, speakers=speakers)
    np.testing.assert_allclose(request["functionals"], functionals, rtol=1e-5, atol=1e-5)
    assert notes[0] == [] and any("only utterance of speaker 's2'" in n for n in notes[2])
    for source in (export_dir, keras_path):
        got = Predictor.load(source).predict_files(files, None, speakers=speakers, batch_size=2)
        np.testing.assert_allclose([list(p.probabilities.values()) for p in got], want, atol=1e-5)
    # Without per-speaker normalisation the raw functionals are the input.
    raw_meta = ex.build_metadata(functionals_config(), LABELS, feature_metadata(cfg))
    raw_request, _ = RequestFeaturizer(raw_meta).inputs(files[:2], None)
    np.testing.assert_allclose(raw_request["functionals"], raw[:2], rtol=1e-6)


def test_functionals_manifest_pools_speakers_and_names_bad_files(
    functionals_model, tmp_path, capsys
):
    _, _, export_dir, _, files = functionals_model
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,speaker\nu1,{files[0]},s1\nu2,{files[2]},s2\nu3,{files[1]},s1\n")
    code, out, err = run_cli(
        ["predict", "--manifest", str(manifest), "--model", str(export_dir), "--json",
         "--no-progress", "--batch-size", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    preds = json.loads(out)["predictions"]
    direct = Predictor.load(export_dir).predict_files(
        [files[0], files[1]], None, speakers=["s1", "s1"]
    )
    for got, want in zip([preds[0], preds[2]], direct):
        np.testing.assert_allclose(
            [got["probabilities"][lab] for lab in LABELS],
            list(want.probabilities.values()),
            atol=1e-5,
        )
    # A file that does not decode: the audio path's error, the file named.
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    code, _, err = run_cli(["predict", str(corrupt), "--model", str(export_dir)], capsys)
    assert code == 1 and "corrupt.wav: cannot decode audio" in err and "Traceback" not in err
    # Functionals openSMILE cannot compute (NaN for a few ms of audio): every file named.
    short = write_tone(tmp_path / "short.wav", 0.01, seed=3)
    featurizer = RequestFeaturizer(ex.load_export_metadata(export_dir)[1])
    with pytest.raises(ValueError, match=r"short\.wav: its openSMILE eGeMAPSv02 functionals"):
        featurizer.functionals_matrix([files[0], short])


def test_functionals_request_settings_must_be_the_models(functionals_model):
    _, _, export_dir, _, files = functionals_model
    with pytest.raises(ValueError, match="feature extractor mismatch for functionals"):
        Predictor.load(export_dir, overrides=["features.functionals=compare"])
    predictor = Predictor.load(export_dir)
    with pytest.raises(ValueError, match="no serving_waveform signature .*openSMILE functionals"):
        predictor.featurizer.inputs(files[:1], None, signature="serving_waveform")
    # A single file without a speaker: normalised alone (all zeros), and said so.
    [pred] = predictor.predict_files(files[:1], None)
    assert any("with no speaker given" in n and "all zero" in n for n in pred.notes)


def test_batches_are_sorted_by_length_and_predictions_come_back_in_order(audio_model):
    """With more items than one batch, a model that ignores padding gets batches of similar
    length (its graph cuts each after its longest real step); results keep the given order."""
    cfg, model, export_dir, _, files = audio_model
    paths = [files["b"], files["a"], files["c"], files["a"]]
    predictor = Predictor.load(export_dir)
    assert predictor.metadata["crop_to_longest"] is True
    seen = []
    run = predictor.predict_inputs

    def recording(inputs, signature):
        seen.append(inputs["audio_mask"].sum(axis=1).tolist())
        return run(inputs, signature)

    predictor.predict_inputs = recording
    sorted_batches = predictor.predict_files(paths, None, batch_size=2)
    lengths = [n for batch in seen for n in batch]
    assert lengths == sorted(lengths) and len(seen) == 2
    one_batch = predictor.predict_files(paths, None, batch_size=4)  # the order given
    want = keras_reference(model, cfg, paths)
    for got, whole, ref in zip(sorted_batches, one_batch, want):
        probs = np.array([got.probabilities[lab] for lab in LABELS])
        np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
        assert got.path == whole.path and got.label == whole.label
    assert [p.path for p in sorted_batches] == [str(p) for p in paths]
