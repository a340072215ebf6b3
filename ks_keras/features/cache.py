"""On-disk feature cache: sharded TFRecords plus JSON metadata.

Layout of the cache folder:

```
metadata.json          extractor metadata per modality, dims, frame rates, completeness
.lock                  held while a process extracts (a second one waits for it)
speed-0.9/ …           speed-perturbed variants (`features.audio.speed_perturb`), same layout
shard-00000.tfrecord   one tf.train.Example per utterance (id, shard, audio, text, lengths)
shard-00000.json       the shard's index: [id, source key, audio frames, text tokens] per row,
                       plus the shard file's size and SHA-256
```

Where: `features.cache_dir` as configured. Left at its default (`cache/features`), each corpus
(name + manifest) and extractor setting gets its own subfolder
`cache/features/<corpus>-<10 hex digits>`, so unrelated configs never share (and never
invalidate) one cache; the folder in use is printed.

Why TFRecords: `tf.data` streams them without holding the corpus in memory (wav2vec features
of IEMOCAP are several GB), shards give natural resume points, and the format needs no extra
dependency. Features are stored unpadded and unnormalised (float32); cropping, padding and
normalisation happen in `ks_keras.data`.

Atomicity and resume: a shard is written to `*.tmp` and renamed, then its index is written
the same way; a shard counts as finished only once its index exists. A killed run leaves at
most a temp file (removed on the next run) or a shard without an index (overwritten), so a
re-run extracts exactly the unfinished utterances. An utterance is re-extracted when its
*source key* (utterance id, SHA-256 of the audio file's bytes, transcript) changes: an audio
file overwritten with other audio of the same size, or another corpus with the same file
names in the same folder, is extracted again. Later shards win over earlier ones.

Integrity: every shard's size and SHA-256 are checked when a cache is opened. `extract_corpus`
(`ks-keras features`, `train`, `evaluate`, `tune`) re-extracts the utterances of a damaged
shard (with a warning naming it); `FeatureCache.open` raises a `ValueError` naming the shard.

Bad audio: every unusable audio file of a run is collected (the good utterances are still
extracted and kept), and one error lists them all at the end.

Invalidation: `metadata.json` records each extractor's `metadata` (settings, model folder and
file hashes, package versions). If the configured extractors differ, the cache is invalidated
with a message naming what changed, its shards are deleted, and extraction starts afresh.

Modules: this one is the public face and re-exports every name; the code lives in
`features/store.py` (format constants, source keys, writing one shard, `FeatureCache` and
reading shards back) and `features/extract.py` (cache folder choice, metadata and
invalidation, the lock, `extract_corpus` and its run summary).

Example:

```python
cache = extract_corpus(cfg, corpus)        # no-op when everything is already there
audio, text = cache.get("03a01Fa")         # [T, 80], [Tt, 384] float32
```
"""

from __future__ import annotations

from ks_keras.features.extract import _IDENTITY_KEYS as _IDENTITY_KEYS
from ks_keras.features.extract import _MACHINE_KEYS as _MACHINE_KEYS
from ks_keras.features.extract import (
    LOCK_FILE,
    TEXT_MEMO_SIZE,
    build_extractors,
    cache_metadata,
    check_compatible,
    default_cache_subfolder,
    extract_corpus,
    resolve_cache_dir,
    run_summary,
)
from ks_keras.features.extract import _diff as _diff
from ks_keras.features.extract import _exclusive as _exclusive
from ks_keras.features.extract import _extract_checked as _extract_checked
from ks_keras.features.extract import _extract_into as _extract_into
from ks_keras.features.extract import _load_wave as _load_wave
from ks_keras.features.extract import _prepare_dir as _prepare_dir
from ks_keras.features.extract import _raise_bad_audio as _raise_bad_audio
from ks_keras.features.store import (
    FORMAT_VERSION,
    METADATA_FILE,
    MODALITIES,
    SHARD_GLOB,
    CacheEntry,
    FeatureCache,
    source_key,
)
from ks_keras.features.store import _atomic_write_text as _atomic_write_text
from ks_keras.features.store import _example as _example
from ks_keras.features.store import _iter_shard_file as _iter_shard_file
from ks_keras.features.store import _read_indexes as _read_indexes
from ks_keras.features.store import _shard_name as _shard_name
from ks_keras.features.store import _shard_problem as _shard_problem
from ks_keras.features.store import _write_shard as _write_shard

__all__ = [
    "FORMAT_VERSION",
    "LOCK_FILE",
    "METADATA_FILE",
    "MODALITIES",
    "SHARD_GLOB",
    "TEXT_MEMO_SIZE",
    "CacheEntry",
    "FeatureCache",
    "build_extractors",
    "cache_metadata",
    "check_compatible",
    "default_cache_subfolder",
    "extract_corpus",
    "resolve_cache_dir",
    "run_summary",
    "source_key",
]
