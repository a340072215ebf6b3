"""Search: run (or resume) a KerasTuner search, write its summary and best config."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf
import yaml

from ks_keras import compat
from ks_keras.config import Config, save_config
from ks_keras.training import count_batches, get_strategy
from ks_keras.tuning.hypermodel import KSTHyperModel, materialize
from ks_keras.tuning.space import OBJECTIVE, SearchSpace, apply_values, check_space
from ks_keras.tuning.tuners import _last_line, make_tuner

KT_DIR = "keras_tuner"
SEARCH_FILE = "search.json"
FINAL_FILE = "final.json"
# Config sections that do not change what a trial computes (a resume may differ in them).
_RESUME_IGNORED = (
    "export",
    "eval.report_dir",
    "eval.repeats",
    "eval.max_folds",
    "train.output_dir",
)


# ---------------------------------------------------------------------------------------------
# Search.


@dataclass
class TrialRow:
    """One trial of the summary table."""

    trial_id: str
    status: str
    val_ua: float | None
    best_epoch: int | None  # 1-based
    values: dict[str, Any]  # decoded config values of the active hyperparameters
    extra: dict[str, Any]  # KerasTuner's own values (Hyperband: tuner/epochs, ...)
    error: str = ""


@dataclass
class SearchResult:
    """What `run_search` found (also written to the project folder)."""

    project_dir: Path
    tuner: str
    space: SearchSpace
    base_config: Config
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Config | None
    new_trials: int  # trials run to their end by this call (an interrupted one re-runs)
    aborted: str | None = None
    fold_info: dict | None = None
    class_weight: dict[int, float] | None = None
    strategy: Any = field(default=None, repr=False)

    @property
    def completed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "COMPLETED"]

    @property
    def failed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status in ("FAILED", "INVALID")]

    @property
    def summary_csv(self) -> Path:
        return self.project_dir / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.project_dir / "summary.md"

    @property
    def best_config_path(self) -> Path:
        return self.project_dir / "best_config.yaml"


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _search_record(kind: str, space: SearchSpace, cfg: Config, fold_info: dict | None) -> dict:
    config = {
        k: v
        for k, v in _flatten(cfg.to_dict()).items()
        if not any(k == i or k.startswith(i + ".") for i in _RESUME_IGNORED)
    }
    return {
        "tuner": kind,
        "objective": OBJECTIVE,
        "space": space.to_dict(),
        "base_config": config,
        "fold": fold_info,
    }


def _check_resume(project_dir: Path, record: dict) -> None:
    path = project_dir / SEARCH_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); pass --overwrite to start afresh"
        ) from None
    problems = []
    normalized = json.loads(json.dumps(record))
    for key in ("tuner", "objective", "space", "fold"):
        if old.get(key) != normalized.get(key):
            problems.append(
                f"{key}: was {json.dumps(old.get(key))[:300]}, now "
                f"{json.dumps(normalized.get(key))[:300]}"
            )
    old_cfg, new_cfg = old.get("base_config") or {}, normalized["base_config"]
    changed = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if changed:
        problems.append(
            "config field(s) "
            + ", ".join(f"{k} ({old_cfg.get(k)!r} → {new_cfg.get(k)!r})" for k in changed[:8])
        )
    if problems:
        raise ValueError(
            f"{project_dir} holds a search with different settings, so resuming it would mix "
            f"incomparable trials: {'; '.join(problems)}. Pass --overwrite (overwrite=True) to "
            "start afresh, or choose another --project-dir"
        )


def _collect_rows(tuner: kt.Tuner, space: SearchSpace) -> list[TrialRow]:
    rows = []
    for trial_id in sorted(tuner.oracle.trials, key=lambda t: (len(t), t)):
        trial = tuner.oracle.trials[trial_id]
        hp = trial.hyperparameters
        values, extra = {}, {}
        for name, value in hp.values.items():
            if name in space.names:
                if hp.is_active(name):
                    values[name] = space[name].decode(value)
            else:
                extra[name] = value
        status = str(trial.status)
        score = trial.score if status == "COMPLETED" else None
        best_step = trial.best_step if status == "COMPLETED" else None
        if best_step is not None:
            # Hyperband continues trials: its history starts at tuner/initial_epoch.
            best_step += int(hp.values.get("tuner/initial_epoch", 0))
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                val_ua=None if score is None else float(score),
                best_epoch=None if best_step is None else int(best_step) + 1,
                values=values,
                extra=extra,
                error=""
                if status == "COMPLETED"
                else _last_line(trial.message)
                if trial.message
                else "",
            )
        )
    return rows


def _best_row(rows: list[TrialRow]) -> TrialRow | None:
    done = [
        r
        for r in rows
        if r.status == "COMPLETED" and r.val_ua is not None and math.isfinite(r.val_ua)
    ]
    if not done:
        return None
    return max(done, key=lambda r: (r.val_ua, -rows.index(r)))


def _fmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _csv_value(value: Any) -> str:
    # Full precision: the CSV is for machines (the markdown table rounds).
    if value is None:
        return ""
    if isinstance(value, list | dict | bool):
        return json.dumps(value)
    return str(value)


def write_summary(result: SearchResult) -> None:
    """`summary.csv` and `summary.md` in the project folder (one row per trial)."""
    names = list(result.space.names)
    extras = sorted({k for r in result.rows for k in r.extra})
    header = ["trial", "status", "val_ua", "best_epoch", *names, *extras, "error"]
    with open(result.summary_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in result.rows:
            writer.writerow(
                [
                    r.trial_id,
                    r.status,
                    "" if r.val_ua is None else f"{r.val_ua:.6f}",
                    "" if r.best_epoch is None else r.best_epoch,
                    *[_csv_value(r.values.get(n)) for n in names],
                    *[_csv_value(r.extra.get(n)) for n in extras],
                    r.error,
                ]
            )

    counts = {}
    for r in result.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    fold = result.fold_info or {}
    lines = [
        f"# KerasTuner search: {result.project_dir.name}",
        "",
        f"- tuner: {result.tuner}; objective: validation UA (`{OBJECTIVE}`, max, best epoch of "
        "each trial)",
    ]
    if fold:
        lines.append(
            f"- fold {fold.get('index')} ({fold.get('name')}): validation speakers "
            f"{', '.join(fold.get('val_speakers', []))} (held out of the training speakers "
            f"{', '.join(fold.get('train_speakers', []))}); test speakers "
            f"{', '.join(fold.get('test_speakers', []))} are not used by the search"
        )
    lines.append("- trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if result.aborted:
        lines.append(f"- **search stopped early: {result.aborted}**")
    if result.best is not None:
        lines.append(
            f"- best: trial {result.best.trial_id}, val UA {result.best.val_ua:.4f} "
            f"→ `best_config.yaml`"
        )
    else:
        lines.append("- **no trial completed**")
    lines += ["", "Space:", ""] + [f"- `{p.describe()}`" for p in result.space.params]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(result.rows, key=lambda r: (r.val_ua is None, -(r.val_ua or 0.0)))
    for r in ordered:
        cells = [
            r.trial_id,
            r.status if r.status == "COMPLETED" else f"**{r.status}**",
            "" if r.val_ua is None else f"{r.val_ua:.4f}",
            "" if r.best_epoch is None else str(r.best_epoch),
            *[_fmt_value(r.values.get(n)) if n in r.values else "–" for n in names],
            *[_fmt_value(r.extra.get(n)) for n in extras],
            r.error.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    result.summary_md.write_text("\n".join(lines) + "\n")


def _clear_project(project_dir: Path) -> None:
    """Delete what a search wrote (only its own files: the folder may hold others)."""
    import shutil

    if not project_dir.is_dir():
        return
    for name in (KT_DIR, "tensorboard"):
        shutil.rmtree(project_dir / name, ignore_errors=True)
    for run in project_dir.glob("best_trial_*"):
        shutil.rmtree(run, ignore_errors=True)
    for name in (
        SEARCH_FILE,
        FINAL_FILE,
        "space.yaml",
        "summary.csv",
        "summary.md",
        "best_config.yaml",
    ):
        (project_dir / name).unlink(missing_ok=True)


def _check_strategy(strategy: tf.distribute.Strategy) -> None:
    if compat.is_multiworker_collective(strategy):
        raise ValueError(
            "train.strategy=multiworker: a search runs on one host (KerasTuner trains each "
            "trial under the strategy, mirrored over this host's GPUs); use 'auto' or "
            "'mirrored' for tuning, and multiworker for training the best config"
        )


def run_search(
    cfg: Config,
    space: SearchSpace,
    train_ds: tf.data.Dataset | Callable[[], tf.data.Dataset],
    val_ds: tf.data.Dataset,
    project_dir: str | Path,
    *,
    tuner: str = "random",
    trials: int = 10,
    overwrite: bool = False,
    class_weight: dict[int, float] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    fold_info: dict | None = None,
    max_consecutive_failures: int = 3,
    hyperband_factor: int = 3,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) a KerasTuner search; write the summary and the best config.

    Args:
        cfg: the base config: the default point and everything not tuned.
        space: the search space (`load_space`); checked here against `cfg`.
        train_ds: training batches `(inputs dict, int labels)` at the global batch size
            `cfg.train.batch_size` (shuffled, seeded), or better a zero-argument function
            returning them: it is called for every trial, so all trials (and the retraining)
            see the same shuffle order, whereas one dataset object reshuffles differently on
            each pass.
        val_ds: the validation speakers' batches: the objective `val_ua` is measured on them.
            Never pass test speakers here.
        project_dir: the project folder (see the module docstring). An existing project is
            resumed: finished trials are kept and not run again, up to `trials` in total.
        tuner: `random`, `bayesian` or `hyperband`.
        trials: the total number of trials of the project.
        overwrite: delete an existing project first.
        class_weight: optional `{class id: weight}` for the loss.
        strategy: the distribution strategy (default `get_strategy(cfg.train)`); passed to
            KerasTuner, which builds and trains every trial under it.
        fold_info: a description of the split (stored, checked on resume, shown in the summary).
        max_consecutive_failures: stop the search after this many failed trials in a row.
        hyperband_factor: Hyperband's reduction factor.
        verbose: Keras/KerasTuner verbosity.
        log: where progress lines go.

    Returns:
        A `SearchResult`. `result.best` is None when no trial completed (failed trials are
        in `result.failed` with their error); the caller decides the exit status.
    """
    _require_tensorboard()
    notes = check_space(space, cfg, tuner)
    for note in notes:
        log(f"note: {note}")
    strategy = strategy or get_strategy(cfg.train)
    _check_strategy(strategy)
    first = materialize(train_ds, "train_ds")
    steps = count_batches(first, "train_ds")
    count_batches(materialize(val_ds, "val_ds"), "val_ds")
    n_train = None
    if "train.batch_size" in space.names:
        n_train = int(
            first.reduce(np.int64(0), lambda n, b: n + tf.cast(tf.shape(b[1])[0], tf.int64))
        )

    project_dir = Path(project_dir)
    kt_dir = project_dir / KT_DIR
    record = _search_record(tuner, space, cfg, fold_info)
    if overwrite:
        _clear_project(project_dir)
    else:
        _check_resume(project_dir, record)
    project_dir.mkdir(parents=True, exist_ok=True)

    hypermodel = KSTHyperModel(
        cfg,
        space,
        steps,
        n_train=n_train,
        class_weight=class_weight,
        hyperband_max_epochs=cfg.train.epochs if tuner == "hyperband" else None,
        train_data=train_ds,
    )
    keras_tuner = make_tuner(
        tuner,
        hypermodel,
        kt_dir,
        trials=trials,
        strategy=strategy,
        seed=cfg.train.seed,
        overwrite=overwrite,
        evaluate_config_first=space.evaluate_config_first,
        max_consecutive_failures=max_consecutive_failures,
        hyperband_factor=hyperband_factor,
        log=log,
    )
    (project_dir / SEARCH_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (project_dir / "space.yaml").write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))

    before = len(keras_tuner.oracle.trials)
    ended_before = len(keras_tuner.oracle.end_order)
    remaining = keras_tuner.oracle.remaining_trials()
    if before:
        log(f"resuming {kt_dir}: {before} trial(s) already run; {max(remaining or 0, 0)} to go")
    aborted = None
    try:
        # No `x`: the HyperModel takes its training data itself (fresh from a factory).
        keras_tuner.search(
            validation_data=val_ds,
            callbacks=[
                keras.callbacks.TensorBoard(
                    log_dir=str(project_dir / "tensorboard"), profile_batch=0
                )
            ],
            verbose=verbose,
        )
    except RuntimeError as e:
        if "consecutive failures" not in str(e):
            raise
        aborted = f"{max_consecutive_failures} consecutive trials failed"
        print(f"\n!!! search stopped: {aborted}\n", file=sys.stderr, flush=True)

    rows = _collect_rows(keras_tuner, space)
    best = _best_row(rows)
    best_config = None
    if best is not None:
        best_config = apply_values(cfg, best.values)
    result = SearchResult(
        project_dir=project_dir,
        tuner=tuner,
        space=space,
        base_config=cfg,
        rows=rows,
        best=best,
        best_config=best_config,
        new_trials=len(keras_tuner.oracle.end_order) - ended_before,
        aborted=aborted,
        fold_info=fold_info,
        class_weight=class_weight,
        strategy=strategy,
    )
    write_summary(result)
    if best_config is not None:
        save_config(best_config, result.best_config_path)
        header = (
            f"# Best configuration of the KerasTuner search in {project_dir}: trial "
            f"{best.trial_id}, validation UA {best.val_ua:.4f}.\n# Tuned: "
            + ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.values.items())
            + "\n# Use it with `ks-keras train --config` or `ks-keras evaluate --config`.\n"
        )
        result.best_config_path.write_text(header + result.best_config_path.read_text())
    else:
        result.best_config_path.unlink(missing_ok=True)

    failed = result.failed
    log(
        f"search: {len(rows)} trial(s) in {project_dir} ({result.new_trials} run now): "
        f"{len(result.completed)} COMPLETED, {len(failed)} FAILED; summary: {result.summary_md}"
    )
    if failed:
        print(
            f"!!! {len(failed)} trial(s) FAILED: "
            + "; ".join(f"{r.trial_id}: {r.error}" for r in failed[:5])
            + f" (see {result.summary_md})",
            file=sys.stderr,
            flush=True,
        )
    if best is not None:
        log(
            f"best: trial {best.trial_id}, val UA {best.val_ua:.4f}, "
            + ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.values.items())
        )
    return result


def _require_tensorboard() -> None:
    # KerasTuner 1.4 imports tensorboard's HParams plugin inside every trial; without it each
    # trial fails and the search "finishes" with nothing (docs/STACK_NOTES).
    try:
        import tensorboard  # noqa: F401
        from tensorboard.plugins.hparams import api  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"tensorboard is not importable ({e}); KerasTuner needs it for every trial. "
            "Reinstall the package (`pip install -e .`), which requires tensorboard"
        ) from None
