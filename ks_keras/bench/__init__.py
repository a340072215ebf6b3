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
- `profile` (only when asked: `--only profile`): op time per category and op type from
  `tf.profiler`, for a training step and for batch-1 requests through the serving graph
  (one thread per op), into the JSON report.

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

# The package (issue 15) was the module ks_keras/bench.py: every name it defined is
# re-exported here, so `from ks_keras.bench import X` and `ks_keras.bench.X` work as before,
# except the command line (`add_bench_args`, `run_bench`, `main`), now
# `ks_keras.commands.bench`.
# Patch a name where it is looked up (its submodule), not here.

from __future__ import annotations

from ks_keras.bench.child import (
    _build_compiled_model,
    _cores,
    _cpu_seconds,
    _minor_faults,
    _peak_rss_gib,
    _serving_function,
    _setup_child,
    _timed,
    realistic_lengths,
    synthetic_batch,
    utterance_seconds,
)
from ks_keras.bench.measures import (
    _in_memory_dataset,
    _measure_attention,
    _measure_lengths,
    _measure_model,
    _measure_pipeline,
    _synthetic_cache,
    child_entry,
    child_main,
)
from ks_keras.bench.plan import (
    plan_measures,
    resolve_settings,
)
from ks_keras.bench.profiling import (
    PROFILE_CATEGORIES,
    _categorize,
    _measure_profile,
)
from ks_keras.bench.runner import (
    _gpu_present,
    _json_default,
    _versions,
    check_reference,
    cpu_info,
    run_benchmark,
    run_child,
)
from ks_keras.bench.settings import (
    CPU_FLAGS,
    LATENCY_MEASURES,
    MEASURES,
    MIN_LENGTH_FRACTION,
    OPTIONAL_MEASURES,
    PAPER_AUDIO_LEN,
    PAPER_FRAME_RATE,
    QUICK_OVERRIDES,
    RESULT_PREFIX,
    STORED_REFERENCE,
    TARGETS,
    UTTERANCE_MEAN_S,
    UTTERANCE_SIGMA,
    _free_memory_gib,
    _load_average,
    _plan,
)
from ks_keras.bench.summary import (
    _ratio,
    summarize,
)
from ks_keras.bench.table import (
    _fmt,
    _stored_reference_lines,
    describe_cpu,
    describe_onednn,
    format_table,
)

__all__ = [
    "CPU_FLAGS",
    "LATENCY_MEASURES",
    "MEASURES",
    "MIN_LENGTH_FRACTION",
    "OPTIONAL_MEASURES",
    "PAPER_AUDIO_LEN",
    "PAPER_FRAME_RATE",
    "PROFILE_CATEGORIES",
    "QUICK_OVERRIDES",
    "RESULT_PREFIX",
    "STORED_REFERENCE",
    "TARGETS",
    "UTTERANCE_MEAN_S",
    "UTTERANCE_SIGMA",
    "_build_compiled_model",
    "_categorize",
    "_cores",
    "_cpu_seconds",
    "_fmt",
    "_free_memory_gib",
    "_gpu_present",
    "_in_memory_dataset",
    "_json_default",
    "_load_average",
    "_measure_attention",
    "_measure_lengths",
    "_measure_model",
    "_measure_pipeline",
    "_measure_profile",
    "_minor_faults",
    "_peak_rss_gib",
    "_plan",
    "_ratio",
    "_serving_function",
    "_setup_child",
    "_stored_reference_lines",
    "_synthetic_cache",
    "_timed",
    "_versions",
    "check_reference",
    "child_entry",
    "child_main",
    "cpu_info",
    "describe_cpu",
    "describe_onednn",
    "format_table",
    "plan_measures",
    "realistic_lengths",
    "resolve_settings",
    "run_benchmark",
    "run_child",
    "summarize",
    "synthetic_batch",
    "utterance_seconds",
]
