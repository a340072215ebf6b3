"""ks_keras: Key-Sparse Transformer + Cascaded Cross-Attention Blocks for multimodal SER."""

__version__ = "0.1.0"
