"""Attention maps (paper Fig. 7) and per-fold audio normalisation."""

from __future__ import annotations

import numpy as np

from ks_keras.config import Config
from ks_keras.corpora.manifest import Corpus
from ks_keras.folds import Fold

# ---------------------------------------------------------------------------------------------
# Attention maps (paper Fig. 7)


def fold_normalizer(cfg: Config, cache, corpus: Corpus, fold: Fold):
    """Audio normalisation statistics for one fold (`features.audio.normalize`).

    `global`: mean/std of the fold's training speakers only. `speaker`: every speaker of the
    fold with its own statistics (unsupervised: labels are never used), test speakers included.
    """
    from ks_keras.experiment import audio_normalizer

    return audio_normalizer(
        cfg, cache, corpus.speaker_of(), fold.train_ids, fold.val_ids + fold.test_ids
    )


def attention_examples(
    model,
    cache,
    ids: list[str],
    cfg: Config,
    layer_name: str | None = None,
    normalizer=None,
    speaker_of=None,
    functionals=None,
):
    """Dense and key-sparse weights of one KS self-attention layer for a few utterances.

    The layer defaults to the first audio DFM layer (or the first key-sparse layer found).
    Returns `{"layer", "ids", "lengths", "dense" [n, T, T], "sparse" [n, T, T] (first head),
    "kept_head" [n, T] (first head's kept keys), "kept" [n, T] (fraction of heads keeping each
    key)}`.
    """
    import keras

    from ks_keras.data import load_arrays
    from ks_keras.layers import TransformerLayer
    from ks_keras.layers.masks import pair_mask

    candidates = [
        layer for layer in model.layers if isinstance(layer, TransformerLayer) and layer.key_sparse
    ]
    if layer_name:
        candidates = [layer for layer in candidates if layer.name == layer_name]
    if not candidates:
        return None
    layer = candidates[0]
    modality = "audio" if layer.name.startswith("audio") else "text"
    inputs = load_arrays(
        cache,
        ids,
        cfg.data,
        modalities=cfg.model.modalities,
        normalizer=normalizer,
        speaker_of=speaker_of,
        functionals=functionals,
    )
    node_input = layer._inbound_nodes[0].arguments.args[0]
    x = np.asarray(keras.Model(model.input, node_input)(inputs))
    mask = inputs[f"{modality}_mask"]
    if layer.input_norm is not None:
        x = layer.input_norm(x)
    if layer.positional is not None:
        x = layer.positional(x)
    details = layer.attention.attention_details(
        x, x, attention_mask=pair_mask(mask, mask, x.shape[1], x.shape[1])
    )
    return {
        "layer": layer.name,
        "sparsity": layer.sparsity,
        "ids": list(ids),
        "lengths": mask.sum(axis=1).tolist(),
        # One head shows the zeroed columns; averaging heads would blur them.
        "dense": np.asarray(details["dense"])[:, 0],
        "sparse": np.asarray(details["sparse"])[:, 0],
        "kept_head": np.asarray(details["kept"])[:, 0],
        "kept": np.asarray(details["kept"], np.float32).mean(axis=1),
    }
