"""SavedModel export: TF Serving layout, signatures, shipped metadata, fresh-process parity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _tiny import tiny_config as shared_tiny_config  # noqa: E402

from ks_keras import cli  # noqa: E402
from ks_keras import export as ex  # noqa: E402
from ks_keras.commands import export as export_command  # noqa: E402
from ks_keras.config import save_config  # noqa: E402
from ks_keras.features.logmel import LogMelExtractor  # noqa: E402
from ks_keras.model import build_model  # noqa: E402

LABELS = ["angry", "happy", "sad"]
AUDIO_MAX, TEXT_MAX = 24, 6


# The suite's tiny config (tests/_tiny.py) without dropout, at this file's lengths.
EXPORT_BASE = {
    "model": {"dropout": 0.0, "head_dropout": 0.0},
    "data": {"audio_max_len": AUDIO_MAX, "text_max_len": TEXT_MAX, "labels": LABELS},
}


def tiny_config(**sections):
    return shared_tiny_config(EXPORT_BASE, **sections)


def feature_metadata(cfg):
    meta = {"text": {"type": "hf_text", "model_path": "/nowhere", "layers": [-1]}}
    if "audio" in cfg.model.modalities:
        meta["audio"] = LogMelExtractor(cfg.features.audio).metadata
    return {m: meta[m] for m in cfg.model.modalities}


def random_inputs(rng, batch, audio_len=AUDIO_MAX, text_len=TEXT_MAX, modalities=("audio", "text")):
    out = {}
    for mod, t, d in (("audio", audio_len, 16), ("text", text_len, 8)):
        if mod not in modalities:
            continue
        lengths = rng.integers(1, t + 1, size=batch)
        lengths[0] = t
        mask = (np.arange(t)[None] < lengths[:, None]).astype("int32")
        out[mod] = (rng.standard_normal((batch, t, d)) * mask[:, :, None]).astype("float32")
        out[f"{mod}_mask"] = mask
    return out


def keras_probs(model, inputs):
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(inputs, training=False)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One verified export (fresh process + saved_model_cli) shared by the tests here."""
    keras.utils.set_random_seed(1)
    cfg = tiny_config()
    model = build_model(cfg)
    base = tmp_path_factory.mktemp("saved_models")
    path = ex.export_model(
        model, cfg, LABELS, feature_metadata(cfg), base_dir=base, name="tiny", verify=True
    )
    return cfg, model, base, path


def test_layout_assets_and_metadata(exported):
    cfg, _, base, path = exported
    assert path == base / "tiny" / "1"
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert (path / "assets" / "labels.txt").read_text().splitlines() == LABELS
    meta = json.loads((path / "assets" / "ks_keras.json").read_text())
    assert meta["format"] == ex.EXPORT_FORMAT and meta["name"] == "tiny" and meta["version"] == 1
    assert meta["labels"] == LABELS
    assert meta["inputs"] == {
        "audio": {"dim": 16, "max_len": AUDIO_MAX},
        "text": {"dim": 8, "max_len": TEXT_MAX},
    }
    assert meta["features"]["audio"]["n_mels"] == 16
    assert meta["sample_rate"] == 16000 and meta["crop"] == "end"
    assert set(meta["signatures"]) == {"serving_default", "serving_waveform"}
    assert ex.metadata_config(meta) == cfg
    # Nothing half-written is left for TF Serving to pick up.
    assert sorted(p.name for p in (base / "tiny").iterdir()) == ["1"]


def test_signatures_named_dynamic_inputs_and_outputs(exported):
    _, _, _, path = exported
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["serving_default"]
    _, kwargs = fn.structured_input_signature
    assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == {
        "audio": (tf.float32, [None, None, 16]),
        "audio_mask": (tf.int32, [None, None]),
        "text": (tf.float32, [None, None, 8]),
        "text_mask": (tf.int32, [None, None]),
    }
    outs = fn.structured_outputs
    assert set(outs) == {"probabilities", "class_id"}
    assert outs["probabilities"].shape.as_list() == [None, 3]
    assert outs["class_id"].shape.as_list() == [None] and outs["class_id"].dtype == tf.int32
    _, wkwargs = loaded.signatures["serving_waveform"].structured_input_signature
    assert {k: v.shape.as_list() for k, v in wkwargs.items()} == {
        "waveform": [None, None],
        "waveform_length": [None],
        "text": [None, None, 8],
        "text_mask": [None, None],
    }


def test_reloaded_export_matches_keras_and_crops_like_training(exported):
    _, model, base, _ = exported
    loaded = ex.load_exported(base / "tiny")  # base folder → latest version
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        inputs = random_inputs(rng, batch)
        got = loaded.predict(inputs)
        np.testing.assert_allclose(got["probabilities"], keras_probs(model, inputs), atol=1e-5)
        np.testing.assert_array_equal(got["class_id"], got["probabilities"].argmax(-1))
    # Longer than trained: the end is cropped; values past the crop change nothing.
    long = random_inputs(rng, 3, audio_len=AUDIO_MAX + 7, text_len=TEXT_MAX + 3)
    cropped = {
        k: v[:, :AUDIO_MAX] if k.startswith("audio") else v[:, :TEXT_MAX] for k, v in long.items()
    }
    np.testing.assert_allclose(
        loaded.predict(long)["probabilities"], keras_probs(model, cropped), atol=1e-5
    )
    # Shorter than trained: padded in the graph; garbage at masked steps is ignored.
    short = random_inputs(rng, 3, audio_len=AUDIO_MAX - 9, text_len=TEXT_MAX - 2)
    noisy = dict(short, audio=short["audio"] + 5.0 * (1 - short["audio_mask"])[:, :, None])
    padded = {
        k: np.pad(
            v,
            [(0, 0), (0, (AUDIO_MAX if k.startswith("audio") else TEXT_MAX) - v.shape[1])]
            + [(0, 0)] * (v.ndim - 2),
        )
        for k, v in short.items()
    }
    np.testing.assert_allclose(
        loaded.predict(noisy)["probabilities"], keras_probs(model, padded), atol=1e-5
    )


def test_waveform_signature_equals_logmel_then_default(exported):
    cfg, _, base, path = exported
    loaded = ex.load_exported(path)
    rng = np.random.default_rng(3)
    lengths = np.array([16000, 3000, 9000], np.int32)  # 1 s is longer than AUDIO_MAX frames
    waves = np.zeros((3, 16000), np.float32)
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * rng.standard_normal(n)
    text = random_inputs(rng, 3, modalities=("text",))
    got = loaded.predict(
        {"waveform": waves, "waveform_length": lengths, **text}, signature="serving_waveform"
    )
    feats = LogMelExtractor(cfg.features.audio).extract([w[:n] for w, n in zip(waves, lengths)])
    audio = np.zeros((3, AUDIO_MAX, 16), np.float32)
    mask = np.zeros((3, AUDIO_MAX), np.int32)
    for i, f in enumerate(feats):
        n = min(len(f), AUDIO_MAX)
        audio[i, :n], mask[i, :n] = f[:n], 1
    want = loaded.predict({"audio": audio, "audio_mask": mask, **text})
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-5)


def test_versions_next_free_and_never_overwritten(exported, tmp_path):
    cfg, model, base, path = exported
    assert ex.list_versions(base / "tiny") == [1] and ex.next_version(base / "tiny") == 2
    assert ex.next_version(tmp_path / "new") == 1
    with pytest.raises(ValueError, match="already exists"):
        ex.export_model(
            model,
            cfg,
            LABELS,
            feature_metadata(cfg),
            base_dir=base,
            name="tiny",
            version=1,
            verify=False,
        )
    # A version folder being copied in (no saved_model.pb yet) still takes its number, but
    # resolving the base folder picks the latest complete version.
    (base / "tiny" / "7").mkdir()
    assert ex.next_version(base / "tiny") == 8
    assert ex.resolve_export_dir(base / "tiny") == path
    (base / "tiny" / "7").rmdir()


def test_verification_catches_a_different_model(exported):
    cfg, _, _, path = exported
    keras.utils.set_random_seed(99)
    other = build_model(cfg)
    with pytest.raises(ValueError, match="differs from the Keras model"):
        ex.verify_export(path, other, batch_sizes=(1,), check_cli=False)


def test_verify_module_reloads_the_export_and_saves_every_output(exported, tmp_path, capsys):
    # The program `verify_export` runs in a fresh process (`python -m ks_keras.export.verify`),
    # here in-process.
    from ks_keras.export import verify

    _, model, _, path = exported
    inputs = random_inputs(np.random.default_rng(5), 2)
    in_path, out_path = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
    np.savez(in_path, **{f"0/{k}": v for k, v in inputs.items()})
    (tmp_path / "in.npz.json").write_text(
        json.dumps([{"signature": "serving_default", "inputs": sorted(inputs)}])
    )
    assert verify.main([str(path), in_path, out_path]) == 0
    assert "signatures: ['serving_default', 'serving_waveform']" in capsys.readouterr().out
    out = dict(np.load(out_path))
    assert sorted(out) == ["0/class_id", "0/probabilities"]
    np.testing.assert_allclose(out["0/probabilities"], keras_probs(model, inputs), atol=1e-5)
    np.testing.assert_array_equal(out["0/class_id"], out["0/probabilities"].argmax(-1))


def test_verification_reloads_with_this_checkout_from_another_folder(
    exported, tmp_path, monkeypatch
):
    # A relative PYTHONPATH means another folder once the working directory changes: the
    # fresh process still imports the ks_keras of this process.
    import ks_keras
    from ks_keras.export import verification

    _, model, _, path = exported
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ".")
    env = verification._reload_env(dict(os.environ))
    root = Path(ks_keras.__file__).resolve().parent.parent
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(root), "."] or paths == ["."]  # unchanged if in site-packages
    report = ex.verify_export(path, model, batch_sizes=(1,), check_cli=False)
    assert [c["case"] for c in report.cases] == ["default", "cropped", "padded", "waveform"]


def test_cli_listing_check_fails_on_missing_signature(exported):
    _, _, _, path = exported
    meta = json.loads((path / "assets" / "ks_keras.json").read_text())
    listing = (
        "signature_def['serving_default']:\n  inputs['audio'] tensor_info:\n"
        "  inputs['audio_mask']\n inputs['text']\n inputs['text_mask']\n"
        "  outputs['probabilities']\n outputs['class_id']\n"
    )
    with pytest.raises(ValueError, match="serving_waveform"):
        ex._check_cli_listing(listing, meta, path)
    meta["signatures"].pop("serving_waveform")
    assert ex._check_cli_listing(listing, meta, path) == ["serving_default"]
    with pytest.raises(ValueError, match="no output 'class_id'"):
        ex._check_cli_listing(listing.replace("outputs['class_id']", ""), meta, path)


def test_bad_requests_are_clear_errors(exported):
    _, _, _, path = exported
    loaded = ex.load_exported(path)
    good = random_inputs(np.random.default_rng(1), 2)
    with pytest.raises(ValueError, match="'audio' has 24 steps but 'audio_mask' has 23"):
        loaded.predict(dict(good, audio_mask=good["audio_mask"][:, :-1]))
    with pytest.raises(ValueError, match=r"input 'text' has shape \(2, 6, 5\)"):
        loaded.predict(dict(good, text=good["text"][:, :, :5]))
    with pytest.raises(ValueError, match="missing \\['text_mask'\\]"):
        loaded.predict({k: v for k, v in good.items() if k != "text_mask"})
    with pytest.raises(ValueError, match="no signature 'nope'"):
        loaded.predict(good, signature="nope")
    # The graph's own check, as TF Serving would report it to a client.
    fn = loaded.loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn(
            **{
                k: tf.constant(v)
                for k, v in dict(
                    good, text=good["text"][:1], text_mask=good["text_mask"][:1]
                ).items()
            }
        )
    assert ex.tf_error_summary(info.value) == "'audio' and 'text' must have the same batch size"


def test_not_an_export_is_a_clear_error(exported, tmp_path):
    _, _, _, path = exported
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        ex.load_exported(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a ks_keras export"):
        ex.load_exported(tmp_path / "empty")
    # A SavedModel that is not ours (no assets/ks_keras.json).
    foreign = tmp_path / "foreign" / "1"
    module = tf.Module()
    module.f = tf.function(
        lambda x: {"y": x * 2.0}, input_signature=[tf.TensorSpec([None], tf.float32)]
    )
    tf.saved_model.save(module, str(foreign), signatures={"serving_default": module.f})
    with pytest.raises(ValueError, match="not a ks_keras export"):
        ex.load_exported(tmp_path / "foreign")
    # A corrupt graph file with valid metadata.
    broken = tmp_path / "broken" / "1"
    (broken / "assets").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    (broken / "assets" / "ks_keras.json").write_text(
        (path / "assets" / "ks_keras.json").read_text()
    )
    with pytest.raises(ValueError, match="does not load"):
        ex.load_exported(broken)


def test_export_rejects_mismatches(exported, tmp_path):
    cfg, model, _, _ = exported
    meta = feature_metadata(cfg)
    with pytest.raises(ValueError, match="3 classes .* 2 labels"):
        ex.export_model(model, cfg, LABELS[:2], meta, base_dir=tmp_path, verify=False)
    with pytest.raises(ValueError, match="model.audio_dim=32"):
        ex.export_model(
            model,
            tiny_config(model={"audio_dim": 32}),
            LABELS,
            meta,
            base_dir=tmp_path,
            verify=False,
        )
    with pytest.raises(ValueError, match="feature_metadata.*text"):
        ex.export_model(
            model, cfg, LABELS, {"audio": meta["audio"]}, base_dir=tmp_path, verify=False
        )
    with pytest.raises(ValueError, match="export name"):
        ex.export_model(model, cfg, LABELS, meta, base_dir=tmp_path, name="a/b", verify=False)
    with pytest.raises(ValueError, match="features.audio.n_mels=80"):
        ex.export_model(
            model,
            tiny_config(features={"audio": {"type": "logmel", "n_mels": 80}}),
            LABELS,
            meta,
            base_dir=tmp_path,
            verify=False,
        )
    assert not any(tmp_path.iterdir())


def test_audio_only_with_global_normalisation_in_graph(tmp_path):
    cfg = tiny_config(
        model={"modalities": ["audio"]},
        features={"audio": {"type": "logmel", "n_mels": 16, "normalize": "global"}},
    )
    model = build_model(cfg)
    with pytest.raises(ValueError, match="norm_stats"):
        ex.export_model(model, cfg, LABELS, feature_metadata(cfg), base_dir=tmp_path)
    rng = np.random.default_rng(2)
    stats = {
        "mode": "global",
        "modality": "audio",
        "mean": rng.standard_normal(16).tolist(),
        "std": (0.5 + rng.random(16)).tolist(),
    }
    path = ex.export_model(
        model,
        cfg,
        LABELS,
        feature_metadata(cfg),
        base_dir=tmp_path,
        name="audio_only",
        verify=False,
        norm_stats=stats,
    )
    meta = json.loads((path / "assets" / "ks_keras.json").read_text())
    assert meta["normalization"]["mode"] == "global"
    assert set(meta["signatures"]) == {"serving_default", "serving_waveform"}
    assert set(meta["signatures"]["serving_default"]["inputs"]) == {"audio", "audio_mask"}
    # Clients send extractor outputs; the graph normalises real steps with the stats.
    raw = random_inputs(rng, 2, modalities=("audio",))
    mask = raw["audio_mask"][:, :, None]
    normalised = dict(
        raw, audio=((raw["audio"] - stats["mean"]) / stats["std"] * mask).astype("float32")
    )
    np.testing.assert_allclose(
        ex.load_exported(path).predict(raw)["probabilities"],
        keras_probs(model, normalised),
        atol=1e-5,
    )


def test_speaker_normalisation_has_no_waveform_signature():
    cfg = tiny_config(features={"audio": {"type": "logmel", "n_mels": 16, "normalize": "speaker"}})
    assert ex.normalization_metadata(cfg) == {"mode": "speaker", "modality": "audio"}
    assert "speaker" in ex.waveform_signature_problem(cfg)
    assert ex.waveform_signature_problem(tiny_config()) is None
    assert ex.waveform_signature_problem(tiny_config(model={"modalities": ["text"]}))


def test_cli_export_from_keras_file_with_sidecar(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(model={"modalities": ["audio"]})
    model = build_model(cfg)
    model_path = tmp_path / "run" / "best.keras"
    model_path.parent.mkdir()
    model.save(model_path)
    argv = [
        "export",
        "--model",
        str(model_path),
        "--base-dir",
        str(tmp_path / "out"),
        "--name",
        "cli",
        "--no-verify",
    ]
    # Without a sidecar or a config the command cannot know labels/features: clean error.
    assert cli.main(argv) == 1
    assert "no sidecar best.keras.json" in capsys.readouterr().err
    sidecar = ex.write_model_sidecar(model_path, cfg, LABELS, feature_metadata(cfg))
    assert sidecar.name == "best.keras.json"
    assert ex.read_model_sidecar(model_path)["labels"] == LABELS
    assert cli.main(argv) == 0
    assert "exported" in capsys.readouterr().out
    loaded = ex.load_exported(tmp_path / "out" / "cli")
    assert loaded.path.name == "1" and loaded.labels == LABELS
    inputs = random_inputs(np.random.default_rng(5), 2, modalities=("audio",))
    np.testing.assert_allclose(
        loaded.predict(inputs)["probabilities"], keras_probs(model, inputs), atol=1e-5
    )
    # --config without a sidecar works too (labels from data.labels).
    sidecar.unlink()
    save_config(cfg, tmp_path / "cfg.yaml")
    assert cli.main([*argv, "--config", str(tmp_path / "cfg.yaml"), "--version", "5"]) == 0
    assert ex.load_exported(tmp_path / "out" / "cli").path.name == "5"
    # --weights bfloat16 reaches the export and says how far it is from float32.
    capsys.readouterr()
    config_args = ["--config", str(tmp_path / "cfg.yaml"), "--version", "6"]
    monkeypatch.setattr(export_command, "bfloat16_units", lambda: False)  # say, an AMD Zen 3
    assert cli.main([*argv, *config_args, "--weights", "bfloat16"]) == 0
    printed = capsys.readouterr()
    assert "weights: bfloat16 (vs the float32 model" in printed.out
    assert "no AMX or AVX512-BF16" in printed.err
    meta = json.loads((tmp_path / "out" / "cli" / "6" / "assets" / "ks_keras.json").read_text())
    assert meta["weights"]["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        cli.main([*argv, "--weights", "float16"])
    # A corrupt .keras file is a clean error.
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    assert (
        cli.main(
            [
                "export",
                "--model",
                str(bad),
                "--config",
                str(tmp_path / "cfg.yaml"),
                "--base-dir",
                str(tmp_path / "out"),
                "--no-verify",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "not a Keras model archive: it is a text file starting with 'garbage'" in err


def _fit(x, mask, max_len, crop):
    out_x, out_m = ex.fit_length(tf.constant(x), tf.constant(mask), max_len, crop_to_longest=crop)
    return out_x.numpy(), out_m.numpy()


def test_fit_length_crops_a_batch_after_its_last_real_step():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 10, 2)).astype("float32")
    mask = np.zeros((3, 10), "int32")
    mask[0, :4] = 1
    mask[1, [0, 2, 6]] = 5  # holes and any non-zero value count as real steps
    padded_x, padded_m = _fit(x, mask, 8, crop=False)
    assert padded_x.shape == (3, 8, 2)
    cropped_x, cropped_m = _fit(x, mask, 8, crop=True)
    assert cropped_x.shape == (3, 7, 2)  # one past row 1's last real step (index 6)
    np.testing.assert_array_equal(cropped_x, padded_x[:, :7])
    np.testing.assert_array_equal(cropped_m, padded_m[:, :7])
    # Real steps past max_len are still cropped; an all-padding batch keeps one step.
    long_mask = np.ones((3, 10), "int32")
    assert _fit(x, long_mask, 8, crop=True)[0].shape == (3, 8, 2)
    empty_x, empty_m = _fit(x, np.zeros((3, 10), "int32"), 8, crop=True)
    assert empty_x.shape == (3, 1, 2) and not empty_x.any() and not empty_m.any()
    assert _fit(x[:, :0], np.zeros((3, 0), "int32"), 8, crop=True)[0].shape == (3, 1, 2)


@pytest.mark.parametrize(
    "model_options,crop",
    [
        ({}, True),
        ({"k_from": "padded"}, False),
        ({"query_mask_in_scores": False}, False),
        ({"pooling": "include_padding"}, False),
        ({"fusion_self_attention_mask": False}, False),
        ({"k_from": "padded", "sparsity": 0.0}, True),
    ],
)
def test_graph_crops_only_models_that_ignore_padding(tmp_path, model_options, crop):
    keras.utils.set_random_seed(4)
    cfg = tiny_config(model=model_options)
    model = build_model(cfg)
    meta = ex.build_metadata(cfg, LABELS, feature_metadata(cfg))
    assert meta["crop_to_longest"] is crop
    classify = ex.make_serving_functions(model, meta)[ex.DEFAULT_SIGNATURE]
    rng = np.random.default_rng(5)
    # A short request: both padded to the trained length and sent as is.
    request = random_inputs(rng, 2, audio_len=9, text_len=3)
    expected = keras_probs(model, ex._fit_numpy(request, meta))
    got = classify({k: tf.constant(v) for k, v in request.items()})["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    graph = classify.get_concrete_function().graph
    lengths = {
        op.outputs[0].shape.as_list()[1]
        for op in graph.get_operations()
        if op.type == "EnsureShape" and op.outputs[0].shape.rank == 3
    }
    assert lengths == ({None} if crop else {AUDIO_MAX, TEXT_MAX})


# ---------------------------------------------------------------------------------------------
# openSMILE functionals input (`features.functionals`, `model.functionals_dim`).

FUNCTIONALS_DIM = 88  # eGeMAPSv02


def functionals_config(**audio):
    return tiny_config(
        model={"functionals_dim": FUNCTIONALS_DIM},
        features={
            "functionals": "egemaps",
            "audio": {"type": "logmel", "n_mels": 16, **audio},
        },
    )


def with_functionals(rng, inputs, scale=1.0):
    batch = len(next(iter(inputs.values())))
    rows = rng.standard_normal((batch, FUNCTIONALS_DIM)) * scale
    return dict(inputs, functionals=rows.astype("float32"))


@pytest.fixture(scope="module")
def functionals_export(tmp_path_factory):
    """A verified export (fresh process + saved_model_cli) of a model with functionals."""
    keras.utils.set_random_seed(2)
    cfg = functionals_config()
    model = build_model(cfg)
    # Non-trivial standardisation statistics, so the functionals visibly move the output.
    norm = model.get_layer("opensmile_functionals_norm")
    rng = np.random.default_rng(0)
    gamma, beta, _, _ = norm.get_weights()
    norm.set_weights(
        [
            gamma,
            beta,
            rng.standard_normal(FUNCTIONALS_DIM).astype("float32"),
            (0.5 + rng.random(FUNCTIONALS_DIM)).astype("float32"),
        ]
    )
    base = tmp_path_factory.mktemp("saved_models_functionals")
    path = ex.export_model(
        model, cfg, LABELS, feature_metadata(cfg), base_dir=base, name="fx", verify=True
    )
    return cfg, model, path


def test_functionals_metadata_signature_and_no_waveform(functionals_export):
    cfg, _, path = functionals_export
    meta = json.loads((path / "assets" / "ks_keras.json").read_text())
    assert meta["format_version"] == ex.FORMAT_VERSION
    assert meta["inputs"] == {
        "audio": {"dim": 16, "max_len": AUDIO_MAX},
        "text": {"dim": 8, "max_len": TEXT_MAX},
        "functionals": {"dim": FUNCTIONALS_DIM},
    }
    functionals = meta["functionals"]
    assert {k: functionals[k] for k in ("set", "opensmile_set", "dim", "normalize")} == {
        "set": "egemaps",
        "opensmile_set": "eGeMAPSv02",
        "dim": FUNCTIONALS_DIM,
        "normalize": "none",
    }
    assert functionals["sample_rate"] == 16000 and functionals["packages"]["opensmile"]
    # openSMILE cannot run in the graph: no raw-waveform signature, and the metadata says why.
    assert set(meta["signatures"]) == {"serving_default"}
    assert "openSMILE functionals" in meta["notes"][0]
    assert meta["signatures"]["serving_default"]["inputs"]["functionals"] == {
        "dtype": "float32",
        "shape": [None, FUNCTIONALS_DIM],
    }
    loaded = tf.saved_model.load(str(path))
    assert sorted(loaded.signatures) == ["serving_default"]
    _, kwargs = loaded.signatures["serving_default"].structured_input_signature
    assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == {
        "audio": (tf.float32, [None, None, 16]),
        "audio_mask": (tf.int32, [None, None]),
        "text": (tf.float32, [None, None, 8]),
        "text_mask": (tf.int32, [None, None]),
        "functionals": (tf.float32, [None, FUNCTIONALS_DIM]),
    }
    # Per-speaker normalisation is recorded for the functionals too.
    speaker = ex.build_metadata(
        functionals_config(normalize="speaker"), LABELS, feature_metadata(cfg)
    )
    assert speaker["functionals"]["normalize"] == "speaker"
    problem = ex.waveform_signature_problem(functionals_config())
    assert "openSMILE functionals" in problem and "egemaps" in problem


def test_functionals_export_matches_keras(functionals_export):
    _, model, path = functionals_export
    loaded = ex.load_exported(path)
    rng = np.random.default_rng(4)
    for batch in (1, 3):
        inputs = with_functionals(rng, random_inputs(rng, batch))
        got = loaded.predict(inputs)["probabilities"]
        np.testing.assert_allclose(got, keras_probs(model, inputs), atol=1e-5)
        # The functionals reach the model: other values give other probabilities.
        other = dict(inputs, functionals=inputs["functionals"] + 3.0)
        assert np.abs(loaded.predict(other)["probabilities"] - got).max() > 1e-4
    # Longer sequences are still cropped; the functionals pass unchanged.
    long = with_functionals(rng, random_inputs(rng, 2, audio_len=AUDIO_MAX + 4))
    cropped = dict(
        long, audio=long["audio"][:, :AUDIO_MAX], audio_mask=long["audio_mask"][:, :AUDIO_MAX]
    )
    np.testing.assert_allclose(
        loaded.predict(long)["probabilities"], keras_probs(model, cropped), atol=1e-5
    )
    # verify_export compares the functionals path too (and catches other weights there).
    report = ex.verify_export(path, model, batch_sizes=(2,), check_cli=False)
    assert report.max_abs_diff <= 1e-5
    other = build_model(functionals_config())
    other.set_weights(model.get_weights())
    norm = other.get_layer("opensmile_functionals_norm")
    gamma, beta, mean, var = norm.get_weights()
    norm.set_weights([gamma, beta, mean + 1.0, var])
    with pytest.raises(ValueError, match="differs from the Keras model"):
        ex.verify_export(path, other, batch_sizes=(2,), check_cli=False)


def test_functionals_bad_requests_are_clear_errors(functionals_export):
    _, _, path = functionals_export
    loaded = ex.load_exported(path)
    rng = np.random.default_rng(6)
    good = with_functionals(rng, random_inputs(rng, 2))
    with pytest.raises(ValueError, match=r"input 'functionals' has shape \(2, 87\)"):
        loaded.predict(dict(good, functionals=good["functionals"][:, :87]))
    with pytest.raises(ValueError, match=r"missing \['functionals'\]"):
        loaded.predict({k: v for k, v in good.items() if k != "functionals"})
    nan = good["functionals"].copy()
    nan[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"'functionals' holds NaN/inf in row\(s\) \[1\]"):
        loaded.predict(dict(good, functionals=nan))
    # The graph's own checks, as TF Serving would report them to a client.
    fn = loaded.loaded.signatures["serving_default"]
    for request, message in [
        (dict(good, functionals=nan), "'functionals' holds NaN/inf"),
        (
            dict(good, functionals=good["functionals"][:1]),
            "'functionals' and 'audio' must have the same batch size",
        ),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            fn(**{k: tf.constant(v) for k, v in request.items()})
        assert ex.tf_error_summary(info.value).startswith(message)


def test_functionals_model_must_match_config(functionals_export, tmp_path):
    cfg, model, path = functionals_export
    meta = feature_metadata(cfg)
    # A model without the input, exported with a config that has it (and the reverse).
    plain = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"expected inputs .*'functionals'"):
        ex.export_model(plain, cfg, LABELS, meta, base_dir=tmp_path, verify=False)
    with pytest.raises(ValueError, match="do not match"):
        ex.export_model(model, tiny_config(), LABELS, meta, base_dir=tmp_path, verify=False)
    # features.functionals and model.functionals_dim must agree.
    with pytest.raises(ValueError, match="model.functionals_dim=88 but features.functionals"):
        ex.build_metadata(tiny_config(model={"functionals_dim": FUNCTIONALS_DIM}), LABELS, meta)
    assert not any(tmp_path.iterdir())
    # Metadata written before the input existed still loads (no functionals); metadata that
    # names the input but not how it was made is refused.
    exported = json.loads((path / "assets" / "ks_keras.json").read_text())
    old = {k: v for k, v in exported.items() if k != "functionals"}
    old["inputs"] = {k: v for k, v in old["inputs"].items() if k != "functionals"}
    assert ex.metadata_functionals(old) is None
    assert "functionals" not in ex.feature_input_specs(old)
    assert ex.model_input_names(old) == ["audio", "audio_mask", "text", "text_mask"]
    assert ex.model_input_names(exported)[-1] == "functionals"
    broken = dict(exported, functionals=None)
    with pytest.raises(ValueError, match="no valid 'functionals' entry"):
        ex.metadata_functionals(broken)


def test_functionals_ensemble_exports_like_a_single_model(tmp_path):
    from ks_keras.ensemble import ensemble_model

    keras.utils.set_random_seed(8)
    cfg = functionals_config()
    model = ensemble_model([build_model(cfg, name=f"member_{i}") for i in (1, 2)])
    path = ex.export_model(
        model, cfg, LABELS, feature_metadata(cfg), base_dir=tmp_path, name="ens", verify=False
    )
    rng = np.random.default_rng(9)
    inputs = with_functionals(rng, random_inputs(rng, 3))
    np.testing.assert_allclose(
        ex.load_exported(path).predict(inputs)["probabilities"],
        keras_probs(model, inputs),
        atol=1e-5,
    )


def test_bfloat16_weights_export_is_verified_and_close_to_float32(tmp_path, capsys):
    """`--weights bfloat16`: the export holds bfloat16 variables, passes the fresh-process
    reload check against its bfloat16 copy, records how far it is from the float32 model, and
    serves float32 probabilities close to the float32 model's (and the same classes on these
    requests); the float32 model itself is left untouched."""
    keras.utils.set_random_seed(3)
    cfg = tiny_config()
    model = build_model(cfg)
    before = [w.copy() for w in model.get_weights()]
    path = ex.export_model(
        model,
        cfg,
        LABELS,
        feature_metadata(cfg),
        base_dir=tmp_path,
        name="bf16",
        verify=True,
        weights="bfloat16",
    )
    meta = json.loads((path / "assets" / "ks_keras.json").read_text())
    assert meta["weights"]["dtype"] == "bfloat16"
    agreement = meta["weights"]["vs_float32"]
    assert 0 < agreement["max_abs_diff"] < 0.05 and agreement["same_class"] >= 0.75
    loaded = tf.saved_model.load(str(path))
    assert any(v.dtype == tf.bfloat16 for v in loaded.variables)
    rng = np.random.default_rng(4)
    inputs = random_inputs(rng, 3)
    probs = ex.load_exported(path).predict(inputs)["probabilities"]
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, keras_probs(model, inputs), atol=0.05)
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    assert all(w.dtype == "float32" for w in model.weights)


def test_export_weights_must_be_float32_or_bfloat16(exported, tmp_path):
    cfg, model, _, _ = exported
    with pytest.raises(ValueError, match="weights: expected one of"):
        ex.export_model(
            model, cfg, LABELS, feature_metadata(cfg), base_dir=tmp_path, weights="float16"
        )
