"""Parent side: the printed report (the table, this machine's CPU, the stored reference)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ks_keras.bench.settings import CPU_FLAGS, LATENCY_MEASURES, STORED_REFERENCE, TARGETS, _plan
from ks_keras.runtime import describe_onednn_state


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


def describe_onednn(report: dict[str, Any]) -> str | None:
    """One line saying whether TensorFlow's oneDNN kernels ran in our measures, who decided,
    and TensorFlow's own default on this CPU (ks_keras/runtime.py); None if no measure said.
    The `onednn` comparison's twin flips the setting on purpose and is left out."""
    states = [
        r["onednn"]
        for name, r in report["results"].items()
        if "_onednn_" not in name and isinstance(r, dict) and isinstance(r.get("onednn"), dict)
    ]
    if not states:
        return None
    enabled = {st.get("enabled") for st in states}
    state = {frozenset({True}): "on", frozenset({False}): "off"}.get(frozenset(enabled), "mixed")
    default = (report["meta"].get("cpu") or {}).get("tensorflow_default_onednn")
    line = describe_onednn_state(state, states[0].get("source"), default)
    return f"TensorFlow oneDNN kernels: {line}"


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


# `row(label, ours, ref_value="", ratio="", target="", same_run_target="")`: adds one table
# row (see `format_table`).
_Row = Callable[..., None]


def _vs_reference_rows(
    row: _Row, s: dict[str, Any], theirs: dict[str, Any] | None, p: dict[str, Any], big: int
) -> None:
    """Figures measured on both sides: throughput, latency, memory and parameters."""
    r = s["vs_reference"]
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


def _comparison_rows(row: _Row, report: dict[str, Any], p: dict[str, Any], big: int) -> None:
    """Our side only: attention, XLA, precision, oneDNN, input pipeline, realistic lengths."""
    s = report["summary"]
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
    row("oneDNN speed-up, train (vs Eigen kernels)", _fmt(s["comparisons"]["onednn"]["speedup"]))
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


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """The rows as left-aligned columns, a rule of dashes under the first."""
    n = len(rows[0])
    widths = [max(len(line[i]) for line in rows) for i in range(n)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _head_lines(report: dict[str, Any], quick: bool) -> list[str]:
    """What ran, on which CPU, and the reference measured beside it."""
    meta = report["meta"]
    head = [
        f"ks-keras bench ({'quick, tiny model' if quick else 'paper size'}; "
        f"precision {meta['precision']}, jit_compile {meta['jit_compile']})",
        describe_cpu(meta.get("cpu") or {"model": meta.get("processor")}),
    ]
    onednn = describe_onednn(report)
    if onednn:
        head.append(onednn)
    ref_meta = report.get("reference")
    if ref_meta:
        head.append(
            f"reference, measured in this run on this machine: {ref_meta['entry']} from "
            f"{ref_meta['dir']} (torch {ref_meta.get('torch')}, "
            f"{ref_meta.get('torch_threads')} threads, {ref_meta.get('device')})"
        )
    if quick:
        head.append("(quick mode: tiny model on every side; the targets apply to the paper size)")
    return head


def format_table(report: dict[str, Any]) -> str:
    """Our figures (and the reference model's, when measured in the same run) as plain text.

    Ratios and targets appear only for figures measured in this run on this machine.
    """
    s = report["summary"]
    quick = report["meta"]["quick"]
    theirs = s.get("reference")
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

    _vs_reference_rows(row, s, theirs, p, big)
    _comparison_rows(row, report, p, big)

    lines = _aligned(rows)
    head = _head_lines(report, quick)
    if theirs:
        tail = [
            "(the reference's latency is its forward on the request padded to the full length; "
            f"ours is given {len(LATENCY_MEASURES)} ways; the bfloat16 row is the export "
            "option `--weights bfloat16`, not the float32 model)"
        ]
    else:
        tail = ["", *_stored_reference_lines()]
    return "\n".join(head + lines + tail)
