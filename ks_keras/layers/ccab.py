"""Cascaded cross-attention block (CCAB) and the modality interaction module (MIM)."""

from __future__ import annotations

import keras

from ks_keras.layers.encoder import INITIALIZERS, TransformerLayer

MIM_SKIPS = ("paper", "official_code")


@keras.saving.register_keras_serializable(package="ks_keras")
class CCAB(keras.layers.Layer):
    """Cascaded cross-attention block for target modality A and source modality B.

    KS cross-attention layer (queries from A, keys = values from B, B's key mask), then a KS
    self-attention layer on the result. The output keeps A's length and width.

    Args:
        num_heads, ffn_dim, dropout, layer_norm_eps, sparsity, k_from, renormalize,
        query_mask_in_scores, input_layer_norm, add_positional, recompute_softmax,
            attention_positional, ffn_activation_dropout, initializer: as `TransformerLayer`
            (both sub-layers are key-sparse).
        context_layer_norm: LayerNorm on B before the cross-attention uses it (the cross
            layer's `context_norm`; authors' code).
        self_attention_mask: give the self-attention layer A's padding mask (default). False:
            no mask there, as in the authors' code: padded steps of A are attended, vote in the
            key scores and can be kept.
        **kwargs: base layer arguments.

    Call args:
        inputs: `[B, T, Da]` target sequence; padding_mask: its `[B, T]` padding mask.
        context: `[B, S, Db]` source sequence; context_mask: its `[B, S]` padding mask.
    """

    def __init__(
        self,
        num_heads,
        ffn_dim,
        dropout=0.1,
        layer_norm_eps=1e-5,
        sparsity=0.5,
        k_from="valid",
        renormalize=False,
        query_mask_in_scores=True,
        input_layer_norm=False,
        add_positional=False,
        recompute_softmax=True,
        attention_positional=False,
        context_layer_norm=False,
        ffn_activation_dropout=False,
        initializer="keras",
        self_attention_mask=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.context_layer_norm = bool(context_layer_norm)
        self.self_attention_mask = bool(self_attention_mask)
        self._layer_config = dict(
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            layer_norm_eps=layer_norm_eps,
            sparsity=sparsity,
            k_from=k_from,
            renormalize=renormalize,
            query_mask_in_scores=query_mask_in_scores,
            input_layer_norm=input_layer_norm,
            add_positional=add_positional,
            recompute_softmax=recompute_softmax,
            attention_positional=attention_positional,
            ffn_activation_dropout=ffn_activation_dropout,
            initializer=initializer,
        )
        self.cross_layer = TransformerLayer(
            key_sparse=True,
            context_layer_norm=self.context_layer_norm,
            dtype=self.dtype_policy,
            name="ks_cross",
            **self._layer_config,
        )
        self.self_layer = TransformerLayer(
            key_sparse=True, dtype=self.dtype_policy, name="ks_self", **self._layer_config
        )

    def build(self, inputs_shape, context_shape=None):
        if context_shape is None:
            raise ValueError("CCAB: a context sequence (the other modality) is required")
        self.cross_layer.build(inputs_shape, context_shape)
        self.self_layer.build(inputs_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, context=None, context_mask=None, training=None):
        if context is None:
            raise ValueError("context: CCAB needs the other modality's sequence")
        x = self.cross_layer(
            inputs,
            padding_mask=padding_mask,
            context=context,
            context_mask=context_mask,
            training=training,
        )
        self_mask = padding_mask if self.self_attention_mask else None
        return self.self_layer(x, padding_mask=self_mask, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(self._layer_config)
        config.update(
            {
                "context_layer_norm": self.context_layer_norm,
                "self_attention_mask": self.self_attention_mask,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="ks_keras")
class ModalityInteraction(keras.layers.Layer):
    """Modality interaction module: N cascaded CCABs plus a skip connection.

    CCAB n takes the previous CCAB's output as queries and always the *same* source sequence
    (the other modality's FEM output) as keys/values. Output: `x + stack(x)` ("paper") or
    `2x + stack(x)` ("official_code", the authors' double skip, SPEC §8). With `n_ccab=0` the
    module is the identity.

    Args:
        n_ccab: number of CCABs (>= 0).
        skip: "paper" or "official_code".
        other args: as `CCAB` (`context_layer_norm` gives every CCAB's cross layer its own
            LayerNorm on the source sequence, as the authors' code does).
    """

    def __init__(
        self,
        n_ccab,
        num_heads,
        ffn_dim,
        dropout=0.1,
        layer_norm_eps=1e-5,
        sparsity=0.5,
        k_from="valid",
        renormalize=False,
        query_mask_in_scores=True,
        input_layer_norm=False,
        add_positional=False,
        skip="paper",
        recompute_softmax=True,
        attention_positional=False,
        context_layer_norm=False,
        ffn_activation_dropout=False,
        initializer="keras",
        self_attention_mask=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(n_ccab, bool) or not isinstance(n_ccab, int) or n_ccab < 0:
            raise ValueError(f"n_ccab: expected an integer >= 0, got {n_ccab!r}")
        if skip not in MIM_SKIPS:
            raise ValueError(f"skip: expected one of {MIM_SKIPS}, got {skip!r}")
        if initializer not in INITIALIZERS:
            raise ValueError(f"initializer: expected one of {INITIALIZERS}, got {initializer!r}")
        self.n_ccab = n_ccab
        self.skip = skip
        self._block_config = dict(
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            layer_norm_eps=layer_norm_eps,
            sparsity=sparsity,
            k_from=k_from,
            renormalize=renormalize,
            query_mask_in_scores=query_mask_in_scores,
            input_layer_norm=input_layer_norm,
            add_positional=add_positional,
            recompute_softmax=recompute_softmax,
            attention_positional=bool(attention_positional),
            context_layer_norm=bool(context_layer_norm),
            ffn_activation_dropout=bool(ffn_activation_dropout),
            initializer=initializer,
            self_attention_mask=bool(self_attention_mask),
        )
        self.blocks = [
            CCAB(dtype=self.dtype_policy, name=f"ccab_{i + 1}", **self._block_config)
            for i in range(n_ccab)
        ]

    def build(self, inputs_shape, context_shape=None):
        for block in self.blocks:
            block.build(inputs_shape, context_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, context=None, context_mask=None, training=None):
        if not self.blocks:
            return inputs
        x = inputs
        for block in self.blocks:
            x = block(
                x,
                padding_mask=padding_mask,
                context=context,
                context_mask=context_mask,
                training=training,
            )
        skip = inputs + inputs if self.skip == "official_code" else inputs
        return skip + x

    def get_config(self):
        config = super().get_config()
        config.update({"n_ccab": self.n_ccab, "skip": self.skip, **self._block_config})
        return config
