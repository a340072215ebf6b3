"""`ks-keras bench`: speed and memory of the KS-T + CCAB model, and of a reference model on the
same machine in the same run.

Every figure is measured in a **fresh child process** (one measure per process, so no
measure inherits another's allocator state, compiled functions or peak memory), after a
warm-up that is excluded from the timings, as the median over several repetitions. The
parent process never imports TensorFlow (nor PyTorch).

Measures (issue 8):

- `train`: one optimizer step (`model.train_on_batch`, the same compiled function
  `model.fit` runs) at global batch 16 and 32 → samples/s; peak resident memory (VmHWM)
  of the training process at batch 32.
- `infer`: `model.predict_on_batch` at batch 32 → samples/s; `latency` at batch 1, also
  through the export's serving graph (which cuts a request after its last real step), with
  TensorFlow's default threads and with one thread per op and one op per core at a time
  (`intra_op 1, inter_op <cores>`, the setting docs/serving.md gives for single requests).
- `attention`: one key-sparse attention layer vs stock `keras.layers.MultiHeadAttention` of
  the same shape (the paper's audio self-attention: 460 × 512, 8 heads), forward and
  forward + backward.
- `xla`: training (and inference) with `jit_compile` on vs off.
- `precision`: float32 vs mixed precision (`mixed_bfloat16` on CPU, `mixed_float16` on GPU).
- `pipeline`: the `tf.data` input pipeline alone (samples/s) vs the model's training step.
- `lengths`: an epoch of training and of batch inference over utterances with realistic
  lengths (`realistic_lengths`: IEMOCAP-like, mean 4.5 s, a tail past 20 s, cropped at 460
  frames), through `ks_keras.data.make_dataset` with length-bucketed batches and with
  batches padded to 460 frames: the same samples per epoch, samples/s for each and the
  ratio bucketed / padded of this run.

Inputs are synthetic with realistic padding: each sample's real length is drawn uniformly
between 30 % and 100 % of the maximum (audio 460 frames, text 20 tokens); the `lengths`
measure draws them from `realistic_lengths` instead.

Ratios are only ever taken between figures measured in the same run on this machine: with
`--reference-dir`, the `train`, `infer` and `latency` measures also run the authors' PyTorch
model (imported from the user's checkout, in child processes; `ks_keras.bench_reference`)
with the same protocol, and the report puts both side by side. Without it the report gives
our absolute figures and this machine's CPU; the figures measured once on another machine
(`STORED_REFERENCE`) are shown as information, labelled with that machine, never divided by.

Example:

```
ks-keras bench                        # paper size, 20-40 min on 2 CPU cores
ks-keras bench --quick                # tiny model, seconds (used by the tests)
ks-keras bench --only train,attention --output reports/bench.json
ks-keras bench --reference-dir ~/src/Key-Sparse-Transformer   # side by side, same run
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ks_keras import bench_reference
from ks_keras.config import Config, load_config, padding_invariant

# The authors' PyTorch implementation measured once on *another* machine (issue 8; torch 2.13
# CPU, 2 threads, fresh process per measure, warm-up until page faults settle). Shown in the
# report as information about that machine only: dividing this machine's figures by them
# would mix two CPUs. Ratios come from `--reference-dir` (the same run, this machine).
STORED_REFERENCE = {
    "source": "authors' PyTorch implementation, torch 2.13 CPU, 2 threads",
    "machine": "a 2-core Intel Xeon machine with AVX-512, without AVX-512-BF16/AMX "
    "(another machine; issue 8)",
    "trainable_params": 85_324_676,
    "train_step_s": {"16": 11.1, "32": 22.9},
    "train_samples_per_s": {"16": 1.44, "32": 1.40},
    "infer_samples_per_s": {"32": 4.9},
    "infer_step_s": {"32": 6.6},
    "latency_ms": 176.0,
    "train_peak_rss_gib": 15.4,
}
# Targets for ours relative to the reference measured in the same run (`--reference-dir`),
# at paper size; the attention target compares two layers of ours in the same run.
TARGETS = {
    "train_throughput_ratio_min": 1.5,
    "latency_ratio_max": 0.7,
    "peak_rss_ratio_max": 0.6,
    "key_sparse_vs_dense_max": 1.15,
}
# CPU features that decide which kernels TensorFlow/oneDNN and PyTorch can use (x86 and Arm
# names as /proc/cpuinfo spells them): the report lists those this machine has.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimdhp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)

MEASURES = ("train", "infer", "latency", "attention", "xla", "precision", "pipeline", "lengths")
# The batch-1 latency measures: (measure name = ratio and target key, summary key in ms,
# table label).
LATENCY_MEASURES = (
    ("latency_b1", "latency_ms", "latency ms, batch 1"),
    ("latency_b1_serving", "latency_serving_ms", "latency ms, batch 1, serving graph"),
    ("latency_b1_serving_inter", "latency_serving_inter_ms", "  same, 1 intra-op thread/op"),
)
# Not run by default (adds a traced run): `--only profile` or `--profile`.
OPTIONAL_MEASURES = ("profile",)
RESULT_PREFIX = "KS_BENCH_RESULT "
MIN_LENGTH_FRACTION = 0.3

# Realistic utterance lengths (the `lengths` measure). The paper's audio input is wav2vec's
# 512-d feature sequence: one frame per 320 samples at 16 kHz, 50 frames/s, so its 460 frames
# hold 9.2 s. IEMOCAP's utterances last 4.5 s on average (median about 3.5 s) with a long
# tail past 20 s; a log-normal duration with mean 4.5 s and shape sigma 0.7 matches that:
# median 3.5 s, standard deviation 3.6 s, 0.7 % past 20 s, 8.5 % past 9.2 s (cropped at 460
# frames, so the crop, not the tail, bounds the cost).
PAPER_FRAME_RATE = 50.0
PAPER_AUDIO_LEN = 460
UTTERANCE_MEAN_S = 4.5
UTTERANCE_SIGMA = 0.7

# A tiny model for `--quick` (the tests): same code paths, seconds instead of minutes.
QUICK_OVERRIDES = [
    "model.audio_dim=16",
    "model.text_dim=24",
    "model.num_heads=2",
    "model.audio_ffn_dim=16",
    "model.text_ffn_dim=16",
    "model.n_fem=1",
    "model.n_ccab=1",
    "model.n_dfm=1",
    "model.head_units=[16]",
    "data.audio_max_len=24",
    "data.text_max_len=6",
]


# ---------------------------------------------------------------------------------------------
# Settings


def _plan(quick: bool) -> dict[str, Any]:
    """Batch sizes, repetitions and sizes of the run."""
    if quick:
        return dict(
            train_batches=[4, 8],
            infer_batch=8,
            warmup=1,
            max_warmup=2,
            repeats=2,
            latency_repeats=3,
            latency_requests=3,
            attention_batch=4,
            pipeline_utterances=24,
            pipeline_epochs=2,
            lengths_samples=24,
            timeout_s=300,
        )
    return dict(
        train_batches=[16, 32],
        infer_batch=32,
        warmup=2,
        max_warmup=5,
        repeats=5,
        latency_repeats=20,
        latency_requests=10,
        attention_batch=32,
        pipeline_utterances=512,
        pipeline_epochs=3,
        lengths_samples=128,
        timeout_s=1800,
    )


def _free_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (None where it does not exist)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Child side: one measure per process. TensorFlow is imported only here.


def _peak_rss_gib() -> float:
    """Peak resident set size of this process (VmHWM), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def utterance_seconds(
    n: int, seed: int, mean_s: float = UTTERANCE_MEAN_S, sigma: float = UTTERANCE_SIGMA
):
    """`n` utterance durations in seconds, log-normal with mean `mean_s` and shape `sigma`
    (IEMOCAP-like with the defaults; see `UTTERANCE_SIGMA`). Same seed, same durations."""
    import numpy as np

    mu = math.log(mean_s) - sigma**2 / 2  # the log-normal's mean is exp(mu + sigma^2 / 2)
    return np.random.default_rng(seed).lognormal(mu, sigma, n)


def realistic_lengths(n: int, seed: int, max_len: int = PAPER_AUDIO_LEN, **kwargs):
    """`n` audio lengths in frames, in [1, `max_len`]: `utterance_seconds(n, seed, **kwargs)`
    at the paper's frame rate scaled so that `max_len` frames hold what 460 frames hold at
    50 frames/s (9.2 s; at the paper's 460 frames exactly 50 frames/s), then cropped."""
    import numpy as np

    frame_rate = PAPER_FRAME_RATE * max_len / PAPER_AUDIO_LEN
    frames = np.ceil(utterance_seconds(n, seed, **kwargs) * frame_rate).astype(np.int64)
    return np.clip(frames, 1, max_len)


def synthetic_batch(spec: dict[str, Any], batch: int, seed: int) -> tuple[dict, Any]:
    """Random features with realistic padding, int32 masks and labels (numpy).

    Each sample's real length is uniform in [30 %, 100 %] of the maximum; padded steps are 0.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    m = spec["model"]
    lengths = {"audio": spec["audio_len"], "text": spec["text_len"]}
    inputs = {}
    for modality in m["modalities"]:
        t_max, dim = lengths[modality], m[f"{modality}_dim"]
        n = rng.integers(max(1, math.ceil(MIN_LENGTH_FRACTION * t_max)), t_max + 1, size=batch)
        mask = (np.arange(t_max)[None, :] < n[:, None]).astype("int32")
        x = rng.standard_normal((batch, t_max, dim), dtype=np.float32) * mask[:, :, None]
        inputs[modality] = x.astype("float32")
        inputs[f"{modality}_mask"] = mask
    labels = rng.integers(0, m["num_classes"], size=batch).astype("int32")
    return inputs, labels


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _setup_child(spec: dict[str, Any]):
    """Import TF/Keras, set threads and the dtype policy; return (tf, keras)."""
    import tensorflow as tf

    threads = spec.get("threads")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if spec.get("inter_threads"):
        tf.config.threading.set_inter_op_parallelism_threads(spec["inter_threads"])
    if spec.get("intra_threads"):
        tf.config.threading.set_intra_op_parallelism_threads(spec["intra_threads"])
    import keras

    keras.utils.set_random_seed(spec.get("seed", 0))
    keras.config.set_dtype_policy(spec.get("precision", "float32"))
    return tf, keras


def _timed(fn, warmup: int, max_warmup: int, repeats: int) -> dict[str, Any]:
    """Run `fn` `warmup`+ times untimed (until page faults settle), then `repeats` times timed.

    Warm-up goes on past `warmup` calls (up to `max_warmup`) while the minor page faults of a
    call still drop by more than 10 % from the call before, i.e. while the allocator is still
    growing its pools.
    """
    warm_times, warm_faults = [], []
    for i in range(max(1, max_warmup)):
        f0, t0 = _minor_faults(), time.perf_counter()
        fn()
        warm_times.append(time.perf_counter() - t0)
        warm_faults.append(_minor_faults() - f0)
        if i + 1 >= warmup and (i == 0 or warm_faults[-1] >= 0.9 * warm_faults[-2]):
            break
    times, faults, cpu = [], [], []
    for _ in range(repeats):
        f0, c0, t0 = _minor_faults(), _cpu_seconds(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
        faults.append(_minor_faults() - f0)
    return {
        "median_s": statistics.median(times),
        "times_s": [round(t, 5) for t in times],
        # CPU time (all threads) per call: robust to other processes sharing the cores.
        "cpu_median_s": statistics.median(cpu),
        "cpu_s": [round(t, 4) for t in cpu],
        "warmup_s": [round(t, 4) for t in warm_times],
        "warmup_minor_faults": warm_faults,
        "minor_faults": faults,
    }


def _build_compiled_model(spec: dict[str, Any], keras):
    from ks_keras.config import ModelConfig, from_dict
    from ks_keras.model import build_model, count_trainable_params
    from ks_keras.training import FusedAdam

    model = build_model(from_dict(ModelConfig, spec["model"], "model"))
    model.compile(
        # The Adam that `ks-keras train` uses (training.make_optimizer).
        optimizer=FusedAdam(spec.get("lr", 5e-4)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=bool(spec["jit"]),
    )
    return model, count_trainable_params(model)


def _serving_function(spec: dict[str, Any], model):
    """The export's `serving_default` function for `model` (what TF Serving and
    `ks-keras predict` run): requests padded to the trained length go in, and the graph cuts
    them after their last real step when the model allows it."""
    from ks_keras.config import ModelConfig, from_dict
    from ks_keras.export import DEFAULT_SIGNATURE, make_serving_functions

    m = spec["model"]
    lengths = {"audio": spec["audio_len"], "text": spec["text_len"]}
    metadata = {
        "modalities": list(m["modalities"]),
        "inputs": {
            mod: {"dim": m[f"{mod}_dim"], "max_len": lengths[mod]} for mod in m["modalities"]
        },
        "normalization": None,
        "crop_to_longest": spec["serving"] == "crop"
        and padding_invariant(from_dict(ModelConfig, m, "model")),
    }
    return make_serving_functions(model, metadata)[DEFAULT_SIGNATURE]


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
        except Exception as e:  # data.py is optional here: fall back, and say why
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


# Where time goes: op categories of a traced training step, from the ops' name scopes
# (segments with Keras' `_1` suffixes removed) — first match wins.
PROFILE_CATEGORIES = (
    ("optimizer", lambda seg: bool(seg) and seg[0] in ("adam", "sgd", "adamw")),
    ("key selection (column scores, top-k)", lambda seg: "key_selection" in seg),
    ("attention core (scores, softmax, weights x values)", lambda seg: "ks_attention_grad" in seg),
    ("LayerNorm", lambda seg: "layer_norm_grad" in seg),
    (
        "attention projections (Q, K, V, O)",
        lambda seg: (
            "attention" in seg
            and any(x in seg for x in ("query", "key", "value", "attention_output"))
        ),
    ),
    ("attention-weight dropout", lambda seg: "attention" in seg and "dropout" in seg),
    ("attention core (scores, softmax, weights x values)", lambda seg: "attention" in seg),
    ("FFN", lambda seg: "ffn_inner" in seg or "ffn_outer" in seg),
    ("LayerNorm", lambda seg: any(x.endswith("_norm") for x in seg)),
    ("residual dropout", lambda seg: "attention_dropout" in seg or "ffn_dropout" in seg),
    (
        "pooling, head, loss",
        lambda seg: any(
            x.endswith("_pool")
            or x.startswith("head_")
            or x in ("logits", "fusion")
            or "crossentropy" in x
            or x == "loss"
            for x in seg
        ),
    ),
)


def _categorize(op_name: str) -> str:
    """Category of a traced op from its scoped name (see `PROFILE_CATEGORIES`)."""
    import re

    segments = [re.sub(r"(_\d+)+$", "", x) for x in op_name.lower().split("/")]
    if segments and segments[0] == "gradient_tape":
        segments = segments[1:]
    for category, matches in PROFILE_CATEGORIES:
        if matches(segments):
            return category
    return "other"


def _measure_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Trace training steps with `tf.profiler` and sum op time per category (no XLA)."""
    import re

    tf, keras = _setup_child(spec)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    spec = {**spec, "jit": False}  # XLA fuses ops into clusters that have no layer names
    model, _ = _build_compiled_model(spec, keras)
    x, y = synthetic_batch(spec, spec["batch"], 0)
    for _ in range(spec["warmup"]):
        model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory(prefix="ks_bench_profile_") as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        for _ in range(spec["repeats"]):
            model.train_on_batch(x, y)
        wall = (time.perf_counter() - t0) / spec["repeats"]
        tf.profiler.experimental.stop()
        planes = sorted(Path(logdir).rglob("*.xplane.pb"))
        space = xplane_pb2.XSpace()
        space.ParseFromString(planes[-1].read_bytes())
    by_category: dict[str, float] = {}
    by_type: dict[str, float] = {}
    by_op: dict[str, float] = {}
    backward: dict[str, float] = {"forward": 0.0, "backward": 0.0}
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if ":" not in meta.name or "::" in meta.name:  # executor bookkeeping
                    continue
                seconds = event.duration_ps * 1e-12 / spec["repeats"]
                op_name, op_type = meta.name.rsplit(":", 1)
                category = _categorize(op_name)
                by_category[category] = by_category.get(category, 0.0) + seconds
                by_type[op_type] = by_type.get(op_type, 0.0) + seconds
                # Layer indices removed, so the same op of every layer adds up.
                generic = re.sub(r"(_\d+)+(?=/|$)", "", op_name)
                by_op[f"{generic}:{op_type}"] = by_op.get(f"{generic}:{op_type}", 0.0) + seconds
                direction = "backward" if "gradient" in op_name.lower() else "forward"
                backward[direction] += seconds
    total = sum(by_category.values()) or 1.0
    top_types = sorted(by_type.items(), key=lambda kv: -kv[1])[:15]
    return {
        "median_s": wall,
        "op_seconds_per_step": round(total, 4),
        "categories": {
            k: {"s": round(v, 4), "share": round(v / total, 4)}
            for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "op_types": {k: {"s": round(v, 4), "share": round(v / total, 4)} for k, v in top_types},
        "top_ops": {k: round(v, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:40]},
        "forward_backward_s": {k: round(v, 4) for k, v in backward.items()},
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
    return result


# ---------------------------------------------------------------------------------------------
# Parent side: plan the measures, run each in a fresh process, assemble the report.


def run_child(spec: dict[str, Any], timeout_s: float, env: dict[str, str] | None = None):
    """Run `child_main(spec)` in a fresh Python process; return its result or an error dict."""
    child_env = dict(os.environ)
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    child_env.update(env or {})
    cmd = [sys.executable, "-m", "ks_keras.bench", "--child", json.dumps(spec)]
    started = time.perf_counter()
    free_before, load_before = _free_memory_gib(), _load_average()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    info = {
        "wall_s": round(time.perf_counter() - started, 2),
        "free_gib_before": free_before,
        "load_before": load_before,
    }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX) :]), **info}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"exit code {proc.returncode}: " + "\n".join(tail), **info}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing TensorFlow in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def resolve_settings(jit: str, precision: str, gpu: bool) -> tuple[bool, str, str]:
    """Headline settings: `(jit_compile, policy, other_policy)`.

    `auto`: mixed_float16 + XLA on a GPU; float32 without XLA on CPU (the faster setting on
    CPU in our measurements, see docs/performance.md).
    """
    mixed = "mixed_float16" if gpu else "mixed_bfloat16"
    use_jit = {"on": True, "off": False}.get(jit, gpu)
    if precision == "auto":
        policy = mixed if gpu else "float32"
    elif precision == "mixed":
        policy = mixed
    elif precision == "float32":
        policy = "float32"
    else:
        raise ValueError(f"--precision: expected auto, float32 or mixed, got {precision!r}")
    other = "float32" if policy != "float32" else mixed
    return use_jit, policy, other


def plan_measures(
    cfg: Config,
    quick: bool,
    only: tuple[str, ...],
    use_jit: bool,
    policy: str,
    other: str,
    reference: dict[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """`(name, spec)` for every child process of the run, in running order.

    With `reference` (`{"dir", "entry", "gpu"}`), each `train`, `infer` and plain `latency`
    measure is followed by its twin on the reference model (`reference_<name>`): the same
    spec (inputs, batch, warm-up, repetitions, precision), run by `bench_reference`.
    """
    p = _plan(quick)
    base = {
        "model": json.loads(json.dumps(cfg.to_dict()["model"])),
        "audio_len": cfg.data.audio_max_len,
        "text_len": cfg.data.text_max_len,
        "lr": cfg.train.lr,
        "seed": cfg.train.seed,
        "warmup": p["warmup"],
        "max_warmup": p["max_warmup"],
        "repeats": p["repeats"],
    }
    big = max(p["train_batches"])
    plan: list[tuple[str, dict[str, Any]]] = []

    def add(name, **spec):
        plan.append((name, {**base, **spec}))

    def add_reference_twin():
        if reference is None:
            return
        name, spec = plan[-1]
        plan.append(
            (
                f"reference_{name}",
                {**spec, "kind": "reference", "measure": spec["kind"], "reference": reference},
            )
        )

    if "train" in only:
        for b in sorted(p["train_batches"], reverse=True):
            add(f"train_b{b}", kind="train", batch=b, jit=use_jit, precision=policy)
            add_reference_twin()
    if "infer" in only:
        add(
            f"infer_b{p['infer_batch']}",
            kind="infer",
            batch=p["infer_batch"],
            jit=use_jit,
            precision=policy,
        )
        add_reference_twin()
    if "latency" in only:
        # Several distinct requests (real lengths drawn like the training inputs), each seen
        # once in the warm-up; the median is over two or more rounds through all of them.
        n = p["latency_requests"]
        requests = dict(
            kind="latency",
            batch=1,
            jit=use_jit,
            precision=policy,
            distinct=n,
            warmup=n,
            max_warmup=n,
            repeats=max(p["latency_repeats"], 2 * n),
        )
        add("latency_b1", **requests)
        add_reference_twin()
        # The serving graph (export, `ks-keras predict`): the same padded requests, cut after
        # their last real step inside the graph (the default model ignores padding).
        add("latency_b1_serving", serving="crop", **requests)
        # The same with the thread setting for single requests (docs/serving.md): one thread
        # per op and one op per core at a time, so the independent ops of a small graph (the
        # audio and text branches, Q/K/V) run side by side instead of splitting tiny ops.
        add(
            "latency_b1_serving_inter",
            serving="crop",
            intra_threads=1,
            inter_threads=_cores(),
            **requests,
        )
    # The twins of the headline setting (XLA flipped, the other precision) are comparisons
    # only, and on CPU each is several times slower than the headline step: one warm-up
    # step and at most two timed steps.
    short = dict(short=True, warmup=1, max_warmup=1, repeats=min(2, p["repeats"]))
    if "xla" in only:
        add(
            f"train_b{big}_xla_{'off' if use_jit else 'on'}",
            kind="train",
            batch=big,
            jit=not use_jit,
            precision=policy,
            **short,
        )
        add(
            f"infer_b{p['infer_batch']}_xla_{'off' if use_jit else 'on'}",
            kind="infer",
            batch=p["infer_batch"],
            jit=not use_jit,
            precision=policy,
            **short,
        )
    if "precision" in only:
        add(
            f"train_b{big}_{other}",
            kind="train",
            batch=big,
            jit=use_jit,
            precision=other,
            **short,
        )
    if "attention" in only:
        m = cfg.model
        dim = (
            m.audio_d_model or m.audio_dim
            if "audio" in m.modalities
            else (m.text_d_model or m.text_dim)
        )
        length = cfg.data.audio_max_len if "audio" in m.modalities else cfg.data.text_max_len
        attention = dict(
            heads=m.num_heads, dim=dim, length=length, dropout=m.dropout, sparsity=m.sparsity or 0.5
        )
        for layer in ("key_sparse", "dense"):
            for mode in ("fwd", "fwd_bwd"):
                add(
                    f"attention_{layer}_{mode}",
                    kind="attention",
                    layer=layer,
                    mode=mode,
                    batch=p["attention_batch"],
                    jit=use_jit,
                    precision=policy,
                    attention=attention,
                )
    if "profile" in only:
        add(
            f"profile_b{big}",
            kind="profile",
            batch=big,
            jit=False,
            precision=policy,
            repeats=min(2, p["repeats"]),
        )
    if "pipeline" in only:
        add(
            "pipeline",
            kind="pipeline",
            batch=big,
            utterances=p["pipeline_utterances"],
            epochs=p["pipeline_epochs"],
        )
    if "lengths" in only:
        # Each timed call is a whole epoch (`lengths_samples` utterances): one to three
        # warm-up epochs (compilation, the pipeline's cache), at most three timed.
        for mode, b in (("train", big), ("infer", p["infer_batch"])):
            for layout in ("bucketed", "padded"):
                add(
                    f"lengths_{mode}_{layout}",
                    kind="lengths",
                    mode=mode,
                    layout=layout,
                    batch=b,
                    samples=p["lengths_samples"],
                    jit=use_jit,
                    precision=policy,
                    warmup=1,
                    max_warmup=3,
                    repeats=min(3, p["repeats"]),
                )
    return plan


def summarize(
    results: dict[str, dict], use_jit: bool, policy: str, other: str, quick: bool
) -> dict[str, Any]:
    """Headline figures, comparisons, reference ratios and targets from raw results."""
    p = _plan(quick)
    big, small = max(p["train_batches"]), min(p["train_batches"])

    def get(name, key="samples_per_s"):
        r = results.get(name)
        return None if r is None or "error" in r else r.get(key)

    summary: dict[str, Any] = {"train": {}, "comparisons": {}, "vs_reference": {}}
    for b in p["train_batches"]:
        if get(f"train_b{b}") is not None:
            summary["train"][str(b)] = {
                "samples_per_s": get(f"train_b{b}"),
                "step_s": get(f"train_b{b}", "median_s"),
                "peak_rss_gib": get(f"train_b{b}", "peak_rss_gib"),
            }
    params = next(
        (r["trainable_params"] for r in results.values() if "trainable_params" in r), None
    )
    summary["trainable_params"] = params
    summary["infer_samples_per_s"] = get(f"infer_b{p['infer_batch']}")
    for name, key, _ in LATENCY_MEASURES:
        latency = get(name, "median_s")
        summary[key] = None if latency is None else 1000 * latency
    summary["train_peak_rss_gib"] = get(f"train_b{big}", "peak_rss_gib")

    c = summary["comparisons"]
    flip = "off" if use_jit else "on"
    on_off = (lambda a, b: (a, b)) if use_jit else (lambda a, b: (b, a))
    t_on, t_off = on_off(
        get(f"train_b{big}", "median_s"), get(f"train_b{big}_xla_{flip}", "median_s")
    )
    i_on, i_off = on_off(
        get(f"infer_b{p['infer_batch']}", "median_s"),
        get(f"infer_b{p['infer_batch']}_xla_{flip}", "median_s"),
    )
    c["xla"] = {
        "batch": big,
        "train_step_s_jit_on": t_on,
        "train_step_s_jit_off": t_off,
        "train_speedup_jit_on": _ratio(t_off, t_on),
        "infer_step_s_jit_on": i_on,
        "infer_step_s_jit_off": i_off,
        "infer_speedup_jit_on": _ratio(i_off, i_on),
        "train_peak_rss_gib_jit_on": get(
            f"train_b{big}" if use_jit else f"train_b{big}_xla_on", "peak_rss_gib"
        ),
        "train_peak_rss_gib_jit_off": get(
            f"train_b{big}_xla_off" if use_jit else f"train_b{big}", "peak_rss_gib"
        ),
    }
    mixed = other if policy == "float32" else policy
    t_main, t_other = get(f"train_b{big}", "median_s"), get(f"train_b{big}_{other}", "median_s")
    t_f32, t_mixed = (t_main, t_other) if policy == "float32" else (t_other, t_main)
    c["precision"] = {
        "batch": big,
        "mixed_policy": mixed,
        "train_step_s_float32": t_f32,
        "train_step_s_mixed": t_mixed,
        "mixed_speedup": _ratio(t_f32, t_mixed),
    }
    att = {
        k: get(f"attention_{k}", "median_s")
        for k in ("key_sparse_fwd", "key_sparse_fwd_bwd", "dense_fwd", "dense_fwd_bwd")
    }
    c["attention"] = {
        **{f"{k}_s": v for k, v in att.items()},
        "ratio_fwd": _ratio(att["key_sparse_fwd"], att["dense_fwd"]),
        "ratio_fwd_bwd": _ratio(att["key_sparse_fwd_bwd"], att["dense_fwd_bwd"]),
    }
    pipe = get("pipeline")
    model_rate = get(f"train_b{big}")
    c["pipeline"] = {
        "source": (results.get("pipeline") or {}).get("source"),
        "pipeline_samples_per_s": pipe,
        "model_train_samples_per_s": model_rate,
        "pipeline_over_model": _ratio(pipe, model_rate),
        # Share of one training step's wall time the pipeline would need if it ran serially.
        "pipeline_share_of_step": _ratio(model_rate, pipe),
    }

    lengths = {}
    for mode in ("train", "infer"):
        bucketed, padded = f"lengths_{mode}_bucketed", f"lengths_{mode}_padded"
        lengths[mode] = {
            "bucketed_samples_per_s": get(bucketed),
            "padded_samples_per_s": get(padded),
            "bucketed_over_padded": _ratio(get(bucketed), get(padded)),
            "bucketed": get(bucketed, "bucketed"),
            "real_step_share_bucketed": get(bucketed, "real_step_share"),
            "real_step_share_padded": get(padded, "real_step_share"),
        }
    lengths["samples_per_epoch"] = p["lengths_samples"]
    frames = [get(f"lengths_{m}_padded", "mean_audio_frames") for m in ("train", "infer")]
    lengths["mean_audio_frames"] = next((f for f in frames if f is not None), None)
    c["lengths"] = lengths

    # The reference model measured in this run (`--reference-dir`), and ours over it. Never
    # a ratio to STORED_REFERENCE: those figures come from another machine.
    def ref(name, key="samples_per_s"):
        return get(f"reference_{name}", key)

    ib = p["infer_batch"]
    measured = any(name.startswith("reference_") for name in results)
    ref_latency = ref("latency_b1", "median_s")
    summary["reference"] = (
        {
            "train": {
                str(b): {
                    "samples_per_s": ref(f"train_b{b}"),
                    "step_s": ref(f"train_b{b}", "median_s"),
                    "peak_rss_gib": ref(f"train_b{b}", "peak_rss_gib"),
                }
                for b in p["train_batches"]
                if ref(f"train_b{b}") is not None
            },
            "trainable_params": next(
                (
                    r["trainable_params"]
                    for k, r in results.items()
                    if k.startswith("reference_") and "trainable_params" in r
                ),
                None,
            ),
            "infer_samples_per_s": ref(f"infer_b{ib}"),
            "latency_ms": None if ref_latency is None else 1000 * ref_latency,
            "train_peak_rss_gib": ref(f"train_b{big}", "peak_rss_gib"),
        }
        if measured
        else None
    )
    r = summary["vs_reference"]
    theirs = summary["reference"] or {"train": {}}
    for b in p["train_batches"]:
        r[f"train_throughput_b{b}"] = _ratio(
            get(f"train_b{b}"), theirs["train"].get(str(b), {}).get("samples_per_s")
        )
    r[f"infer_throughput_b{ib}"] = _ratio(
        summary["infer_samples_per_s"], theirs.get("infer_samples_per_s")
    )
    for name, key, _ in LATENCY_MEASURES:
        r[name] = _ratio(summary[key], theirs.get("latency_ms"))
    r[f"train_peak_rss_b{big}"] = _ratio(
        summary["train_peak_rss_gib"], theirs.get("train_peak_rss_gib")
    )
    r["trainable_params"] = _ratio(params, theirs.get("trainable_params"))

    t = TARGETS

    def check(value, bound, upper):
        if value is None:
            return None
        return value <= bound if upper else value >= bound

    summary["targets"] = {
        "train_throughput_b32": check(
            r.get(f"train_throughput_b{big}"), t["train_throughput_ratio_min"], False
        ),
        "train_throughput_b16": check(
            r.get(f"train_throughput_b{small}"), t["train_throughput_ratio_min"], False
        ),
        **{name: check(r[name], t["latency_ratio_max"], True) for name, _, _ in LATENCY_MEASURES},
        "train_peak_rss_b32": check(r[f"train_peak_rss_b{big}"], t["peak_rss_ratio_max"], True),
        "attention_fwd": check(c["attention"]["ratio_fwd"], t["key_sparse_vs_dense_max"], True),
        "attention_fwd_bwd": check(
            c["attention"]["ratio_fwd_bwd"], t["key_sparse_vs_dense_max"], True
        ),
    }
    if quick:
        # A tiny model says nothing about the paper-size targets (the same-run ratios stay:
        # both sides ran the same tiny sizes).
        summary["targets"] = {k: None for k in summary["targets"]}
    return summary


def _fmt(value, spec=".2f", suffix=""):
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def describe_cpu(cpu: dict[str, Any]) -> str:
    """One line naming the CPU, its cores and the instruction-set flags that matter."""
    flags = cpu.get("flags")
    if flags is None:
        flag_text = "unknown (no /proc/cpuinfo)"
    else:
        flag_text = " ".join(flags) or "none of " + " ".join(CPU_FLAGS)
    return (
        f"CPU: {cpu.get('model') or 'unknown'} ({cpu.get('machine') or '?'}), "
        f"{cpu.get('cores')} cores available; flags: {flag_text}"
    )


def _stored_reference_lines() -> list[str]:
    ref = STORED_REFERENCE
    train = ", ".join(
        f"{rate} (batch {b})" for b, rate in sorted(ref["train_samples_per_s"].items())
    )
    infer = ", ".join(f"{v} (batch {b})" for b, v in ref["infer_samples_per_s"].items())
    return [
        "Stored figures, information only (another machine: no ratios, no targets):",
        f"  {ref['source']}",
        f"  measured on {ref['machine']}",
        f"  train samples/s {train}; inference samples/s {infer}",
        f"  latency {ref['latency_ms']:.0f} ms (batch 1); peak RSS {ref['train_peak_rss_gib']} "
        f"GiB (train batch 32); {ref['trainable_params']:,} trainable parameters",
        "For ratios on this machine, measure the reference side by side: --reference-dir PATH "
        "(docs/performance.md).",
    ]


def format_table(report: dict[str, Any]) -> str:
    """Our figures (and the reference model's, when measured in the same run) as plain text.

    Ratios and targets appear only for figures measured in this run on this machine.
    """
    s = report["summary"]
    quick = report["meta"]["quick"]
    theirs = s.get("reference")
    r = s["vs_reference"]
    p = _plan(quick)
    big = max(p["train_batches"])
    if theirs:
        rows = [("measure", "ours", "reference", "ours/ref", "target")]
    else:
        rows = [("measure", "ours", "target")]

    def row(label, ours, ref_value="", ratio="", target="", same_run_target=""):
        """A table row; `target` applies to ours/ref, `same_run_target` to ours alone."""
        if theirs:
            rows.append((label, ours, ref_value, ratio, target or same_run_target))
        else:
            rows.append((label, ours, same_run_target))

    train_target = f">= {TARGETS['train_throughput_ratio_min']}"
    for b, ours in sorted(s["train"].items(), key=lambda kv: int(kv[0])):
        ref_row = (theirs or {}).get("train", {}).get(b, {})
        row(
            f"train samples/s, batch {b}",
            _fmt(ours["samples_per_s"]),
            _fmt(ref_row.get("samples_per_s")),
            _fmt(r.get(f"train_throughput_b{b}")),
            train_target,
        )
        row(
            f"train step s, batch {b}",
            _fmt(ours["step_s"], ".3f"),
            _fmt(ref_row.get("step_s"), ".3f"),
        )
    ib = p["infer_batch"]
    row(
        f"inference samples/s, batch {ib}",
        _fmt(s["infer_samples_per_s"]),
        _fmt((theirs or {}).get("infer_samples_per_s")),
        _fmt(r.get(f"infer_throughput_b{ib}")),
    )
    for name, key, label in LATENCY_MEASURES:
        row(
            label,
            _fmt(s.get(key), ".1f"),
            _fmt((theirs or {}).get("latency_ms"), ".1f"),
            _fmt(r.get(name)),
            f"<= {TARGETS['latency_ratio_max']}",
        )
    row(
        f"peak RSS GiB, train batch {big}",
        _fmt(s["train_peak_rss_gib"]),
        _fmt((theirs or {}).get("train_peak_rss_gib")),
        _fmt(r.get(f"train_peak_rss_b{big}")),
        f"<= {TARGETS['peak_rss_ratio_max']}",
    )
    row(
        "trainable parameters",
        _fmt(s["trainable_params"], ","),
        _fmt((theirs or {}).get("trainable_params"), ","),
        _fmt(r.get("trainable_params"), ".4f"),
    )
    a = s["comparisons"]["attention"]
    attention_target = f"<= {TARGETS['key_sparse_vs_dense_max']}"
    row("KS / dense attention, fwd", _fmt(a["ratio_fwd"]), same_run_target=attention_target)
    row("KS / dense attention, fwd+bwd", _fmt(a["ratio_fwd_bwd"]), same_run_target=attention_target)
    x = s["comparisons"]["xla"]
    xla_train = _fmt(x["train_speedup_jit_on"])
    twin = next(
        (r for k, r in report["results"].items() if "_xla_" in k and k.startswith("train")), None
    )
    if x["train_speedup_jit_on"] is None and twin and "timed out" in twin.get("error", ""):
        xla_train = "timed out"
    row("XLA speed-up, train", xla_train)
    row("XLA speed-up, inference", _fmt(x["infer_speedup_jit_on"]))
    pr = s["comparisons"]["precision"]
    row(f"{pr['mixed_policy']} speed-up, train", _fmt(pr["mixed_speedup"]))
    pi = s["comparisons"]["pipeline"]
    row("tf.data samples/s", _fmt(pi["pipeline_samples_per_s"], ".0f"))
    row(
        "tf.data / model train rate", _fmt(pi["pipeline_over_model"], ".0f"), same_run_target=">> 1"
    )
    le = s["comparisons"].get("lengths") or {}
    for mode, label in (
        ("train", f"train, batch {big}"),
        ("infer", f"inference, batch {p['infer_batch']}"),
    ):
        figures = le.get(mode) or {}
        row(
            f"realistic lengths, {label}: samples/s bucketed / padded",
            f"{_fmt(figures.get('bucketed_samples_per_s'))} / "
            f"{_fmt(figures.get('padded_samples_per_s'))}",
        )
        row("  ratio bucketed / padded (same run)", _fmt(figures.get("bucketed_over_padded")))

    n = len(rows[0])
    widths = [max(len(line[i]) for line in rows) for i in range(n)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meta = report["meta"]
    head = [
        f"ks-keras bench ({'quick, tiny model' if quick else 'paper size'}; "
        f"precision {meta['precision']}, jit_compile {meta['jit_compile']})",
        describe_cpu(meta.get("cpu") or {"model": meta.get("processor")}),
    ]
    ref_meta = report.get("reference")
    if ref_meta:
        head.append(
            f"reference, measured in this run on this machine: {ref_meta['entry']} from "
            f"{ref_meta['dir']} (torch {ref_meta.get('torch')}, "
            f"{ref_meta.get('torch_threads')} threads, {ref_meta.get('device')})"
        )
    if quick:
        head.append("(quick mode: tiny model on every side; the targets apply to the paper size)")
    if theirs:
        tail = [
            "(the reference's latency is its forward on the request padded to the full length; "
            "ours is given three ways)"
        ]
    else:
        tail = ["", *_stored_reference_lines()]
    return "\n".join(head + lines + tail)


def run_benchmark(
    config: str | None = None,
    overrides: list[str] | None = None,
    quick: bool = False,
    only: tuple[str, ...] = MEASURES,
    jit: str = "auto",
    precision: str = "auto",
    output: str | Path | None = "reports/benchmark.json",
    repeats: int | None = None,
    threads: int | None = None,
    progress=lambda line: print(line, flush=True),
    reference_dir: str | Path | None = None,
    reference_entry: str = bench_reference.DEFAULT_REFERENCE_ENTRY,
) -> dict[str, Any]:
    """Run the benchmark (one fresh process per measure) and write the JSON report.

    Args:
        config: YAML config (model and data lengths); None = paper defaults.
        overrides: dotted overrides (`model.n_ccab=2`).
        quick: tiny model and few repetitions (seconds; for tests and smoke checks).
        only: which measure groups to run (subset of `MEASURES`).
        jit: `auto` (XLA on GPU only), `on` or `off` for the headline figures.
        precision: `auto` (mixed_float16 on GPU, float32 on CPU), `float32` or `mixed`.
        output: JSON path (parent folders are created); None = do not write.
        repeats: timed repetitions per measure (default 5; 2 in quick mode).
        threads: intra/inter-op threads for the children (default: TF's choice).
        progress: called with one line per finished measure.
        reference_dir: a checkout of the reference PyTorch code (the authors'); its model is
            then measured in this run with the same protocol, side by side (loader contract:
            `ks_keras.bench_reference`). None: our figures only.
        reference_entry: `MODULE:CALLABLE` that builds the reference model.

    Returns:
        The report: `meta` (with this machine's CPU), `reference` (the reference measured in
        this run, or None), `stored_reference` (figures from another machine, information
        only), `targets`, `results` (raw, per child) and `summary` (headline figures,
        comparisons, same-run ratios to the reference, targets met).

    Raises:
        FileNotFoundError: the config or `reference_dir` does not exist.
        ValueError: a bad argument, or a reference that does not follow the loader contract
            (PyTorch, module or callable missing, wrong forward).
    """
    unknown = sorted(set(only) - set(MEASURES) - set(OPTIONAL_MEASURES))
    if unknown or not only:
        raise ValueError(
            f"--only: expected a comma list of "
            f"{', '.join(MEASURES + OPTIONAL_MEASURES)}, got "
            f"{','.join(only) or 'nothing'}"
        )
    if repeats is not None and repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads: expected >= 1, got {threads}")
    cfg = load_config(config, list(overrides or []) + (QUICK_OVERRIDES if quick else []))
    gpu = _gpu_present()
    use_jit, policy, other = resolve_settings(jit, precision, gpu)
    timeout = _plan(quick)["timeout_s"]
    started = time.perf_counter()
    reference = None
    if reference_dir is not None:
        if not {"train", "infer", "latency"} & set(only):
            raise ValueError(
                "--reference-dir: the reference model is measured in train, infer and latency; "
                f"--only {','.join(only)} has none of them"
            )
        if progress:
            progress(f"reference: loading {reference_entry} from {reference_dir} ...")
        reference = check_reference(
            cfg, reference_dir, reference_entry, gpu=gpu, threads=threads, timeout_s=timeout
        )
    plan = plan_measures(
        cfg,
        quick,
        tuple(only),
        use_jit,
        policy,
        other,
        reference=None if reference is None else reference["spec"],
    )
    results: dict[str, dict] = {}
    for i, (name, spec) in enumerate(plan, 1):
        if repeats is not None and not spec.get("short"):
            spec["repeats"] = max(repeats, 2 * spec["distinct"]) if "distinct" in spec else repeats
        if threads is not None:
            spec["threads"] = threads
        if progress:
            progress(f"[{i}/{len(plan)}] {name} (free memory {_free_memory_gib()} GiB) ...")
        # A comparison twin gets at most 10 min: XLA training on CPU may not even finish
        # compiling in that time, which is itself the answer (reported, not fatal).
        res = run_child(spec, min(timeout, 600) if spec.get("short") else timeout)
        if spec.get("short") and "error" in res:
            res["comparison_only"] = True
        results[name] = res
        if progress:
            if "error" in res:
                progress(f"    FAILED: {res['error']}")
            else:
                rate = res.get("samples_per_s")
                progress(
                    f"    median {res['median_s']:.4f} s"
                    + (f", {rate:.2f} samples/s" if rate is not None else "")
                    + f", peak RSS {res.get('peak_rss_gib')} GiB, wall {res['wall_s']} s"
                )
    cpu = cpu_info()
    report = {
        "meta": {
            "quick": quick,
            "config": config,
            "overrides": list(overrides or []),
            "precision": policy,
            "jit_compile": use_jit,
            "gpu": gpu,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": cpu["model"],
            "cpu": cpu,
            "python": platform.python_version(),
            "versions": _versions(),
            "env": {
                k: os.environ[k]
                for k in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "TF_XLA_FLAGS")
                if k in os.environ
            },
            "plan": _plan(quick),
            "model": cfg.to_dict()["model"],
            "audio_len": cfg.data.audio_max_len,
            "text_len": cfg.data.text_max_len,
            "min_length_fraction": MIN_LENGTH_FRACTION,
            "total_wall_s": round(time.perf_counter() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "reference": None if reference is None else reference["info"],
        "stored_reference": STORED_REFERENCE,
        "targets": TARGETS,
        "results": results,
    }
    report["summary"] = summarize(results, use_jit, policy, other, quick)
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return report


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def cpu_info() -> dict[str, Any]:
    """This machine's CPU: model name, architecture, cores this process may use and the
    `CPU_FLAGS` it has (from /proc/cpuinfo; `platform` where that does not exist, flags None).
    """
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if model is None and key in ("model name", "cpu model", "hardware"):
                model = value.strip()
            elif flags is None and key in ("flags", "features"):
                flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "machine": platform.machine() or None,
        "cores": _cores(),
        "flags": None if flags is None else [f for f in CPU_FLAGS if f in flags],
    }


def check_reference(
    cfg: Config,
    reference_dir: str | Path,
    entry: str,
    gpu: bool = False,
    threads: int | None = None,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Load the reference model once in a child process and check it against the contract.

    Fails fast, before any measure runs: the directory (here), then PyTorch, the module, the
    callable and one forward on a batch of 2 (in the child).

    Args:
        cfg: the bench config (sizes and lengths the reference model gets).
        reference_dir: the reference code's directory.
        entry: `MODULE:CALLABLE` (`bench_reference` documents the contract).
        gpu: run the reference on the GPU when PyTorch sees one.
        threads: the bench's `--threads`.
        timeout_s: for the child.

    Returns:
        `{"spec": …, "info": …}`: what the reference measures' specs carry, and what the
        report records (directory, entry, builder arguments, torch version, parameters).

    Raises:
        FileNotFoundError: no such directory.
        ValueError: a malformed entry, or the child's one-line account of what is missing.
    """
    folder = bench_reference.check_reference_dir(reference_dir)
    bench_reference.parse_entry(entry)
    spec_ref = {"dir": str(folder), "entry": entry, "gpu": gpu}
    spec = {
        "kind": "reference",
        "measure": "load",
        "model": json.loads(json.dumps(cfg.to_dict()["model"])),
        "audio_len": cfg.data.audio_max_len,
        "text_len": cfg.data.text_max_len,
        "seed": cfg.train.seed,
        "reference": spec_ref,
    }
    if threads is not None:
        spec["threads"] = threads
    res = run_child(spec, min(timeout_s, 600))
    if "error" in res:
        if res.get("reference_error"):
            raise ValueError(res["error"])
        raise ValueError(
            f"--reference-dir {reference_dir}, --reference-entry {entry}: loading the "
            f"reference model failed: {res['error']}"
        )
    info = {
        "dir": str(folder),
        "entry": entry,
        **{
            k: res.get(k)
            for k in (
                "module_file",
                "kwargs",
                "torch",
                "torch_threads",
                "torch_interop_threads",
                "device",
                "trainable_params",
            )
        },
    }
    return {"spec": spec_ref, "info": info}


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    out = {}
    for name in ("tensorflow", "keras", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def add_bench_args(p: argparse.ArgumentParser, config_args: bool = True) -> None:
    """The `bench` options (shared by `ks-keras bench` and scripts/benchmark.py).

    Args:
        p: the parser to extend.
        config_args: also add `--config` and `--set` (the CLI has its own helper for them).
    """
    if config_args:
        p.add_argument("--config", default=None, help="YAML config (default: paper model)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted override, repeatable",
        )
    p.add_argument(
        "--quick", action="store_true", help="tiny model, few repetitions (seconds; a smoke test)"
    )
    p.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma list of measures (default all: {','.join(MEASURES)})",
    )
    p.add_argument(
        "--jit",
        choices=("auto", "on", "off"),
        default="auto",
        help="XLA for the headline figures (auto: on with a GPU, off on CPU)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "mixed"),
        default="auto",
        help="auto: mixed_float16 on a GPU, float32 on CPU",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per measure")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra/inter-op threads of every measure (TensorFlow; PyTorch for the reference)",
    )
    p.add_argument("--output", default="reports/benchmark.json", help="JSON report path")
    p.add_argument(
        "--reference-dir",
        default=None,
        metavar="PATH",
        help="a checkout of the authors' PyTorch code: measure its model in this run with the "
        "same protocol and print ours side by side with ratios (needs PyTorch; contract below)",
    )
    p.add_argument(
        "--reference-entry",
        default=bench_reference.DEFAULT_REFERENCE_ENTRY,
        metavar="MODULE:CALLABLE",
        help="the callable under --reference-dir that builds the reference model "
        "(default: %(default)s, the authors' builder)",
    )


def run_bench(args) -> int:
    """`ks-keras bench`: run, print the table, write the JSON. Exit 1 if a measure failed."""
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    report = run_benchmark(
        config=args.config,
        overrides=args.overrides,
        quick=args.quick,
        only=only,
        jit=args.jit,
        precision=args.precision,
        output=args.output,
        repeats=args.repeats,
        threads=args.threads,
        reference_dir=args.reference_dir,
        reference_entry=args.reference_entry,
    )
    print(format_table(report))
    print(f"wrote {args.output}")
    failed = [
        k for k, v in report["results"].items() if "error" in v and not v.get("comparison_only")
    ]
    slow = [k for k, v in report["results"].items() if "error" in v and v.get("comparison_only")]
    if slow:
        print(f"comparison measures without a figure: {', '.join(slow)} (see the JSON)")
    if failed:
        print(f"failed measures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ks_keras.bench`: the benchmark, or (`--child SPEC`) one measure."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
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
    parser = argparse.ArgumentParser(
        prog="python -m ks_keras.bench",
        description=__doc__,
        epilog=bench_reference.REFERENCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_args(parser)
    try:
        return run_bench(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
