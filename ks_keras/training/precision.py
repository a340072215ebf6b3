"""Dtype policy (`train.mixed_precision`), random seeds and op determinism."""

from __future__ import annotations

import keras
import tensorflow as tf

from ks_keras.config import TrainConfig

# ---------------------------------------------------------------------------------------------
# Precision and seeds


def resolve_precision_policy(mixed_precision: str) -> str:
    """Keras dtype policy name for `train.mixed_precision`.

    `auto` picks `mixed_float16` when a GPU is visible (tensor cores, loss scaling handled by
    Keras) and `mixed_bfloat16` on CPU (no loss scaling needed; fast on CPUs with bf16
    instructions, correct but possibly slower elsewhere). `none` is `float32`.
    """
    if mixed_precision == "none":
        return "float32"
    if mixed_precision == "auto":
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
        return "mixed_float16" if has_gpu else "mixed_bfloat16"
    if mixed_precision in ("mixed_float16", "mixed_bfloat16"):
        return mixed_precision
    raise ValueError(
        "train.mixed_precision: expected one of 'none', 'auto', 'mixed_float16', "
        f"'mixed_bfloat16', got {mixed_precision!r}"
    )


def setup_precision_and_seeds(train_cfg: TrainConfig) -> str:
    """Set the global Keras dtype policy, all random seeds, and op determinism.

    Seeds Python, NumPy and TensorFlow with `train.seed` (`keras.utils.set_random_seed`);
    `train.deterministic` switches TensorFlow op determinism on (or back off). The dtype
    policy is process-global: models built afterwards use it (`fit` restores the previous
    policy when it returns).

    Returns:
        The dtype policy name now in effect.
    """
    policy = resolve_precision_policy(train_cfg.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config as tf_framework_config

        disable = getattr(tf_framework_config, "disable_op_determinism", None)
        if disable is not None:
            disable()
    return policy
