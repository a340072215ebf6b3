"""Helpers for the training tests: a tiny config, synthetic data, and a subprocess runner.

Run as a script, it trains the tiny model on synthetic data in a fresh process, which the
tests need for things that must happen before TensorFlow initialises (logical CPU devices,
multi-worker collectives) or that kill the process (resume):

    python tests/_training_support.py --run-dir DIR [--epochs N] [--strategy S]
        [--logical-cpus K] [--kill-at-epoch E] [--tear-backup-at-epoch E]

It prints one line `RESULT <json>` with the fit result summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

N_CLASSES = 3
AUDIO_DIM = 8
TEXT_DIM = 6


def tiny_config(**train):
    """The suite's tiny config (tests/_tiny.py) at this file's widths, for 2-epoch runs."""
    from _tiny import tiny_config as shared_tiny_config

    return shared_tiny_config(
        model={
            "audio_dim": AUDIO_DIM,
            "text_dim": TEXT_DIM,
            "audio_d_model": 16,
            "text_d_model": 16,
            "head_units": [8],
            "num_classes": N_CLASSES,
        },
        features={"audio": {"n_mels": AUDIO_DIM}},
        train={"epochs": 2, "batch_size": 8, "schedule": "constant", "lr": 3e-3, **train},
    )


def pooled_mlp(cfg):
    """A fast stand-in for the KS-T with the same dict inputs, masks and logits output.

    Tracing the KS-T train step costs 15-30 s per process on 2 shared cores; tests of the
    training machinery (strategies, resume, determinism) use this model unless they are
    about the KS-T itself. Includes dropout so seeding matters.
    """
    import keras

    from ks_keras.layers import MaskedMeanPooling
    from ks_keras.model import model_inputs

    inputs = model_inputs(cfg.model)
    pooled = [
        MaskedMeanPooling(name=f"{m}_pool")(inputs[m], padding_mask=inputs[f"{m}_mask"])
        for m in cfg.model.modalities
    ]
    x = keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0]
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    logits = keras.layers.Dense(cfg.model.num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits)


def make_builder(name: str, cfg):
    from ks_keras.model import build_model

    if name == "kst":
        return lambda: build_model(cfg)
    if name == "mlp":
        return lambda: pooled_mlp(cfg)
    raise ValueError(f"--model: expected kst or mlp, got {name!r}")


def synthetic_arrays(n: int = 32, seed: int = 0, ta: int = 12, tt: int = 5):
    """Learnable toy data: the class shifts the audio and text features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    rng.shuffle(labels)
    audio = rng.normal(size=(n, ta, AUDIO_DIM)).astype("float32")
    text = rng.normal(size=(n, tt, TEXT_DIM)).astype("float32")
    audio += labels[:, None, None].astype("float32")
    text -= labels[:, None, None].astype("float32")
    audio_len = rng.integers(ta // 2, ta + 1, size=n)
    text_len = rng.integers(2, tt + 1, size=n)
    audio_mask = (np.arange(ta)[None] < audio_len[:, None]).astype("int32")
    text_mask = (np.arange(tt)[None] < text_len[:, None]).astype("int32")
    audio *= audio_mask[..., None]
    text *= text_mask[..., None]
    inputs = {"audio": audio, "audio_mask": audio_mask, "text": text, "text_mask": text_mask}
    return inputs, labels.astype("int32")


def synthetic_dataset(n: int = 32, batch_size: int = 8, seed: int = 0, shuffle: bool = True):
    import tensorflow as tf

    inputs, labels = synthetic_arrays(n, seed)
    ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--kill-at-epoch", type=int, default=-1)
    # Die while the backup at the end of epoch E is being written, leaving that file torn
    # (what Ctrl-C during the write did to Keras' in-place backup).
    parser.add_argument("--tear-backup-at-epoch", type=int, default=-1)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--model", default="mlp", choices=["mlp", "kst"])
    args = parser.parse_args(argv)

    import tensorflow as tf

    if args.logical_cpus:
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )

    import keras
    import numpy as np

    from ks_keras.training import fit, get_strategy

    cfg = tiny_config(epochs=args.epochs, strategy=args.strategy)
    # The strategy comes first: multi-worker collectives must be set up before other ops.
    strategy = get_strategy(cfg.train)

    class KillAt(keras.callbacks.Callback):
        """Simulate a crash in the middle of an epoch: no cleanup, no callbacks."""

        def on_train_batch_end(self, batch, logs=None):
            if self._epoch == args.kill_at_epoch and batch == 1:
                sys.stdout.flush()
                os._exit(17)

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    class IterationsAtEnd(keras.callbacks.Callback):
        """Optimizer steps when training ends (before `fit` restores the best epoch)."""

        value = None

        def on_train_end(self, logs=None):
            IterationsAtEnd.value = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    extra = [IterationsAtEnd()] + ([KillAt()] if args.kill_at_epoch >= 0 else [])
    if args.tear_backup_at_epoch >= 0:
        from pathlib import Path

        epoch_now = {}

        class TrackEpoch(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                epoch_now["epoch"] = epoch

        save_weights = keras.Model.save_weights

        def tearing_save_weights(self, filepath, *a, **kw):
            save_weights(self, filepath, *a, **kw)
            path = Path(filepath)
            if "backup" in path.parts and epoch_now.get("epoch") == args.tear_backup_at_epoch:
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 4])  # the process dies mid-write
                sys.stdout.flush()
                os._exit(17)

        keras.Model.save_weights = tearing_save_weights
        extra.append(TrackEpoch())
    train_ds = synthetic_dataset(args.n, cfg.train.batch_size, seed=0)
    val_ds = synthetic_dataset(16, cfg.train.batch_size, seed=1, shuffle=False)
    result = fit(
        make_builder(args.model, cfg),
        train_ds,
        val_ds,
        cfg,
        args.run_dir,
        callbacks_extra=extra,
        verbose=0,
        strategy=strategy,
    )
    weights_sum = float(sum(np.abs(w).sum() for w in result.model.get_weights()))
    summary = {
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "initial_epoch": result.initial_epoch,
        "epochs_run": result.epochs_run,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_value": result.best_value,
        "weights_sum": weights_sum,
        "iterations_at_end": IterationsAtEnd.value,
    }
    if args.logical_cpus:
        # UA of the distributed Keras metric vs scikit-learn on the same predictions.
        from sklearn.metrics import balanced_accuracy_score

        eval_logs = result.model.evaluate(val_ds, verbose=0, return_dict=True)
        inputs, labels = synthetic_arrays(16, 1)
        pred = result.model.predict(val_ds, verbose=0).argmax(-1)
        summary["eval_ua"] = float(eval_logs["ua"])
        summary["sklearn_ua"] = float(balanced_accuracy_score(labels, pred))
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
