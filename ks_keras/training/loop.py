"""`fit`: build, compile and train under the configured strategy; keep the best epoch."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ks_keras import compat
from ks_keras.config import Config, TrainConfig, save_config, validate_config
from ks_keras.training.callbacks import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    CHECKPOINT_DIR,
    LAST_EPOCH,
    RunLog,
    SafeBackupAndRestore,
    check_resume_config,
    monitor_mode,
    read_top_checkpoints,
)
from ks_keras.training.optimizer import compile_model
from ks_keras.training.precision import setup_precision_and_seeds
from ks_keras.training.strategy import get_strategy, worker_role

# Metrics `compile_model` attaches; `monitor` must be one of these, optionally `val_`-prefixed.
MONITORABLE = ("loss", "accuracy", "ua")


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        model: the trained model, holding the best epoch's weights (by `monitor`).
        history: `{name: [value per epoch]}` over all epochs of the run, including those run
            before a resume; `history["epoch"]` lists the epoch indices (0-based).
        best_epoch: 0-based epoch of the best `monitor` value (None if never finite).
        best_value: that value.
        monitor: the monitored log name, e.g. `"val_ua"`.
        run_dir: the run folder (see the `ks_keras.training` docstring).
        initial_epoch: the epoch this call started at (> 0 after a resume).
        epochs_run: epochs trained by this call.
        strategy: the distribution strategy used.
        checkpoints: with `train.checkpoint_ensemble: k > 1`, the weight files of the k best
            epochs, best first (`[(0-based epoch, monitored value, path)]`); else empty.
    """

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int | None
    best_value: float | None
    monitor: str
    run_dir: Path
    initial_epoch: int
    epochs_run: int
    strategy: Any = field(repr=False, default=None)
    checkpoints: list[tuple[int, float, Path]] = field(default_factory=list)

    @property
    def best_weights_path(self) -> Path:
        return self.run_dir / BEST_WEIGHTS

    def each_checkpoint(self) -> Iterator[int]:
        """Loads each kept checkpoint into `model` in turn (best first) and yields its 0-based
        epoch; afterwards `model` holds the best epoch's weights again."""
        try:
            for epoch, _, path in self.checkpoints:
                self.load_weights(path)
                yield epoch
        finally:
            if self.checkpoints:
                self.load_weights(self.best_weights_path)

    def load_weights(self, path: str | Path) -> None:
        """Load a weights file (e.g. one of `checkpoints`) into `model`, in its strategy's
        scope; `load_weights(best_weights_path)` restores the best epoch."""
        if self.strategy is None:
            self.model.load_weights(path)
        else:
            with self.strategy.scope():
                self.model.load_weights(path)


def _check_monitor(monitor: str, has_val: bool) -> None:
    if monitor == LAST_EPOCH:
        return
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if base not in MONITORABLE:
        allowed = ", ".join(list(MONITORABLE) + [f"val_{m}" for m in MONITORABLE] + [LAST_EPOCH])
        raise ValueError(f"monitor: expected one of {allowed}, got {monitor!r}")
    if monitor.startswith("val_") and not has_val:
        raise ValueError(f"monitor {monitor!r} needs validation data, but val_ds is None")


def _check_class_weight(class_weight, n_classes: int) -> dict[int, float] | None:
    if class_weight is None:
        return None
    if not isinstance(class_weight, dict):
        raise ValueError(
            f"class_weight: expected a dict {{class id: weight}}, got {class_weight!r}"
        )
    out = {c: 1.0 for c in range(n_classes)}
    for key, weight in class_weight.items():
        if (
            isinstance(key, bool)
            or not isinstance(key, int | np.integer)
            or not (0 <= key < n_classes)
        ):
            raise ValueError(
                f"class_weight: class ids must be integers in [0, {n_classes}), got {key!r}"
            )
        if not (
            isinstance(weight, int | float | np.floating) and math.isfinite(weight) and weight >= 0
        ):
            raise ValueError(f"class_weight[{key}]: expected a finite number >= 0, got {weight!r}")
        out[int(key)] = float(weight)
    return out


def count_batches(dataset: tf.data.Dataset, name: str = "dataset") -> int:
    """Number of batches in a finite `dataset` (its cardinality, or one pass when unknown)."""
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"{name}: expected a tf.data.Dataset, got {type(dataset).__name__}")
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError(f"{name}: the dataset is infinite (repeat()); give steps_per_epoch")
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        cardinality = int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
    if cardinality == 0:
        raise ValueError(f"{name}: the dataset yields no batches")
    return cardinality


def _with_known_cardinality(dataset: tf.data.Dataset, name: str) -> tuple[tf.data.Dataset, int]:
    # Keras shows a proper progress bar and restarts the dataset each epoch only when the
    # cardinality is known; a finite dataset of unknown size (e.g. after filter()) is counted.
    steps = count_batches(dataset, name)
    if int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
    return dataset, steps


def _check_dataset_inputs(dataset: tf.data.Dataset, model: keras.Model, name: str) -> None:
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3) or not isinstance(spec[0], dict):
        raise ValueError(
            f"{name}: expected batches of (inputs dict, labels), got element_spec {spec}"
        )
    wanted = {t.name.split(":")[0] for t in model.inputs}
    missing = sorted(wanted - set(spec[0]))
    if missing:
        raise ValueError(
            f"{name}: the model needs inputs {sorted(wanted)}, the dataset lacks {missing}"
        )


def _shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Cached shards may be fewer than workers, and file-based sharding would then starve
    # a worker; DATA sharding splits every global batch instead (same order on every worker
    # because shuffling is seeded).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _check_train_val(
    train_ds: tf.data.Dataset, val_ds: tf.data.Dataset | None, steps_per_epoch: int | None
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, int, bool]:
    """`(train_ds, val_ds, steps_per_epoch, infinite)` with every finite cardinality known."""
    infinite = (
        isinstance(train_ds, tf.data.Dataset)
        and int(train_ds.cardinality()) == tf.data.INFINITE_CARDINALITY
    )
    if infinite:
        if (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, int)
            or (steps_per_epoch < 1)
        ):
            raise ValueError(
                "steps_per_epoch: an infinite train_ds needs an integer >= 1, "
                f"got {steps_per_epoch!r}"
            )
    else:
        train_ds, steps_per_epoch = _with_known_cardinality(train_ds, "train_ds")
    if val_ds is not None:
        val_ds, _ = _with_known_cardinality(val_ds, "val_ds")
    return train_ds, val_ds, steps_per_epoch, infinite


def _build_and_compile(
    model_builder: Callable[[], keras.Model],
    strategy: tf.distribute.Strategy,
    train_cfg: TrainConfig,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    steps_per_epoch: int,
    n_classes: int,
) -> keras.Model:
    """The compiled model, built in `strategy.scope()`; the caller's dtype policy is restored."""
    previous_policy = keras.mixed_precision.global_policy()
    try:
        setup_precision_and_seeds(train_cfg)
        with strategy.scope():
            model = model_builder()
            if not isinstance(model, keras.Model):
                raise ValueError(
                    f"model_builder: expected a keras.Model, got {type(model).__name__}"
                )
            _check_dataset_inputs(train_ds, model, "train_ds")
            if val_ds is not None:
                _check_dataset_inputs(val_ds, model, "val_ds")
            compile_model(model, train_cfg, steps_per_epoch, n_classes)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return model


def _fit_callbacks(
    train_cfg: TrainConfig,
    monitor: str,
    run_dir: Path,
    work_dir: Path,
    is_chief: bool,
    run_log: RunLog,
    callbacks_extra: Sequence[keras.callbacks.Callback] | None,
) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = []
    if is_chief:
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), profile_batch=0)
        )
    if train_cfg.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                mode=monitor_mode(monitor),
                patience=train_cfg.early_stopping_patience,
            )
        )
    callbacks.extend(callbacks_extra or [])
    # Order matters: the backup of an epoch is written after its log and checkpoint.
    callbacks.append(run_log)
    # One backup folder per worker: a shared HDF5 file would be locked by the other worker.
    callbacks.append(SafeBackupAndRestore(work_dir / BACKUP_DIR))
    return callbacks


def _remove_worker_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
    try:
        work_dir.parent.rmdir()  # run_dir/workers, once every worker has cleaned up
    except OSError:
        pass


def fit(
    model_builder: Callable[[], keras.Model],
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    cfg: Config,
    run_dir: str | Path,
    class_weight: dict[int, float] | None = None,
    monitor: str = "val_ua",
    callbacks_extra: Sequence[keras.callbacks.Callback] | None = None,
    verbose: str | int = "auto",
    strategy: tf.distribute.Strategy | None = None,
    steps_per_epoch: int | None = None,
) -> FitResult:
    """Build, compile and train a model under the configured strategy; keep the best epoch.

    Args:
        model_builder: returns a new uncompiled model (called inside `strategy.scope()`
            after the dtype policy and seeds are set), e.g. `lambda: build_model(cfg)`.
        train_ds: batches of `(inputs_dict, int labels)` with the **global** batch size
            `cfg.train.batch_size`; shuffle it in the pipeline (seeded).
        val_ds: the same for validation (held-out speakers), or None. Under the authors'
            "paper" protocol the caller passes the test fold here and monitors on it.
        cfg: the full config (`train` section: optimizer, schedule, strategy, precision…).
        run_dir: folder for checkpoints, logs and the resume backup. Running `fit` again
            with the same folder after a crash resumes from the last finished epoch.
        class_weight: optional `{class id: weight}` for the loss (missing ids weigh 1).
        monitor: log name that picks the best epoch: `"val_ua"` (default), `"val_accuracy"`,
            `"val_loss"` (minimised), a training metric, or `"epoch"`: the last epoch (and
            the last k for `train.checkpoint_ensemble: k`), for a fixed schedule without
            validation data.
        callbacks_extra: more Keras callbacks (run before the checkpoint/backup ones).
        verbose: Keras progress-bar verbosity (non-chief workers are always silent).
        strategy: reuse a strategy; default `get_strategy(cfg.train)`.
        steps_per_epoch: required for an infinite (`repeat()`) `train_ds`, ignored otherwise
            (counted from the dataset).

    Returns:
        A `FitResult`; its model holds the best epoch's weights.

    Notes:
        - Reproducibility: `fit` seeds everything before building the model, but a
          `tf.data` shuffle combines its own seed with the global TF seed in force when the
          dataset was *created*. Two runs in fresh processes match; within one process,
          create the datasets after the same `tf.random.set_seed` call to match too.
        - Resume: the history, the best checkpoint and the optimizer state survive a kill;
          an `EarlyStopping` patience counter restarts from zero.
        - Multi-worker: every worker runs the same call with its own `TF_CONFIG`; the chief
          writes `run_dir`, the others a private `run_dir/workers/worker_<i>` (removed at the
          end). Datasets are sharded by element (`AutoShardPolicy.DATA`), so every worker
          must build them with the same shuffle seed.
    """
    validate_config(cfg)
    train_cfg = cfg.train
    n_classes = cfg.model.num_classes
    _check_monitor(monitor, val_ds is not None)
    if monitor == LAST_EPOCH and train_cfg.early_stopping_patience > 0:
        raise ValueError(
            "train.early_stopping_patience: must be 0 when the last epoch is kept "
            "(monitor 'epoch', no validation data): nothing to stop on"
        )
    class_weight = _check_class_weight(class_weight, n_classes)
    strategy = strategy or get_strategy(train_cfg)
    compat.apply_multiworker_patches(strategy)  # no-op unless multi-worker; idempotent
    replicas = strategy.num_replicas_in_sync
    if train_cfg.batch_size < replicas:
        raise ValueError(
            f"train.batch_size: the global batch ({train_cfg.batch_size}) must be at least the "
            f"number of replicas ({replicas})"
        )
    train_ds, val_ds, steps_per_epoch, infinite = _check_train_val(
        train_ds, val_ds, steps_per_epoch
    )

    is_chief, worker_index = worker_role(strategy)
    run_dir = Path(run_dir)
    work_dir = run_dir if is_chief else run_dir / "workers" / f"worker_{worker_index}"
    check_resume_config(cfg, run_dir, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if is_chief:
        save_config(cfg, run_dir / "config.yaml")
    if compat.is_multiworker_collective(strategy):
        train_ds = _shard_by_data(train_ds)
        val_ds = _shard_by_data(val_ds) if val_ds is not None else None
        if not is_chief:
            verbose = 0

    model = _build_and_compile(
        model_builder, strategy, train_cfg, train_ds, val_ds, steps_per_epoch, n_classes
    )

    if train_cfg.mixup_alpha > 0:
        from ks_keras.mixup import mix_batches

        # Class weights move into the mixed batches' sample weights (packed labels).
        train_ds = mix_batches(train_ds, train_cfg.mixup_alpha, train_cfg.seed, class_weight)
        class_weight = None

    run_log = RunLog(work_dir, monitor, keep=train_cfg.checkpoint_ensemble)
    callbacks = _fit_callbacks(
        train_cfg, monitor, run_dir, work_dir, is_chief, run_log, callbacks_extra
    )

    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=train_cfg.epochs,
        steps_per_epoch=steps_per_epoch if infinite else None,
        class_weight=class_weight,
        shuffle=False,  # tf.data input: shuffling belongs to the (seeded) pipeline
        callbacks=callbacks,
        verbose=verbose,
    )

    best = run_log.best
    if best is not None and run_log.weights_path.is_file():
        with strategy.scope():
            model.load_weights(run_log.weights_path)
    history = run_log.history()
    if not is_chief:
        _remove_worker_dir(work_dir)
    return FitResult(
        model=model,
        history=history,
        best_epoch=None if best is None else int(best["epoch"]),
        best_value=None if best is None else float(best["value"]),
        monitor=monitor,
        run_dir=run_dir,
        initial_epoch=run_log.initial_epoch or 0,
        epochs_run=run_log.epochs_run,
        strategy=strategy,
        checkpoints=top_checkpoints(run_dir) if train_cfg.checkpoint_ensemble > 1 else [],
    )


def top_checkpoints(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """The kept checkpoints of a run folder, best first: `[(epoch, value, path)]`."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    return [
        (int(e["epoch"]), float(e["value"]), directory / e["file"])
        for e in read_top_checkpoints(directory)
    ]
