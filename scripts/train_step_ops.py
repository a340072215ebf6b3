#!/usr/bin/env python
"""Fingerprint of one traced training step: did a refactor change what a step computes?

Builds the model (paper layout, small widths so it traces in seconds), traces one training
step (forward with dropout, loss, gradients, the Adam update `ks-keras train` uses) as a
`tf.function` and lists its graph's operations in creation order: op type, output dtypes and
shapes (names left out: they change with any rename). Prints the number of operations and a
SHA-256 of the list; `--output` writes the list itself, for a `diff`.

Two checkouts compute the same step exactly when their fingerprints match. Run this file from
one checkout against another by putting the other first on the path:

    PYTHONPATH=/path/to/old/checkout python scripts/train_step_ops.py --output old.txt
    PYTHONPATH=. python scripts/train_step_ops.py --output new.txt

(the script imports only `ks_keras.config.ModelConfig` / `from_dict`, `ks_keras.model.build_model`,
`ks_keras.training.FusedAdam` and `ks_keras.bench.synthetic_batch`, which older checkouts have
too). Issue 15 used it to show
that the refactor left the training step unchanged while the batch-16 timings moved by a few
per cent (docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys

# Small widths, the paper's layer counts, heads and options (ModelConfig's defaults).
SMALL_WIDTHS = {
    "audio_dim": 32,
    "text_dim": 64,
    "audio_ffn_dim": 16,
    "text_ffn_dim": 32,
    "head_units": [16, 8],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option (YAML value), repeatable, e.g. --set n_ccab=2 --set sparsity=0.8",
    )
    parser.add_argument("--batch", type=int, default=4, help="batch size of the traced step")
    parser.add_argument("--audio-len", type=int, default=40, help="audio frames")
    parser.add_argument("--text-len", type=int, default=10, help="text tokens")
    parser.add_argument("--output", help="write the operation list (one per line) here")
    return parser.parse_args(argv)


def model_options(pairs: list[str]) -> dict:
    import yaml

    options = dict(SMALL_WIDTHS)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. --set n_ccab=2")
        options[key.strip()] = yaml.safe_load(value)
    return options


def step_operations(options: dict, batch: int, audio_len: int, text_len: int) -> list[str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ks_keras  # noqa: F401, I001  (first: it turns oneDNN on before TensorFlow loads)

    import keras
    import tensorflow as tf

    from ks_keras.bench import synthetic_batch
    from ks_keras.config import ModelConfig, from_dict
    from ks_keras.model import build_model
    from ks_keras.training import FusedAdam

    keras.utils.set_random_seed(0)
    config = from_dict(ModelConfig, options, "model")
    model = build_model(config)
    optimizer = FusedAdam(5e-4)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # The bench's random padded batch (the same helper at every commit since the bench began).
    spec = {"model": dataclasses.asdict(config), "audio_len": audio_len, "text_len": text_len}
    inputs, labels = synthetic_batch(spec, batch, seed=0)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    graph = train_step.get_concrete_function(inputs, tf.constant(labels)).graph
    return [
        op.type + " " + ",".join(f"{out.dtype.name}{out.shape}" for out in op.outputs)
        for op in graph.get_operations()
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    ops = step_operations(model_options(args.set), args.batch, args.audio_len, args.text_len)
    text = "\n".join(ops) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    import ks_keras

    print(f"ks_keras from {os.path.dirname(ks_keras.__file__)}")
    print(f"{len(ops)} operations, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
