"""Loading an export: `load_exported` and the request checks of `ExportedModel.predict`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.export.layout import load_export_metadata
from ks_keras.export.metadata import DEFAULT_SIGNATURE, FUNCTIONALS_INPUT, OUTPUT_NAMES


@dataclass
class ExportedModel:
    """A loaded export: its metadata and a `predict` over the SavedModel signatures."""

    path: Path
    metadata: dict
    loaded: Any = None

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def signatures(self) -> list[str]:
        return sorted(self.metadata["signatures"])

    def predict(
        self, inputs: dict[str, np.ndarray], signature: str = DEFAULT_SIGNATURE
    ) -> dict[str, np.ndarray]:
        """Run a signature on numpy inputs; returns `probabilities` and `class_id` arrays."""
        import tensorflow as tf

        if signature not in self.metadata["signatures"]:
            raise ValueError(f"{self.path}: no signature {signature!r} (has {self.signatures})")
        expected = self.metadata["signatures"][signature]["inputs"]
        check_request(inputs, expected, f"{self.path} [{signature}]")
        fn = self.loaded.signatures[signature]
        kwargs = {
            k: tf.constant(np.asarray(inputs[k], dtype=expected[k]["dtype"])) for k in expected
        }
        try:
            result = fn(**kwargs)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise ValueError(
                f"{self.path} [{signature}]: bad request ({tf_error_summary(e)})"
            ) from None
        return {k: result[k].numpy() for k in OUTPUT_NAMES}


def tf_error_summary(error: Exception) -> str:
    """The informative line of a TensorFlow error (its assertion text), not the node dump."""
    text = getattr(error, "message", None) or str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if line.startswith("assertion failed:"):
            match = re.search(r"assertion failed: \[(.*?)\] \[Condition", line) or re.search(
                r"assertion failed: \[(.*?)\]", line
            )
            return (match.group(1) if match else line).replace("\\'", "'")
    useful = [ln for ln in lines if not ln.startswith(("[[", "Detected at", "<stack", "Graph"))]
    return (useful or lines or [type(error).__name__])[-1]


def check_request(inputs: dict, expected: dict, where: str) -> None:
    """Names, ranks, widths and batch sizes of a request, before TensorFlow sees it."""
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: expected inputs {sorted(expected)}; missing {missing}, unexpected {extra}"
        )
    batches = set()
    for name, spec in expected.items():
        shape = np.shape(inputs[name])
        want = spec["shape"]
        if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
            pretty = ["None" if w is None else w for w in want]
            raise ValueError(f"{where}: input {name!r} has shape {shape}, expected {pretty}")
        batches.add(shape[0])
    if len(batches) > 1:
        raise ValueError(f"{where}: inputs disagree on the batch size {sorted(batches)}")
    if FUNCTIONALS_INPUT in expected:
        try:
            values = np.asarray(inputs[FUNCTIONALS_INPUT], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: input 'functionals' is not a numeric array") from None
        bad = np.flatnonzero(~np.isfinite(values).all(axis=-1)).tolist()
        if bad:
            raise ValueError(
                f"{where}: input 'functionals' holds NaN/inf in row(s) {bad[:10]}; every "
                "value must be finite (openSMILE gives NaN for audio that is too short)"
            )
    for name in expected:
        if name.endswith("_mask") and name[: -len("_mask")] in expected:
            t_x, t_m = np.shape(inputs[name[: -len("_mask")]])[1], np.shape(inputs[name])[1]
            if t_x != t_m:
                raise ValueError(
                    f"{where}: {name[: -len('_mask')]!r} has {t_x} steps but {name!r} has {t_m}"
                )


def load_exported(path: str | Path) -> ExportedModel:
    """Load an export (a version folder, or a base folder → its latest version).

    Raises:
        FileNotFoundError: no such folder.
        ValueError: not a ks_keras export, or a SavedModel that does not load.
    """
    import tensorflow as tf

    version_dir, metadata = load_export_metadata(path)
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as e:  # corrupt protobuf / missing variables
        raise ValueError(
            f"{version_dir}: the SavedModel does not load ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    missing = [s for s in metadata["signatures"] if s not in loaded.signatures]
    if missing:
        raise ValueError(f"{version_dir}: signatures {missing} named in its metadata are missing")
    return ExportedModel(path=version_dir, metadata=metadata, loaded=loaded)
