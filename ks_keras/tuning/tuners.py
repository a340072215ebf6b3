"""Tuners: KerasTuner's own, reporting every finished trial (loudly when it failed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras_tuner as kt
import tensorflow as tf

from ks_keras.tuning.hypermodel import KSTHyperModel
from ks_keras.tuning.space import OBJECTIVE, TUNERS

# ---------------------------------------------------------------------------------------------
# Tuners: KerasTuner's own, reporting every finished trial (loudly when it failed).


def _last_line(message: str | None) -> str:
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"


class _ReportingTuner:
    """Mixin: one line per finished trial; a failed trial is printed to stderr with its error.

    Random and Bayesian searches keep only the best trial's checkpoint (the paper-size model
    weighs ~340 MB per trial; the best configuration is retrained anyway). Hyperband needs
    every checkpoint (later rounds continue earlier trials), so it keeps them.
    """

    prune_checkpoints = True
    log: Callable[[str], None] = print

    def on_trial_begin(self, trial):
        self._trial_started = time.perf_counter()
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        seconds = time.perf_counter() - getattr(self, "_trial_started", time.perf_counter())
        trial = self.oracle.get_trial(trial.trial_id)
        status = trial.status
        if status == "COMPLETED":
            self.log(
                f"trial {trial.trial_id} COMPLETED: {OBJECTIVE} {trial.score:.4f} "
                f"(best epoch {int(trial.best_step) + 1}) [{seconds:.0f}s]"
            )
        elif status in ("FAILED", "INVALID"):
            print(
                f"\n!!! trial {trial.trial_id} {status}: {_last_line(trial.message)}\n"
                f"    values: {trial.hyperparameters.values}\n    full traceback: "
                f"{Path(self.get_trial_dir(trial.trial_id)) / 'trial.json'}\n",
                file=sys.stderr,
                flush=True,
            )
        if self.prune_checkpoints:
            self._prune_checkpoints()

    def _prune_checkpoints(self):
        best = self.oracle.get_best_trials(1)
        keep = best[0].trial_id if best else None
        for trial_id in self.oracle.trials:
            if trial_id != keep:
                path = Path(self._get_checkpoint_fname(trial_id))
                if path.is_file():
                    path.unlink()


class _SearchTuner(_ReportingTuner, kt.Tuner):
    """A KerasTuner `Tuner` (random or Bayesian, by its oracle) that reports trials."""


class _HyperbandTuner(_ReportingTuner, kt.Hyperband):
    prune_checkpoints = False


class _ConfigFirst:
    """Oracle mixin: the first trial of a new search evaluates the defaults (the config)."""

    def populate_space(self, trial_id):
        if not self.start_order:
            hps = kt.HyperParameters()
            for hp in self.hyperparameters.space:
                hps.merge([hp])
                if hps.is_active(hp):
                    hps.values[hp.name] = hp.default
            return {"status": "RUNNING", "values": hps.values}
        return super().populate_space(trial_id)


class _ConfigFirstRandomOracle(_ConfigFirst, kt.oracles.RandomSearchOracle):
    pass


class _ConfigFirstBayesianOracle(_ConfigFirst, kt.oracles.BayesianOptimizationOracle):
    pass


def make_tuner(
    kind: str,
    hypermodel: KSTHyperModel,
    project_dir: str | Path,
    *,
    trials: int,
    strategy: tf.distribute.Strategy | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    evaluate_config_first: bool = True,
    max_consecutive_failures: int = 3,
    hyperband_factor: int = 3,
    log: Callable[[str], None] = print,
) -> kt.Tuner:
    """A KerasTuner tuner over `hypermodel`, objective `val_ua` (max).

    Args:
        kind: `random`, `bayesian` or `hyperband`.
        hypermodel: the `KSTHyperModel`.
        project_dir: KerasTuner's project folder; an existing one is resumed unless
            `overwrite`.
        trials: the maximum number of trials (Hyperband: a cap on its own schedule, whose
            longest trials run `train.epochs` epochs).
        strategy: the `tf.distribute` strategy every trial builds and trains under.
        seed: the tuner's random seed.
        overwrite: delete an existing project and start afresh.
        evaluate_config_first: random/Bayesian: trial 0 evaluates the defaults (the config).
        max_consecutive_failures: stop after this many failed trials in a row.
        hyperband_factor: Hyperband's reduction factor.
    """
    if kind not in TUNERS:
        raise ValueError(f"tuner: expected one of {', '.join(TUNERS)}, got {kind!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: expected an integer >= 1, got {trials!r}")
    if max_consecutive_failures < 1:
        raise ValueError(
            f"max_consecutive_failures: expected an integer >= 1, got {max_consecutive_failures}"
        )
    project_dir = Path(project_dir)
    objective = kt.Objective(OBJECTIVE, direction="max")
    oracle_args = dict(
        objective=objective, seed=seed, max_consecutive_failed_trials=max_consecutive_failures
    )
    tuner_args = dict(
        hypermodel=hypermodel,
        directory=str(project_dir.parent),
        project_name=project_dir.name,
        overwrite=overwrite,
        distribution_strategy=strategy,
    )
    hypermodel.declare_only = True
    try:
        if kind == "hyperband":
            tuner = _HyperbandTuner(
                max_epochs=hypermodel.cfg.train.epochs,
                factor=hyperband_factor,
                **oracle_args,
                **tuner_args,
            )
            tuner.oracle.max_trials = trials
        else:
            if kind == "random":
                base = (
                    _ConfigFirstRandomOracle
                    if evaluate_config_first
                    else (kt.oracles.RandomSearchOracle)
                )
            else:
                base = (
                    _ConfigFirstBayesianOracle
                    if evaluate_config_first
                    else (kt.oracles.BayesianOptimizationOracle)
                )
            tuner = _SearchTuner(oracle=base(max_trials=trials, **oracle_args), **tuner_args)
    finally:
        hypermodel.declare_only = False
    tuner.log = log
    return tuner
