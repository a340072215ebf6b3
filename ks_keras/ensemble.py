"""Seed ensembles: several models trained alike, averaged as probabilities, saved as one model.
The same holds for checkpoint ensembles (`train.checkpoint_ensemble`: a model's best epochs).

With a few hundred training utterances a single network's test score moves by up to ±0.15 UA
with its random draws (initialisation, dropout, shuffling, augmentation). Averaging the class
probabilities of `train.ensemble` members trained with different seeds removes much of that
variance. `ensemble_model` wraps the members into one functional Keras model whose output
(`logits`) is the log of the mean probability, so `softmax(logits)` is the members' mean
probability and everything downstream (metrics, `predict`, `export`, TF Serving) treats an
ensemble exactly like a single model.
"""

from __future__ import annotations

import keras

from ks_keras.layers.ensemble import MeanProbabilityLogits

# Member j of a run with seed s trains with seed s + MEMBER_SEED_STRIDE * j (repeats use s + r,
# so members and repeats never share a seed while repeats < MEMBER_SEED_STRIDE).
MEMBER_SEED_STRIDE = 1000


def member_seed(seed: int, member: int) -> int:
    """The training seed of ensemble member `member` (0-based) of a run seeded `seed`."""
    return seed + MEMBER_SEED_STRIDE * member


def ensemble_model(members: list[keras.Model], name: str = "ks_ensemble") -> keras.Model:
    """One model averaging the probabilities of `members` (same inputs, same classes).

    Args:
        members: trained models with identical named inputs and `[B, C]` logits outputs;
            their names must differ (e.g. `build_model(cfg, name="member_1")`).
        name: the ensemble model's name.

    Returns:
        A functional model with the members' inputs and one output named `logits`.

    Raises:
        ValueError: no members, duplicate member names, or members whose inputs or output
            widths differ.
    """
    if not members:
        raise ValueError("ensemble_model: no members given")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"ensemble_model: member names must differ, got {names}")
    first = members[0]

    def signature(model):
        return sorted((t.name, tuple(t.shape[1:]), str(t.dtype)) for t in model.inputs), tuple(
            model.outputs[0].shape[1:]
        )

    for m in members[1:]:
        if signature(m) != signature(first):
            raise ValueError(
                f"ensemble_model: member {m.name!r} has inputs/outputs {signature(m)}, "
                f"member {first.name!r} has {signature(first)}"
            )
    inputs = {
        t.name: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name) for t in first.inputs
    }
    outputs = [m(inputs) for m in members]
    logits = MeanProbabilityLogits(name="logits")(outputs)
    return keras.Model(inputs=inputs, outputs=logits, name=name)


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The member models of an `ensemble_model` (or `[model]` for a single model)."""
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return inner or [model]


def checkpoint_copies(cfg, result, name: str) -> list[keras.Model]:
    """Float32 copies (outside any strategy) of a `FitResult`'s best epoch, or of each of its
    kept checkpoints, best first, under `train.checkpoint_ensemble` (named
    `{name}_epoch_{N}`); wrap several with `ensemble_model`. The result's model holds the best
    epoch's weights again afterwards."""
    from ks_keras.model import build_model
    from ks_keras.training import float32_copy

    if not result.checkpoints:
        return [float32_copy(lambda: build_model(cfg, name=name), result.model)]
    return [
        float32_copy(lambda e=epoch: build_model(cfg, name=f"{name}_epoch_{e + 1}"), result.model)
        for epoch in result.each_checkpoint()
    ]
