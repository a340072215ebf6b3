"""Post-norm Transformer encoder layer: vanilla or key-sparse, self- or cross-attention."""

from __future__ import annotations

import math

import keras
from keras import ops

from ks_keras.layers.dropout import FastDropout
from ks_keras.layers.fast_attention import FastMultiHeadAttention
from ks_keras.layers.key_sparse_attention import KeySparseAttention
from ks_keras.layers.masks import check_sequence_mask, pair_mask
from ks_keras.layers.positional import SinusoidalPositionalEncoding

# Weight initialisation: Keras' defaults, or the authors' PyTorch code's (SPEC §8).
INITIALIZERS = ("keras", "official_code")


@keras.saving.register_keras_serializable(package="ks_keras")
class FastLayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis with a hand-written gradient.

    Same weights (`gamma`, `beta`), same output up to float rounding. Automatic
    differentiation of Keras' formula runs about a dozen element-wise passes over the
    activations per backward step and keeps several intermediates; this keeps only the
    normalised input and the inverse standard deviation (one value per position). See
    docs/performance.md. Other configurations (several axes, RMS scaling, no centering or
    scaling) fall back to the base class.
    """

    def call(self, inputs):
        axis = self.axis if isinstance(self.axis, int) else tuple(self.axis)
        last = axis in (-1, len(inputs.shape) - 1) or axis in ((-1,), (len(inputs.shape) - 1,))
        if not (last and self.center and self.scale) or self.rms_scaling:
            return super().call(inputs)
        return _layer_norm_last_axis(
            inputs, self.gamma, self.beta, self.epsilon, self.compute_dtype
        )


def _layer_norm_last_axis(inputs, gamma, beta, epsilon, out_dtype):
    """LayerNorm over the last axis, float32 statistics, with its analytic gradient."""
    gamma = ops.convert_to_tensor(gamma)
    beta = ops.convert_to_tensor(beta)

    @ops.custom_gradient
    def norm(x, gamma, beta):
        x32 = x if x.dtype == "float32" else ops.cast(x, "float32")
        mean = ops.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        inv_std = ops.rsqrt(ops.mean(ops.square(centered), axis=-1, keepdims=True) + epsilon)
        normalized = centered * inv_std
        g32 = ops.cast(gamma, "float32")
        out = ops.cast(normalized * g32 + ops.cast(beta, "float32"), out_dtype)

        def grad(d_out, variables=None):
            with keras.name_scope("layer_norm_grad"):
                d32 = ops.cast(d_out, "float32")
                reduce_axes = tuple(range(len(d32.shape) - 1))
                d_gamma = ops.sum(d32 * normalized, axis=reduce_axes)
                d_beta = ops.sum(d32, axis=reduce_axes)
                d_norm = d32 * g32
                # dx = inv_std * (dn - mean(dn) - n * mean(dn * n)) over the normalised axis.
                d_x = inv_std * (
                    d_norm
                    - ops.mean(d_norm, axis=-1, keepdims=True)
                    - normalized * ops.mean(d_norm * normalized, axis=-1, keepdims=True)
                )
                grads = (
                    ops.cast(d_x, x.dtype),
                    ops.cast(d_gamma, gamma.dtype),
                    ops.cast(d_beta, beta.dtype),
                )
            if variables is not None:
                return grads, [None] * len(variables)
            return grads

        return out, grad

    return norm(inputs, gamma, beta)


@keras.saving.register_keras_serializable(package="ks_keras")
class TransformerLayer(keras.layers.Layer):
    """One Transformer encoder layer (SPEC §3), post-norm.

    `x = LN(x + Dropout(Attention(x, context)))`, then `x = LN(x + Dropout(FFN(x)))` with a
    ReLU FFN. Self-attention when no `context` is given; cross-attention (queries from `x`,
    keys = values from `context`) otherwise.

    The options marked "authors' code" reproduce what the authors' public PyTorch code does
    (SPEC §8); all are off by default. A block of the authors' code (a stack of layers) is the
    first layer of the stack with `input_layer_norm=True` (and `context_layer_norm=True` for
    cross-attention) followed by the others without.

    Args:
        num_heads: attention heads; must divide the input width.
        ffn_dim: hidden width of the position-wise FFN.
        dropout: dropout on attention weights, the attention output and the FFN output.
        layer_norm_eps: LayerNorm epsilon (authors' code 1e-5).
        key_sparse: use key-sparse attention (KS-Transformer layer) instead of vanilla MHA.
        sparsity, k_from, renormalize: key-sparse options (see `KeySparseAttention`);
            ignored when `key_sparse=False`.
        query_mask_in_scores: True (default): padded query rows attend nothing (and, when
            key-sparse, get no vote in the key scores). False: every query row, padding
            included, attends over the real keys (and votes), as the authors' code does.
        input_layer_norm: apply a LayerNorm to the layer input before anything else; the
            residual stream starts from the normalised input (the authors' code does this once
            per block: sublayer `input_norm`).
        add_positional: add sinusoidal positions to `x` (and `context`) before attending: the
            residual stream and the attention's queries, keys and values all get them.
        attention_positional: add sinusoidal positions to the attention's input only (authors'
            code): in self-attention queries, keys and values are projected from `x +
            positions`; in cross-attention queries from `x + positions`, keys from `context +
            positions` and values from `context`. The residual stream gets none. Excludes
            `add_positional`.
        context_layer_norm: cross-attention only: LayerNorm on `context` (the key/value source)
            before it is used (authors' code; sublayer `context_norm`).
        ffn_activation_dropout: dropout after the FFN's ReLU as well as after its output
            (authors' code; sublayer `ffn_activation_dropout`).
        initializer: `"keras"` (default): Keras' defaults (Glorot-uniform kernels with fans
            from the 3-D attention kernel shapes, zero biases). `"official_code"`: the authors'
            PyTorch initialisation: Xavier-uniform on each 2-D projection matrix as PyTorch
            lays it out (queries, keys and values of self-attention as one `[D, 3D]` matrix,
            of cross-attention as three), PyTorch's default `U(+-1/sqrt(fan_in))` biases.
        recompute_softmax: attention layers recompute their softmax in the backward pass
            instead of keeping it (less memory, a little more time; same results).
        **kwargs: base layer arguments.

    Call args:
        inputs: `[B, T, D]`.
        padding_mask: `[B, T]` int/bool padding mask of `inputs` (1 = real step).
        context: optional `[B, S, Dc]` sequence for cross-attention.
        context_mask: `[B, S]` padding mask of `context`.
        training: dropout switch.
    """

    def __init__(
        self,
        num_heads,
        ffn_dim,
        dropout=0.1,
        layer_norm_eps=1e-5,
        key_sparse=False,
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads: expected an integer >= 1, got {num_heads!r}")
        if isinstance(ffn_dim, bool) or not isinstance(ffn_dim, int) or ffn_dim < 1:
            raise ValueError(f"ffn_dim: expected an integer >= 1, got {ffn_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout!r}")
        if key_sparse and not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
        if add_positional and attention_positional:
            raise ValueError(
                "attention_positional: positions go either to the residual stream and the "
                "attention (add_positional) or to the attention input only, not both"
            )
        if initializer not in INITIALIZERS:
            raise ValueError(f"initializer: expected one of {INITIALIZERS}, got {initializer!r}")
        self.num_heads = num_heads
        self.ffn_dim = ffn_dim
        self.dropout = float(dropout)
        self.layer_norm_eps = float(layer_norm_eps)
        self.key_sparse = bool(key_sparse)
        self.sparsity = float(sparsity)
        self.k_from = k_from
        self.renormalize = bool(renormalize)
        self.query_mask_in_scores = bool(query_mask_in_scores)
        self.input_layer_norm = bool(input_layer_norm)
        self.add_positional = bool(add_positional)
        self.recompute_softmax = bool(recompute_softmax)
        self.attention_positional = bool(attention_positional)
        self.context_layer_norm = bool(context_layer_norm)
        self.ffn_activation_dropout = bool(ffn_activation_dropout)
        self.initializer = initializer

    def build(self, inputs_shape, context_shape=None):
        input_shape = inputs_shape
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("TransformerLayer: the feature dimension of inputs must be known")
        if dim % self.num_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} heads do not divide the model width {dim}"
            )
        head_dim = dim // self.num_heads
        attn_kwargs = dict(
            num_heads=self.num_heads,
            key_dim=head_dim,
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name="attention",
        )
        # `call` always passes `pair_mask(...)`, an outer product of padding masks, so the
        # fast layers may fold its key part into the scores matmul.
        fast_kwargs = dict(
            recompute_softmax=self.recompute_softmax, separable_mask=True, **attn_kwargs
        )
        if self.key_sparse:
            self.attention = KeySparseAttention(
                sparsity=self.sparsity,
                k_from=self.k_from,
                renormalize=self.renormalize,
                query_mask_in_scores=self.query_mask_in_scores,
                **fast_kwargs,
            )
        elif self.dropout > 0.0:
            # Vanilla attention. With attention dropout, stock MultiHeadAttention takes its
            # explicit path (masked softmax, dropout, weights x values), which the fast layer
            # computes identically (same weights) with a leaner, hand-written backward pass:
            # less memory and time (docs/performance.md).
            self.attention = FastMultiHeadAttention(**fast_kwargs)
        else:
            self.attention = keras.layers.MultiHeadAttention(**attn_kwargs)
        kv_shape = tuple(context_shape) if context_shape is not None else tuple(input_shape)
        self.attention.build(tuple(input_shape), kv_shape, kv_shape)

        def norm(name, shape=input_shape):
            layer = FastLayerNormalization(
                epsilon=self.layer_norm_eps, dtype=self.dtype_policy, name=name
            )
            layer.build(tuple(shape))
            return layer

        self.input_norm = norm("input_norm") if self.input_layer_norm else None
        self.context_norm = (
            norm("context_norm", context_shape)
            if self.context_layer_norm and context_shape is not None
            else None
        )
        self.attention_norm = norm("attention_norm")
        self.ffn_norm = norm("ffn_norm")
        # Residual dropout from 16-bit random numbers (ks_keras.layers.dropout).
        self.attention_dropout = FastDropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.ffn_inner = keras.layers.Dense(
            self.ffn_dim, activation="relu", dtype=self.dtype_policy, name="ffn_inner"
        )
        self.ffn_inner.build(tuple(input_shape))
        self.ffn_outer = keras.layers.Dense(dim, dtype=self.dtype_policy, name="ffn_outer")
        self.ffn_outer.build(tuple(input_shape[:-1]) + (self.ffn_dim,))
        self.ffn_dropout = FastDropout(self.dropout, dtype=self.dtype_policy, name="ffn_dropout")
        self.ffn_inner_dropout = (
            FastDropout(self.dropout, dtype=self.dtype_policy, name="ffn_activation_dropout")
            if self.ffn_activation_dropout
            else None
        )
        self.positional = (
            SinusoidalPositionalEncoding(dtype=self.dtype_policy, name="positional")
            if self.add_positional or self.attention_positional
            else None
        )
        if self.initializer == "official_code":
            self._initialize_as_official_code(dim, kv_shape[-1], context_shape is None)
        self.built = True

    def _initialize_as_official_code(self, dim, kv_dim, self_attention):
        """Re-draw the weights as the authors' PyTorch code initialises them.

        Each PyTorch `nn.Linear(n_in, n_out)` there gets a Xavier-uniform weight,
        `U(+-sqrt(6 / (n_in + n_out)))`, and keeps PyTorch's default bias,
        `U(+-1 / sqrt(n_in))`. Self-attention projects queries, keys and values with one
        `Linear(D, 3D)`, so their limit is `sqrt(6 / 4D)`; cross-attention uses
        `Linear(D, D)` for queries and `Linear(Dc, D)` for keys and values. LayerNorms start
        at gamma 1, beta 0 in both frameworks.
        """
        attention = self.attention
        qkv_fan_out = 3 * dim if self_attention else dim
        projections = (
            (attention._query_dense, dim, qkv_fan_out),
            (attention._key_dense, kv_dim, qkv_fan_out),
            (attention._value_dense, kv_dim, qkv_fan_out),
            (attention._output_dense, dim, dim),
            (self.ffn_inner, dim, self.ffn_dim),
            (self.ffn_outer, self.ffn_dim, dim),
        )
        for layer, fan_in, fan_out in projections:
            _assign_uniform(layer.kernel, math.sqrt(6.0 / (fan_in + fan_out)))
            if layer.bias is not None:
                _assign_uniform(layer.bias, 1.0 / math.sqrt(fan_in))

    def call(self, inputs, padding_mask=None, context=None, context_mask=None, training=None):
        x = inputs
        if padding_mask is not None:
            check_sequence_mask(x, padding_mask, "padding_mask")
        if context is not None and context_mask is not None:
            check_sequence_mask(context, context_mask, "context_mask")
        if context is None and context_mask is not None:
            raise ValueError("context_mask: given without a context sequence")

        if self.input_norm is not None:
            x = self.input_norm(x)
        if context is not None and self.context_norm is not None:
            context = self.context_norm(context)
        if self.add_positional:
            x = self.positional(x)
            if context is not None:
                context = self.positional(context)
        query = self.positional(x) if self.attention_positional else x
        if context is None:
            key = value = query
            kv_mask = padding_mask
        else:
            key = self.positional(context) if self.attention_positional else context
            value = context
            kv_mask = context_mask
        # Key-sparse layers read the query side of the pair mask themselves (votes, empty
        # rows); a vanilla layer whose padded queries attend gets a key-only mask.
        query_mask = padding_mask if self.key_sparse or self.query_mask_in_scores else None
        attention_mask = pair_mask(query_mask, kv_mask, ops.shape(x)[1], ops.shape(key)[1])

        attended = self.attention(
            query=query, value=value, key=key, attention_mask=attention_mask, training=training
        )
        x = self.attention_norm(x + self.attention_dropout(attended, training=training))
        hidden = self.ffn_inner(x)
        if self.ffn_inner_dropout is not None:
            hidden = self.ffn_inner_dropout(hidden, training=training)
        ffn = self.ffn_outer(hidden)
        x = self.ffn_norm(x + self.ffn_dropout(ffn, training=training))
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "ffn_dim": self.ffn_dim,
                "dropout": self.dropout,
                "layer_norm_eps": self.layer_norm_eps,
                "key_sparse": self.key_sparse,
                "sparsity": self.sparsity,
                "k_from": self.k_from,
                "renormalize": self.renormalize,
                "query_mask_in_scores": self.query_mask_in_scores,
                "input_layer_norm": self.input_layer_norm,
                "add_positional": self.add_positional,
                "recompute_softmax": self.recompute_softmax,
                "attention_positional": self.attention_positional,
                "context_layer_norm": self.context_layer_norm,
                "ffn_activation_dropout": self.ffn_activation_dropout,
                "initializer": self.initializer,
            }
        )
        return config


def _assign_uniform(variable, limit):
    """Overwrite `variable` with `U(-limit, limit)` draws (seeded like Keras' initialisers:
    reproducible under `keras.utils.set_random_seed`, a new draw per variable)."""
    init = keras.initializers.RandomUniform(-limit, limit)
    variable.assign(init(variable.shape, dtype=variable.dtype))
