"""Learning-rate schedules, optimizers (`FusedAdam`), class weights and `compile_model`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from keras import ops

from ks_keras.config import TrainConfig
from ks_keras.data import class_weights
from ks_keras.metrics import UnweightedAverageRecall

# ---------------------------------------------------------------------------------------------
# Learning rate and optimizer


@keras.saving.register_keras_serializable(package="ks_keras")
class EpochLRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate as a function of the optimizer step, defined in epochs.

    - `constant`: `base_lr`.
    - `step`: `base_lr * step_factor ** floor(epoch / step_epochs)` (paper: halve every 30).
    - `cosine`: from `base_lr` down to `base_lr * final_ratio` along a half cosine, per step,
      reaching the floor at the end of training (`epochs`).
    - `warmup_epochs > 0`: a linear ramp `base_lr * (step + 1) / warmup_steps` first; the main
      schedule then starts (its epoch 0 is the first epoch after warm-up).

    Args:
        base_lr: peak learning rate.
        steps_per_epoch: optimizer steps per epoch (global batches).
        kind: `"constant"`, `"step"` or `"cosine"`.
        epochs: total epochs including warm-up (cosine horizon).
        step_epochs, step_factor: the `step` schedule.
        final_ratio: the cosine floor as a fraction of `base_lr`.
        warmup_epochs: epochs of linear warm-up.
    """

    def __init__(
        self,
        base_lr: float,
        steps_per_epoch: int,
        kind: str = "constant",
        epochs: int = 1,
        step_epochs: int = 30,
        step_factor: float = 0.5,
        final_ratio: float = 1e-3,
        warmup_epochs: int = 0,
    ):
        if kind not in ("constant", "step", "cosine"):
            raise ValueError(f"kind: expected 'constant', 'step' or 'cosine', got {kind!r}")
        if (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, int)
            or (steps_per_epoch < 1)
        ):
            raise ValueError(f"steps_per_epoch: expected an integer >= 1, got {steps_per_epoch!r}")
        self.base_lr = float(base_lr)
        self.steps_per_epoch = steps_per_epoch
        self.kind = kind
        self.epochs = int(epochs)
        self.step_epochs = int(step_epochs)
        self.step_factor = float(step_factor)
        self.final_ratio = float(final_ratio)
        self.warmup_epochs = int(warmup_epochs)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        per_epoch = float(self.steps_per_epoch)
        warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
        after = ops.maximum(step - warmup_steps, 0.0)
        if self.kind == "step":
            epoch = ops.floor(after / per_epoch)
            factor = ops.power(self.step_factor, ops.floor(epoch / float(self.step_epochs)))
        elif self.kind == "cosine":
            total = max(float((self.epochs - self.warmup_epochs) * self.steps_per_epoch), 1.0)
            progress = ops.minimum(after / total, 1.0)
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            factor = self.final_ratio + (1.0 - self.final_ratio) * cosine
        else:
            factor = ops.ones_like(step)
        if warmup_steps > 0:
            factor = ops.where(step < warmup_steps, (step + 1.0) / warmup_steps, factor)
        return self.base_lr * factor

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "kind": self.kind,
            "epochs": self.epochs,
            "step_epochs": self.step_epochs,
            "step_factor": self.step_factor,
            "final_ratio": self.final_ratio,
            "warmup_epochs": self.warmup_epochs,
        }


def make_lr_schedule(train_cfg: TrainConfig, steps_per_epoch: int) -> EpochLRSchedule:
    """The learning-rate schedule of `train` (`schedule`, `lr`, warm-up) for a run.

    Args:
        train_cfg: the `train` config section.
        steps_per_epoch: optimizer steps per epoch (number of global batches).

    Example:

    >>> s = make_lr_schedule(TrainConfig(lr=1e-3, schedule="step", step_epochs=30), 10)
    >>> float(s(299)), float(s(300))  # epoch 29, epoch 30
    (0.001, 0.0005)
    """
    if train_cfg.warmup_epochs >= train_cfg.epochs:
        raise ValueError(
            f"train.warmup_epochs: expected fewer than train.epochs={train_cfg.epochs}, "
            f"got {train_cfg.warmup_epochs}"
        )
    return EpochLRSchedule(
        base_lr=train_cfg.lr,
        steps_per_epoch=steps_per_epoch,
        kind=train_cfg.schedule,
        epochs=train_cfg.epochs,
        step_epochs=train_cfg.step_epochs,
        step_factor=train_cfg.step_factor,
        final_ratio=train_cfg.cosine_final_ratio,
        warmup_epochs=train_cfg.warmup_epochs,
    )


@keras.saving.register_keras_serializable(package="ks_keras")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose dense float32 update runs TensorFlow's fused Adam kernel.

    Keras' Adam updates each variable with about a dozen element-wise ops, each a pass over
    the variable and its two moments; TensorFlow's `ResourceApplyAdam` kernel does it in one.
    Measured effect: docs/performance.md ("fused Adam"). The update rule is the same (Keras' Adam is the kernel's
    "epsilon hat" form), and so are the options, the optimizer variables and the saved
    state: a checkpoint written with either loads into the other. AMSGrad, sparse gradients
    (`IndexedSlices`) and non-float32 variables take Keras' own update.

    Args:
        **kwargs: everything `keras.optimizers.Adam` accepts.
    """

    def update_step(self, gradient, variable, learning_rate):
        if (
            self.amsgrad
            or keras.backend.backend() != "tensorflow"
            or isinstance(gradient, tf.IndexedSlices)
            or variable.dtype != "float32"
        ):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        local_step = ops.cast(self.iterations + 1, "float32")

        def handle(var):
            # Inside `strategy.extended.update` a distributed variable's `handle` is this
            # replica's copy.
            return (var.value if isinstance(var, keras.Variable) else var).handle

        tf.raw_ops.ResourceApplyAdam(
            var=handle(variable),
            m=handle(m),
            v=handle(v),
            beta1_power=ops.power(ops.cast(self.beta_1, "float32"), local_step),
            beta2_power=ops.power(ops.cast(self.beta_2, "float32"), local_step),
            lr=ops.cast(learning_rate, "float32"),
            beta1=ops.cast(self.beta_1, "float32"),
            beta2=ops.cast(self.beta_2, "float32"),
            epsilon=ops.cast(self.epsilon, "float32"),
            grad=ops.cast(gradient, "float32"),
        )


def make_optimizer(train_cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (paper; `FusedAdam`) or SGD with momentum (authors' code) on `make_lr_schedule`.

    `train.weight_decay` is decoupled weight decay (Keras' `weight_decay`, as AdamW), not
    an L2 term in the loss; biases and LayerNorm scales/offsets are not decayed.
    """
    if not train_cfg.weight_decay >= 0:
        raise ValueError(
            f"train.weight_decay: expected a number >= 0, got {train_cfg.weight_decay}"
        )
    schedule = make_lr_schedule(train_cfg, steps_per_epoch)
    weight_decay = train_cfg.weight_decay or None
    if train_cfg.optimizer == "adam":
        optimizer = FusedAdam(learning_rate=schedule, weight_decay=weight_decay)
    elif train_cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=train_cfg.momentum, weight_decay=weight_decay
        )
    else:
        raise ValueError(f"train.optimizer: expected 'adam' or 'sgd', got {train_cfg.optimizer!r}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def float32_copy(model_builder: Callable[[], keras.Model], trained: keras.Model) -> keras.Model:
    """A float32 copy of `trained` built outside any distribution strategy.

    What `ks-keras train` and the tuner's retrain save and export: no optimizer state, no
    mixed-precision casts, no collective ops when predicting. `model_builder` builds the same
    architecture (e.g. `lambda: build_model(cfg)`); the global dtype policy is restored after.
    """
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        plain = model_builder()
        plain.set_weights(trained.get_weights())
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return plain


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> dict[int, float]:
    """`{class: n / (C * count)}` (scikit-learn's "balanced"); absent classes get 1.0.

    The dict form of `data.class_weights` (one rule for every caller).
    """
    weights = class_weights(labels, n_classes)
    return {c: float(w) for c, w in enumerate(weights)}


# ---------------------------------------------------------------------------------------------
# Compile


def compile_model(
    model: keras.Model, train_cfg: TrainConfig, steps_per_epoch: int, n_classes: int
) -> keras.Model:
    """Compile for training: optimizer + schedule, cross-entropy on logits, WA and UA.

    Call inside `strategy.scope()` under a distribution strategy. Metrics are named
    `accuracy` (WA) and `ua`, so Keras logs `loss, accuracy, ua, val_loss, val_accuracy,
    val_ua`.

    Returns:
        The same model, compiled.
    """
    width = model.outputs[0].shape[-1]
    if width != n_classes:
        raise ValueError(
            f"model output has {width} logits but n_classes={n_classes}; "
            "set model.num_classes to the number of labels"
        )
    if train_cfg.mixup_alpha > 0:
        from ks_keras.mixup import DominantLabelAccuracy, MixupCrossentropy

        loss, accuracy = MixupCrossentropy(), DominantLabelAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(
        optimizer=make_optimizer(train_cfg, steps_per_epoch),
        loss=loss,
        metrics=[accuracy, UnweightedAverageRecall(n_classes, name="ua")],
        jit_compile=bool(train_cfg.jit_compile),
    )
    return model
