"""KS-T building blocks, one file per box of the paper's figures."""

from ks_keras.layers.augment import FeatureAugment
from ks_keras.layers.ccab import CCAB, ModalityInteraction
from ks_keras.layers.encoder import TransformerLayer
from ks_keras.layers.ensemble import MeanProbabilityLogits
from ks_keras.layers.fast_attention import FastMultiHeadAttention
from ks_keras.layers.functionals import UtteranceFunctionals
from ks_keras.layers.key_sparse_attention import KeySparseAttention, num_kept_keys
from ks_keras.layers.pooling import MaskedMeanPooling
from ks_keras.layers.positional import SinusoidalPositionalEncoding, sinusoid_table

__all__ = [
    "CCAB",
    "FastMultiHeadAttention",
    "FeatureAugment",
    "KeySparseAttention",
    "MaskedMeanPooling",
    "MeanProbabilityLogits",
    "ModalityInteraction",
    "SinusoidalPositionalEncoding",
    "TransformerLayer",
    "UtteranceFunctionals",
    "num_kept_keys",
    "sinusoid_table",
]
