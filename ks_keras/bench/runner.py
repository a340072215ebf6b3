"""Parent side: run each measure in a fresh process (`run_child`), check the reference
before any measure, run the whole benchmark and write the JSON report."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ks_keras import bench_reference, runtime
from ks_keras.bench.child import _cores
from ks_keras.bench.plan import plan_measures, resolve_settings
from ks_keras.bench.settings import (
    CPU_FLAGS,
    MEASURES,
    MIN_LENGTH_FRACTION,
    OPTIONAL_MEASURES,
    QUICK_OVERRIDES,
    RESULT_PREFIX,
    STORED_REFERENCE,
    TARGETS,
    _free_memory_gib,
    _load_average,
    _plan,
)
from ks_keras.bench.summary import summarize
from ks_keras.config import Config, load_config

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


def _gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing TensorFlow in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


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
        res = run_child(
            spec, min(timeout, 600) if spec.get("short") else timeout, env=spec.get("env")
        )
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
    model, flags = runtime.read_cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "machine": platform.machine() or None,
        "cores": _cores(),
        "flags": None if flags is None else [f for f in CPU_FLAGS if f in flags],
        "tensorflow_default_onednn": runtime.tensorflow_default_onednn(flags),
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
