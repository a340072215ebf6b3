#!/usr/bin/env python
"""Cross-validated evaluation with a report folder (same as `ks-keras evaluate`).

Example:
    python scripts/evaluate.py --config configs/paper.yaml --set data.manifest=iemocap.csv
    python scripts/evaluate.py --config configs/emodb_demo.yaml --protocol paper --repeats 3
"""

import sys

from ks_keras.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
