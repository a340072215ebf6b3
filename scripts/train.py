#!/usr/bin/env python
"""Train one model with held-out validation speakers (same as `ks-keras train`).

Example:
    python scripts/train.py --config configs/emodb_demo.yaml --set train.epochs=30
    python scripts/train.py --config configs/paper.yaml --set data.manifest=iemocap.csv \
        --set train.strategy=mirrored --run-dir runs/iemocap
"""

import sys

from ks_keras.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
