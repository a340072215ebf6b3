"""Child side: the `profile` measure, where time goes in a traced training step by op category."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ks_keras.bench.child import (
    _build_compiled_model,
    _peak_rss_gib,
    _serving_function,
    _setup_child,
    synthetic_batch,
)

# Where time goes: op categories of a traced training step, from the ops' name scopes
# (segments with Keras' `_1` suffixes removed) — first match wins.
PROFILE_CATEGORIES = (
    ("optimizer", lambda seg: bool(seg) and seg[0] in ("adam", "sgd", "adamw", "fused_adam")),
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
    """Trace training steps with `tf.profiler` and sum op time per category (no XLA).

    With `serving` in the spec, trace the export's serving graph on batch-1 requests instead
    (`distinct` requests with real lengths drawn as for the latency measures, one call per
    traced repetition, cycling through them): where a single request's time goes.
    """
    import re

    tf, keras = _setup_child(spec)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    spec = {**spec, "jit": False}  # XLA fuses ops into clusters that have no layer names
    model, _ = _build_compiled_model(spec, keras)
    if spec.get("serving"):
        import numpy as np

        serve = _serving_function(spec, model)
        requests = [synthetic_batch(spec, 1, seed)[0] for seed in range(spec.get("distinct", 1))]

        def step(i):
            np.asarray(serve(requests[i % len(requests)])["probabilities"])

    else:
        x, y = synthetic_batch(spec, spec["batch"], 0)

        def step(i):
            model.train_on_batch(x, y)

    for i in range(spec["warmup"]):
        step(i)
    with tempfile.TemporaryDirectory(prefix="ks_bench_profile_") as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        for i in range(spec["repeats"]):
            step(i)
        wall = (time.perf_counter() - t0) / spec["repeats"]
        tf.profiler.experimental.stop()
        planes = sorted(Path(logdir).rglob("*.xplane.pb"))
        space = xplane_pb2.XSpace()
        space.ParseFromString(planes[-1].read_bytes())
    by_category: dict[str, float] = {}
    by_type: dict[str, float] = {}
    by_op: dict[str, float] = {}
    backward: dict[str, float] = {"forward": 0.0, "backward": 0.0}
    n_ops = 0
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
                n_ops += 1
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
        "ops_per_step": round(n_ops / spec["repeats"], 1),
        "categories": {
            k: {"s": round(v, 4), "share": round(v / total, 4)}
            for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "op_types": {k: {"s": round(v, 4), "share": round(v / total, 4)} for k, v in top_types},
        "top_ops": {k: round(v, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:40]},
        "forward_backward_s": {k: round(v, 4) for k, v in backward.items()},
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }
