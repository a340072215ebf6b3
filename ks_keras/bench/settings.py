"""The benchmark's constants (stored reference, targets, measures, quick model) and its
settings (batch sizes and repetitions of a run; free memory and load of this machine)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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

MEASURES = (
    "train",
    "infer",
    "latency",
    "attention",
    "xla",
    "precision",
    "onednn",
    "pipeline",
    "lengths",
)
# The batch-1 latency measures: (measure name = ratio and target key, summary key in ms,
# table label).
LATENCY_MEASURES = (
    ("latency_b1", "latency_ms", "latency ms, batch 1"),
    ("latency_b1_serving", "latency_serving_ms", "latency ms, batch 1, serving graph"),
    ("latency_b1_serving_inter", "latency_serving_inter_ms", "  same, 1 intra-op thread/op"),
    (
        "latency_b1_serving_bf16",
        "latency_serving_bf16_ms",
        "  same, weights in bfloat16 (export --weights)",
    ),
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
