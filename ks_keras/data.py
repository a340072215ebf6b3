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

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ks_keras.config import DataConfig
from ks_keras.features.cache import FeatureCache
from ks_keras.sequences import normalize_np, normalize_tf, pad_or_crop, pad_or_crop_tf

MODALITIES = ("audio", "text")
STD_FLOOR = 1e-5


def class_weights(labels, n_classes: int) -> np.ndarray:
    """Balanced class weights `n / (n_classes * count_c)` (float32, mean over samples = 1).

    A class absent from `labels` gets weight 1.0 (neutral; it never occurs in training).
    `training.balanced_class_weights` is this function as the `{class: weight}` dict that
    `fit(class_weight=...)` takes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(
            f"class_weights: expected a non-empty 1-D array of class indices, got "
            f"shape {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"class_weights: labels must lie in [0, {n_classes}), got "
            f"{labels.min()}..{labels.max()}"
        )
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, labels.size / (n_classes * np.maximum(counts, 1)), 1.0)
    return weights.astype(np.float32)


@dataclass
class NormStats:
    """Mean/std per feature dim, global or per speaker (JSON round-trip via to/from_dict)."""

    mode: str  # "global" or "speaker"
    modality: str = "audio"
    mean: np.ndarray | None = None  # [D] (global)
    std: np.ndarray | None = None
    speakers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "modality": self.modality,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "speakers": {s: [m.tolist(), d.tolist()] for s, (m, d) in self.speakers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        arr = lambda v: None if v is None else np.asarray(v, np.float32)  # noqa: E731
        return cls(
            d["mode"],
            d.get("modality", "audio"),
            arr(d.get("mean")),
            arr(d.get("std")),
            {s: (arr(m), arr(v)) for s, (m, v) in d.get("speakers", {}).items()},
        )

    def stats_for(
        self, utt_id: str, speaker_of: dict[str, str] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "global":
            return self.mean, self.std
        if not speaker_of or utt_id not in speaker_of:
            raise ValueError(
                f"speaker normalisation: no speaker known for utterance {utt_id}; "
                f"pass speaker_of (e.g. corpus.speaker_of())"
            )
        speaker = speaker_of[utt_id]
        if speaker not in self.speakers:
            raise ValueError(
                f"speaker normalisation: no statistics for speaker {speaker!r} "
                f"(utterance {utt_id}); compute_norm_stats must see that speaker"
            )
        return self.speakers[speaker]


def _mean_std(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    frames = np.concatenate([a for a in arrays if a.shape[0] > 0]).astype(np.float64)
    return (
        frames.mean(axis=0).astype(np.float32),
        np.maximum(frames.std(axis=0), STD_FLOOR).astype(np.float32),
    )


def compute_norm_stats(
    cache: FeatureCache,
    utt_ids: list[str],
    mode: str,
    speaker_of: dict[str, str] | None = None,
    modality: str = "audio",
) -> NormStats | None:
    """Mean/variance statistics of `modality` features over `utt_ids` (all real frames).

    Args:
        cache: the feature cache.
        utt_ids: for `global`, the training utterances only; for `speaker`, every utterance
            of every speaker to normalise.
        mode: `features.audio.normalize`: "none" (returns None), "global" or "speaker".
        speaker_of: `{id: speaker}` (required for `speaker`).
    """
    if mode == "none":
        return None
    if mode not in ("global", "speaker"):
        raise ValueError(
            f"features.audio.normalize: expected none, global or speaker, got {mode!r}"
        )
    if not utt_ids:
        raise ValueError("compute_norm_stats: no utterances given")
    arrays = {}
    for utt_id, audio, text in cache.iter_records(utt_ids):
        arrays[utt_id] = audio if modality == "audio" else text
        if arrays[utt_id] is None:
            raise ValueError(f"the feature cache holds no {modality} features")
    if mode == "global":
        mean, std = _mean_std(list(arrays.values()))
        return NormStats("global", modality, mean, std)
    if speaker_of is None:
        raise ValueError("speaker normalisation needs speaker_of (e.g. corpus.speaker_of())")
    missing = [i for i in utt_ids if i not in speaker_of]
    if missing:
        raise ValueError(f"speaker normalisation: no speaker for utterance(s) {missing[:10]}")
    groups: dict[str, list[np.ndarray]] = {}
    for utt_id, x in arrays.items():
        groups.setdefault(speaker_of[utt_id], []).append(x)
    return NormStats(
        "speaker", modality, speakers={s: _mean_std(xs) for s, xs in sorted(groups.items())}
    )


def _validate(
    cache: FeatureCache,
    utt_ids: list[str],
    labels,
    modalities: tuple[str, ...],
    num_classes: int | None,
) -> np.ndarray:
    utt_ids = list(utt_ids)
    if not utt_ids:
        raise ValueError("make_dataset: no utterance ids given")
    dups = (
        sorted({i for i in utt_ids if utt_ids.count(i) > 1})
        if len(set(utt_ids)) != len(utt_ids)
        else []
    )
    if dups:
        raise ValueError(f"make_dataset: duplicate utterance id(s) {dups[:10]}")
    labels = np.asarray(labels)
    if labels.shape != (len(utt_ids),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"make_dataset: labels must be {len(utt_ids)} integer class indices "
            f"(one per id), got shape {labels.shape} dtype {labels.dtype}"
        )
    upper = num_classes if num_classes is not None else np.iinfo(np.int32).max
    bad = [(i, int(y)) for i, y in zip(utt_ids, labels) if not 0 <= y < upper]
    if bad:
        raise ValueError(f"make_dataset: label(s) out of range [0, {num_classes}): {bad[:10]}")
    for m in modalities:
        if m not in MODALITIES:
            raise ValueError(f"make_dataset: unknown modality {m!r}; expected audio/text")
        cache._check_modality(m)
    cache.check_ids(utt_ids)
    for m in modalities:
        empty = [i for i, n in zip(utt_ids, cache.lengths(utt_ids, m)) if n == 0]
        if empty:
            raise ValueError(
                f"utterance(s) {empty[:20]} have no {m} frames: the {m}_mask would be all "
                f"padding; remove them from the split or re-extract their features"
            )
    return labels.astype(np.int32)


def load_arrays(
    cache: FeatureCache,
    utt_ids: list[str],
    data_cfg: DataConfig,
    modalities: tuple[str, ...] | list[str] | None = None,
    normalizer: NormStats | None = None,
    speaker_of: dict[str, str] | None = None,
    functionals: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Cropped/padded (and normalised) arrays of the given utterances, in the given order.

    With `functionals` (`{id: [D]}`, see `ks_keras.features.functionals.model_functionals`)
    the result also holds `"functionals": [N, D]`.

    Returns:
        `{"audio": [N, audio_max_len, Da], "audio_mask": [N, audio_max_len] int32, "text": …,
        "text_mask": …}` for the requested modalities (default: all in the cache).
    """
    modalities = tuple(modalities or cache.modalities)
    _validate(cache, utt_ids, np.zeros(len(utt_ids), np.int32), modalities, None)
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}
    out = {m: np.zeros((len(utt_ids), max_len[m], cache.dims[m]), np.float32) for m in modalities}
    out.update({f"{m}_mask": np.zeros((len(utt_ids), max_len[m]), np.int32) for m in modalities})
    position = {utt_id: k for k, utt_id in enumerate(utt_ids)}
    for utt_id, audio, text in cache.iter_records(utt_ids):
        k = position[utt_id]
        arrays = {"audio": audio, "text": text}
        for m in modalities:
            x, mask = pad_or_crop(arrays[m], max_len[m])
            if normalizer is not None and normalizer.modality == m:
                x = normalize_np(x, mask, *normalizer.stats_for(utt_id, speaker_of))
            out[m][k], out[f"{m}_mask"][k] = x, mask
    if functionals is not None:
        out["functionals"] = functional_rows(functionals, utt_ids)
    return out


def functional_rows(functionals: dict[str, np.ndarray], utt_ids: list[str]) -> np.ndarray:
    """`[N, D]` float32 rows of `functionals` for `utt_ids` (clear error for missing ids)."""
    missing = [i for i in utt_ids if i not in functionals]
    if missing:
        raise ValueError(
            f"no openSMILE functionals for {len(missing)} utterance(s) ({', '.join(missing[:5])})"
        )
    return np.stack([np.asarray(functionals[i], np.float32) for i in utt_ids])


def _static_table(keys: list[str], values, dtype, default):
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, tf.string), tf.constant(values, dtype)
        ),
        default_value=tf.constant(default, dtype),
    )


def make_dataset(
    cache: FeatureCache,
    utterance_ids: list[str],
    labels,
    data_cfg: DataConfig,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    modalities: tuple[str, ...] | list[str] | None = None,
    class_weight: np.ndarray | None = None,
    normalizer: NormStats | None = None,
    speaker_of: dict[str, str] | None = None,
    num_classes: int | None = None,
    drop_remainder: bool = False,
    repeat: bool = False,
    with_ids: bool = False,
    prefetch: bool = True,
    functionals: dict[str, np.ndarray] | None = None,
    bucket_by_length: bool = False,
    speed_variants: bool = True,
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of `(inputs, label[, sample_weight])` (see module doc).

    Args:
        cache: the feature cache (`extract_corpus` / `FeatureCache.open`).
        utterance_ids: which utterances.
        labels: their class indices (ints), one per id.
        data_cfg: `data.audio_max_len`, `data.text_max_len`, `data.shuffle_buffer`.
        batch_size: batch size.
        shuffle: stream and shuffle by `seed` (training); otherwise keep the given order.
        seed: shuffle seed.
        modalities: which inputs to yield (default: all in the cache).
        class_weight: per-class weights (e.g. `class_weights(...)`); adds a sample weight.
        normalizer: `NormStats` to apply (None = no normalisation).
        speaker_of: `{id: speaker}`, needed for speaker normalisation.
        num_classes: if given, labels are checked to lie in [0, num_classes).
        drop_remainder: drop the last partial batch (static batch dimension).
        repeat: repeat forever (use with `steps_per_epoch`).
        with_ids: also put the utterance id (string) into `inputs["id"]`.
        prefetch: add `prefetch(AUTOTUNE)`.
        functionals: `{id: [D]}` openSMILE functionals; adds the input `"functionals"`.
        bucket_by_length: batch utterances of similar length together and cut each batch
            after its longest real step. Same samples per epoch, far less padding; use it
            only for models whose output ignores trailing padding (`bucketing(cfg)`,
            `ks_keras.config.padding_invariant`). Training (`shuffle=True`): 4 buckets at the
            length quartiles of these utterances, shuffled within and across buckets.
            Evaluation (`shuffle=False`): the utterances come in `length_order(...)` order
            (shortest first), so batches are consecutive lengths; put predictions back in
            the order given with `restore_order(predictions, length_order(...))`.
        speed_variants: training only (`shuffle=True`), when `cache.variants` holds
            speed-perturbed features (`features.audio.speed_perturb`): every epoch, each
            utterance comes from one of the original and its variants, drawn by `seed`
            (uniformly, afresh each epoch, exactly one per utterance, so an epoch has the same
            samples and length). Normalisation statistics, transcripts and functionals are the
            original utterance's. Without shuffling (validation, test) only the original is
            used. Memory: every variant is cached like the original.

    Raises:
        ValueError: unknown/duplicate ids, bad labels, all-padding samples (named), missing
            modalities or speakers.
    """
    modalities = tuple(modalities or cache.modalities)
    if batch_size < 1:
        raise ValueError(f"make_dataset: batch_size must be >= 1, got {batch_size}")
    utterance_ids = list(utterance_ids)
    labels = _validate(cache, utterance_ids, labels, modalities, num_classes)
    if class_weight is not None:
        class_weight = np.asarray(class_weight, np.float32)
        if class_weight.ndim != 1 or labels.max() >= class_weight.shape[0]:
            raise ValueError(
                f"make_dataset: class_weight must be a 1-D array with one weight "
                f"per class (labels go up to {labels.max()}), got shape "
                f"{class_weight.shape}"
            )
    if normalizer is not None:
        for utt_id in utterance_ids:
            normalizer.stats_for(utt_id, speaker_of)  # fail early, naming the utterance
    rows = functional_rows(functionals, utterance_ids) if functionals is not None else None
    if bucket_by_length and not shuffle:
        order = length_order(cache, utterance_ids, data_cfg, modalities)
        utterance_ids = [utterance_ids[i] for i in order]
        labels = labels[order]
        rows = rows[order] if rows is not None else None
    if shuffle:
        sources = [cache]
        if speed_variants and "audio" in modalities:
            sources += list(getattr(cache, "variants", []))
        streams = [
            _streaming(
                source,
                utterance_ids,
                labels,
                data_cfg,
                modalities,
                normalizer,
                speaker_of,
                class_weight,
                rows,
            )
            for source in sources
        ]
        ds = streams[0] if len(streams) == 1 else _one_variant_each(streams, seed)
        ds = ds.shuffle(
            max(1, min(data_cfg.shuffle_buffer, len(utterance_ids))),
            seed=seed,
            reshuffle_each_iteration=True,
        )
    else:
        arrays = load_arrays(cache, utterance_ids, data_cfg, modalities, normalizer, speaker_of)
        inputs = {k: arrays[k] for k in _input_keys(modalities)}
        if rows is not None:
            inputs["functionals"] = rows
        if with_ids:
            inputs["id"] = np.array(utterance_ids, dtype=object)
        elements = (inputs, labels)
        if class_weight is not None:
            elements = (inputs, labels, class_weight[labels])
        ds = tf.data.Dataset.from_tensor_slices(elements)
    bucketed_training = shuffle and bucket_by_length
    if not with_ids and not bucketed_training:
        ds = ds.map(_drop_id)
    if repeat:
        ds = ds.repeat()
    if bucketed_training:
        ds = _bucketed_batches(cache, utterance_ids, data_cfg, modalities, ds, batch_size)
        ds = ds.map(_cut_after_longest(modalities), num_parallel_calls=tf.data.AUTOTUNE)
        if not with_ids:  # the buckets go by id (see `_bucketed_batches`)
            ds = ds.map(_drop_id)
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if bucket_by_length:  # sorted by length above: consecutive batches, each cut
            ds = ds.map(_cut_after_longest(modalities), num_parallel_calls=tf.data.AUTOTUNE)
    if prefetch:
        ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds


def bucketing(cfg) -> bool:
    """Whether batches of `cfg` (training and prediction) may be bucketed by length and cut
    after their longest real step: `data.bucket_by_length`, and a model that ignores trailing
    padding."""
    from ks_keras.config import padding_invariant

    return bool(cfg.data.bucket_by_length and padding_invariant(cfg.model))


def length_order(
    cache: FeatureCache,
    utterance_ids: list[str],
    data_cfg: DataConfig,
    modalities: tuple[str, ...] | list[str] | None = None,
) -> np.ndarray:
    """Indices into `utterance_ids` from the shortest to the longest utterance: the order in
    which `make_dataset(..., shuffle=False, bucket_by_length=True)` yields them.

    Sorted by the cropped length of the first modality, then of the others; ties keep the
    given order (a stable sort), so the same arguments always give the same order.

    Example:

    ```python
    ds = make_dataset(cache, ids, labels, cfg.data, 32, bucket_by_length=True)
    probs = restore_order(model.predict(ds), length_order(cache, ids, cfg.data))
    ```
    """
    modalities = tuple(modalities or cache.modalities)
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}
    ids = list(utterance_ids)
    keys = [np.minimum(cache.lengths(ids, m), max_len[m]) for m in modalities]
    # np.lexsort sorts by its last key first, and is stable.
    return np.lexsort(keys[::-1]) if keys else np.arange(len(ids))


def restore_order(rows, order: np.ndarray) -> np.ndarray:
    """Rows produced in `order` (e.g. predictions of a length-sorted dataset) put back in
    the original order: `restore_order(x[order], order)` is `x`."""
    rows = np.asarray(rows)
    order = np.asarray(order)
    if len(rows) != len(order):
        raise ValueError(f"restore_order: {len(rows)} rows for an order of {len(order)} items")
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _bucketed_batches(cache, utt_ids, data_cfg, modalities, ds, batch_size):
    """Batches of similar length: buckets at the quartiles of the (cropped) lengths of the
    first modality. Every bucket flushes its last partial batch, so an epoch has the same
    samples, and the same number of batches, every time. An utterance goes to the bucket of
    its original length (looked up by id), so speed-perturbed variants, which are a little
    shorter or longer, keep the bucket sizes, and the epoch's batch count, unchanged."""
    key = modalities[0]
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}[key]
    lengths = np.minimum(cache.lengths(list(utt_ids), key), max_len)
    bounds = sorted({int(q) + 1 for q in np.quantile(lengths, [0.25, 0.5, 0.75])})
    bounds = [b for b in bounds if 1 < b <= max_len]
    length_of = _static_table(list(utt_ids), lengths.astype(np.int32), tf.int32, 1)

    def length(inputs, *rest):
        return length_of.lookup(inputs["id"])

    return ds.bucket_by_sequence_length(
        length,
        bucket_boundaries=bounds,
        bucket_batch_sizes=[batch_size] * (len(bounds) + 1),
        drop_remainder=False,
    )


def _cut_after_longest(modalities):
    """Cut every modality of a batch after its longest real step (padding only goes)."""

    def cut(inputs, *rest):
        inputs = dict(inputs)
        for m in modalities:
            longest = tf.maximum(tf.reduce_max(tf.reduce_sum(inputs[f"{m}_mask"], axis=1)), 1)
            inputs[m] = inputs[m][:, :longest]
            inputs[f"{m}_mask"] = inputs[f"{m}_mask"][:, :longest]
        return (inputs, *rest)

    return cut


def _one_variant_each(streams: list[tf.data.Dataset], seed: int) -> tf.data.Dataset:
    """One element per utterance out of `streams` (the same utterances, one stream per speed
    variant): utterance `u` comes from stream `hash(u, r) mod len(streams)`, where `r` is drawn
    afresh (by `seed`) every time the dataset is iterated, i.e. every epoch."""
    k = len(streams)

    def tag(v):
        def add(inputs, *rest):
            return ({**inputs, "variant": tf.constant(v, tf.int64)}, *rest)

        return add

    union = streams[0].map(tag(0))
    for v, stream in enumerate(streams[1:], start=1):
        union = union.concatenate(stream.map(tag(v)))
    n = int(streams[0].cardinality())
    draw = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    draws = draw.flat_map(lambda r: tf.data.Dataset.from_tensors(r).repeat())

    def chosen(element, r):
        key = tf.strings.join([element[0]["id"], tf.strings.as_string(r)], separator="#")
        return tf.equal(tf.strings.to_hash_bucket_fast(key, k), element[0]["variant"])

    def untag(element, r):
        inputs = {name: x for name, x in element[0].items() if name != "variant"}
        return (inputs, *element[1:])

    ds = tf.data.Dataset.zip((union, draws)).filter(chosen).map(untag)
    return ds.apply(tf.data.experimental.assert_cardinality(n))


def _input_keys(modalities: tuple[str, ...]) -> list[str]:
    return [k for m in modalities for k in (m, f"{m}_mask")]


def _drop_id(inputs, *rest):
    inputs = {k: v for k, v in inputs.items() if k != "id"}
    return (inputs, *rest)


def _streaming(
    cache: FeatureCache,
    utt_ids: list[str],
    labels: np.ndarray,
    data_cfg: DataConfig,
    modalities: tuple[str, ...],
    normalizer: NormStats | None,
    speaker_of: dict[str, str] | None,
    class_weight: np.ndarray | None,
    functional_matrix: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Stream the shards, keep the wanted (latest) records, crop/pad/normalise, cache."""
    shards = [cache.entries[i].shard for i in utt_ids]
    files = [str(cache.shard_path(n)) for n in sorted(set(shards))]
    shard_of = _static_table(utt_ids, shards, tf.int64, -1)
    label_of = _static_table(utt_ids, labels, tf.int32, -1)
    weight_of = (
        _static_table(utt_ids, class_weight[labels], tf.float32, 0.0)
        if class_weight is not None
        else None
    )
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}
    norm_table = norm_mean = norm_std = None
    if normalizer is not None:
        # One row of statistics per utterance: global stats repeated, or its speaker's.
        rows = [normalizer.stats_for(i, speaker_of) for i in utt_ids]
        norm_mean = tf.constant(np.stack([r[0] for r in rows]))
        norm_std = tf.constant(np.stack([r[1] for r in rows]))
        norm_table = _static_table(utt_ids, list(range(len(utt_ids))), tf.int64, -1)
    parse = cache.parse_fn()
    row_of = None
    if functional_matrix is not None:
        row_of = _static_table(utt_ids, list(range(len(utt_ids))), tf.int64, -1)
        functional_table = tf.constant(functional_matrix, tf.float32)

    def keep(record):
        return tf.equal(shard_of.lookup(record["id"]), record["shard"])

    def to_element(record):
        inputs = {"id": record["id"]}
        for m in modalities:
            x, mask = pad_or_crop_tf(record[m], max_len[m])
            if normalizer is not None and normalizer.modality == m:
                row = norm_table.lookup(record["id"])
                x = normalize_tf(x, mask, norm_mean[row], norm_std[row])
            inputs[m] = tf.ensure_shape(x, [max_len[m], cache.dims[m]])
            inputs[f"{m}_mask"] = mask
        if row_of is not None:
            inputs["functionals"] = tf.gather(functional_table, row_of.lookup(record["id"]))
        label = label_of.lookup(record["id"])
        if weight_of is not None:
            return inputs, label, weight_of.lookup(record["id"])
        return inputs, label

    ds = tf.data.TFRecordDataset(files)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).filter(keep)
    ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)
    # Exactly one record per id survives the filter; saying so gives Keras the epoch length.
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(utt_ids)))
    return ds.cache()
