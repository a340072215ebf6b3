"""Run-folder callbacks: `RunLog`, crash-safe checkpoints and backups, resume checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import keras
from keras import ops

from ks_keras.config import Config, from_dict
from ks_keras.files import read_utf8

BEST_WEIGHTS = "best.weights.h5"
# `train.checkpoint_ensemble: k > 1`: the k best epochs' weights (by the monitor) are kept
# here as `epoch_NNN.weights.h5`, listed best first in `top.json`.
CHECKPOINT_DIR = "checkpoints"
TOP_RECORD = "top.json"
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


# Monitor that keeps the last epoch (and the last k for a checkpoint ensemble): training on a
# fixed schedule without validation data, so nothing is chosen on any held-out speaker.
LAST_EPOCH = "epoch"


class TrainingDivergedError(ValueError):
    """The loss (or the weights) became NaN/inf; the message names the epoch and what to do."""


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

    With `keep > 1` it also keeps the weights of the `keep` best epochs (`TopCheckpoints`)
    for a checkpoint ensemble.
    """

    def __init__(self, directory: str | Path, monitor: str, keep: int = 1):
        super().__init__()
        self.directory = Path(directory)
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.entries: dict[int, dict[str, float]] = {}
        self.best: dict[str, Any] | None = None
        self.initial_epoch: int | None = None
        self.epochs_run = 0
        self.top = TopCheckpoints(self.directory / CHECKPOINT_DIR, self.mode, keep)

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
            self.top.reset()
            return
        self.top.reload(epoch)
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
        # `LAST_EPOCH` (a fixed schedule without validation data): every epoch "improves",
        # so the last one (and the last k checkpoints) are kept.
        by_epoch = self.monitor == LAST_EPOCH
        if not by_epoch and self.monitor not in logs:
            raise ValueError(
                f"monitor {self.monitor!r} is not among the logged values {sorted(logs)}"
            )
        entry = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        entry["lr"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.entries[epoch] = entry
        self.epochs_run += 1
        value = float(epoch) if by_epoch else entry[self.monitor]
        if self._improved(value):
            self.best = {"epoch": epoch, "monitor": self.monitor, "value": value}
            commit_weights(self.model, self.weights_path, self.best_path, self.best)
        self.top.offer(self.model, epoch, value)
        write_json_atomic(self.history_path, [self.entries[e] for e in sorted(self.entries)])

    def history(self) -> dict[str, list[float]]:
        """Logged values as `{name: [value per epoch]}` over every epoch so far."""
        return history_columns([self.entries[e] for e in sorted(self.entries)])


class TopCheckpoints:
    """The weights of the `keep` best epochs (by a monitored value), on disk, crash-safe.

    Files are `epoch_NNN.weights.h5` (1-based epoch) in `directory`; `top.json` lists the
    kept ones best first (`[{"epoch": 0-based, "value": v, "file": name}, …]`). A new file is
    written completely before the record names it, and an evicted file is deleted only after
    the record stops naming it, so a kill leaves at worst an unlisted file, which `reload`
    deletes. Ties keep the earlier epoch (as the best-epoch checkpoint does). `keep <= 1`
    writes nothing.
    """

    def __init__(self, directory: Path, mode: str, keep: int):
        self.directory = Path(directory)
        self.mode = mode
        self.keep = int(keep)
        self.entries: list[dict[str, Any]] = []

    @property
    def record_path(self) -> Path:
        return self.directory / TOP_RECORD

    def reset(self) -> None:
        """A fresh run: forget and delete every kept checkpoint."""
        self.entries = []
        self._delete_unlisted()
        self.record_path.unlink(missing_ok=True)

    def reload(self, epoch: int) -> None:
        """A run resumed at `epoch`: the record's checkpoints of earlier epochs whose files
        exist; other files (later epochs are trained again) go."""
        self.entries = [e for e in read_top_checkpoints(self.directory) if e["epoch"] < epoch]
        self._delete_unlisted()

    def _delete_unlisted(self) -> None:
        listed = {e["file"] for e in self.entries}
        for stray in self.directory.glob("*.h5"):  # nothing when the folder does not exist
            if stray.name not in listed:
                stray.unlink()

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def offer(self, model: keras.Model, epoch: int, value: float) -> None:
        """Keep `model`'s weights of `epoch` if `value` is among the `keep` best so far."""
        if self.keep <= 1 or not math.isfinite(value):
            return
        full = len(self.entries) >= self.keep
        if full and not self._better(value, self.entries[-1]["value"]):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch_{epoch + 1:03d}.weights.h5"
        final = self.directory / name
        tmp = _tmp_weights(final)
        model.save_weights(tmp, overwrite=True)
        os.replace(tmp, final)
        entry = {"epoch": int(epoch), "value": float(value), "file": name}
        position = next(
            (i for i, e in enumerate(self.entries) if self._better(value, e["value"])),
            len(self.entries),
        )
        entries = self.entries[:position] + [entry] + self.entries[position:]
        evicted = entries[self.keep :]
        self.entries = entries[: self.keep]
        write_json_atomic(self.record_path, self.entries)
        for e in evicted:
            (self.directory / e["file"]).unlink(missing_ok=True)


def read_top_checkpoints(directory: str | Path) -> list[dict[str, Any]]:
    """`TopCheckpoints`' record in `directory` (best first), keeping entries whose file
    exists; `[]` when there is none or it is unreadable."""
    directory = Path(directory)
    try:
        entries = json.loads(read_utf8(directory / TOP_RECORD))
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [
        e
        for e in entries
        if isinstance(e, dict) and "file" in e and (directory / str(e["file"])).is_file()
    ]


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
