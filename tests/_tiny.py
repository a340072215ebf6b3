"""The one tiny KS-T config of the test suite (width 16, 2 heads, one layer per stage, log-mel
with 16 bands, 3 classes), built from overrides merged section by section:

    tiny_config(model={"n_ccab": 0}, train={"epochs": 1})
    tiny_config(EXPORT_BASE, model={"functionals_dim": 88})   # a file's own base, then more

Nested mappings merge (`features={"audio": {"normalize": "speaker"}}` keeps `n_mels`); any
other value (lists included) replaces. Tests get it as the `tiny_config` fixture
(conftest.py) or import it (`from _tiny import tiny_config`), e.g. in helper scripts.

Model tests (no features, no corpus) use `model_overrides(MODEL_TESTS, n_ccab=0)`: the same
model section as `a.b=value` overrides, which also apply on top of a shipped preset
(`load_config("configs/official_code.yaml", model_overrides(...))`), and `random_batch` for
inputs with masks.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

TINY: dict[str, Any] = {
    "model": {
        "audio_dim": 16,
        "text_dim": 8,
        "num_heads": 2,
        "audio_ffn_dim": 16,
        "text_ffn_dim": 16,
        "n_fem": 1,
        "n_ccab": 1,
        "n_dfm": 1,
        "head_units": [16],
        "num_classes": 3,
    },
    "features": {"audio": {"type": "logmel", "n_mels": 16}},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `overrides` merged in (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config_dict(*bases: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """`TINY` with each of `bases`, then `sections`, merged in (see the module docstring)."""
    out = TINY
    for layer in (*bases, sections):
        out = merged(out, layer)
    return out


def tiny_config(*bases: dict[str, Any], **sections: Any):
    """The validated `Config` of `tiny_config_dict(*bases, **sections)`."""
    from ks_keras.config import config_from_dict

    return config_from_dict(tiny_config_dict(*bases, **sections))


# The model tests' variant: text wider than audio (24 vs 16), FFN 8, head 8, no dropout.
MODEL_TESTS: dict[str, Any] = {
    "model": {
        "audio_dim": 16,
        "text_dim": 24,
        "audio_ffn_dim": 8,
        "text_ffn_dim": 8,
        "head_units": [8],
        "dropout": 0.0,
    }
}


def model_overrides(*bases: dict[str, Any], **model: Any) -> list[str]:
    """The model section of `tiny_config_dict(*bases, model=model)` as `model.key=value`
    overrides (for `config_from_dict({}, ...)` / `load_config(path, ...)`)."""
    section = tiny_config_dict(*bases, model=model)["model"]
    return [f"model.{key}={json.dumps(value)}" for key, value in section.items()]


def random_batch(b, ta, tt, *, da=16, dt=24, lengths=None, seed=0) -> dict[str, np.ndarray]:
    """Random `audio [b, ta, da]` / `text [b, tt, dt]` inputs with int32 masks; `lengths`
    `(audio lengths, text lengths)`, drawn in [1, T] when None."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = (rng.integers(1, ta + 1, size=b), rng.integers(1, tt + 1, size=b))
    a_len, t_len = (np.asarray(n) for n in lengths)
    return {
        "audio": rng.normal(size=(b, ta, da)).astype("float32"),
        "audio_mask": (np.arange(ta)[None] < a_len[:, None]).astype("int32"),
        "text": rng.normal(size=(b, tt, dt)).astype("float32"),
        "text_mask": (np.arange(tt)[None] < t_len[:, None]).astype("int32"),
    }
