"""The KS-T + CCAB network as a functional Keras model (paper Fig. 2, SPEC §3).

inputs → FEM (5 vanilla Transformer layers per modality) → MIM (N CCABs per direction, K/V
from the other modality's FEM output, one skip) → DFM (2 KS-Transformer layers per branch)
→ masked mean pooling → concatenation → MLP head → logits.

Options beyond the paper (off by default): training-time augmentation of the audio input
(`model.augment`), utterance-level functionals of the audio frames (`model.audio_functionals`)
and openSMILE's utterance functionals as an extra input (`functionals`, `model.functionals_dim`),
both concatenated with the pooled outputs before the head.

The authors' public code differs from the paper's text in ways each a `model.` switch
reproduces (SPEC §8; all on in configs/official_code.yaml): `k_from`, `query_mask_in_scores`,
`fusion_self_attention_mask`, `positional: attention_input`, `input_layer_norm: per_block`,
`ffn_activation_dropout`, `initializer`, `mim_skip`, `pooling`.
"""

from __future__ import annotations

import math

import keras

from ks_keras.config import Config, ModelConfig, input_norm_placement, validate_config
from ks_keras.layers import (
    FeatureAugment,
    MaskedMeanPooling,
    ModalityInteraction,
    SinusoidalPositionalEncoding,
    TransformerLayer,
    UtteranceFunctionals,
)

INPUT_NAMES = ("audio", "audio_mask", "text", "text_mask")
OTHER = {"audio": "text", "text": "audio"}


def _width(m: ModelConfig, modality: str) -> int:
    return getattr(m, f"{modality}_d_model") or getattr(m, f"{modality}_dim")


def _layer_options(m: ModelConfig, modality: str) -> dict:
    return dict(
        num_heads=m.num_heads,
        ffn_dim=getattr(m, f"{modality}_ffn_dim"),
        dropout=m.dropout,
        layer_norm_eps=m.layer_norm_eps,
        add_positional=m.positional == "every_layer",
        attention_positional=m.positional == "attention_input",
        ffn_activation_dropout=m.ffn_activation_dropout,
        initializer=m.initializer,
        recompute_softmax=m.attention_recompute,
    )


def _stack_input_norm(m: ModelConfig, index: int) -> bool:
    """Whether layer `index` of a stack (FEM, DFM) normalises its input: every layer
    ("every_layer") or the first one only, the block input of the authors' code ("per_block").
    """
    placement = input_norm_placement(m)
    return placement == "every_layer" or (placement == "per_block" and index == 0)


def _dense_initializers(m: ModelConfig, fan_in: int) -> dict:
    """Kernel/bias initialisers of a plain Dense layer (projection, head): Keras' defaults, or
    PyTorch's default `nn.Linear` init (`U(+-1/sqrt(fan_in))` for both), which the authors'
    head keeps."""
    if m.initializer == "keras":
        return {}
    limit = 1.0 / math.sqrt(fan_in)
    return {
        "kernel_initializer": keras.initializers.RandomUniform(-limit, limit),
        "bias_initializer": keras.initializers.RandomUniform(-limit, limit),
    }


def _sparse_options(m: ModelConfig) -> dict:
    return dict(
        sparsity=m.sparsity,
        k_from=m.k_from,
        renormalize=m.renormalize,
        query_mask_in_scores=m.query_mask_in_scores,
    )


def model_inputs(m: ModelConfig) -> dict[str, keras.KerasTensor]:
    """Named inputs for the configured modalities: features float32, masks int32."""
    inputs = {}
    for modality in m.modalities:
        dim = getattr(m, f"{modality}_dim")
        inputs[modality] = keras.Input((None, dim), dtype="float32", name=modality)
        inputs[f"{modality}_mask"] = keras.Input((None,), dtype="int32", name=f"{modality}_mask")
    if m.functionals_dim:
        inputs["functionals"] = keras.Input(
            (m.functionals_dim,), dtype="float32", name="functionals"
        )
    return inputs


def opensmile_functionals(m: ModelConfig, f):
    """The openSMILE functionals input (`features.functionals`): standardised by a
    BatchNormalization (raw or per-speaker z-normalised values alike), then dropout."""
    f = keras.layers.BatchNormalization(name="opensmile_functionals_norm")(f)
    if m.functionals_dropout > 0:
        f = keras.layers.Dropout(m.functionals_dropout, name="opensmile_functionals_dropout")(f)
    return f


def augmentation(m: ModelConfig, x, mask):
    """Training-time masks/noise on the audio input (`model.augment`); identity otherwise."""
    a = m.augment
    layer = FeatureAugment(
        time_masks=a.time_masks,
        time_mask_frames=a.time_mask_frames,
        freq_masks=a.freq_masks,
        freq_mask_bins=a.freq_mask_bins,
        noise_std=a.noise_std,
        name="audio_augment",
    )
    return layer(x, padding_mask=mask) if layer.active else x


def utterance_functionals(m: ModelConfig, x, mask):
    """Statistics of the audio input frames (`model.audio_functionals`) for the head."""
    f = UtteranceFunctionals(m.audio_functionals, name="audio_functionals")(x, padding_mask=mask)
    f = keras.layers.BatchNormalization(name="functionals_norm")(f)
    if m.functionals_dropout > 0:
        f = keras.layers.Dropout(m.functionals_dropout, name="functionals_dropout")(f)
    return f


def feature_extraction(m: ModelConfig, modality: str, x, mask):
    """FEM: optional projection, sinusoidal positions, n_fem vanilla Transformer layers."""
    if getattr(m, f"{modality}_d_model"):
        x = keras.layers.Dense(
            _width(m, modality),
            name=f"{modality}_projection",
            **_dense_initializers(m, getattr(m, f"{modality}_dim")),
        )(x)
    if m.positional == "input":
        x = SinusoidalPositionalEncoding(name=f"{modality}_positional")(x)
    if m.use_fem:
        for i in range(m.n_fem):
            x = TransformerLayer(
                key_sparse=False,
                name=f"{modality}_fem_{i + 1}",
                input_layer_norm=_stack_input_norm(m, i),
                # Vanilla layers have no key scores; this says whether padded queries attend.
                query_mask_in_scores=m.query_mask_in_scores,
                **_layer_options(m, modality),
            )(x, padding_mask=mask)
    return x


def modality_interaction(m: ModelConfig, modality: str, x, mask, other, other_mask):
    """MIM for target `modality`: queries from x, keys/values from the other FEM output."""
    placement = input_norm_placement(m)
    return ModalityInteraction(
        n_ccab=m.n_ccab,
        skip=m.mim_skip,
        name=f"{modality}_mim",
        # Each CCAB layer is a block of its own in the authors' code: both placements put a
        # LayerNorm on its input; only theirs also normalises the source sequence.
        input_layer_norm=placement != "none",
        context_layer_norm=placement == "per_block",
        self_attention_mask=m.fusion_self_attention_mask,
        **_layer_options(m, modality),
        **_sparse_options(m),
    )(x, padding_mask=mask, context=other, context_mask=other_mask)


def deep_fusion(m: ModelConfig, modality: str, x, mask):
    """DFM: n_dfm key-sparse self-attention layers (without a padding mask when
    `fusion_self_attention_mask` is off, as in the authors' code)."""
    layer_mask = mask if m.fusion_self_attention_mask else None
    for i in range(m.n_dfm):
        x = TransformerLayer(
            key_sparse=True,
            name=f"{modality}_dfm_{i + 1}",
            input_layer_norm=_stack_input_norm(m, i),
            **_layer_options(m, modality),
            **_sparse_options(m),
        )(x, padding_mask=layer_mask)
    return x


def classifier_head(m: ModelConfig, pooled):
    """Dense → ReLU → Dropout per hidden width, then the logits layer (float32)."""
    x = pooled
    for i, units in enumerate(m.head_units):
        x = keras.layers.Dense(
            units,
            activation="relu",
            name=f"head_dense_{i + 1}",
            **_dense_initializers(m, x.shape[-1]),
        )(x)
        x = keras.layers.Dropout(m.head_dropout, name=f"head_dropout_{i + 1}")(x)
    # Logits in float32 so the loss is stable under mixed precision.
    return keras.layers.Dense(
        m.num_classes, dtype="float32", name="logits", **_dense_initializers(m, x.shape[-1])
    )(x)


def build_model(config: Config | ModelConfig, name: str = "ks_transformer") -> keras.Model:
    """Build the KS-T + CCAB model.

    Args:
        config: a full `Config` (its `model` section is used) or a `ModelConfig`.
        name: model name.

    Returns:
        A functional `keras.Model` taking a dict with `audio` `[B, Ta, audio_dim]` float32,
        `audio_mask` `[B, Ta]` int32, `text` `[B, Tt, text_dim]` float32 and `text_mask`
        `[B, Tt]` int32 (only the configured modalities' entries) and returning logits
        `[B, num_classes]` (output name `logits`).

    Example:

    >>> cfg = load_config("configs/paper.yaml")
    >>> model = build_model(cfg)
    >>> model.count_params()  # ≈ 85.3 M
    """
    if isinstance(config, Config):
        validate_config(config)
        m = config.model
    elif isinstance(config, ModelConfig):
        validate_config(Config(model=config))
        m = config
    else:
        raise ValueError(f"config: expected a Config or ModelConfig, got {type(config).__name__}")

    inputs = model_inputs(m)
    masks = {mod: inputs[f"{mod}_mask"] for mod in m.modalities}
    features = {mod: inputs[mod] for mod in m.modalities}
    if "audio" in features:
        features["audio"] = augmentation(m, features["audio"], masks["audio"])

    fem = {mod: feature_extraction(m, mod, features[mod], masks[mod]) for mod in m.modalities}

    multimodal = len(m.modalities) == 2
    if multimodal and m.use_mim and m.n_ccab > 0:
        branches = {
            mod: modality_interaction(
                m, mod, fem[mod], masks[mod], fem[OTHER[mod]], masks[OTHER[mod]]
            )
            for mod in m.modalities
        }
    else:
        branches = dict(fem)

    if m.use_dfm:
        branches = {mod: deep_fusion(m, mod, branches[mod], masks[mod]) for mod in m.modalities}

    pooled = [
        MaskedMeanPooling(include_padding=m.pooling == "include_padding", name=f"{mod}_pool")(
            branches[mod], padding_mask=masks[mod]
        )
        for mod in m.modalities
    ]
    if m.audio_functionals:
        pooled.append(utterance_functionals(m, features["audio"], masks["audio"]))
    if m.functionals_dim:
        pooled.append(opensmile_functionals(m, inputs["functionals"]))
    fused = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="fusion")(pooled)
    logits = classifier_head(m, fused)
    return keras.Model(inputs=inputs, outputs=logits, name=name)


def count_trainable_params(model: keras.Model) -> int:
    """Number of trainable scalars in `model`."""
    total = 0
    for weight in model.trainable_weights:
        size = 1
        for dim in weight.shape:
            size *= int(dim)
        total += size
    return total
