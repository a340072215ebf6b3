"""Reload an export in a fresh process and run its signatures: the reload check of
`verify_export`.

`python -m ks_keras.export.verify EXPORT_DIR IN_NPZ OUT_NPZ` loads the SavedModel in
`EXPORT_DIR` with `tf.saved_model.load` (nothing cached from the parent process), reads the
cases from `IN_NPZ + ".json"` (a list of `{"signature", "inputs"}`) and their arrays from
`IN_NPZ` (keys `"<case>/<input>"`), calls each case's signature and saves every output as
`"<case>/<output>"` in `OUT_NPZ`; it then prints the signatures it found.

Only TensorFlow and numpy are used; `verify_export` runs this module and compares the outputs
with the Keras model.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Run the reload check; `argv` is `[export_dir, in_path, out_path]` (default
    `sys.argv[1:]`)."""
    export_dir, in_path, out_path = (sys.argv[1:] if argv is None else argv)[:3]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    with open(in_path + ".json") as f:
        cases = json.loads(f.read())
    arrays = np.load(in_path)
    loaded = tf.saved_model.load(export_dir)
    out = {}
    for i, case in enumerate(cases):
        fn = loaded.signatures[case["signature"]]
        kwargs = {k: tf.constant(arrays[f"{i}/{k}"]) for k in case["inputs"]}
        result = fn(**kwargs)
        for k, v in result.items():
            out[f"{i}/{k}"] = v.numpy()
    np.savez(out_path, **out)
    print("signatures:", sorted(loaded.signatures.keys()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
