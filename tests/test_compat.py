"""The multi-worker Keras patches: when they apply, what they change, and that they undo.

The end-to-end proof (two worker processes training over loopback) is in
tests/test_distribute.py; these tests pin the pieces without starting a cluster.
"""

import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer
from tensorflow.python.distribute import values as distribute_values

from ks_keras import compat


@pytest.fixture
def pretend_multiworker(monkeypatch):
    """Make every strategy look like the collective multi-worker one; undo patches after."""
    monkeypatch.setattr(compat, "is_multiworker_collective", lambda strategy: True)
    yield
    compat.remove_multiworker_patches()


class FakeCollectiveStrategy:
    """Records reductions; local results are the PerReplica's components."""

    def __init__(self):
        self.calls = []

    def reduce(self, op, value, axis):
        self.calls.append((op, axis))
        return value

    def experimental_local_results(self, value):
        return value.values


def test_not_applied_for_single_worker_strategies():
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(["/cpu:0"])):
        assert compat.apply_multiworker_patches(strategy) is False
    assert not compat.multiworker_patches_applied()
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is original_build
    assert tf_trainer.reduce_per_replica is original_reduce


def test_apply_is_idempotent_and_remove_restores_originals(pretend_multiworker):
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    assert compat.apply_multiworker_patches(object()) is True
    patched_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    assert patched_build is not original_build
    assert tf_trainer.reduce_per_replica is not original_reduce
    assert compat.apply_multiworker_patches(object()) is True  # second call: no double wrap
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is patched_build
    compat.remove_multiworker_patches()
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is original_build
    assert tf_trainer.reduce_per_replica is original_reduce
    compat.remove_multiworker_patches()  # no-op


def test_reduce_uses_axis_none_for_multiworker_mean(pretend_multiworker):
    # keras#20329: scalar metric results must be averaged across replicas, not over axis 0.
    compat.apply_multiworker_patches(object())
    strategy = FakeCollectiveStrategy()
    logs = {"loss": tf.constant(1.5), "ua": tf.constant(0.25)}
    out = tf_trainer.reduce_per_replica(logs, strategy, reduction="auto")
    assert strategy.calls == [("MEAN", None), ("MEAN", None)]
    assert float(out["loss"]) == 1.5 and float(out["ua"]) == 0.25


def test_patched_functions_delegate_for_other_strategies():
    # With the patch installed, a non-collective strategy still takes Keras' own code path.
    compat._ORIGINALS["reduce_per_replica"] = tf_trainer.reduce_per_replica
    try:
        value = tf.constant([1.0, 3.0])
        out = compat._patched_reduce_per_replica(value, tf.distribute.get_strategy(), "auto")
        np.testing.assert_allclose(out, [1.0, 3.0])
    finally:
        compat._ORIGINALS.clear()


def test_first_local_replica_batch_keeps_per_replica_shapes():
    # keras#20585: the model is built from this worker's first replica batch.
    a0, a1 = tf.zeros((4, 7, 3)), tf.ones((4, 7, 3))
    m0, m1 = tf.zeros((4, 7), tf.int32), tf.ones((4, 7), tf.int32)
    batch = (
        {
            "audio": distribute_values.PerReplica((a0, a1)),
            "audio_mask": distribute_values.PerReplica((m0, m1)),
        },
        distribute_values.PerReplica((tf.zeros((4,), tf.int32), tf.ones((4,), tf.int32))),
    )
    inputs, labels = compat.first_local_replica_batch(batch, FakeCollectiveStrategy())
    assert inputs["audio"] is a0 and inputs["audio_mask"] is m0
    assert inputs["audio_mask"].dtype == tf.int32 and tuple(labels.shape) == (4,)
    plain = {"x": tf.zeros((2,))}
    assert compat.first_local_replica_batch(plain, FakeCollectiveStrategy())["x"] is plain["x"]


def test_upstream_issues_are_named():
    assert any("20585" in url for url in compat.UPSTREAM_ISSUES)
    assert any("20329" in url for url in compat.UPSTREAM_ISSUES)
    assert "20585" in compat.__doc__ and "20329" in compat.__doc__
