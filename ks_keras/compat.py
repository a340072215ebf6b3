"""Work-arounds for upstream Keras bugs that block `model.fit` under MultiWorkerMirroredStrategy.

Keras 3 (checked on 3.15.1 with TensorFlow 2.21) cannot run `model.fit` with the collective
multi-worker strategy; both failures are tracked upstream and still open:

- keras-team/keras#20585 — `TensorFlowTrainer._maybe_symbolic_build` mean-reduces the first
  distributed batch across *all* replicas (`strategy.reduce("MEAN", batch, axis=None)`) only
  to learn its shapes and dtypes. Under the collective strategy this fails for any input
  ("unsupported type PerReplica/dict to a Tensor"). The fix builds from this worker's own
  first local replica batch, which has the same per-replica shapes and dtypes.
- keras-team/keras#20329 — `reduce_per_replica(..., reduction="mean")` calls
  `strategy.reduce("MEAN", v, axis=0)` on every step output in multi-worker mode; the outputs
  are scalar metric results, so the reduction fails ("Invalid reduction dimension 0 for input
  with 0 dimensions"). The fix reduces across replicas only (`axis=None`), which is what a
  mean of per-replica scalars means.

`apply_multiworker_patches(strategy)` installs both fixes, but only when `strategy` is a
`MultiWorkerMirroredStrategy` actually running in multi-worker mode; the patched functions
delegate to the original Keras code for every other strategy, so installing them cannot change
single-worker behaviour. The patch is idempotent and `remove_multiworker_patches()` undoes it.
Delete this module once the upstream issues are fixed in the pinned Keras version.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as _tf_trainer

UPSTREAM_ISSUES = (
    "https://github.com/keras-team/keras/issues/20585",
    "https://github.com/keras-team/keras/issues/20329",
)

_ORIGINALS: dict[str, object] = {}


def is_multiworker_collective(strategy) -> bool:
    """True when `strategy` is a MultiWorkerMirroredStrategy with more than one worker."""
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def first_local_replica_batch(batch, strategy):
    """Replace every distributed leaf of `batch` by this worker's first replica's value.

    Used instead of a cross-worker mean to learn the input signature (keras#20585): the
    local value has exactly the per-replica shape and dtype that the model will see.
    """

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tree.map_structure(first, batch)


def _patched_maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self._distribute_strategy
    if strategy is None or not is_multiworker_collective(strategy) or iterator is None:
        return _ORIGINALS["_maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)
    for _, _, it in iterator:
        data_batch = first_local_replica_batch(next(it), strategy)
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _patched_reduce_per_replica(values, strategy, reduction):
    original = _ORIGINALS["reduce_per_replica"]
    if not is_multiworker_collective(strategy) or reduction not in ("auto", "mean"):
        return original(values, strategy, reduction)

    # keras#20329: mean over replicas (axis=None), not over axis 0 of scalar results.
    def reduce_mean(value):
        return strategy.reduce("MEAN", value, axis=None)

    return tree.map_structure(reduce_mean, values)


def multiworker_patches_applied() -> bool:
    return bool(_ORIGINALS)


def apply_multiworker_patches(strategy) -> bool:
    """Install the keras#20585 / keras#20329 fixes if `strategy` needs them.

    Args:
        strategy: the `tf.distribute.Strategy` that `model.fit` will run under.

    Returns:
        True when the patches are (now or already) installed, False when `strategy` is not the
        collective multi-worker strategy and nothing was changed.
    """
    if not is_multiworker_collective(strategy):
        return False
    if _ORIGINALS:
        return True
    trainer_cls = _tf_trainer.TensorFlowTrainer
    if not hasattr(trainer_cls, "_maybe_symbolic_build") or not hasattr(
        _tf_trainer, "reduce_per_replica"
    ):
        raise RuntimeError(
            "this Keras version no longer has the functions ks_keras.compat patches for "
            f"multi-worker training ({', '.join(UPSTREAM_ISSUES)}); check whether the upstream "
            "issues are fixed and update ks_keras/compat.py"
        )
    _ORIGINALS["_maybe_symbolic_build"] = trainer_cls._maybe_symbolic_build
    _ORIGINALS["reduce_per_replica"] = _tf_trainer.reduce_per_replica
    trainer_cls._maybe_symbolic_build = _patched_maybe_symbolic_build
    # Looked up as a module global at call time by the train/test step functions.
    _tf_trainer.reduce_per_replica = _patched_reduce_per_replica
    return True


def remove_multiworker_patches() -> None:
    """Restore the original Keras functions (no-op when the patches are not installed)."""
    if not _ORIGINALS:
        return
    _tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINALS.pop("_maybe_symbolic_build")
    _tf_trainer.reduce_per_replica = _ORIGINALS.pop("reduce_per_replica")
