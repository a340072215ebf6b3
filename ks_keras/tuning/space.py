"""Search space: YAML → checked `SearchSpace` (and the dotted-config helpers)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ks_keras.config import Config, config_from_dict
from ks_keras.training import make_lr_schedule

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
    from ks_keras.config.loading import _coerce

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
