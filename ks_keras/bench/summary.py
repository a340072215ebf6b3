"""Parent side: headline figures, comparisons, reference ratios and targets of a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ks_keras.bench.settings import LATENCY_MEASURES, TARGETS, _plan


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# `get(name, key="samples_per_s")`: one figure of a measure's result, None when the measure
# is missing or failed (see `summarize`).
_Getter = Callable[..., Any]


def _train_figures(get: _Getter, batches) -> dict[str, dict[str, Any]]:
    """`{batch: {samples_per_s, step_s, peak_rss_gib}}` of the train measures that ran."""
    return {
        str(b): {
            "samples_per_s": get(f"train_b{b}"),
            "step_s": get(f"train_b{b}", "median_s"),
            "peak_rss_gib": get(f"train_b{b}", "peak_rss_gib"),
        }
        for b in batches
        if get(f"train_b{b}") is not None
    }


def _xla_comparison(get: _Getter, big: int, infer_batch: int, use_jit: bool) -> dict[str, Any]:
    flip = "off" if use_jit else "on"
    on_off = (lambda a, b: (a, b)) if use_jit else (lambda a, b: (b, a))
    t_on, t_off = on_off(
        get(f"train_b{big}", "median_s"), get(f"train_b{big}_xla_{flip}", "median_s")
    )
    i_on, i_off = on_off(
        get(f"infer_b{infer_batch}", "median_s"),
        get(f"infer_b{infer_batch}_xla_{flip}", "median_s"),
    )
    return {
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


def _precision_comparison(get: _Getter, big: int, policy: str, other: str) -> dict[str, Any]:
    mixed = other if policy == "float32" else policy
    t_main, t_other = get(f"train_b{big}", "median_s"), get(f"train_b{big}_{other}", "median_s")
    t_f32, t_mixed = (t_main, t_other) if policy == "float32" else (t_other, t_main)
    return {
        "batch": big,
        "mixed_policy": mixed,
        "train_step_s_float32": t_f32,
        "train_step_s_mixed": t_mixed,
        "mixed_speedup": _ratio(t_f32, t_mixed),
    }


def _onednn_comparison(get: _Getter, big: int, results: dict[str, Any]) -> dict[str, Any]:
    """Training with TensorFlow's oneDNN kernels on vs off (Eigen), same run."""
    twin = next((k for k in results if k.startswith(f"train_b{big}_onednn_")), None)
    if twin is None:
        return {
            "batch": big,
            "train_step_s_on": None,
            "train_step_s_off": None,
            "speedup": None,
            "train_peak_rss_gib_twin": None,
        }
    headline, other = get(f"train_b{big}", "median_s"), get(twin, "median_s")
    t_on, t_off = (other, headline) if twin.endswith("_on") else (headline, other)
    return {
        "batch": big,
        "train_step_s_on": t_on,
        "train_step_s_off": t_off,
        "speedup": _ratio(t_off, t_on),
        "train_peak_rss_gib_twin": get(twin, "peak_rss_gib"),
    }


def _attention_comparison(get: _Getter) -> dict[str, Any]:
    att = {
        k: get(f"attention_{k}", "median_s")
        for k in ("key_sparse_fwd", "key_sparse_fwd_bwd", "dense_fwd", "dense_fwd_bwd")
    }
    return {
        **{f"{k}_s": v for k, v in att.items()},
        "ratio_fwd": _ratio(att["key_sparse_fwd"], att["dense_fwd"]),
        "ratio_fwd_bwd": _ratio(att["key_sparse_fwd_bwd"], att["dense_fwd_bwd"]),
    }


def _pipeline_comparison(get: _Getter, results: dict[str, dict], big: int) -> dict[str, Any]:
    pipe = get("pipeline")
    model_rate = get(f"train_b{big}")
    return {
        "source": (results.get("pipeline") or {}).get("source"),
        "pipeline_samples_per_s": pipe,
        "model_train_samples_per_s": model_rate,
        "pipeline_over_model": _ratio(pipe, model_rate),
        # Share of one training step's wall time the pipeline would need if it ran serially.
        "pipeline_share_of_step": _ratio(model_rate, pipe),
    }


def _lengths_comparison(get: _Getter, samples_per_epoch: int) -> dict[str, Any]:
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
    lengths["samples_per_epoch"] = samples_per_epoch
    frames = [get(f"lengths_{m}_padded", "mean_audio_frames") for m in ("train", "infer")]
    lengths["mean_audio_frames"] = next((f for f in frames if f is not None), None)
    return lengths


def _reference_summary(
    get: _Getter, results: dict[str, dict], p: dict[str, Any], big: int
) -> dict[str, Any] | None:
    """The reference model measured in this run (`--reference-dir`), or None. Never
    STORED_REFERENCE: those figures come from another machine."""

    def ref(name, key="samples_per_s"):
        return get(f"reference_{name}", key)

    if not any(name.startswith("reference_") for name in results):
        return None
    ref_latency = ref("latency_b1", "median_s")
    return {
        "train": _train_figures(ref, p["train_batches"]),
        "trainable_params": next(
            (
                r["trainable_params"]
                for k, r in results.items()
                if k.startswith("reference_") and "trainable_params" in r
            ),
            None,
        ),
        "infer_samples_per_s": ref(f"infer_b{p['infer_batch']}"),
        "latency_ms": None if ref_latency is None else 1000 * ref_latency,
        "train_peak_rss_gib": ref(f"train_b{big}", "peak_rss_gib"),
    }


def _vs_reference(
    get: _Getter, summary: dict[str, Any], p: dict[str, Any], big: int
) -> dict[str, float | None]:
    """Our figures over the reference measured in this run (all None without one)."""
    r = {}
    theirs = summary["reference"] or {"train": {}}
    for b in p["train_batches"]:
        r[f"train_throughput_b{b}"] = _ratio(
            get(f"train_b{b}"), theirs["train"].get(str(b), {}).get("samples_per_s")
        )
    r[f"infer_throughput_b{p['infer_batch']}"] = _ratio(
        summary["infer_samples_per_s"], theirs.get("infer_samples_per_s")
    )
    for name, key, _ in LATENCY_MEASURES:
        r[name] = _ratio(summary[key], theirs.get("latency_ms"))
    r[f"train_peak_rss_b{big}"] = _ratio(
        summary["train_peak_rss_gib"], theirs.get("train_peak_rss_gib")
    )
    r["trainable_params"] = _ratio(summary["trainable_params"], theirs.get("trainable_params"))
    return r


def _targets(r: dict[str, Any], c: dict[str, Any], big: int, small: int) -> dict[str, Any]:
    """Each target met (True), missed (False) or not measured (None)."""
    t = TARGETS

    def check(value, bound, upper):
        if value is None:
            return None
        return value <= bound if upper else value >= bound

    return {
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


def summarize(
    results: dict[str, dict], use_jit: bool, policy: str, other: str, quick: bool
) -> dict[str, Any]:
    """Headline figures, comparisons, reference ratios and targets from raw results."""
    p = _plan(quick)
    big, small = max(p["train_batches"]), min(p["train_batches"])

    def get(name, key="samples_per_s"):
        r = results.get(name)
        return None if r is None or "error" in r else r.get(key)

    summary: dict[str, Any] = {
        "train": _train_figures(get, p["train_batches"]),
        "comparisons": {},
        "vs_reference": {},
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
    c["xla"] = _xla_comparison(get, big, p["infer_batch"], use_jit)
    c["precision"] = _precision_comparison(get, big, policy, other)
    c["onednn"] = _onednn_comparison(get, big, results)
    c["attention"] = _attention_comparison(get)
    c["pipeline"] = _pipeline_comparison(get, results, big)
    c["lengths"] = _lengths_comparison(get, p["lengths_samples"])

    summary["reference"] = _reference_summary(get, results, p, big)
    summary["vs_reference"] = _vs_reference(get, summary, p, big)
    summary["targets"] = _targets(summary["vs_reference"], c, big, small)
    if quick:
        # A tiny model says nothing about the paper-size targets (the same-run ratios stay:
        # both sides ran the same tiny sizes).
        summary["targets"] = {k: None for k in summary["targets"]}
    return summary
