"""The KerasTuner HyperModel: the KS-T + CCAB model with a `SearchSpace`'s config fields."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import keras
import keras_tuner as kt
import tensorflow as tf

from ks_keras.config import Config
from ks_keras.model import build_model
from ks_keras.training import compile_model, setup_precision_and_seeds
from ks_keras.tuning.space import (
    OBJECTIVE,
    HyperParam,
    SearchSpace,
    _check_config,
    _get_dotted,
    apply_values,
)

# ---------------------------------------------------------------------------------------------
# HyperModel.


def materialize(
    data: tf.data.Dataset | Callable[[], tf.data.Dataset] | None, name: str
) -> tf.data.Dataset:
    """A dataset, or a fresh one from a zero-argument factory (same seeded order each call)."""
    if isinstance(data, tf.data.Dataset):
        return data
    if callable(data):
        data = data()
        if isinstance(data, tf.data.Dataset):
            return data
    raise ValueError(
        f"{name}: expected a tf.data.Dataset or a function returning one, got {type(data).__name__}"
    )


class KSTHyperModel(kt.HyperModel):
    """The KS-T + CCAB model with the config fields of a `SearchSpace` as hyperparameters.

    Each hyperparameter's default is the base config's value (the paper's values for
    `configs/paper.yaml`). `build(hp)` applies the trial's active values to the base config,
    sets the dtype policy and seeds (`train.seed`, the same for every trial), builds the model
    and compiles it with the trial's optimizer and LR schedule (`training.compile_model`);
    `fit` trains for the trial's `train.epochs` (Hyperband: its own epochs) and returns the
    Keras history, from which KerasTuner takes the best epoch's `val_ua`.

    Args:
        cfg: the base config (the default point).
        space: the checked `SearchSpace`.
        steps_per_epoch: training batches per epoch at `cfg.train.batch_size`.
        n_train: number of training examples (needed only when `train.batch_size` is tuned).
        class_weight: optional `{class id: weight}` for the loss.
        hyperband_max_epochs: the schedule horizon under Hyperband (`train.epochs`).
        train_data: the training batches, or a zero-argument function returning them; a
            function is called once per trial, so every trial (and the retraining) sees the
            same seeded shuffle order. Used when `fit` gets no `x`.
    """

    def __init__(
        self,
        cfg: Config,
        space: SearchSpace,
        steps_per_epoch: int,
        n_train: int | None = None,
        class_weight: dict[int, float] | None = None,
        hyperband_max_epochs: int | None = None,
        train_data: tf.data.Dataset | Callable[[], tf.data.Dataset] | None = None,
    ):
        super().__init__(name="ks_transformer")
        self.train_data = train_data
        self.cfg = cfg
        self.space = space
        self.steps_per_epoch = steps_per_epoch
        self.n_train = n_train
        self.class_weight = class_weight
        self.hyperband_max_epochs = hyperband_max_epochs
        # While KerasTuner explores the space (at tuner construction) `build` only declares
        # the hyperparameters: building the paper-size model once per conditional branch
        # would take minutes for nothing.
        self.declare_only = False

    def _default(self, p: HyperParam) -> Any:
        current = _get_dotted(self.cfg, p.name)
        return p.kt_value(current) if p.contains(current) else None

    def _declare_one(self, hp: kt.HyperParameters, p: HyperParam) -> Any:
        default = self._default(p)
        if p.type == "choice":
            values = [p.kt_value(v) for v in p.values]
            return hp.Choice(p.name, values, ordered=p.ordered, default=default)
        if p.type == "int":
            return hp.Int(p.name, p.min, p.max, step=p.step, sampling=p.sampling, default=default)
        if p.type == "float":
            return hp.Float(p.name, p.min, p.max, step=p.step, sampling=p.sampling, default=default)
        if p.type == "boolean":
            return hp.Boolean(p.name, default=bool(default) if default is not None else False)
        return hp.Fixed(p.name, p.kt_value(p.value))

    def declare(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """Declare the space on `hp`; returns the active values, decoded to config values."""
        active: dict[str, Any] = {}
        for p in self.space.params:
            scopes = [
                hp.conditional_scope(parent, [self.space[parent].kt_value(v) for v in allowed])
                for parent, allowed in p.when.items()
            ]
            for scope in scopes:
                scope.__enter__()
            try:
                value = self._declare_one(hp, p)
            finally:
                for scope in reversed(scopes):
                    scope.__exit__(None, None, None)
            if value is not None:  # KerasTuner returns None for an inactive parameter
                active[p.name] = p.decode(value)
        return active

    def declare_hyperparameters(self, hp):
        self.declare(hp)

    def trial_config(self, hp: kt.HyperParameters) -> Config:
        """The full config of a trial (the base config with the active values applied)."""
        values = self.declare(hp)
        try:
            cfg = apply_values(self.cfg, values)
            if self.hyperband_max_epochs is not None:
                cfg = replace(cfg, train=replace(cfg.train, epochs=self.hyperband_max_epochs))
            _check_config(cfg)
        except ValueError as e:
            # An invalid combination is a failed trial, not a reason to retry it.
            raise kt.errors.FailedTrialError(f"invalid combination {values}: {e}") from None
        return cfg

    def _steps(self, cfg: Config) -> int:
        if cfg.train.batch_size == self.cfg.train.batch_size:
            return self.steps_per_epoch
        return math.ceil(self.n_train / cfg.train.batch_size)

    def build(self, hp):
        if self.declare_only:
            self.declare(hp)
            return None
        cfg = self.trial_config(hp)
        previous_policy = keras.mixed_precision.global_policy()
        try:
            setup_precision_and_seeds(cfg.train)
            model = build_model(cfg)
            compile_model(model, cfg.train, self._steps(cfg), cfg.model.num_classes)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
        return model

    def _rebatch(self, ds: tf.data.Dataset | None, batch_size: int):
        if ds is None or batch_size == self.cfg.train.batch_size:
            return ds
        # padded_batch: length-bucketed training batches are cut after their longest real
        # step, so the utterances of a new batch may differ in length (masks pad with 0).
        return ds.unbatch().padded_batch(batch_size)

    def fit(
        self,
        hp,
        model,
        x=None,
        validation_data=None,
        callbacks=None,
        epochs=None,
        initial_epoch=0,
        verbose="auto",
        **kwargs,
    ):
        cfg = self.trial_config(hp)
        if x is None:
            x = materialize(self.train_data, "train_ds")
        train_ds = self._rebatch(x, cfg.train.batch_size)
        val_ds = self._rebatch(validation_data, cfg.train.batch_size)
        if train_ds is not x:
            train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(self._steps(cfg)))
        callbacks = list(callbacks or [])
        if cfg.train.early_stopping_patience > 0:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=OBJECTIVE, mode="max", patience=cfg.train.early_stopping_patience
                )
            )
        return model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs if epochs is not None else cfg.train.epochs,
            initial_epoch=initial_epoch,
            class_weight=self.class_weight,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles (seeded); Keras cannot shuffle a dataset
            **kwargs,
        )
