"""Parent side: the headline settings and the plan of measures (one spec per child)."""

from __future__ import annotations

import json
import os
from typing import Any

from ks_keras import runtime
from ks_keras.bench.child import _cores
from ks_keras.bench.settings import _plan
from ks_keras.config import Config


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


def onednn_twin() -> str:
    """`on` or `off`: the oneDNN setting of the `onednn` comparison, the opposite of what
    this process's children get (ks_keras sets TF_ENABLE_ONEDNN_OPTS=1 unless the user set
    it; TensorFlow reads `0`/`false` as off)."""
    value = os.environ.get(runtime.ONEDNN_ENV, "1").strip().lower()
    return "on" if value in ("0", "false") else "off"


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
        # The same with the weights in bfloat16 (`ks-keras export --weights bfloat16`): fast
        # on CPUs with AMX or AVX512-BF16; elsewhere TensorFlow's generic bfloat16 kernels.
        add(
            "latency_b1_serving_bf16",
            serving="crop",
            weights="bfloat16",
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
    if "onednn" in only:
        # TensorFlow's oneDNN kernels flipped (ks_keras turns them on, runtime.py; without them
        # TensorFlow runs Eigen's AVX-only kernels): what the choice is worth on this CPU.
        flip = onednn_twin()
        add(
            f"train_b{big}_onednn_{flip}",
            kind="train",
            batch=big,
            jit=use_jit,
            precision=policy,
            env={runtime.ONEDNN_ENV: "1" if flip == "on" else "0", runtime.MARKER_ENV: "bench"},
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
        # Where a single request's time goes: the batch-1 serving graph with the thread
        # setting for single requests (as `latency_b1_serving_inter`), each distinct request
        # traced once after a warm-up round.
        n = p["latency_requests"]
        add(
            "profile_latency_b1_serving_inter",
            kind="profile",
            batch=1,
            jit=False,
            precision=policy,
            serving="crop",
            intra_threads=1,
            inter_threads=_cores(),
            distinct=n,
            warmup=n,
            repeats=n,
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
