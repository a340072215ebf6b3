"""Training: distribution strategy, precision and seeds, LR schedules, compile, and `fit`.

The functions here are dataset-agnostic: `fit` takes any `tf.data.Dataset` yielding
`(inputs_dict, int_label)` batches, **batched with the global batch size**
(`train.batch_size`). Under a multi-replica strategy Keras distributes the dataset
(`strategy.experimental_distribute_dataset`), which splits every global batch evenly across
the replicas, so the effective batch per optimizer step is the same on 1 CPU, 2 GPUs or
2 machines × 2 GPUs.

Run folder written by `fit` (`run_dir`):

```
config.yaml            resolved config
history.json           per-epoch logs (loss, accuracy, ua, val_*, lr), survives resumes
best.weights.h5        weights of the best epoch by `monitor`
best.json              {"epoch", "monitor", "value"} of that checkpoint
tensorboard/           TensorBoard logs
backup/                BackupAndRestore state while training (deleted when fit finishes)
workers/worker_<i>/    the same files for non-chief workers under multi-worker training
```

Reliability (docs/reliability.md):

- Checkpoints and backups are written to a temporary file, then committed by an atomic JSON
  record and renamed: a kill or Ctrl-C at any moment leaves the previous complete state (a
  rename the kill interrupted is finished on the next run). A backup that cannot be loaded
  (torn by an older version, or from another model) fails with a message saying what to do.
- A non-finite loss (or weights) at the end of an epoch stops training with a
  `TrainingDivergedError` naming the epoch; that epoch is neither checkpointed nor backed up.
  The check runs once per epoch, never inside the training step.
- Resuming a run folder whose backup was written with another config is refused before
  anything is written, naming the keys that differ.

Example:

```python
cfg = load_config("configs/emodb_demo.yaml")
result = fit(lambda: build_model(cfg), train_ds, val_ds, cfg, "runs/demo")
result.best_epoch, result.best_value, result.history["val_ua"]
```
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from ks_keras import compat
from ks_keras.config import Config, TrainConfig, from_dict, save_config, validate_config
from ks_keras.data import class_weights
from ks_keras.files import read_utf8
from ks_keras.metrics import UnweightedAverageRecall

# Metrics `compile_model` attaches; `monitor` must be one of these, optionally `val_`-prefixed.
MONITORABLE = ("loss", "accuracy", "ua")
BEST_WEIGHTS = "best.weights.h5"
BACKUP_DIR = "backup"
# Config keys that may change between a killed run and its resume: bookkeeping and where
# things are, not what is trained.
RESUME_IGNORED = (
    "export",
    "eval.repeats",
    "eval.max_folds",
    "eval.report_dir",
    "train.output_dir",
    "features.cache_dir",
)


class TrainingDivergedError(ValueError):
    """The loss (or the weights) became NaN/inf; the message names the epoch and what to do."""


# MultiWorkerMirroredStrategy can be created once per process (it configures collective ops),
# so repeated `fit` calls (folds, repeats) reuse it.
_MULTIWORKER: dict[str, tf.distribute.Strategy] = {}


# ---------------------------------------------------------------------------------------------
# Strategy


def parse_tf_config(raw: str | None = None) -> dict:
    """Parse and check `TF_CONFIG` (default: the environment variable).

    Returns:
        The parsed dict with `cluster` (job name → list of "host:port") and `task`
        (`type`, `index`).

    Raises:
        ValueError: TF_CONFIG unset, not JSON, or inconsistent (task not in the cluster).
    """
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if not raw:
        raise ValueError(
            "train.strategy='multiworker' needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}); it is not set'
        )
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG: not valid JSON ({e})") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise ValueError(
            f"TF_CONFIG: expected a 'cluster' mapping with a non-empty 'worker' list, got {raw}"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"TF_CONFIG: cluster.{job} must be a list of 'host:port' strings")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(
            f"TF_CONFIG: expected task.type to be one of {sorted(cluster)}, got {task!r}"
        )
    index = task.get("index", 0)
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not (0 <= index < len(cluster[task["type"]]))
    ):
        raise ValueError(
            f"TF_CONFIG: task.index must be in [0, {len(cluster[task['type']])}) for "
            f"job {task['type']!r}, got {index!r}"
        )
    return tf_config


def get_strategy(train_cfg: TrainConfig) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` that `train.strategy` asks for.

    - `default`: the default (no-op) strategy, one device.
    - `auto`: `MirroredStrategy` over all GPUs when there is more than one, else `default`.
    - `mirrored`: `MirroredStrategy` over all logical GPUs, or over all logical CPU devices
      when there is no GPU (one CPU device unless logical devices were configured).
    - `multiworker`: `MultiWorkerMirroredStrategy` from `TF_CONFIG`, with the
      `ks_keras.compat` fixes for Keras' multi-worker `fit` installed. Call this before any
      other TensorFlow op in the process: the strategy configures collective ops.

    Raises:
        ValueError: the strategy is not available (e.g. `multiworker` without a valid
            TF_CONFIG), before anything is trained.
    """
    name = train_cfg.strategy
    if name == "multiworker":
        raw = os.environ.get("TF_CONFIG", "")
        parse_tf_config(raw)
        if raw not in _MULTIWORKER:
            if _MULTIWORKER:
                raise ValueError(
                    "TF_CONFIG changed after a MultiWorkerMirroredStrategy was created in this "
                    "process; a process can join only one cluster"
                )
            _MULTIWORKER[raw] = tf.distribute.MultiWorkerMirroredStrategy()
        strategy = _MULTIWORKER[raw]
        compat.apply_multiworker_patches(strategy)
        return strategy
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise ValueError(
        f"train.strategy: expected one of 'auto', 'default', 'mirrored', 'multiworker', "
        f"got {name!r}"
    )


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """`(is_chief, worker_index)`; `(True, 0)` for every single-worker strategy."""
    if not compat.is_multiworker_collective(strategy):
        return True, 0
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    jobs = resolver.cluster_spec().as_dict()
    if task_type == "chief":
        return True, 0
    is_chief = task_type == "worker" and task_id == 0 and "chief" not in jobs
    offset = 1 if "chief" in jobs else 0
    return is_chief, task_id + offset


# ---------------------------------------------------------------------------------------------
# Precision and seeds


def resolve_precision_policy(mixed_precision: str) -> str:
    """Keras dtype policy name for `train.mixed_precision`.

    `auto` picks `mixed_float16` when a GPU is visible (tensor cores, loss scaling handled by
    Keras) and `mixed_bfloat16` on CPU (no loss scaling needed; fast on CPUs with bf16
    instructions, correct but possibly slower elsewhere). `none` is `float32`.
    """
    if mixed_precision == "none":
        return "float32"
    if mixed_precision == "auto":
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
        return "mixed_float16" if has_gpu else "mixed_bfloat16"
    if mixed_precision in ("mixed_float16", "mixed_bfloat16"):
        return mixed_precision
    raise ValueError(
        "train.mixed_precision: expected one of 'none', 'auto', 'mixed_float16', "
        f"'mixed_bfloat16', got {mixed_precision!r}"
    )


def setup_precision_and_seeds(train_cfg: TrainConfig) -> str:
    """Set the global Keras dtype policy, all random seeds, and op determinism.

    Seeds Python, NumPy and TensorFlow with `train.seed` (`keras.utils.set_random_seed`);
    `train.deterministic` switches TensorFlow op determinism on (or back off). The dtype
    policy is process-global: models built afterwards use it (`fit` restores the previous
    policy when it returns).

    Returns:
        The dtype policy name now in effect.
    """
    policy = resolve_precision_policy(train_cfg.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_framework_config

        disable = getattr(tf_framework_config, "disable_op_determinism", None)
        if disable is not None:
            disable()
    return policy


# ---------------------------------------------------------------------------------------------
# Learning rate and optimizer


@keras.saving.register_keras_serializable(package="ks_keras")
class EpochLRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate as a function of the optimizer step, defined in epochs.

    - `constant`: `base_lr`.
    - `step`: `base_lr * step_factor ** floor(epoch / step_epochs)` (paper: halve every 30).
    - `cosine`: from `base_lr` down to `base_lr * final_ratio` along a half cosine, per step,
      reaching the floor at the end of training (`epochs`).
    - `warmup_epochs > 0`: a linear ramp `base_lr * (step + 1) / warmup_steps` first; the main
      schedule then starts (its epoch 0 is the first epoch after warm-up).

    Args:
        base_lr: peak learning rate.
        steps_per_epoch: optimizer steps per epoch (global batches).
        kind: `"constant"`, `"step"` or `"cosine"`.
        epochs: total epochs including warm-up (cosine horizon).
        step_epochs, step_factor: the `step` schedule.
        final_ratio: the cosine floor as a fraction of `base_lr`.
        warmup_epochs: epochs of linear warm-up.
    """

    def __init__(
        self,
        base_lr: float,
        steps_per_epoch: int,
        kind: str = "constant",
        epochs: int = 1,
        step_epochs: int = 30,
        step_factor: float = 0.5,
        final_ratio: float = 1e-3,
        warmup_epochs: int = 0,
    ):
        if kind not in ("constant", "step", "cosine"):
            raise ValueError(f"kind: expected 'constant', 'step' or 'cosine', got {kind!r}")
        if (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, int)
            or (steps_per_epoch < 1)
        ):
            raise ValueError(f"steps_per_epoch: expected an integer >= 1, got {steps_per_epoch!r}")
        self.base_lr = float(base_lr)
        self.steps_per_epoch = steps_per_epoch
        self.kind = kind
        self.epochs = int(epochs)
        self.step_epochs = int(step_epochs)
        self.step_factor = float(step_factor)
        self.final_ratio = float(final_ratio)
        self.warmup_epochs = int(warmup_epochs)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        per_epoch = float(self.steps_per_epoch)
        warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
        after = ops.maximum(step - warmup_steps, 0.0)
        if self.kind == "step":
            epoch = ops.floor(after / per_epoch)
            factor = ops.power(self.step_factor, ops.floor(epoch / float(self.step_epochs)))
        elif self.kind == "cosine":
            total = max(float((self.epochs - self.warmup_epochs) * self.steps_per_epoch), 1.0)
            progress = ops.minimum(after / total, 1.0)
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            factor = self.final_ratio + (1.0 - self.final_ratio) * cosine
        else:
            factor = ops.ones_like(step)
        if warmup_steps > 0:
            factor = ops.where(step < warmup_steps, (step + 1.0) / warmup_steps, factor)
        return self.base_lr * factor

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "kind": self.kind,
            "epochs": self.epochs,
            "step_epochs": self.step_epochs,
            "step_factor": self.step_factor,
            "final_ratio": self.final_ratio,
            "warmup_epochs": self.warmup_epochs,
        }


def make_lr_schedule(train_cfg: TrainConfig, steps_per_epoch: int) -> EpochLRSchedule:
    """The learning-rate schedule of `train` (`schedule`, `lr`, warm-up) for a run.

    Args:
        train_cfg: the `train` config section.
        steps_per_epoch: optimizer steps per epoch (number of global batches).

    Example:

    >>> s = make_lr_schedule(TrainConfig(lr=1e-3, schedule="step", step_epochs=30), 10)
    >>> float(s(299)), float(s(300))  # epoch 29, epoch 30
    (0.001, 0.0005)
    """
    if train_cfg.warmup_epochs >= train_cfg.epochs:
        raise ValueError(
            f"train.warmup_epochs: expected fewer than train.epochs={train_cfg.epochs}, "
            f"got {train_cfg.warmup_epochs}"
        )
    return EpochLRSchedule(
        base_lr=train_cfg.lr,
        steps_per_epoch=steps_per_epoch,
        kind=train_cfg.schedule,
        epochs=train_cfg.epochs,
        step_epochs=train_cfg.step_epochs,
        step_factor=train_cfg.step_factor,
        final_ratio=train_cfg.cosine_final_ratio,
        warmup_epochs=train_cfg.warmup_epochs,
    )


@keras.saving.register_keras_serializable(package="ks_keras")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose dense float32 update runs TensorFlow's fused Adam kernel.

    Keras' Adam updates each variable with about a dozen element-wise ops, each a pass over
    the variable and its two moments; TensorFlow's `ResourceApplyAdam` kernel does it in one.
    At paper size (85 M parameters) that is 250 -> 73 ms per training step on 2 CPU cores
    (docs/performance.md). The update rule is the same (Keras' Adam is the kernel's
    "epsilon hat" form), and so are the options, the optimizer variables and the saved
    state: a checkpoint written with either loads into the other. AMSGrad, sparse gradients
    (`IndexedSlices`) and non-float32 variables take Keras' own update.

    Args:
        **kwargs: everything `keras.optimizers.Adam` accepts.
    """

    def update_step(self, gradient, variable, learning_rate):
        if (
            self.amsgrad
            or keras.backend.backend() != "tensorflow"
            or isinstance(gradient, tf.IndexedSlices)
            or variable.dtype != "float32"
        ):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        local_step = ops.cast(self.iterations + 1, "float32")

        def handle(var):
            # Inside `strategy.extended.update` a distributed variable's `handle` is this
            # replica's copy.
            return (var.value if isinstance(var, keras.Variable) else var).handle

        tf.raw_ops.ResourceApplyAdam(
            var=handle(variable),
            m=handle(m),
            v=handle(v),
            beta1_power=ops.power(ops.cast(self.beta_1, "float32"), local_step),
            beta2_power=ops.power(ops.cast(self.beta_2, "float32"), local_step),
            lr=ops.cast(learning_rate, "float32"),
            beta1=ops.cast(self.beta_1, "float32"),
            beta2=ops.cast(self.beta_2, "float32"),
            epsilon=ops.cast(self.epsilon, "float32"),
            grad=ops.cast(gradient, "float32"),
        )


def make_optimizer(train_cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (paper; `FusedAdam`) or SGD with momentum (authors' code) on `make_lr_schedule`.

    `train.weight_decay` is decoupled weight decay (Keras' `weight_decay`, as AdamW), not
    an L2 term in the loss; biases and LayerNorm scales/offsets are not decayed.
    """
    if not train_cfg.weight_decay >= 0:
        raise ValueError(
            f"train.weight_decay: expected a number >= 0, got {train_cfg.weight_decay}"
        )
    schedule = make_lr_schedule(train_cfg, steps_per_epoch)
    weight_decay = train_cfg.weight_decay or None
    if train_cfg.optimizer == "adam":
        optimizer = FusedAdam(learning_rate=schedule, weight_decay=weight_decay)
    elif train_cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=train_cfg.momentum, weight_decay=weight_decay
        )
    else:
        raise ValueError(f"train.optimizer: expected 'adam' or 'sgd', got {train_cfg.optimizer!r}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def float32_copy(model_builder: Callable[[], keras.Model], trained: keras.Model) -> keras.Model:
    """A float32 copy of `trained` built outside any distribution strategy.

    What `ks-keras train` and the tuner's retrain save and export: no optimizer state, no
    mixed-precision casts, no collective ops when predicting. `model_builder` builds the same
    architecture (e.g. `lambda: build_model(cfg)`); the global dtype policy is restored after.
    """
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        plain = model_builder()
        plain.set_weights(trained.get_weights())
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return plain


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> dict[int, float]:
    """`{class: n / (C * count)}` (scikit-learn's "balanced"); absent classes get 1.0.

    The dict form of `data.class_weights` (one rule for every caller).
    """
    weights = class_weights(labels, n_classes)
    return {c: float(w) for c, w in enumerate(weights)}


# ---------------------------------------------------------------------------------------------
# Compile


def compile_model(
    model: keras.Model, train_cfg: TrainConfig, steps_per_epoch: int, n_classes: int
) -> keras.Model:
    """Compile for training: optimizer + schedule, cross-entropy on logits, WA and UA.

    Call inside `strategy.scope()` under a distribution strategy. Metrics are named
    `accuracy` (WA) and `ua`, so Keras logs `loss, accuracy, ua, val_loss, val_accuracy,
    val_ua`.

    Returns:
        The same model, compiled.
    """
    width = model.outputs[0].shape[-1]
    if width != n_classes:
        raise ValueError(
            f"model output has {width} logits but n_classes={n_classes}; "
            "set model.num_classes to the number of labels"
        )
    if train_cfg.mixup_alpha > 0:
        from ks_keras.mixup import DominantLabelAccuracy, MixupCrossentropy

        loss, accuracy = MixupCrossentropy(), DominantLabelAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(
        optimizer=make_optimizer(train_cfg, steps_per_epoch),
        loss=loss,
        metrics=[accuracy, UnweightedAverageRecall(n_classes, name="ua")],
        jit_compile=bool(train_cfg.jit_compile),
    )
    return model


# ---------------------------------------------------------------------------------------------
# Callbacks


def monitor_mode(monitor: str) -> str:
    """`"min"` for losses, `"max"` for everything else (accuracy, UA)."""
    return "min" if monitor.endswith("loss") else "max"


class RunLog(keras.callbacks.Callback):
    """Per-epoch history and the best-epoch checkpoint, both resumable.

    Keras' `ModelCheckpoint(save_best_only=True)` forgets its best value when
    `BackupAndRestore` resumes a run, and `History` only sees the epochs of the current
    call. This callback keeps both on disk (`history.json`, `best.json`,
    `best.weights.h5`) and reloads them when training resumes at an epoch > 0; a run that
    starts at epoch 0 starts a fresh log. Place it before `BackupAndRestore`, so that a
    backup never claims an epoch whose log and checkpoint are missing.
    """

    def __init__(self, directory: str | Path, monitor: str):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.entries: dict[int, dict[str, float]] = {}
        self.best: dict[str, Any] | None = None
        self.initial_epoch: int | None = None
        self.epochs_run = 0

    @property
    def history_path(self) -> Path:
        return self.directory / "history.json"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.json"

    @property
    def weights_path(self) -> Path:
        return self.directory / BEST_WEIGHTS

    def on_epoch_begin(self, epoch, logs=None):
        if self.initial_epoch is not None:
            return
        self.initial_epoch = epoch
        self.directory.mkdir(parents=True, exist_ok=True)
        if epoch == 0:
            for stale in (self.history_path, self.best_path, self.weights_path):
                stale.unlink(missing_ok=True)
            _tmp_weights(self.weights_path).unlink(missing_ok=True)
            return
        # Resumed by BackupAndRestore: keep what the finished epochs logged.
        if self.history_path.is_file():
            for entry in json.loads(self.history_path.read_text()):
                if entry["epoch"] < epoch:
                    self.entries[entry["epoch"]] = entry
        best = finish_pending_weights(self.best_path, self.weights_path)
        if best is not None and self.weights_path.is_file():
            self.best = best

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

    def _check_finite(self, epoch: int, logs: dict) -> None:
        # Once per epoch (the step stays free of checks): Keras' logs are epoch means, so a
        # single NaN batch shows here; weights are checked too, a NaN can hide behind a
        # finite accuracy.
        bad = {k: float(v) for k, v in logs.items() if "loss" in k and not math.isfinite(v)}
        weights_ok = all(
            bool(ops.convert_to_numpy(ops.all(ops.isfinite(w.value))))
            for w in self.model.trainable_weights
        )
        if not bad and weights_ok:
            return
        what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "the weights hold NaN/inf"
        epochs = self.params.get("epochs") if self.params else None
        kept = (
            f"{BEST_WEIGHTS} keeps epoch {self.best['epoch'] + 1} ({self.monitor} "
            f"{self.best['value']:.4g})"
            if self.best
            else "no epoch was checkpointed"
        )
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch + 1}{f' of {epochs}' if epochs else ''}: "
            f"{what}. Nothing of this epoch was saved ({kept}). Lower train.lr (or check the "
            f"features for extreme values) and train in a fresh run folder (or delete "
            f"{self.directory / BACKUP_DIR} to restart this one)"
        )

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        self._check_finite(epoch, logs)
        if self.monitor not in logs:
            raise ValueError(
                f"monitor {self.monitor!r} is not among the logged values {sorted(logs)}"
            )
        entry = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        entry["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.entries[epoch] = entry
        self.epochs_run += 1
        value = entry[self.monitor]
        if self._improved(value):
            self.best = {"epoch": epoch, "monitor": self.monitor, "value": value}
            commit_weights(self.model, self.weights_path, self.best_path, self.best)
        write_json_atomic(self.history_path, [self.entries[e] for e in sorted(self.entries)])

    def history(self) -> dict[str, list[float]]:
        """Logged values as `{name: [value per epoch]}` over every epoch so far."""
        return history_columns([self.entries[e] for e in sorted(self.entries)])


def history_columns(entries: list[dict]) -> dict[str, list[float]]:
    """`history.json`'s per-epoch entries as `{name: [value per epoch]}` (NaN where absent)."""
    names = sorted({k for entry in entries for k in entry if k != "epoch"})
    out: dict[str, list[float]] = {"epoch": [e["epoch"] for e in entries]}
    for name in names:
        out[name] = [e.get(name, float("nan")) for e in entries]
    return out


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file, then rename: a kill never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _tmp_weights(final: Path) -> Path:
    # Keras wants weight files to end in ".weights.h5".
    return final.with_name("tmp_" + final.name)


def commit_weights(model: keras.Model, final: Path, record_path: Path, record: dict) -> None:
    """Save `model`'s weights to `final` and `record` (JSON) to `record_path`, crash-safe.

    Write-ahead: the weights go to a temporary file; the record, naming that file as
    `pending`, is committed atomically; the file is renamed to `final`; the record is
    rewritten without `pending`. Killed at any moment, the folder holds either the previous
    weights and record, or a committed record whose rename `finish_pending_weights` completes.
    """
    tmp = _tmp_weights(final)
    model.save_weights(tmp, overwrite=True)
    write_json_atomic(record_path, {**record, "pending": tmp.name})
    os.replace(tmp, final)
    write_json_atomic(record_path, record)


def finish_pending_weights(record_path: Path, final: Path) -> dict | None:
    """The record `commit_weights` wrote (None if none), after completing the rename of its
    weights if a kill interrupted it. A temporary weights file that was never committed is
    deleted."""
    tmp = _tmp_weights(final)
    if not record_path.is_file():
        tmp.unlink(missing_ok=True)
        return None
    try:
        record = json.loads(read_utf8(record_path))
    except ValueError as e:
        raise ValueError(f"{record_path}: unreadable ({e}); delete it to start afresh") from None
    pending = record.pop("pending", None)
    if pending is not None:
        if tmp.is_file():
            os.replace(tmp, final)  # committed but not renamed: roll forward
        write_json_atomic(record_path, record)
    tmp.unlink(missing_ok=True)  # written but never committed
    return record


class SafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that a kill cannot tear, and that says what to do
    when a backup cannot be restored.

    Keras writes `latest.weights.h5` in place: Ctrl-C during the write leaves a half-written
    file, and every later run fails with "N objects could not be loaded". Here the backup is
    written with `commit_weights` (temporary file, atomic record `training_metadata.json`,
    rename), so the last complete backup always survives. Same files, same behaviour
    otherwise (saved every epoch, deleted when training finishes).

    Args:
        backup_dir: the backup folder (one per worker under multi-worker training).
    """

    def __init__(self, backup_dir: str | Path):
        super().__init__(str(backup_dir), save_freq="epoch")

    def on_train_begin(self, logs=None):
        backup_dir = Path(self.backup_dir)
        weights = Path(self._weights_path)
        record = finish_pending_weights(Path(self._training_metadata_path), weights)
        if record is None:
            weights.unlink(missing_ok=True)  # weights without a record: never committed
            return
        if not weights.is_file():
            raise ValueError(
                f"the training backup in {backup_dir} records epoch {record.get('epoch')} but "
                f"holds no {weights.name}; to start this run afresh delete {backup_dir} (or "
                "use another run folder)"
            )
        try:
            self._load_model()
        except Exception as e:  # h5py/Keras raise many types for a torn or foreign file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ValueError(
                f"cannot resume from the training backup {weights} (epoch "
                f"{record.get('epoch')}): {type(e).__name__}: {reason}. It was torn while it "
                "was being written (a run killed by an older ks_keras) or comes from another "
                f"model or config. To start this run afresh delete {backup_dir} (the finished "
                "epochs are then trained again), or use another run folder"
            ) from None

    def _save_model(self):
        Path(self.backup_dir).mkdir(parents=True, exist_ok=True)
        commit_weights(
            self.model,
            Path(self._weights_path),
            Path(self._training_metadata_path),
            {"epoch": self._current_epoch, "batch": self._last_batch_seen},
        )


def _flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _ignored_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED)


def check_resume_config(cfg: Config, run_dir: Path, work_dir: Path) -> None:
    """Refuse to resume a run folder whose unfinished run used another config.

    Called before anything is written: a resume restores weights, optimizer state and the
    best checkpoint of the earlier config, so mixing two configs would be silently wrong
    (or fail later with a multi-KB Keras error after `config.yaml` was overwritten).

    Raises:
        ValueError: naming the keys that differ and how to start afresh.
    """
    state = work_dir / BACKUP_DIR / "training_metadata.json"
    saved = run_dir / "config.yaml"
    if not (state.is_file() and saved.is_file()):
        return  # nothing to resume: a fresh run
    import yaml

    try:
        old = from_dict(Config, yaml.safe_load(read_utf8(saved)) or {}).to_dict()
    except (ValueError, yaml.YAMLError) as e:
        differences = [f"its config.yaml is not a config this version reads ({e})"]
    else:
        before, after = _flat_config(old), _flat_config(cfg.to_dict())
        differences = [
            f"{key}: {before.get(key)!r} → {after.get(key)!r}"
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and not _ignored_on_resume(key)
        ]
    if differences:
        shown = "; ".join(differences[:10])
        more = f"; … and {len(differences) - 10} more" if len(differences) > 10 else ""
        try:
            epoch = json.loads(read_utf8(state)).get("epoch", "?")
        except ValueError:
            epoch = "?"
        raise ValueError(
            f"{run_dir} holds an unfinished run (backup at epoch {epoch}) trained with another "
            "config: "
            f"{shown}{more}. Run again with the same config to resume it, or start afresh: "
            f"use another run folder, or delete {work_dir / BACKUP_DIR} (nothing was written)"
        )


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
        run_dir: the run folder (see the module docstring).
        initial_epoch: the epoch this call started at (> 0 after a resume).
        epochs_run: epochs trained by this call.
        strategy: the distribution strategy used.
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

    @property
    def best_weights_path(self) -> Path:
        return self.run_dir / BEST_WEIGHTS


def _check_monitor(monitor: str, has_val: bool) -> None:
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if base not in MONITORABLE:
        allowed = ", ".join(list(MONITORABLE) + [f"val_{m}" for m in MONITORABLE])
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
            `"val_loss"` (minimised), or a training metric.
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
    class_weight = _check_class_weight(class_weight, n_classes)
    strategy = strategy or get_strategy(train_cfg)
    compat.apply_multiworker_patches(strategy)  # no-op unless multi-worker; idempotent
    replicas = strategy.num_replicas_in_sync
    if train_cfg.batch_size < replicas:
        raise ValueError(
            f"train.batch_size: the global batch ({train_cfg.batch_size}) must be at least the "
            f"number of replicas ({replicas})"
        )
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

    if train_cfg.mixup_alpha > 0:
        from ks_keras.mixup import mix_batches

        # Class weights move into the mixed batches' sample weights (packed labels).
        train_ds = mix_batches(train_ds, train_cfg.mixup_alpha, train_cfg.seed, class_weight)
        class_weight = None

    run_log = RunLog(work_dir, monitor)
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
        shutil.rmtree(work_dir, ignore_errors=True)
        try:
            work_dir.parent.rmdir()  # run_dir/workers, once every worker has cleaned up
        except OSError:
            pass
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
    )
