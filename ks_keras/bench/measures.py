"""Child side: the measures, one per child process (`child_main`): model, attention, pipeline,
lengths (and `profile`, from `ks_keras.bench.profiling`)."""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ks_keras import bench_reference, runtime
from ks_keras.bench.child import (
    _build_compiled_model,
    _peak_rss_gib,
    _serving_function,
    _setup_child,
    _timed,
    realistic_lengths,
    synthetic_batch,
)
from ks_keras.bench.profiling import _measure_profile
from ks_keras.bench.runner import _json_default
from ks_keras.bench.settings import MIN_LENGTH_FRACTION, RESULT_PREFIX
from ks_keras.config import padding_invariant


def _measure_model(spec: dict[str, Any]) -> dict[str, Any]:
    """`train`, `infer` or `latency`: one compiled model, one batch size."""
    import numpy as np

    _, keras = _setup_child(spec)
    model, n_params = _build_compiled_model(spec, keras)
    batch = spec["batch"]
    batches = [synthetic_batch(spec, batch, seed) for seed in range(spec.get("distinct", 3))]
    counter = [0]

    def next_batch():
        counter[0] += 1
        return batches[counter[0] % len(batches)]

    if spec["kind"] == "train":

        def step():
            x, y = next_batch()
            loss = model.train_on_batch(x, y)
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite training loss {loss}")

    elif spec.get("serving"):
        serve = _serving_function(spec, model)

        def step():
            x, _ = next_batch()
            np.asarray(serve(x)["probabilities"])

    else:

        def step():
            x, _ = next_batch()
            model.predict_on_batch(x)

    timing = _timed(step, spec["warmup"], spec["max_warmup"], spec["repeats"])
    return {
        **timing,
        "samples_per_s": batch / timing["median_s"],
        "trainable_params": n_params,
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }


def _measure_attention(spec: dict[str, Any]) -> dict[str, Any]:
    """One attention layer (key-sparse or stock MHA), forward or forward + backward."""
    tf, keras = _setup_child(spec)
    from ks_keras.layers import KeySparseAttention
    from ks_keras.layers.masks import pair_mask

    a = spec["attention"]
    heads, dim, length = a["heads"], a["dim"], a["length"]
    common = dict(num_heads=heads, key_dim=dim // heads, dropout=a["dropout"])
    if spec["layer"] == "key_sparse":
        layer = KeySparseAttention(sparsity=a["sparsity"], **common)
    else:
        layer = keras.layers.MultiHeadAttention(**common)
    layer.build((None, length, dim), (None, length, dim))

    import numpy as np

    rng = np.random.default_rng(0)
    batch = spec["batch"]
    n = rng.integers(max(1, math.ceil(MIN_LENGTH_FRACTION * length)), length + 1, size=batch)
    padding = tf.constant((np.arange(length)[None, :] < n[:, None]).astype("int32"))
    x = tf.constant(rng.standard_normal((batch, length, dim), dtype=np.float32))
    backward = spec["mode"] == "fwd_bwd"

    @tf.function(jit_compile=bool(spec["jit"]))
    def run(x, padding):
        mask = pair_mask(padding, padding, length, length)
        if not backward:
            return [layer(x, x, attention_mask=mask, training=False)]
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, x, attention_mask=mask, training=True)
            loss = tf.reduce_sum(tf.cast(out, "float32") ** 2)
        return tape.gradient(loss, [x, *layer.trainable_variables])

    def step():
        outs = run(x, padding)
        outs[0].numpy()

    timing = _timed(step, spec["warmup"], spec["max_warmup"], spec["repeats"])
    return {**timing, "peak_rss_gib": round(_peak_rss_gib(), 3)}


def _synthetic_cache(
    spec: dict[str, Any], folder: Path, n: int, lengths: dict[str, Any] | None = None
):
    """A feature cache of `n` synthetic utterances, written with the cache module's writer
    (stored lengths from `lengths`, `{modality: [n] ints}`, where given)."""
    from types import SimpleNamespace

    import numpy as np

    from ks_keras.features import cache as cache_mod

    rng = np.random.default_rng(0)
    m = spec["model"]
    max_len = {"audio": spec["audio_len"], "text": spec["text_len"]}
    modalities = tuple(m["modalities"])
    extractors = {
        mod: SimpleNamespace(
            metadata={"synthetic": True}, name="synthetic", dim=m[f"{mod}_dim"], frame_rate=None
        )
        for mod in modalities
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / cache_mod.METADATA_FILE).write_text(
        json.dumps({**cache_mod.cache_metadata(extractors), "complete": True})
    )
    shard_size = 64
    for start in range(0, n, shard_size):
        utts = [
            SimpleNamespace(id=f"syn{i:05d}", path=str(folder / f"syn{i:05d}.wav"), text="x")
            for i in range(start, min(n, start + shard_size))
        ]
        features = {}
        for mod in modalities:
            t_max = max_len[mod]
            # Stored unpadded and, like real features, sometimes longer than the crop length.
            sizes = rng.integers(
                math.ceil(MIN_LENGTH_FRACTION * t_max), int(1.2 * t_max) + 1, len(utts)
            )
            if lengths is not None and mod in lengths:
                sizes = lengths[mod][start : start + len(utts)]
            features[mod] = [
                rng.standard_normal((int(s), m[f"{mod}_dim"]), dtype=np.float32) for s in sizes
            ]
        cache_mod._write_shard(folder, start // shard_size, utts, features, modalities)
    return cache_mod.FeatureCache.open(folder)


def _in_memory_dataset(spec: dict[str, Any], n: int, batch: int, tf):
    """Fallback pipeline: ragged in-memory arrays → pad to the fixed lengths → batches."""
    import numpy as np

    rng = np.random.default_rng(0)
    m = spec["model"]
    lengths = {"audio": spec["audio_len"], "text": spec["text_len"]}
    columns = {}
    for mod in m["modalities"]:
        t_max, dim = lengths[mod], m[f"{mod}_dim"]
        sizes = rng.integers(math.ceil(MIN_LENGTH_FRACTION * t_max), t_max + 1, n)
        columns[mod] = tf.RaggedTensor.from_row_lengths(
            rng.standard_normal((int(sizes.sum()), dim), dtype=np.float32), sizes
        )
    labels = rng.integers(0, m["num_classes"], n).astype("int32")

    def to_element(features, label):
        inputs = {}
        for mod, x in features.items():
            size = tf.shape(x)[0]
            inputs[mod] = x
            inputs[f"{mod}_mask"] = tf.ones([size], tf.int32)
        return inputs, label

    shapes = {}
    for mod in m["modalities"]:
        shapes[mod] = [lengths[mod], m[f"{mod}_dim"]]
        shapes[f"{mod}_mask"] = [lengths[mod]]
    ds = tf.data.Dataset.from_tensor_slices((columns, labels)).map(to_element).cache()
    ds = ds.shuffle(n, seed=0, reshuffle_each_iteration=True)
    ds = ds.padded_batch(batch, padded_shapes=(shapes, []), drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _measure_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput of the input pipeline alone, first pass and cached epochs."""
    tf, _ = _setup_child(spec)
    n, batch = spec["utterances"], spec["batch"]
    source, fallback_reason = None, None
    with tempfile.TemporaryDirectory(prefix="ks_bench_cache_") as tmp:
        try:
            from ks_keras.config import DataConfig
            from ks_keras.data import make_dataset

            cache = _synthetic_cache(spec, Path(tmp) / "cache", n)
            data_cfg = DataConfig(audio_max_len=spec["audio_len"], text_max_len=spec["text_len"])
            rng = __import__("numpy").random.default_rng(1)
            labels = rng.integers(0, spec["model"]["num_classes"], n)
            ds = make_dataset(
                cache,
                cache.ids,
                labels,
                data_cfg,
                batch_size=batch,
                shuffle=True,
                seed=0,
                modalities=tuple(spec["model"]["modalities"]),
                drop_remainder=True,
            )
            source = "ks_keras.data.make_dataset (synthetic TFRecord feature cache)"
        except Exception as e:  # ks_keras.data is optional here: fall back, and say why
            fallback_reason = f"{type(e).__name__}: {e}"
            ds = _in_memory_dataset(spec, n, batch, tf)
            source = "in-memory tf.data (from_tensor_slices + padded_batch)"

        epoch_times = []
        samples = 0
        for _ in range(spec["epochs"] + 1):
            t0 = time.perf_counter()
            samples = 0
            for inputs, _labels in ds:
                samples += int(inputs[spec["model"]["modalities"][0]].shape[0])
            epoch_times.append(time.perf_counter() - t0)
    steady = statistics.median(epoch_times[1:])
    return {
        "source": source,
        "fallback_reason": fallback_reason,
        "utterances": n,
        "samples_per_epoch": samples,
        "first_epoch_s": round(epoch_times[0], 4),
        "epoch_times_s": [round(t, 4) for t in epoch_times[1:]],
        "median_s": steady,
        "samples_per_s": samples / steady if steady > 0 else float("inf"),
        "first_epoch_samples_per_s": samples / epoch_times[0] if epoch_times[0] > 0 else None,
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }


def _measure_lengths(spec: dict[str, Any]) -> dict[str, Any]:
    """One epoch of training (`mode` train) or of batch inference (`infer`) over `samples`
    utterances with `realistic_lengths`, batched by `ks_keras.data.make_dataset` as
    `ks-keras train` / `evaluate` batch them: length-bucketed (`layout` bucketed, when the
    model ignores trailing padding) or padded to the full length (`padded`)."""
    import numpy as np

    from ks_keras.config import DataConfig, ModelConfig, from_dict
    from ks_keras.data import length_order, make_dataset, restore_order

    _, keras = _setup_child(spec)
    model, n_params = _build_compiled_model(spec, keras)
    m = spec["model"]
    n, batch, train = spec["samples"], spec["batch"], spec["mode"] == "train"
    modalities = tuple(m["modalities"])
    bucket = spec["layout"] == "bucketed" and padding_invariant(from_dict(ModelConfig, m, "model"))
    audio = realistic_lengths(n, spec.get("seed", 0), spec["audio_len"])
    # The transcript grows with the utterance: its length in proportion to the audio's.
    text = np.clip(np.ceil(audio * spec["text_len"] / spec["audio_len"]), 1, spec["text_len"])
    data_cfg = DataConfig(audio_max_len=spec["audio_len"], text_max_len=spec["text_len"])
    labels = np.random.default_rng(1).integers(0, m["num_classes"], n)
    with tempfile.TemporaryDirectory(prefix="ks_bench_lengths_") as tmp:
        cache = _synthetic_cache(
            spec, Path(tmp) / "cache", n, {"audio": audio, "text": text.astype(np.int64)}
        )
        ids = list(cache.ids)
        ds = make_dataset(
            cache,
            ids,
            labels,
            data_cfg,
            batch_size=batch,
            shuffle=train,
            seed=0,
            modalities=modalities,
            bucket_by_length=bucket,
        )
        # Batches and the share of computed audio steps that are real (not padding); this
        # pass also fills the training pipeline's in-memory cache.
        key = modalities[0]
        widths = [(int(x[key].shape[0]), int(x[key].shape[1])) for x, *_ in ds]
        real = int(np.minimum(cache.lengths(ids, key), getattr(data_cfg, f"{key}_max_len")).sum())
        order = length_order(cache, ids, data_cfg, modalities) if bucket and not train else None

        if train:

            def epoch():
                for x, y in ds:
                    loss = model.train_on_batch(x, y)
                    if not math.isfinite(float(loss)):
                        raise FloatingPointError(f"non-finite training loss {loss}")

        else:

            def epoch():
                probs = model.predict(ds, verbose=0)
                if order is not None:
                    probs = restore_order(probs, order)  # what evaluation does
                if probs.shape[0] != n or not np.isfinite(probs).all():
                    raise FloatingPointError(f"bad predictions, shape {probs.shape}")

        timing = _timed(epoch, spec["warmup"], spec["max_warmup"], spec["repeats"])
    return {
        **timing,
        "samples_per_s": n / timing["median_s"],
        "samples_per_epoch": n,
        "batches_per_epoch": len(widths),
        "bucketed": bucket,
        "mean_audio_frames": round(float(audio.mean()), 1),
        "real_step_share": round(real / sum(b * w for b, w in widths), 4),
        "trainable_params": n_params,
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measure described by `spec` (in this process) and return its result."""
    kind = spec["kind"]
    if kind == "reference":  # PyTorch only: this process never imports TensorFlow
        return bench_reference.measure_reference(spec)
    if kind in ("train", "infer", "latency"):
        result = _measure_model(spec)
    elif kind == "attention":
        result = _measure_attention(spec)
    elif kind == "pipeline":
        result = _measure_pipeline(spec)
    elif kind == "lengths":
        result = _measure_lengths(spec)
    elif kind == "profile":
        result = _measure_profile(spec)
    else:
        raise ValueError(f"unknown measure kind {kind!r}")
    import tensorflow as tf

    result["devices"] = [d.device_type for d in tf.config.list_physical_devices()]
    result["onednn"] = runtime.onednn_status()
    return result


def child_entry(spec_json: str) -> int:
    """`python -m ks_keras.bench --child SPEC`: run one measure in this process and print its
    result as one `RESULT_PREFIX` JSON line (what `ks_keras.bench.runner.run_child` reads)."""
    spec = json.loads(spec_json)
    try:
        result = child_main(spec)
    except (bench_reference.ReferenceLoadError, FileNotFoundError) as e:
        if spec.get("kind") != "reference":
            raise
        # Worded for the user (the reference contract): the parent shows it as is.
        print(RESULT_PREFIX + json.dumps({"error": str(e), "reference_error": True}))
        return 1
    print(RESULT_PREFIX + json.dumps(result, default=_json_default), flush=True)
    return 0
