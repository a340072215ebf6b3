"""`python -m ks_keras.bench`: the benchmark, or (`--child SPEC`) one measure in this process."""

import sys

from ks_keras.bench.cli import main

sys.exit(main())
