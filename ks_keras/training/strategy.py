"""Distribution strategy: `TF_CONFIG`, the strategy `train.strategy` asks for, worker roles."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from ks_keras import compat
from ks_keras.config import TrainConfig

# MultiWorkerMirroredStrategy can be created once per process (it configures collective ops),
# so repeated `fit` calls (folds, repeats) reuse it.
_MULTIWORKER: dict[str, tf.distribute.Strategy] = {}


# ---------------------------------------------------------------------------------------------
# Strategy


def parse_tf_config(raw: str | None = None) -> dict:
    """Parse and check `TF_CONFIG` (default: the environment variable).

    Returns:
        The parsed dict with `cluster` (job name → list of "host:port") and `task`
        (`type`, `index`).

    Raises:
        ValueError: TF_CONFIG unset, not JSON, or inconsistent (task not in the cluster).
    """
    raw = os.environ.get("TF_CONFIG") if raw is None else raw
    if not raw:
        raise ValueError(
            "train.strategy='multiworker' needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}); it is not set'
        )
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG: not valid JSON ({e})") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise ValueError(
            f"TF_CONFIG: expected a 'cluster' mapping with a non-empty 'worker' list, got {raw}"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"TF_CONFIG: cluster.{job} must be a list of 'host:port' strings")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(
            f"TF_CONFIG: expected task.type to be one of {sorted(cluster)}, got {task!r}"
        )
    index = task.get("index", 0)
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not (0 <= index < len(cluster[task["type"]]))
    ):
        raise ValueError(
            f"TF_CONFIG: task.index must be in [0, {len(cluster[task['type']])}) for "
            f"job {task['type']!r}, got {index!r}"
        )
    return tf_config


def get_strategy(train_cfg: TrainConfig) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` that `train.strategy` asks for.

    - `default`: the default (no-op) strategy, one device.
    - `auto`: `MirroredStrategy` over all GPUs when there is more than one, else `default`.
    - `mirrored`: `MirroredStrategy` over all logical GPUs, or over all logical CPU devices
      when there is no GPU (one CPU device unless logical devices were configured).
    - `multiworker`: `MultiWorkerMirroredStrategy` from `TF_CONFIG`, with the
      `ks_keras.compat` fixes for Keras' multi-worker `fit` installed. Call this before any
      other TensorFlow op in the process: the strategy configures collective ops.

    Raises:
        ValueError: the strategy is not available (e.g. `multiworker` without a valid
            TF_CONFIG), before anything is trained.
    """
    name = train_cfg.strategy
    if name == "multiworker":
        raw = os.environ.get("TF_CONFIG", "")
        parse_tf_config(raw)
        if raw not in _MULTIWORKER:
            if _MULTIWORKER:
                raise ValueError(
                    "TF_CONFIG changed after a MultiWorkerMirroredStrategy was created in this "
                    "process; a process can join only one cluster"
                )
            _MULTIWORKER[raw] = tf.distribute.MultiWorkerMirroredStrategy()
        strategy = _MULTIWORKER[raw]
        compat.apply_multiworker_patches(strategy)
        return strategy
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    raise ValueError(
        f"train.strategy: expected one of 'auto', 'default', 'mirrored', 'multiworker', "
        f"got {name!r}"
    )


def worker_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """`(is_chief, worker_index)`; `(True, 0)` for every single-worker strategy."""
    if not compat.is_multiworker_collective(strategy):
        return True, 0
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    jobs = resolver.cluster_spec().as_dict()
    if task_type == "chief":
        return True, 0
    is_chief = task_type == "worker" and task_id == 0 and "chief" not in jobs
    offset = 1 if "chief" in jobs else 0
    return is_chief, task_id + offset
