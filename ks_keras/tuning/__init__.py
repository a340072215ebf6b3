"""KerasTuner search over the KS-T + CCAB config: space from YAML, resumable, best model exported.

A search space is a YAML file (see `tuning/paper_space.yaml`) whose keys are **dotted config
fields**, so any `model.*` or `train.*` field can be tuned; each names a KerasTuner type, its
range and sampling, and optionally the values of earlier parameters it depends on (`when`):

```yaml
evaluate_config_first: true        # trial 0 = the config's own values (random/bayesian)
hyperparameters:
  model.n_ccab:  {type: choice, values: [0, 1, 2, 3]}
  model.sparsity: {type: float, min: 0.0, max: 0.9, step: 0.1}
  train.lr:      {type: float, min: 1.0e-5, max: 1.0e-3, sampling: log}
  train.schedule: {type: choice, values: [step, cosine, constant]}
  train.step_epochs: {type: int, min: 10, max: 60, step: 10, when: {train.schedule: step}}
```

The default of every hyperparameter is the config's value, so a search around
`configs/paper.yaml` starts from the paper's setting. The objective is **validation UA**
(`val_ua`, maximised, best epoch of each trial) on the validation speakers of one fold,
which are held out of its training speakers; the fold's test speakers are not touched by the
search. After the search, the best configuration is retrained with `training.fit`, scored
once on the test speakers (WA / UA / macro-F1) and exported as a SavedModel.

Project folder (`run_search` / `ks-keras tune --project-dir`):

```
search.json            what is searched: tuner, space, base config, fold (checked on resume)
space.yaml             the space file used
keras_tuner/           KerasTuner's project: oracle.json, trial_<id>/trial.json (re-run resumes)
tensorboard/<trial>/   per-trial TensorBoard logs with HParams
summary.csv, summary.md  one row per trial: id, status, val UA, best epoch, values, error
best_config.yaml       the full resolved config of the best trial (`ks-keras evaluate/train`)
best_trial_<id>/       retraining of the best config (training.fit run folder, best.keras)
final.json             best trial, its val UA, test WA/UA/F1, the export path
```

Example:

```python
space = load_space("tuning/emodb_demo_space.yaml")
data = prepare_fold_data(cfg, fold=0)
result = run_search(cfg, space, data.train_ds, data.val_ds, "runs/tune/demo", trials=10)
final = finish_search(result, data)          # retrain, test, export
```
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf
import yaml

from ks_keras import compat
from ks_keras.config import Config, config_from_dict, save_config
from ks_keras.metrics import compute_metrics
from ks_keras.model import build_model
from ks_keras.training import (
    balanced_class_weights,
    compile_model,
    count_batches,
    fit,
    float32_copy,
    get_strategy,
    make_lr_schedule,
    setup_precision_and_seeds,
)

OBJECTIVE = "val_ua"
TUNERS = ("random", "bayesian", "hyperband")
HP_TYPES = ("choice", "int", "float", "boolean", "fixed")
SAMPLINGS = ("linear", "log", "reverse_log")
_HP_KEYS = {
    "choice": {"type", "values", "ordered", "when"},
    "int": {"type", "min", "max", "step", "sampling", "when"},
    "float": {"type", "min", "max", "step", "sampling", "when"},
    "boolean": {"type", "when"},
    "fixed": {"type", "value", "when"},
}
_SPACE_KEYS = {"hyperparameters", "evaluate_config_first", "description"}
# Only model.* and train.* are tunable: the datasets, features and folds are built once before
# the search, so a trial could not honour a data/features/eval change (it would be silently
# ignored). Within those sections, these are fixed by the data or are not hyperparameters.
TUNABLE_SECTIONS = ("model", "train")
FROZEN_FIELDS = {
    "model.modalities": "the datasets carry a fixed set of modalities",
    "model.audio_dim": "it is the width of the cached audio features",
    "model.text_dim": "it is the width of the cached text features",
    "model.num_classes": "it is the number of labels of the corpus",
    "train.strategy": "the distribution strategy is chosen once for the whole search",
    "train.output_dir": "it is a path, not a hyperparameter",
}
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
# Search space: YAML → checked `SearchSpace`.


@dataclass
class HyperParam:
    """One tunable config field.

    Attributes:
        name: dotted config field, e.g. `"model.n_ccab"` (also the KerasTuner name).
        type: `choice`, `int`, `float`, `boolean` or `fixed`.
        values: the choices (`choice`), already converted to the field's type.
        min, max, step, sampling: the range (`int`, `float`).
        value: the constant (`fixed`).
        ordered: whether KerasTuner may treat numeric choices as ordered.
        when: `{parent name: [allowed values]}`; the parameter is only active (and only set)
            when every parent takes one of its values. Parents are declared before it.
    """

    name: str
    type: str
    values: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"
    value: Any = None
    ordered: bool | None = None
    when: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def encoded(self) -> bool:
        """Choices KerasTuner cannot hold natively (lists, null, mixed types) are passed to it
        as JSON strings and decoded when applied."""
        if self.type != "choice":
            return False
        kinds = {type(v) for v in self.values}
        return len(kinds) != 1 or not kinds <= {int, float, str, bool}

    def kt_value(self, value: Any) -> Any:
        """`value` as KerasTuner stores it (JSON string for encoded choices)."""
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        """A KerasTuner value → the config value."""
        if value is None:
            return None
        if self.encoded:
            return json.loads(value)
        if self.type == "int":
            return int(value)
        if self.type == "float":
            # Stepped floats come back as 0.30000000000000004; keep configs readable.
            out = float(f"{float(value):.12g}")
            return min(max(out, self.min), self.max)
        if self.type == "boolean":
            return bool(value)
        if isinstance(value, np.generic):
            return value.item()
        return value

    def contains(self, value: Any) -> bool:
        """Whether a (decoded) value lies in this parameter's declared space."""
        if self.type == "choice":
            return value in self.values
        if self.type == "fixed":
            return value == self.value
        if self.type == "boolean":
            return isinstance(value, bool)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if self.type == "int" and int(value) != value:
            return False
        return self.min <= value <= self.max

    def describe(self) -> str:
        if self.type == "choice":
            text = "{" + ", ".join(json.dumps(v) for v in self.values) + "}"
        elif self.type in ("int", "float"):
            text = f"[{self.min:g}, {self.max:g}]"
            if self.step is not None:
                text += f" step {self.step:g}"
            if self.sampling != "linear":
                text += f" {self.sampling}"
        elif self.type == "fixed":
            text = f"= {json.dumps(self.value)}"
        else:
            text = "{true, false}"
        if self.when:
            cond = ", ".join(f"{k} in {v}" for k, v in self.when.items())
            text += f" when {cond}"
        return f"{self.name} {self.type} {text}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for key in ("values", "min", "max", "step", "value", "ordered"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.type in ("int", "float"):
            out["sampling"] = self.sampling
        if self.when:
            out["when"] = self.when
        return out


@dataclass
class SearchSpace:
    """The hyperparameters of a search, in declaration order (parents before children)."""

    params: list[HyperParam]
    evaluate_config_first: bool = True
    description: str = ""
    source: str = "<dict>"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def __getitem__(self, name: str) -> HyperParam:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluate_config_first": self.evaluate_config_first,
            "hyperparameters": {p.name: p.to_dict() for p in self.params},
        }


def _field_annotation(dotted: str) -> Any:
    """The type annotation of a dotted config field; ValueError naming valid keys."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        where = ".".join(parts[:i]) or "the config"
        if part not in hints:
            raise ValueError(
                f"unknown config field {dotted!r}: {where} has no key {part!r} "
                f"(valid keys: {', '.join(sorted(hints))})"
            )
        cls = hints[part]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise ValueError(
                f"{dotted!r} is a config section, not a field; name one of its keys "
                f"({', '.join(sorted(typing.get_type_hints(cls)))})"
            )
        if not dataclasses.is_dataclass(cls) and i < len(parts) - 1:
            raise ValueError(
                f"unknown config field {dotted!r}: {'.'.join(parts[: i + 1])} is not a section"
            )
    return cls


def _number(raw: Any, where: str, integer: bool = False) -> float | int:
    if isinstance(raw, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            raw = float(raw)
        except ValueError:
            pass
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError(
            f"{where}: expected {'an integer' if integer else 'a number'}, got {raw!r}"
        )
    if integer:
        if int(raw) != raw:
            raise ValueError(f"{where}: expected an integer, got {raw!r}")
        return int(raw)
    return float(raw)


def _parse_param(name: str, spec: Any, where: str, declared: dict[str, HyperParam]) -> HyperParam:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping with at least 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in HP_TYPES:
        raise ValueError(f"{where}.type: expected one of {', '.join(HP_TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - _HP_KEYS[kind])
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} for type {kind}; "
            f"allowed: {', '.join(sorted(_HP_KEYS[kind]))}"
        )
    param = HyperParam(name=name, type=kind)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.values: expected a non-empty list, got {values!r}")
        param.values = values
        ordered = spec.get("ordered")
        if ordered is not None and not isinstance(ordered, bool):
            raise ValueError(f"{where}.ordered: expected true/false, got {ordered!r}")
        param.ordered = ordered
    elif kind in ("int", "float"):
        integer = kind == "int"
        for key in ("min", "max"):
            if key not in spec:
                raise ValueError(f"{where}: type {kind} needs '{key}'")
        param.min = _number(spec["min"], f"{where}.min", integer)
        param.max = _number(spec["max"], f"{where}.max", integer)
        if param.min > param.max:
            raise ValueError(f"{where}: min {param.min} is greater than max {param.max}")
        sampling = spec.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"{where}.sampling: expected one of {', '.join(SAMPLINGS)}, got {sampling!r}"
            )
        param.sampling = sampling
        if sampling != "linear" and param.min <= 0:
            raise ValueError(f"{where}: {sampling} sampling needs min > 0, got {param.min}")
        if spec.get("step") is not None:
            param.step = _number(spec["step"], f"{where}.step", integer)
            if sampling == "linear" and param.step <= 0:
                raise ValueError(f"{where}.step: expected a step > 0, got {param.step}")
            if sampling != "linear" and param.step <= 1:
                raise ValueError(
                    f"{where}.step: with {sampling} sampling the step is a factor "
                    f"and must be > 1, got {param.step}"
                )
    elif kind == "fixed":
        if "value" not in spec:
            raise ValueError(f"{where}: type fixed needs 'value'")
        param.value = spec["value"]

    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ValueError(
            f"{where}.when: expected a mapping {{parent field: value or [values]}}, got {when!r}"
        )
    for parent, allowed in when.items():
        if parent not in declared:
            raise ValueError(
                f"{where}.when: {parent!r} is not a hyperparameter declared before {name!r} "
                f"(declared so far: {', '.join(declared) or 'none'})"
            )
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if not allowed:
            raise ValueError(f"{where}.when.{parent}: expected at least one value")
        param.when[parent] = allowed
    return param


def space_from_dict(data: Any, source: str = "<dict>") -> SearchSpace:
    """Parse a search space (the YAML's content); the structure is checked, not the config.

    Call `check_space(space, cfg)` to check the fields and ranges against a config.

    Raises:
        ValueError: naming `source` and the offending key.
    """
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: expected a mapping with a 'hyperparameters' key, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - _SPACE_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_SPACE_KEYS))}"
        )
    hps = data.get("hyperparameters")
    if not isinstance(hps, dict) or not hps:
        raise ValueError(
            f"{source}: 'hyperparameters' must be a non-empty mapping of dotted "
            "config fields (e.g. model.n_ccab) to their space"
        )
    first = data.get("evaluate_config_first", True)
    if not isinstance(first, bool):
        raise ValueError(f"{source}: evaluate_config_first: expected true/false, got {first!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{source}: description: expected a string, got {description!r}")
    declared: dict[str, HyperParam] = {}
    for name, spec in hps.items():
        if not isinstance(name, str):
            raise ValueError(
                f"{source}: hyperparameter names must be dotted config fields, got {name!r}"
            )
        declared[name] = _parse_param(name, spec, f"{source}: hyperparameters.{name}", declared)
    return SearchSpace(list(declared.values()), first, description, source)


def load_space(path: str | Path) -> SearchSpace:
    """Read a search-space YAML file (structure checked; see `check_space` for the config).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, or a malformed space (the message names file and key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return space_from_dict(data, str(path))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def _get_dotted(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A new validated config: `cfg` with the dotted fields in `values` replaced.

    Raises:
        ValueError: a value of the wrong type or a combination the config rejects.
    """
    data = cfg.to_dict()
    for name, value in values.items():
        _field_annotation(name)
        _set_dotted(data, name, value)
    return config_from_dict(data)


def _check_config(cfg: Config) -> None:
    """Checks a trial config must pass beyond `validate_config` (LR schedule arguments)."""
    make_lr_schedule(cfg.train, 1)


def check_space(space: SearchSpace, cfg: Config, tuner: str = "random") -> list[str]:
    """Check a space against a config: fields exist and are tunable, every declared value
    (each choice, each range end) gives a valid config, conditions name reachable values.

    Choice values are converted to the field's type in place (e.g. `1` → `1.0` for a float
    field).

    Returns:
        Notes for the user, e.g. a config value that lies outside the space (KerasTuner then
        uses the range's start as the default).

    Raises:
        ValueError: naming the space file, the hyperparameter and what was expected.
    """
    from ks_keras.config import _coerce

    try:
        _check_config(cfg)
    except ValueError as e:
        raise ValueError(f"the base config is not trainable: {e}") from None
    notes = []
    seen: set[str] = set()
    for p in space.params:
        where = f"{space.source}: hyperparameters.{p.name}"
        try:
            annotation = _field_annotation(p.name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        section = p.name.split(".")[0]
        if section not in TUNABLE_SECTIONS:
            raise ValueError(
                f"{where}: {section}.* fields cannot be tuned: the features, datasets and folds "
                "are built once before the search, so a trial could not honour the change. "
                f"Tune model.* or train.* fields; run separate searches for other {section} "
                "settings."
            )
        if p.name in FROZEN_FIELDS:
            raise ValueError(f"{where}: this field cannot be tuned: {FROZEN_FIELDS[p.name]}")
        if p.name == "train.epochs" and tuner == "hyperband":
            raise ValueError(
                f"{where}: Hyperband chooses the number of epochs itself (up to "
                "train.epochs); remove train.epochs from the space or use another "
                "tuner"
            )
        if p.name in seen:
            raise ValueError(f"{where}: declared twice")
        seen.add(p.name)
        if p.type == "choice":
            try:
                p.values = [_coerce(v, annotation, p.name) for v in p.values]
            except ValueError as e:
                raise ValueError(f"{where}.values: {e}") from None
            texts = [json.dumps(v, sort_keys=True) for v in p.values]
            if len(set(texts)) != len(texts):
                raise ValueError(f"{where}.values: expected distinct values, got {p.values}")
            candidates = list(p.values)
        elif p.type in ("int", "float"):
            candidates = [p.min, p.max]
        elif p.type == "boolean":
            candidates = [True, False]
        else:
            try:
                p.value = _coerce(p.value, annotation, p.name)
            except ValueError as e:
                raise ValueError(f"{where}.value: {e}") from None
            candidates = [p.value]
        for parent, allowed in p.when.items():
            parent_param = space[parent]
            try:
                allowed[:] = [_coerce(v, _field_annotation(parent), parent) for v in allowed]
            except ValueError as e:
                raise ValueError(f"{where}.when.{parent}: {e}") from None
            outside = [v for v in allowed if not parent_param.contains(v)]
            if outside:
                raise ValueError(
                    f"{where}.when.{parent}: value(s) {outside} are not in the "
                    f"space of {parent} ({parent_param.describe()})"
                )
        # The parameter only matters when its conditions hold: check it under them.
        context = {parent: allowed[0] for parent, allowed in p.when.items()}
        for value in candidates:
            try:
                trial_cfg = apply_values(cfg, {**context, p.name: value})
                _check_config(trial_cfg)
            except ValueError as e:
                raise ValueError(
                    f"{where}: the value {value!r} gives an invalid config ({e})"
                ) from None
        current = _get_dotted(cfg, p.name)
        active_at_config = all(
            _get_dotted(cfg, parent) in allowed for parent, allowed in p.when.items()
        )
        if active_at_config and not p.contains(current):
            notes.append(
                f"{p.name}: the config's value {current!r} lies outside the space "
                f"({p.describe()}); KerasTuner's default is used instead"
            )
    return notes


# ---------------------------------------------------------------------------------------------
# HyperModel.


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


# ---------------------------------------------------------------------------------------------
# Tuners: KerasTuner's own, reporting every finished trial (loudly when it failed).


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


# ---------------------------------------------------------------------------------------------
# After the search: retrain the best config, test it once, export it.


@dataclass
class FoldData:
    """The datasets of one fold, ready for `run_search` and `finish_search`.

    `train_ds` may be a function returning a fresh (identically shuffled) dataset.
    """

    train_ds: tf.data.Dataset | Callable[[], tf.data.Dataset]
    val_ds: tf.data.Dataset
    test_ds: tf.data.Dataset
    labels: list[str]
    feature_metadata: dict[str, dict]
    class_weight: dict[int, float] | None = None
    fold_info: dict | None = None
    # The training statistics under `features.audio.normalize: global` (sidecar + export).
    norm_stats: Any = None


@dataclass
class FinalResult:
    """The retrained best configuration and its test score."""

    trial_id: str
    val_ua: float | None
    test_metrics: dict[str, Any]
    run_dir: Path
    model_path: Path
    export_path: Path | None
    reused: bool = False


def _config_digest(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _predict(model: keras.Model, test_ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = [], []
    for batch in test_ds:
        inputs, labels = batch[0], batch[1]
        # A plain call, not predict_on_batch: under MirroredStrategy (Keras 3.15) that returns
        # every replica's outputs for the whole batch (twice the rows on 2 replicas).
        logits = model(inputs, training=False)
        truth.append(np.asarray(labels).reshape(-1))
        pred.append(np.argmax(np.asarray(logits), axis=-1))
    return np.concatenate(truth), np.concatenate(pred)


def finish_search(
    result: SearchResult,
    data: FoldData,
    *,
    export: bool = True,
    export_dir: str | Path | None = None,
    export_name: str | None = None,
    verify_export: bool = True,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> FinalResult:
    """Retrain the best trial's config (`training.fit`, best epoch on the validation
    speakers), score it once on the test speakers and export it as a SavedModel.

    Done once per best trial: a re-run with the same best trial reuses `final.json` (and the
    export) instead of training again; a killed retraining resumes from its backup.

    Args:
        result: the `run_search` result.
        data: the same fold's datasets, with the test speakers' `test_ds`.
        export: write the SavedModel (`export.export_model`).
        export_dir: the export root (default `export.base_dir`, i.e. `saved_models`).
        export_name: the model name (default `export.name`).
        verify_export: reload the export in a fresh process and compare (slow, thorough).

    Raises:
        ValueError: no trial completed.
    """
    from ks_keras.export import export_model, write_model_sidecar

    if result.best is None or result.best_config is None:
        raise ValueError(
            f"no trial of the search in {result.project_dir} completed, so there is "
            f"no best configuration; see {result.summary_md}"
        )
    best, cfg = result.best, result.best_config
    digest = _config_digest(cfg)
    final_path = result.project_dir / FINAL_FILE
    if final_path.is_file():
        old = json.loads(final_path.read_text())
        export_ok = (not export) or (old.get("export_path") and Path(old["export_path"]).is_dir())
        if (
            old.get("trial_id") == best.trial_id
            and old.get("config_digest") == digest
            and export_ok
            and Path(old.get("model_path", "")).is_file()
        ):
            log(
                f"best trial {best.trial_id} was already retrained and tested: "
                f"test UA {old['test']['ua']:.4f} (see {final_path})"
            )
            return FinalResult(
                best.trial_id,
                best.val_ua,
                old["test"],
                Path(old["run_dir"]),
                Path(old["model_path"]),
                Path(old["export_path"]) if old.get("export_path") else None,
                reused=True,
            )

    run_dir = result.project_dir / f"best_trial_{best.trial_id}"
    log(
        f"retraining the best config (trial {best.trial_id}) for {cfg.train.epochs} epoch(s) "
        f"in {run_dir} ..."
    )
    fitted = fit(
        lambda: build_model(cfg),
        materialize(data.train_ds, "train_ds"),
        data.val_ds,
        cfg,
        run_dir,
        class_weight=data.class_weight,
        monitor=OBJECTIVE,
        verbose=verbose,
        strategy=result.strategy,
    )
    # Saved, tested and exported as `ks-keras train` does: a float32 copy outside the strategy.
    model = float32_copy(lambda: build_model(cfg), fitted.model)
    y_true, y_pred = _predict(model, data.test_ds)
    metrics = compute_metrics(y_true, y_pred, cfg.model.num_classes)
    test = {k: float(metrics[k]) for k in ("wa", "ua", "macro_f1")}
    test["confusion"] = np.asarray(metrics["confusion"]).tolist()
    test["n"] = int(y_true.size)
    log(
        f"test speakers: WA {test['wa']:.4f} UA {test['ua']:.4f} macro-F1 "
        f"{test['macro_f1']:.4f} ({test['n']} utterances; retrained val UA "
        f"{fitted.best_value if fitted.best_value is not None else float('nan'):.4f})"
    )

    model_path = run_dir / "best.keras"
    model.save(model_path)
    write_model_sidecar(
        model_path, cfg, data.labels, data.feature_metadata, norm_stats=data.norm_stats
    )
    export_path = None
    if export:
        export_path = export_model(
            model,
            cfg,
            data.labels,
            data.feature_metadata,
            base_dir=export_dir,
            name=export_name,
            verify=verify_export,
            norm_stats=data.norm_stats,
        )
        log(f"exported SavedModel: {export_path}")
    record = {
        "trial_id": best.trial_id,
        "search_val_ua": best.val_ua,
        "values": best.values,
        "config_digest": digest,
        "retrained_val_ua": fitted.best_value,
        "retrained_best_epoch": None if fitted.best_epoch is None else fitted.best_epoch + 1,
        "test": test,
        "fold": result.fold_info,
        "labels": data.labels,
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "export_path": None if export_path is None else str(export_path),
    }
    (run_dir / "test_metrics.json").write_text(json.dumps(test, indent=1) + "\n")
    final_path.write_text(json.dumps(record, indent=1) + "\n")
    return FinalResult(best.trial_id, best.val_ua, test, run_dir, model_path, export_path)


# ---------------------------------------------------------------------------------------------
# Corpus → features → one fold's datasets, and the CLI.


def select_fold(corpus, cfg: Config, index: int = 0):
    """Fold `index` of `eval.folds` under the honest protocol (validation speakers held out).

    Fold 0 is the first fold `make_folds` produces (LOSO: the first speaker in sorted order;
    leave-one-session-out: the first session). The search sees only its training and
    validation speakers; its test speakers score the retrained best model once.
    """
    from ks_keras.folds import make_folds

    if cfg.eval.val_speakers < 1:
        raise ValueError(
            "eval.val_speakers: tuning needs at least 1 validation speaker (the "
            "objective is UA on held-out validation speakers), got 0"
        )
    folds = make_folds(
        corpus, replace(cfg.eval, protocol="honest", max_folds=None), seed=cfg.train.seed
    )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(folds):
        raise ValueError(
            f"--fold: expected an integer in [0, {len(folds)}) (the corpus has "
            f"{len(folds)} folds under eval.folds={cfg.eval.folds}), got {index!r}"
        )
    return folds[index]


def prepare_fold_data(
    cfg: Config, fold: int = 0, progress: bool = True, log: Callable[[str], None] = print
) -> FoldData:
    """Load the corpus, extract (or reuse) its features, and build one fold's datasets.

    Everything that can be checked cheaply (corpus, labels, fold, feature widths) is checked
    before features are extracted.
    """
    from ks_keras.corpora import load_corpus
    from ks_keras.data import bucketing, compute_norm_stats, make_dataset
    from ks_keras.features import check_model_dims
    from ks_keras.features.cache import extract_corpus
    from ks_keras.features.functionals import model_functionals

    corpus = load_corpus(cfg.data)
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}; set model.num_classes or data.labels"
        )
    chosen = select_fold(corpus, cfg, fold)
    check_model_dims(cfg)
    log(
        f"{corpus!r}; tuning on fold {chosen.index} ({chosen.name}): train "
        f"{len(chosen.train_ids)} ({', '.join(chosen.train_speakers)}), validation "
        f"{len(chosen.val_ids)} ({', '.join(chosen.val_speakers)}), test {len(chosen.test_ids)} "
        f"({', '.join(chosen.test_speakers)}, used once after the search)"
    )
    cache = extract_corpus(cfg, corpus, progress=progress)
    functionals = model_functionals(cfg, corpus, progress=progress)

    label_of = dict(zip(corpus.ids, corpus.label_ids().tolist(), strict=True))
    speaker_of = corpus.speaker_of()
    mode = cfg.features.audio.normalize
    normalizer = None
    if mode != "none" and "audio" in cfg.model.modalities:
        ids = (
            chosen.train_ids
            if mode == "global"
            else (chosen.train_ids + chosen.val_ids + chosen.test_ids)
        )
        normalizer = compute_norm_stats(cache, ids, mode, speaker_of=speaker_of)

    def dataset(ids: list[str], shuffle: bool) -> tf.data.Dataset:
        return make_dataset(
            cache,
            ids,
            [label_of[i] for i in ids],
            cfg.data,
            batch_size=cfg.train.batch_size,
            shuffle=shuffle,
            bucket_by_length=shuffle and bucketing(cfg),
            seed=cfg.train.seed,
            modalities=cfg.model.modalities,
            normalizer=normalizer,
            speaker_of=speaker_of,
            num_classes=cfg.model.num_classes,
            functionals=functionals,
        )

    class_weight = None
    if cfg.data.class_weights:
        class_weight = balanced_class_weights(
            [label_of[i] for i in chosen.train_ids], cfg.model.num_classes
        )
    extractors = cache.metadata.get("extractors", {})
    return FoldData(
        train_ds=lambda: dataset(chosen.train_ids, True),
        val_ds=dataset(chosen.val_ids, False),
        test_ds=dataset(chosen.test_ids, False),
        labels=list(corpus.labels),
        feature_metadata={m: extractors[m] for m in cfg.model.modalities if m in extractors},
        class_weight=class_weight,
        norm_stats=normalizer if mode == "global" else None,
        fold_info={
            "index": chosen.index,
            "name": chosen.name,
            "folds": cfg.eval.folds,
            "train_speakers": chosen.train_speakers,
            "val_speakers": chosen.val_speakers,
            "test_speakers": chosen.test_speakers,
            "n_train": len(chosen.train_ids),
            "n_val": len(chosen.val_ids),
            "n_test": len(chosen.test_ids),
        },
    )


def default_project_dir(cfg: Config, config_path: str | None, space_path: str, tuner: str) -> Path:
    """`<train.output_dir>/tune/<config>_<space>_<tuner>`."""
    config_name = Path(config_path).stem if config_path else "default"
    return Path(cfg.train.output_dir) / "tune" / f"{config_name}_{Path(space_path).stem}_{tuner}"


def run_tune(args) -> int:
    """`ks-keras tune --config C --space S --tuner random|bayesian|hyperband --trials N`."""
    from ks_keras.config import load_config

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    check_space(space, cfg, args.tuner)  # before any feature extraction
    _require_tensorboard()
    strategy = get_strategy(cfg.train)
    _check_strategy(strategy)
    project_dir = Path(
        args.project_dir or default_project_dir(cfg, args.config, args.space, args.tuner)
    )
    verbose = 0 if args.no_progress else "auto"
    data = prepare_fold_data(cfg, args.fold, progress=not args.no_progress)
    result = run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        project_dir,
        tuner=args.tuner,
        trials=args.trials,
        overwrite=args.overwrite,
        class_weight=data.class_weight,
        strategy=strategy,
        fold_info=data.fold_info,
        max_consecutive_failures=args.max_failures,
        verbose=verbose,
    )
    if result.best is None:
        print(
            f"ks-keras tune: error: no trial completed ({len(result.failed)} failed); see "
            f"{result.summary_md}",
            file=sys.stderr,
        )
        return 1
    print(f"best config: {result.best_config_path}")
    if args.no_retrain:
        return 0
    final = finish_search(
        result,
        data,
        export=not args.no_export,
        export_dir=args.export_dir,
        export_name=args.export_name,
        verify_export=not args.no_verify,
        verbose=verbose,
    )
    print(
        f"test speakers ({', '.join((result.fold_info or {}).get('test_speakers', []))}): "
        f"WA {final.test_metrics['wa']:.4f} UA {final.test_metrics['ua']:.4f} "
        f"macro-F1 {final.test_metrics['macro_f1']:.4f}"
    )
    if final.export_path is not None:
        print(f"SavedModel: {final.export_path}")
    return 0
