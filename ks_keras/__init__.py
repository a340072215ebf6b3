"""ks_keras: Key-Sparse Transformer + Cascaded Cross-Attention Blocks for multimodal SER."""

from ks_keras.runtime import prefer_onednn

__version__ = "0.1.0"

# Before anything imports TensorFlow: its oneDNN kernels on every x86-64 CPU (runtime.py).
prefer_onednn()
