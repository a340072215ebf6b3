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

# The package re-exports every name of the former `ks_keras/training.py`; the code lives in:
# strategy.py (strategy), precision.py (precision and seeds), optimizer.py (learning rate,
# optimizer, compile), callbacks.py (run log, checkpoints, backups, resume), loop.py (`fit`).
from ks_keras.training.callbacks import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    RESUME_IGNORED,
    RunLog,
    SafeBackupAndRestore,
    TrainingDivergedError,
    check_resume_config,
    commit_weights,
    finish_pending_weights,
    history_columns,
    monitor_mode,
    write_json_atomic,
)
from ks_keras.training.callbacks import _flat_config as _flat_config
from ks_keras.training.callbacks import _ignored_on_resume as _ignored_on_resume
from ks_keras.training.callbacks import _tmp_weights as _tmp_weights
from ks_keras.training.loop import (
    MONITORABLE,
    FitResult,
    count_batches,
    fit,
)
from ks_keras.training.loop import _check_class_weight as _check_class_weight
from ks_keras.training.loop import _check_dataset_inputs as _check_dataset_inputs
from ks_keras.training.loop import _check_monitor as _check_monitor
from ks_keras.training.loop import _shard_by_data as _shard_by_data
from ks_keras.training.loop import _with_known_cardinality as _with_known_cardinality
from ks_keras.training.optimizer import (
    EpochLRSchedule,
    FusedAdam,
    balanced_class_weights,
    compile_model,
    float32_copy,
    make_lr_schedule,
    make_optimizer,
)
from ks_keras.training.precision import resolve_precision_policy, setup_precision_and_seeds
from ks_keras.training.strategy import _MULTIWORKER as _MULTIWORKER
from ks_keras.training.strategy import get_strategy, parse_tf_config, worker_role

__all__ = [
    "BACKUP_DIR",
    "BEST_WEIGHTS",
    "MONITORABLE",
    "RESUME_IGNORED",
    "EpochLRSchedule",
    "FitResult",
    "FusedAdam",
    "RunLog",
    "SafeBackupAndRestore",
    "TrainingDivergedError",
    "balanced_class_weights",
    "check_resume_config",
    "commit_weights",
    "compile_model",
    "count_batches",
    "finish_pending_weights",
    "fit",
    "float32_copy",
    "get_strategy",
    "history_columns",
    "make_lr_schedule",
    "make_optimizer",
    "monitor_mode",
    "parse_tf_config",
    "resolve_precision_policy",
    "setup_precision_and_seeds",
    "worker_role",
    "write_json_atomic",
]
