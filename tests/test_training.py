"""Training: schedules, optimizer, strategy choice, precision/seeds, fit, determinism, resume."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ks_keras.config import TrainConfig
from ks_keras.training import (
    EpochLRSchedule,
    TrainingDivergedError,
    balanced_class_weights,
    commit_weights,
    finish_pending_weights,
    fit,
    float32_copy,
    get_strategy,
    make_lr_schedule,
    make_optimizer,
    parse_tf_config,
    resolve_precision_policy,
    setup_precision_and_seeds,
)

SUPPORT = Path(__file__).with_name("_training_support.py")


def _load_support():
    # Tests are imported with --import-mode=importlib (tests/ is not on sys.path).
    name = "ks_keras_tests_training_support"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SUPPORT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


support = _load_support()
N_CLASSES = support.N_CLASSES
make_builder = support.make_builder
pooled_mlp = support.pooled_mlp
synthetic_arrays = support.synthetic_arrays
synthetic_dataset = support.synthetic_dataset
tiny_config = support.tiny_config


@pytest.fixture(autouse=True)
def _no_op_determinism_leak():
    yield
    setup_precision_and_seeds(TrainConfig(deterministic=False))
    keras.config.set_dtype_policy("float32")


def lr_at(schedule, step):
    return float(schedule(step))


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def test_step_schedule_halves_at_the_epoch_boundary():
    cfg = TrainConfig(lr=1e-3, schedule="step", step_epochs=30, step_factor=0.5, epochs=120)
    s = make_lr_schedule(cfg, steps_per_epoch=10)
    assert lr_at(s, 0) == pytest.approx(1e-3)
    assert lr_at(s, 299) == pytest.approx(1e-3)  # last step of epoch 29
    assert lr_at(s, 300) == pytest.approx(5e-4)  # first step of epoch 30
    assert lr_at(s, 599) == pytest.approx(5e-4)
    assert lr_at(s, 600) == pytest.approx(2.5e-4)
    assert lr_at(s, 1199) == pytest.approx(1.25e-4)


def test_cosine_schedule_endpoints_and_midpoint():
    cfg = TrainConfig(lr=2e-3, schedule="cosine", cosine_final_ratio=1e-3, epochs=10)
    s = make_lr_schedule(cfg, steps_per_epoch=4)
    final = 2e-3 * 1e-3
    assert lr_at(s, 0) == pytest.approx(2e-3)
    assert lr_at(s, 20) == pytest.approx((2e-3 + final) / 2, rel=1e-5)  # half-way
    assert lr_at(s, 40) == pytest.approx(final, rel=1e-4)  # end of training
    assert lr_at(s, 400) == pytest.approx(final, rel=1e-4)  # stays at the floor
    values = [lr_at(s, i) for i in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_ramps_then_hands_over_to_the_schedule():
    cfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_epochs=2, epochs=12)
    s = make_lr_schedule(cfg, steps_per_epoch=5)  # 10 warm-up steps
    assert lr_at(s, 0) == pytest.approx(1e-4)
    assert lr_at(s, 4) == pytest.approx(5e-4)
    assert lr_at(s, 9) == pytest.approx(1e-3)
    assert lr_at(s, 10) == pytest.approx(1e-3)  # cosine starts at its peak
    assert lr_at(s, 60) == pytest.approx(1e-6, rel=1e-3)  # 10 cosine epochs later: floor
    step = make_lr_schedule(replace(cfg, schedule="step", step_epochs=3), steps_per_epoch=5)
    assert lr_at(step, 10 + 14) == pytest.approx(1e-3)  # epoch 2 after warm-up
    assert lr_at(step, 10 + 15) == pytest.approx(5e-4)  # epoch 3 after warm-up


def test_constant_schedule_and_serialization_round_trip():
    s = make_lr_schedule(TrainConfig(lr=3e-4, schedule="constant"), steps_per_epoch=7)
    assert lr_at(s, 0) == lr_at(s, 10_000) == pytest.approx(3e-4)
    cosine = make_lr_schedule(TrainConfig(schedule="cosine", warmup_epochs=1, epochs=5), 3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cosine))
    assert isinstance(restored, EpochLRSchedule)
    assert restored.get_config() == cosine.get_config()
    for step in (0, 2, 3, 7, 15):
        assert lr_at(restored, step) == pytest.approx(lr_at(cosine, step))


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="train.warmup_epochs"):
        make_lr_schedule(TrainConfig(warmup_epochs=5, epochs=5), 10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_lr_schedule(TrainConfig(), 0)


def test_make_optimizer_adam_and_sgd():
    adam = make_optimizer(TrainConfig(optimizer="adam", lr=1e-3), 10)
    assert isinstance(adam, keras.optimizers.Adam)
    sgd = make_optimizer(TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=1e-4), 10)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.momentum == pytest.approx(0.9) and sgd.weight_decay == pytest.approx(1e-4)
    assert isinstance(sgd._learning_rate, EpochLRSchedule)
    with pytest.raises(ValueError, match="train.weight_decay"):
        make_optimizer(TrainConfig(weight_decay=-1.0), 10)


def test_balanced_class_weights():
    weights = balanced_class_weights([0, 0, 0, 1], 3)
    assert weights == {0: pytest.approx(4 / 9), 1: pytest.approx(4 / 3), 2: 1.0}
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        balanced_class_weights([0, 3], 3)
    # One rule for both helpers (they used to disagree on absent classes: 0 vs 1.0).
    from ks_keras.data import class_weights

    assert list(weights.values()) == pytest.approx(class_weights([0, 0, 0, 1], 3).tolist())


# ---------------------------------------------------------------------------------------------
# Strategy, precision, seeds


def test_strategy_default_and_auto_on_cpu():
    assert get_strategy(TrainConfig(strategy="default")) is tf.distribute.get_strategy()
    if not tf.config.list_physical_devices("GPU"):
        assert get_strategy(TrainConfig(strategy="auto")).num_replicas_in_sync == 1
    mirrored = get_strategy(TrainConfig(strategy="mirrored"))
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)


def test_multiworker_without_tf_config_fails_before_training(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        get_strategy(TrainConfig(strategy="multiworker"))


@pytest.mark.parametrize(
    "raw,match",
    [
        ("{not json", "not valid JSON"),
        ('{"cluster": {}}', "non-empty 'worker' list"),
        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "ps", "index": 0}}', "task.type"),
        ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}', "task.index"),
        ('{"cluster": {"worker": "h:1"}, "task": {"type": "worker", "index": 0}}', "list of"),
    ],
)
def test_parse_tf_config_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_tf_config(raw)


def test_parse_tf_config_accepts_a_cluster():
    cfg = parse_tf_config(
        '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
        '"task": {"type": "worker", "index": 1}}'
    )
    assert cfg["task"]["index"] == 1


def test_precision_policies_and_seeds():
    assert resolve_precision_policy("none") == "float32"
    assert resolve_precision_policy("mixed_bfloat16") == "mixed_bfloat16"
    expected_auto = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    assert resolve_precision_policy("auto") == expected_auto
    assert (
        setup_precision_and_seeds(TrainConfig(mixed_precision="mixed_float16")) == "mixed_float16"
    )
    assert keras.config.dtype_policy().name == "mixed_float16"
    setup_precision_and_seeds(TrainConfig(seed=7))
    first = (np.random.random(), float(tf.random.uniform(())))  # noqa: NPY002 (global RNG)
    setup_precision_and_seeds(TrainConfig(seed=7))
    assert (np.random.random(), float(tf.random.uniform(()))) == first  # noqa: NPY002
    assert keras.config.dtype_policy().name == "float32"


# ---------------------------------------------------------------------------------------------
# fit: checks before training


def _mlp_fit(tmp_path, cfg=None, **kwargs):
    cfg = cfg or tiny_config(epochs=1)
    defaults = dict(
        train_ds=synthetic_dataset(16, cfg.train.batch_size),
        val_ds=synthetic_dataset(8, cfg.train.batch_size, seed=1, shuffle=False),
        cfg=cfg,
        run_dir=tmp_path / "run",
        verbose=0,
    )
    defaults.update(kwargs)
    return fit(lambda: pooled_mlp(cfg), **defaults)


def test_fit_rejects_bad_arguments_before_training(tmp_path):
    with pytest.raises(ValueError, match="needs validation data"):
        _mlp_fit(tmp_path, val_ds=None)
    with pytest.raises(ValueError, match="monitor: expected one of"):
        _mlp_fit(tmp_path, monitor="val_f1")
    with pytest.raises(ValueError, match="train_ds: the dataset yields no batches"):
        _mlp_fit(tmp_path, train_ds=synthetic_dataset(16, 8).take(0))
    with pytest.raises(ValueError, match="class_weight"):
        _mlp_fit(tmp_path, class_weight={5: 1.0})
    with pytest.raises(ValueError, match=r"class_weight\[0\]"):
        _mlp_fit(tmp_path, class_weight={0: float("nan")})
    no_text = synthetic_dataset(16, 8).map(
        lambda x, y: ({k: v for k, v in x.items() if not k.startswith("text")}, y)
    )
    with pytest.raises(ValueError, match=r"lacks \['text', 'text_mask'\]"):
        _mlp_fit(tmp_path, train_ds=no_text)
    wrong_width = tiny_config(epochs=1)
    with pytest.raises(ValueError, match="4 logits but n_classes=3"):
        fit(
            lambda: pooled_mlp(
                replace(wrong_width, model=replace(wrong_width.model, num_classes=4))
            ),
            synthetic_dataset(16, 8),
            None,
            wrong_width,
            tmp_path / "w",
            monitor="ua",
            verbose=0,
        )
    assert keras.config.dtype_policy().name == "float32"


def test_fit_counts_batches_of_unknown_cardinality(tmp_path):
    filtered = synthetic_dataset(16, 8).filter(lambda x, y: tf.constant(True))
    assert int(filtered.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    result = _mlp_fit(tmp_path, cfg=tiny_config(epochs=2), train_ds=filtered, monitor="ua")
    assert result.history["epoch"] == [0, 1]
    # 2 steps per epoch were taken in each epoch (not 2 in total, not stuck).
    assert int(result.model.optimizer.iterations) == 4


# ---------------------------------------------------------------------------------------------
# fit end to end

# The training machinery is tested on the fast stand-in model by default; the same tests on
# the tiny KS-T (30-120 s per traced model on 2 shared cores) run with `-m large`.
MODELS = ["mlp", pytest.param("kst", marks=pytest.mark.large)]


@pytest.mark.parametrize("model_name", MODELS)
def test_fit_end_to_end(tmp_path, model_name):
    cfg = tiny_config(epochs=3, schedule="step", step_epochs=2, lr=2e-3)
    train_ds = synthetic_dataset(24, cfg.train.batch_size)
    val_ds = synthetic_dataset(12, cfg.train.batch_size, seed=1, shuffle=False)
    run_dir = tmp_path / "run"
    result = fit(
        make_builder(model_name, cfg),
        train_ds,
        val_ds,
        cfg,
        run_dir,
        class_weight=balanced_class_weights(synthetic_arrays(24)[1], N_CLASSES),
        verbose=0,
    )
    h = result.history
    assert h["epoch"] == [0, 1, 2]
    for key in ("loss", "accuracy", "ua", "val_loss", "val_accuracy", "val_ua", "lr"):
        assert len(h[key]) == 3 and all(np.isfinite(h[key])), key
    # Step schedule: epochs 0-1 at lr, epoch 2 halved.
    assert h["lr"][0] == pytest.approx(2e-3) and h["lr"][2] == pytest.approx(1e-3)
    # The best epoch is the first maximum of val_ua, and the model holds its weights.
    assert result.best_epoch == int(np.argmax(h["val_ua"]))
    assert result.best_value == pytest.approx(max(h["val_ua"]))
    for name in ("config.yaml", "history.json", "best.json", "best.weights.h5"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert not (run_dir / "backup").exists()  # removed after a finished run
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == result.best_epoch
    logs = result.model.evaluate(val_ds, verbose=0, return_dict=True)
    assert logs["ua"] == pytest.approx(result.best_value, abs=1e-5)
    # The model's UA in Keras equals scikit-learn's on the same predictions.
    from sklearn.metrics import balanced_accuracy_score

    pred = result.model.predict(val_ds, verbose=0).argmax(-1)
    assert logs["ua"] == pytest.approx(balanced_accuracy_score(synthetic_arrays(12, 1)[1], pred))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fit_mixed_precision(tmp_path, policy, model_name):
    cfg = tiny_config(epochs=1, mixed_precision=policy)
    result = fit(
        make_builder(model_name, cfg),
        synthetic_dataset(16, 8),
        synthetic_dataset(8, 8, seed=1, shuffle=False),
        cfg,
        tmp_path / policy,
        verbose=0,
    )
    model = result.model
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    first_hidden = "audio_fem_1" if model_name == "kst" else "audio_pool"
    assert model.get_layer(first_hidden).compute_dtype == compute
    assert model.get_layer("logits").compute_dtype == "float32"
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.history["val_loss"])
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_float32_copy_of_a_mixed_precision_model(tmp_path):
    """`train` and the tuner's retrain save/export the same kind of model: a float32 copy."""
    cfg = tiny_config(epochs=1, mixed_precision="mixed_bfloat16")
    result = fit(
        make_builder("mlp", cfg),
        synthetic_dataset(16, 8),
        synthetic_dataset(8, 8, seed=1, shuffle=False),
        cfg,
        tmp_path / "run",
        verbose=0,
    )
    assert result.model.get_layer("audio_pool").compute_dtype == "bfloat16"
    plain = float32_copy(make_builder("mlp", cfg), result.model)
    assert all(layer.compute_dtype == "float32" for layer in plain.layers if layer.weights)
    for a, b in zip(plain.get_weights(), result.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # a copy: the same values, bit for bit
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("model_name", MODELS)
def test_same_seed_and_determinism_give_identical_runs(tmp_path, model_name):
    def run(name, seed):
        cfg = tiny_config(epochs=2, deterministic=True, seed=seed)
        # tf.data combines a shuffle's seed with the global seed in force when the dataset
        # is *created*; a fresh process starts from the same state, so mimic that here.
        tf.random.set_seed(0)
        train_ds = synthetic_dataset(16, 8, seed=3)
        val_ds = synthetic_dataset(8, 8, seed=1, shuffle=False)
        return fit(make_builder(model_name, cfg), train_ds, val_ds, cfg, tmp_path / name, verbose=0)

    first, second = run("a", 99), run("b", 99)
    assert first.history == second.history
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # A different seed really changes the run (so the test can fail).
    assert run("c", 100).history["loss"] != first.history["loss"]


def test_fit_jit_compile(tmp_path):
    cfg = tiny_config(epochs=1, jit_compile=True)
    result = _mlp_fit(tmp_path, cfg=cfg)
    assert result.model.jit_compile is True
    assert np.isfinite(result.history["loss"]).all()


# ---------------------------------------------------------------------------------------------
# Resume after a kill (BackupAndRestore)


def _run_support(run_dir, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return subprocess.run(
        [sys.executable, str(SUPPORT), "--run-dir", str(run_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _result(proc):
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_killed_run_resumes_and_finishes_with_the_same_epochs(tmp_path):
    run_dir = tmp_path / "run"
    killed = _run_support(run_dir, "--epochs", "4", "--kill-at-epoch", "2")
    assert killed.returncode == 17, killed.stderr[-3000:]  # died in the middle of epoch 2
    assert json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    assert [e["epoch"] for e in json.loads((run_dir / "history.json").read_text())] == [0, 1]

    resumed = _result(_run_support(run_dir, "--epochs", "4"))
    assert resumed["initial_epoch"] == 2 and resumed["epochs_run"] == 2
    assert resumed["history"]["epoch"] == [0, 1, 2, 3]  # 4 epochs in total, none twice
    # The optimizer state came back with the weights: 4 epochs x 4 steps in total.
    assert resumed["iterations_at_end"] == 4 * 4
    assert resumed["best_value"] == pytest.approx(max(resumed["history"]["val_ua"]))
    assert not (run_dir / "backup").exists()


def test_backup_torn_by_a_kill_mid_write_resumes_from_the_last_complete_one(tmp_path):
    run_dir = tmp_path / "run"
    torn = _run_support(run_dir, "--epochs", "4", "--tear-backup-at-epoch", "2")
    assert torn.returncode == 17, torn.stderr[-3000:]  # died while writing epoch 2's backup
    resumed = _result(_run_support(run_dir, "--epochs", "4"))
    assert resumed["initial_epoch"] == 2  # the last complete backup: after epoch 1
    assert resumed["history"]["epoch"] == [0, 1, 2, 3]
    assert resumed["iterations_at_end"] == 4 * 4
    assert not (run_dir / "backup").exists()


def test_a_backup_that_cannot_be_loaded_says_what_to_do(tmp_path):
    cfg = tiny_config(epochs=2)
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    # What Keras' in-place write left after Ctrl-C (before this fix): a torn weights file.
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (backup / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    with pytest.raises(ValueError, match=r"cannot resume from the training backup .*epoch 1") as e:
        _mlp_fit(tmp_path, cfg=cfg)
    assert f"delete {backup}" in str(e.value)


def test_checkpoint_commit_survives_a_kill_between_its_steps(tmp_path):
    model = pooled_mlp(tiny_config())
    final, record = tmp_path / "best.weights.h5", tmp_path / "best.json"
    commit_weights(model, final, record, {"epoch": 0})
    first = [w.copy() for w in model.get_weights()]
    assert finish_pending_weights(record, final) == {"epoch": 0}
    # Killed after the record was committed but before the rename: rolled forward.
    model.set_weights([w + 1 for w in first])
    model.save_weights(tmp_path / "tmp_best.weights.h5")
    record.write_text(json.dumps({"epoch": 3, "pending": "tmp_best.weights.h5"}))
    assert finish_pending_weights(record, final) == {"epoch": 3}
    assert json.loads(record.read_text()) == {"epoch": 3}
    model.load_weights(final)
    np.testing.assert_array_equal(model.get_weights()[0], first[0] + 1)
    # Killed while the temporary file was written (never committed): the old pair stays.
    (tmp_path / "tmp_best.weights.h5").write_bytes(b"half")
    assert finish_pending_weights(record, final) == {"epoch": 3}
    assert not (tmp_path / "tmp_best.weights.h5").exists()
    model.load_weights(final)


def test_non_finite_loss_stops_training_and_saves_nothing(tmp_path):
    cfg = tiny_config(epochs=3, lr=1e30)
    with pytest.raises(TrainingDivergedError, match=r"diverged in epoch 1 of 3: loss = nan") as e:
        _mlp_fit(tmp_path, cfg=cfg)
    assert "no epoch was checkpointed" in str(e.value) and "train.lr" in str(e.value)
    run_dir = tmp_path / "run"
    assert not (run_dir / "best.weights.h5").exists() and not (run_dir / "best.json").exists()
    assert not (run_dir / "backup" / "latest.weights.h5").exists()


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    killed = _run_support(run_dir, "--epochs", "3", "--kill-at-epoch", "1")
    assert killed.returncode == 17, killed.stderr[-3000:]
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    cfg = tiny_config(epochs=3, lr=1e-2, strategy="default")
    with pytest.raises(ValueError, match=r"another config: train\.lr: 0\.003 → 0\.01\.") as e:
        _mlp_fit(tmp_path, cfg=cfg, run_dir=run_dir)
    assert "another run folder" in str(e.value) and str(run_dir / "backup") in str(e.value)
    after = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before  # config.yaml and the backup untouched
    # The same config resumes (bookkeeping keys such as export.* may change).
    same = tiny_config(epochs=3, strategy="default")
    same = replace(same, export=replace(same.export, name="renamed"))
    resumed = _mlp_fit(tmp_path, cfg=same, run_dir=run_dir)
    assert resumed.initial_epoch == 1 and resumed.history["epoch"] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# FusedAdam


def _adam_run(optimizer, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.normal(size=shape).astype("float32"), name=name)
        for shape, name in (((5, 3), "kernel"), ((3,), "bias"), ((2, 4, 3), "other"))
    ]
    optimizer.build(variables)
    for _ in range(steps):
        grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
        optimizer.apply(grads, variables)
    moments = [np.asarray(m) for m in optimizer._momentums + optimizer._velocities]
    return [np.asarray(v) for v in variables], moments


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.01},
        {"clipnorm": 0.5, "beta_1": 0.8, "epsilon": 1e-5},
        {"amsgrad": True},
    ],
)
def test_fused_adam_updates_like_keras_adam(options):
    from ks_keras.training import FusedAdam

    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.5)
    ours = _adam_run(FusedAdam(learning_rate=schedule, **options))
    reference = _adam_run(keras.optimizers.Adam(learning_rate=schedule, **options))
    for a, b in zip(ours[0] + ours[1], reference[0] + reference[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The update really moved the variables.
    assert not np.allclose(ours[0][0], _adam_run(FusedAdam(), steps=0)[0][0])


def test_fused_adam_is_the_default_adam_and_round_trips(tmp_path):
    from ks_keras.training import FusedAdam

    adam = make_optimizer(TrainConfig(optimizer="adam", lr=1e-3), 10)
    assert isinstance(adam, FusedAdam)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=FusedAdam(1e-3, beta_2=0.99), loss="mse")
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    model.fit(x, x[:, :2], epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(again.optimizer, FusedAdam)
    assert again.optimizer.beta_2 == pytest.approx(0.99)
    assert int(again.optimizer.iterations) == 1


_MIRRORED_ADAM = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from ks_keras.training import FusedAdam
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6)).astype("float32")
y = rng.normal(size=(32, 3)).astype("float32")
weights = None
results = []
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for optimizer in (FusedAdam, keras.optimizers.Adam):
    with strategy.scope():
        inputs = keras.Input((6,))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5)(inputs)))
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)
        model.compile(optimizer=optimizer(0.01), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    results.append(model.get_weights())
for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
assert not np.allclose(results[0][0], weights[0])
print("RESULT ok")
"""


def test_fused_adam_under_mirrored_strategy():
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_ADAM],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "RESULT ok" in proc.stdout, proc.stderr[-4000:]
