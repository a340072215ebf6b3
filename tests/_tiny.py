"""The one tiny KS-T config of the test suite (width 16, 2 heads, one layer per stage, log-mel
with 16 bands, 3 classes), built from overrides merged section by section:

    tiny_config(model={"n_ccab": 0}, train={"epochs": 1})
    tiny_config(EXPORT_BASE, model={"functionals_dim": 88})   # a file's own base, then more

Nested mappings merge (`features={"audio": {"normalize": "speaker"}}` keeps `n_mels`); any
other value (lists included) replaces. Tests get it as the `tiny_config` fixture
(conftest.py) or import it (`from _tiny import tiny_config`), e.g. in helper scripts.
"""

from __future__ import annotations

import copy
from typing import Any

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
