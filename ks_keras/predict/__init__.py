"""Prediction from raw files: `ks-keras predict path.wav --text "..." --model ...`.

The model is either an export (`saved_models/<name>` → its latest version, or
`saved_models/<name>/<version>`) or a `.keras` file with its sidecar `<file>.keras.json`
(written by training via `ks_keras.export.write_model_sidecar`; without one, pass `--config`
with the training config whose `data.labels` names the classes in output order).

Raw inputs become model inputs exactly as in training: `load_audio` (mono, resampled to the
extractor's rate, with a note when the file had another rate), the extractors named by the
model's config, crop/pad at the end to the trained max lengths (`sequences.pad_or_crop`). Before
any extraction the request's extractors are compared with the fingerprints stored in the
model: a different model folder, layer, log-mel setting, … is an error, not a silent wrong
number.

A model with an openSMILE functionals input (`features.functionals`, export metadata
`functionals`) gets them computed for the request's audio files (one openSMILE child process per
call, `ks_keras.features.functionals.extract_files`) and, when it was trained with
`features.audio.normalize: speaker`, z-normalised per speaker from the request's utterances of
each speaker (`speaker_normalize`, training's rule), as the audio frames are.

Example:

```python
predictor = Predictor.load("saved_models/ks_keras")
[p] = predictor.predict_files(["a.wav"], ["I can't believe it"])
p.label, p.probabilities
```

The package, from the request to the answer:

- `ks_keras.predict.featurize`: `RequestFeaturizer` (raw files → model inputs) and the
  extractor fingerprint check (`compare_extractor_metadata`);
- `ks_keras.predict.predictor`: `Predictor` (a model + the featurizer) and `request_config`;
- `ks_keras.predict.output`: `check_probabilities` and `Prediction` records;
- `ks_keras.predict.manifest`: CSV manifests to predict and the output path check.

The command glue of `ks-keras predict` (local model or TF Serving) is
`ks_keras.commands.predict`; this package does not import `ks_keras.serving`.
"""

from __future__ import annotations

# `_MACHINE_KEYS` and `_manifest_chunks` (private) stay importable from here, as before.
from ks_keras.predict.featurize import _MACHINE_KEYS as _MACHINE_KEYS
from ks_keras.predict.featurize import (
    BadAudioError,
    RequestFeaturizer,
    compare_extractor_metadata,
    speaker_groups,
)
from ks_keras.predict.manifest import _manifest_chunks as _manifest_chunks
from ks_keras.predict.manifest import (
    check_output_path,
    read_prediction_manifest,
)
from ks_keras.predict.output import (
    Prediction,
    check_probabilities,
    predictions_from_probabilities,
)
from ks_keras.predict.predictor import Predictor, request_config

__all__ = [
    "BadAudioError",
    "Prediction",
    "Predictor",
    "RequestFeaturizer",
    "check_output_path",
    "check_probabilities",
    "compare_extractor_metadata",
    "predictions_from_probabilities",
    "read_prediction_manifest",
    "request_config",
    "speaker_groups",
]
