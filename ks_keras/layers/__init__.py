"""KS-T building blocks, one file per box of the paper's figures."""

from ks_keras.layers.ccab import CCAB, ModalityInteraction
from ks_keras.layers.encoder import TransformerLayer
from ks_keras.layers.key_sparse_attention import KeySparseAttention, num_kept_keys
from ks_keras.layers.pooling import MaskedMeanPooling
from ks_keras.layers.positional import SinusoidalPositionalEncoding, sinusoid_table

__all__ = [
    "CCAB",
    "KeySparseAttention",
    "MaskedMeanPooling",
    "ModalityInteraction",
    "SinusoidalPositionalEncoding",
    "TransformerLayer",
    "num_kept_keys",
    "sinusoid_table",
]
