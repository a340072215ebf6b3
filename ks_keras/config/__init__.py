"""Configuration tree: plain dataclasses, YAML load/save and dotted overrides.

One tree (`Config`) with sections `model`, `features`, `data`, `train`, `eval`, `export`.
YAML files in `configs/` hold partial trees; anything not given keeps its default.
Unknown keys and values of the wrong type or outside their allowed set raise a
`ValueError` that names the dotted field.

Example:

```python
cfg = load_config("configs/paper.yaml", overrides=["model.n_ccab=2", "train.lr=1e-4"])
cfg.model.n_ccab  # 2
```
"""

# The package re-exports every name of the former `ks_keras/config.py`; the code lives in:
# schema.py (the dataclasses, padding_invariant, input_norm_placement), validation.py
# (validate_config, check_functionals), loading.py (from_dict, overrides, YAML load/save).
from ks_keras.config.loading import _coerce as _coerce
from ks_keras.config.loading import _deep_copy as _deep_copy
from ks_keras.config.loading import _parse_scalar as _parse_scalar
from ks_keras.config.loading import _type_name as _type_name
from ks_keras.config.loading import (
    apply_overrides,
    config_from_dict,
    from_dict,
    load_config,
    save_config,
)
from ks_keras.config.schema import (
    MODALITIES,
    AudioFeatureConfig,
    AugmentConfig,
    BaselineConfig,
    Config,
    DataConfig,
    EvalConfig,
    ExportConfig,
    FeaturesConfig,
    ModelConfig,
    TextFeatureConfig,
    TrainConfig,
    input_norm_placement,
    padding_invariant,
)
from ks_keras.config.validation import FUNCTIONALS, check_functionals, validate_config
from ks_keras.config.validation import _check as _check

__all__ = [
    "FUNCTIONALS",
    "MODALITIES",
    "AudioFeatureConfig",
    "AugmentConfig",
    "BaselineConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "FeaturesConfig",
    "ModelConfig",
    "TextFeatureConfig",
    "TrainConfig",
    "apply_overrides",
    "check_functionals",
    "config_from_dict",
    "from_dict",
    "input_norm_placement",
    "load_config",
    "padding_invariant",
    "save_config",
    "validate_config",
]
