"""SavedModel export for TF Serving: layout, signatures, shipped metadata and a parity check.

An export is a plain SavedModel in TF Serving's layout, `<base_dir>/<name>/<version>/`, with
integer versions (the next free one by default):

```
saved_models/<name>/<version>/
  saved_model.pb, variables/        the graph and weights
  assets/labels.txt                 one class label per line, in output order
  assets/ks_keras.json              label order, feature extractor metadata, input widths,
                                    trained max lengths, openSMILE functionals settings,
                                    signatures and the resolved config
```

Signatures:

- `serving_default`: named inputs `audio` `[None, None, Da]` float32, `audio_mask`
  `[None, None]` int32, `text` `[None, None, Dt]` float32, `text_mask` `[None, None]` int32
  (only the trained modalities), plus `functionals` `[None, D]` float32 when the model reads
  openSMILE utterance functionals (`features.functionals`; no mask, no time axis; the client
  computes them and, under `features.audio.normalize: speaker`, z-normalises them per
  speaker as in training), named outputs `probabilities` `[None, C]` float32 and
  `class_id` `[None]` int32. Batch and length are dynamic. Inside the graph every sequence is
  brought to the trained length exactly as in training: steps beyond `data.<mod>_max_len`
  are cropped **at the end** (the start is kept), shorter inputs are zero-padded at the end,
  and feature values at masked steps are zeroed. The result therefore does not depend on how
  a client padded its batch. Where the model ignores trailing padding
  (`config.padding_invariant`, metadata `crop_to_longest`), the batch is then cut after its
  last real step instead of being padded to the trained length (same result, less work).
- `serving_waveform` (only when the audio front-end is the built-in log-mel and neither
  per-speaker normalisation nor openSMILE functionals are used: neither can run in the
  graph): raw 16 kHz mono `waveform` `[None, None]` float32 plus `waveform_length` `[None]`
  int32 (valid samples per row) and the text inputs; log-mel is computed in the graph, then
  as `serving_default`.

A version is written to a hidden temporary folder, verified there (unless asked not to) and
only then renamed to its integer name, so TF Serving, which polls the base folder, never
sees a half-written or unverified version.

Models saved as `.keras` files carry the same metadata in a sidecar JSON next to them
(`best.keras` → `best.keras.json`, see `write_model_sidecar`); `ks-keras export` and
`ks-keras predict` read it.

Example:

```python
path = export_model(model, cfg, labels=["angry", "happy", "neutral", "sad"],
                    feature_metadata={"audio": audio_ex.metadata, "text": text_ex.metadata})
exported = load_exported("saved_models/ks_keras")  # latest version
exported.predict({"audio": a, "audio_mask": am, "text": t, "text_mask": tm})
```

The package's modules, in import order (each imports only those before it):
`metadata` (format constants, `build_metadata`), `sidecar` (`.keras` sidecar and loading),
`layout` (TF Serving version folders), `signatures` (serving functions), `verification`
(`verify_export`, which reloads the export with `python -m ks_keras.export.verify`),
`exporting` (`export_model`) and `loading` (`load_exported`). Everything is importable from
`ks_keras.export`; the `ks-keras export` command is `ks_keras.commands.export`.
"""

from __future__ import annotations

from ks_keras.export.exporting import export_model
from ks_keras.export.layout import (
    list_versions,
    load_export_metadata,
    next_version,
    resolve_export_dir,
)
from ks_keras.export.loading import ExportedModel, check_request, load_exported, tf_error_summary
from ks_keras.export.metadata import (
    DEFAULT_SIGNATURE,
    EXPORT_FORMAT,
    FORMAT_VERSION,
    FUNCTIONALS_INPUT,
    LABELS_FILE,
    METADATA_FILE,
    OUTPUT_NAMES,
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    WAVEFORM_SIGNATURE,
    build_metadata,
    config_feature_metadata,
    functionals_metadata,
    metadata_config,
    metadata_functionals,
    model_input_names,
    normalization_metadata,
)
from ks_keras.export.sidecar import (
    check_finite_weights,
    check_keras_archive,
    load_keras_model,
    read_model_sidecar,
    sidecar_path,
    write_model_sidecar,
)
from ks_keras.export.signatures import (
    feature_input_specs,
    fit_length,
    make_serving_functions,
    waveform_input_specs,
    waveform_signature_problem,
)
from ks_keras.export.verification import (
    VerificationReport,
    normalize_numpy,
    verify_export,
)
from ks_keras.export.verification import _check_cli_listing as _check_cli_listing
from ks_keras.export.verification import _fit_numpy as _fit_numpy

__all__ = [
    "DEFAULT_SIGNATURE",
    "EXPORT_FORMAT",
    "FORMAT_VERSION",
    "FUNCTIONALS_INPUT",
    "LABELS_FILE",
    "METADATA_FILE",
    "OUTPUT_NAMES",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "WAVEFORM_SIGNATURE",
    "ExportedModel",
    "VerificationReport",
    "build_metadata",
    "check_finite_weights",
    "check_keras_archive",
    "check_request",
    "config_feature_metadata",
    "export_model",
    "feature_input_specs",
    "fit_length",
    "functionals_metadata",
    "list_versions",
    "load_export_metadata",
    "load_exported",
    "load_keras_model",
    "make_serving_functions",
    "metadata_config",
    "metadata_functionals",
    "model_input_names",
    "next_version",
    "normalization_metadata",
    "normalize_numpy",
    "read_model_sidecar",
    "resolve_export_dir",
    "sidecar_path",
    "tf_error_summary",
    "verify_export",
    "waveform_input_specs",
    "waveform_signature_problem",
    "write_model_sidecar",
]
