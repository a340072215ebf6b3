"""`python -m ks_keras.bench`: the benchmark, or (`--child SPEC`) one measure in this process.

The process entry point only (never imported by the library): the command line is
`ks_keras.commands.bench`, the child side `ks_keras.bench.measures.child_entry`.
"""

import sys

from ks_keras.commands.bench import main

sys.exit(main())
