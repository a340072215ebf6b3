#!/usr/bin/env python
"""Speed and memory benchmark of the KS-T + CCAB model (issue 8); with --reference-dir, the
authors' PyTorch model side by side in the same run.

Same as `ks-keras bench`; see `python scripts/benchmark.py --help` and docs/performance.md.

    python scripts/benchmark.py                      # paper size (~20 min on 2 CPU cores)
    python scripts/benchmark.py --quick              # tiny model, a smoke test
    python scripts/benchmark.py --only train,attention --output reports/bench.json
    python scripts/benchmark.py --reference-dir ~/src/Key-Sparse-Transformer
"""

import sys

from ks_keras.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
