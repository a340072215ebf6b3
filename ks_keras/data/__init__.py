"""tf.data pipelines from the feature cache: crop/pad, int32 masks, normalisation, batching.

Every element is `(inputs, label)` or `(inputs, label, sample_weight)` with

```
inputs = {"audio": [B, audio_max_len, Da] float32, "audio_mask": [B, audio_max_len] int32,
          "text":  [B, text_max_len, Dt] float32,  "text_mask":  [B, text_max_len] int32}
label  = [B] int32
```

(only the requested modalities' keys). Sequences are cropped or zero-padded **at the end**
(paper: 460 audio frames, 20 tokens); mask 1 = real step. Padded steps are exactly 0, also
after normalisation.

- Training (`shuffle=True`) streams the TFRecord shards (memory stays small; multi-worker
  sharding by file works), caches the cropped elements in memory after the first pass, and
  shuffles with `seed` (same seed → same order; each epoch reshuffles deterministically).
- Evaluation (`shuffle=False`) yields the utterances **in the order given**, built from
  `load_arrays` (cropped arrays in memory).
- Length bucketing (`bucket_by_length=True`, only for models whose output ignores trailing
  padding, `bucketing(cfg)`) cuts every batch after its longest real step. Training batches
  utterances of similar length (buckets at the length quartiles, shuffled); evaluation
  batches them from the shortest to the longest (`length_order`), and `restore_order` puts
  the predictions back in the order given.

Normalisation (`features.audio.normalize`): statistics are computed by `compute_norm_stats`
from the utterances you pass (the training ids for `global`), stored in a JSON-able
`NormStats`, and applied here — never baked into the cache. `speaker` mode normalises each
speaker with that speaker's own statistics (labels are never used), so pass every utterance
whose speaker must be normalised, test speakers included.

Example:

```python
ds = make_dataset(cache, train_ids, corpus.label_ids(train_ids), cfg.data, batch_size=16,
                  shuffle=True, seed=123)
inputs, labels = next(iter(ds))
inputs["audio"].shape   # (16, 460, 80)
```
"""

# The package re-exports every name of the former `ks_keras/data.py`; the code lives in:
# arrays.py (class weights, normalisation statistics, input checks, cropped arrays, length
# order) and pipeline.py (`make_dataset` and its tf.data pieces). The crop/pad/normalise
# helpers come from `ks_keras.sequences`, as before.
from ks_keras.data.arrays import (
    MODALITIES,
    STD_FLOOR,
    NormStats,
    class_weights,
    compute_norm_stats,
    functional_rows,
    length_order,
    load_arrays,
    restore_order,
)
from ks_keras.data.arrays import _mean_std as _mean_std
from ks_keras.data.arrays import _validate as _validate
from ks_keras.data.pipeline import _bucketed_batches as _bucketed_batches
from ks_keras.data.pipeline import _cut_after_longest as _cut_after_longest
from ks_keras.data.pipeline import _drop_id as _drop_id
from ks_keras.data.pipeline import _input_keys as _input_keys
from ks_keras.data.pipeline import _one_variant_each as _one_variant_each
from ks_keras.data.pipeline import _static_table as _static_table
from ks_keras.data.pipeline import _streaming as _streaming
from ks_keras.data.pipeline import bucketing, make_dataset
from ks_keras.sequences import normalize_np, normalize_tf, pad_or_crop, pad_or_crop_tf

__all__ = [
    "MODALITIES",
    "STD_FLOOR",
    "NormStats",
    "bucketing",
    "class_weights",
    "compute_norm_stats",
    "functional_rows",
    "length_order",
    "load_arrays",
    "make_dataset",
    "normalize_np",
    "normalize_tf",
    "pad_or_crop",
    "pad_or_crop_tf",
    "restore_order",
]
