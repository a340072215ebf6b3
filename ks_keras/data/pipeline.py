"""tf.data pipelines: `make_dataset` streams (training) or slices (evaluation) the cache.

The tf.data side of `ks_keras.data` (which re-exports every name; its docstring describes the
elements): `make_dataset`, `bucketing`, streaming the TFRecord shards (`_streaming`), length
buckets and cutting batches after their longest real step, and drawing one speed variant per
utterance each epoch (`_one_variant_each`). Arrays, weights and statistics come from
`ks_keras.data.arrays`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ks_keras.config import DataConfig
from ks_keras.data.arrays import (
    NormStats,
    _validate,
    functional_rows,
    length_order,
    load_arrays,
)
from ks_keras.features.cache import FeatureCache
from ks_keras.sequences import normalize_tf, pad_or_crop_tf


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
