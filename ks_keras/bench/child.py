"""Child-side helpers shared by the measures: peak memory, CPU time, synthetic inputs and
realistic lengths, threads and dtype policy, the timing loop, the compiled model."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ks_keras.bench.settings import (
    MIN_LENGTH_FRACTION,
    PAPER_AUDIO_LEN,
    PAPER_FRAME_RATE,
    UTTERANCE_MEAN_S,
    UTTERANCE_SIGMA,
)
from ks_keras.config import padding_invariant

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
    from ks_keras.export.exporting import bfloat16_copy

    if spec.get("weights") == "bfloat16":  # what `ks-keras export --weights bfloat16` serves
        model = bfloat16_copy(model)
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
