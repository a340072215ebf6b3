"""The benchmark runs on a tiny config and writes a complete JSON report (no timing checks)."""

import json
import re

import pytest

from ks_keras import bench, bench_reference
from ks_keras.bench import runner as bench_runner
from ks_keras.cli import main as cli_main

SUMMARY_KEYS = {
    "train",
    "trainable_params",
    "infer_samples_per_s",
    "latency_ms",
    "train_peak_rss_gib",
    "comparisons",
    "vs_reference",
    "reference",
    "targets",
}
COMPARISONS = {"xla", "precision", "onednn", "attention", "pipeline", "lengths"}


def _fake_child(
    step_s=10.0,
    latency_s=0.1,
    rss=8.0,
    ks_s=1.1,
    dense_s=1.0,
    fail=(),
    ref_step_s=20.0,
    ref_latency_s=0.2,
    ref_rss=16.0,
):
    """A stand-in for the child process: fixed figures per measure kind (the reference
    model's, `kind == "reference"`, from the `ref_*` figures)."""
    calls = []

    def run_child(spec, timeout_s, env=None):
        calls.append(spec)
        kind = spec["kind"]
        if any(kind == f for f in fail):
            return {"error": "exit code 1: boom"}
        out = {"times_s": [1.0], "cpu_median_s": 1.0, "peak_rss_gib": rss, "wall_s": 1.0}
        if kind == "reference":
            out.update(peak_rss_gib=ref_rss, trainable_params=86_000_000, torch="2.13.0+cpu")
            out.update(torch_threads=2, device="cpu", module_file="/ref/model/x.py")
            measure = spec["measure"]
            if measure == "load":
                return out
            kind = None  # not one of ours below
            out["median_s"] = {
                "train": ref_step_s * spec["batch"] / 32,
                "infer": ref_step_s / 4,
                "latency": ref_latency_s,
            }[measure]
            out["samples_per_s"] = spec["batch"] / out["median_s"]
        if kind == "train":
            out.update(median_s=step_s * spec["batch"] / 32, trainable_params=85_000_000)
        elif kind == "infer":
            out.update(median_s=step_s / 4, trainable_params=85_000_000)
        elif kind == "latency":
            out.update(median_s=latency_s, trainable_params=85_000_000)
        elif kind == "attention":
            out["median_s"] = ks_s if spec["layer"] == "key_sparse" else dense_s
        elif kind == "pipeline":
            out.update(median_s=0.1, samples_per_s=5000.0, source="fake pipeline")
        elif kind == "lengths":
            # An epoch of `samples`: bucketed twice as fast as padded.
            out.update(median_s=spec["samples"] / (8.0 if spec["layout"] == "bucketed" else 4.0))
            out.update(samples_per_s=8.0 if spec["layout"] == "bucketed" else 4.0)
            out.update(mean_audio_frames=208.0, bucketed=spec["layout"] == "bucketed")
        if kind in ("train", "infer", "latency"):
            out["samples_per_s"] = spec["batch"] / out["median_s"]
        return out

    return run_child, calls


def test_plan_runs_every_measure_in_its_own_process(monkeypatch, tmp_path):
    run_child, calls = _fake_child()
    monkeypatch.setattr(bench_runner, "run_child", run_child)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    out = tmp_path / "bench.json"
    report = bench.run_benchmark(output=out, progress=None)
    kinds = [c["kind"] for c in calls]
    # train 16 + 32, their XLA/precision/oneDNN twins, inference (+ XLA twin), latency (plain,
    # through the serving graph, that with one thread per op, and that with bfloat16
    # weights), 4 attention runs, the pipeline: each a separate child.
    assert kinds.count("train") == 5 and kinds.count("infer") == 2
    assert kinds.count("attention") == 4 and kinds.count("latency") == 4
    latency = [c for c in calls if c["kind"] == "latency"]
    assert [c.get("serving") for c in latency] == [None, "crop", "crop", "crop"]
    assert [c.get("weights") for c in latency] == [None, None, None, "bfloat16"]
    for c in latency[2:]:
        assert c["intra_threads"] == 1 and c["inter_threads"] >= 1
    assert kinds.count("pipeline") == 1
    # Realistic lengths: training and inference, bucketed and padded, the same samples.
    lengths = [c for c in calls if c["kind"] == "lengths"]
    assert [(c["mode"], c["layout"], c["batch"]) for c in lengths] == [
        ("train", "bucketed", 32),
        ("train", "padded", 32),
        ("infer", "bucketed", 32),
        ("infer", "padded", 32),
    ]
    assert {c["samples"] for c in lengths} == {bench._plan(False)["lengths_samples"]}
    assert sorted({c["batch"] for c in calls if c["kind"] == "train"}) == [16, 32]
    assert {c["jit"] for c in calls if c["kind"] == "train"} == {True, False}
    assert {c["precision"] for c in calls if c["kind"] == "train"} == {
        "float32",
        "mixed_bfloat16",
    }
    # The XLA / precision / oneDNN twins are comparisons: one warm-up step, at most two timed
    # steps.
    twins = [c for c in calls if c.get("short")]
    assert len(twins) == 4 and all(c["warmup"] == 1 and c["repeats"] <= 2 for c in twins)
    # Paper shapes reach the children.
    assert calls[0]["audio_len"] == 460 and calls[0]["text_len"] == 20
    assert calls[0]["model"]["audio_dim"] == 512 and calls[0]["model"]["n_ccab"] == 3

    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    s = saved["summary"]
    assert SUMMARY_KEYS <= set(s) and COMPARISONS <= set(s["comparisons"])
    # 10 s per step of 32 → 3.2 samples/s.
    assert s["train"]["32"]["samples_per_s"] == pytest.approx(3.2)
    assert s["latency_ms"] == pytest.approx(100.0)
    assert s["comparisons"]["attention"]["ratio_fwd"] == pytest.approx(1.1)
    # No reference measured in this run: no ratio to figures from another machine, and no
    # target judged on them; the attention targets compare two measures of this run.
    assert s["reference"] is None and saved["reference"] is None
    assert set(s["vs_reference"].values()) == {None}
    assert s["targets"] == {
        "train_throughput_b32": None,
        "train_throughput_b16": None,
        "latency_b1": None,
        "latency_b1_serving": None,
        "latency_b1_serving_inter": None,
        "latency_b1_serving_bf16": None,
        "train_peak_rss_b32": None,
        "attention_fwd": True,
        "attention_fwd_bwd": True,
    }
    assert s["comparisons"]["pipeline"]["pipeline_over_model"] == pytest.approx(5000 / 3.2)
    le = s["comparisons"]["lengths"]
    assert le["train"]["bucketed_over_padded"] == pytest.approx(2.0)
    assert le["infer"]["padded_samples_per_s"] == pytest.approx(4.0)
    assert le["mean_audio_frames"] == pytest.approx(208.0)
    table = bench.format_table(report)
    assert "realistic lengths, train, batch 32: samples/s bucketed / padded" in table
    assert "8.00 / 4.00" in table
    assert saved["meta"]["cpu"]["cores"] >= 1 and saved["meta"]["cpu"]["model"]
    assert saved["stored_reference"]["machine"] == bench.STORED_REFERENCE["machine"]


def test_report_without_a_reference_names_the_cpu_and_divides_by_nothing(monkeypatch):
    run_child, _ = _fake_child()
    monkeypatch.setattr(bench_runner, "run_child", run_child)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    cpu = {"model": "Test CPU 9000", "machine": "x86_64", "cores": 2, "flags": ["avx2", "fma"]}
    monkeypatch.setattr(bench_runner, "cpu_info", lambda: cpu)
    report = bench.run_benchmark(output=None, progress=None)
    table = bench.format_table(report)
    header = table.splitlines()[0].split("  ")
    assert "CPU: Test CPU 9000 (x86_64), 2 cores available; flags: avx2 fma" in table
    # Our absolute figures, no column of ratios or reference figures.
    assert "3.20" in table and "ours/ref" not in table and "reference" not in header
    # 3.2 / 1.40 (the stored batch-32 rate) and 100 / 176 ms would be cross-machine ratios.
    assert "2.29" not in table and "0.57" not in table
    # The stored figures are there as information, labelled with their machine.
    stored = table[table.index("Stored figures") :]
    assert bench.STORED_REFERENCE["machine"] in stored and "1.4 (batch 32)" in stored
    assert "information only" in stored and "--reference-dir" in stored


def test_flags_fall_back_to_unknown_without_proc_cpuinfo():
    line = bench.describe_cpu({"model": "arm", "machine": "arm64", "cores": 8, "flags": None})
    assert line == "CPU: arm (arm64), 8 cores available; flags: unknown (no /proc/cpuinfo)"
    assert bench.cpu_info()["cores"] >= 1


def test_a_reference_measured_in_the_same_run_gives_ratios_and_targets(monkeypatch, tmp_path):
    run_child, calls = _fake_child()
    monkeypatch.setattr(bench_runner, "run_child", run_child)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    report = bench.run_benchmark(
        only=("train", "infer", "latency"),
        output=tmp_path / "bench.json",
        progress=None,
        reference_dir=tmp_path,
    )
    refs = [c for c in calls if c["kind"] == "reference"]
    # One check (build + one forward), then a twin of each train/infer/plain-latency measure
    # with our spec: same batch, inputs, warm-up and repetitions.
    assert [c["measure"] for c in refs] == ["load", "train", "train", "infer", "latency"]
    assert all(c["reference"]["dir"] == str(tmp_path.resolve()) for c in refs)
    ours = {(c["kind"], c["batch"]): c for c in calls if c["kind"] != "reference"}
    for c in refs[1:]:
        twin = ours[(c["measure"], c["batch"])]
        assert {k: c[k] for k in ("warmup", "repeats", "model", "seed")} == {
            k: twin[k] for k in ("warmup", "repeats", "model", "seed")
        }
    s = report["summary"]
    # Ours 3.2 samples/s at batch 32 vs the reference's 1.6 in this run; latency 100 vs 200 ms.
    assert s["reference"]["train"]["32"]["samples_per_s"] == pytest.approx(1.6)
    assert s["vs_reference"]["train_throughput_b32"] == pytest.approx(2.0)
    assert s["vs_reference"]["latency_b1"] == pytest.approx(0.5)
    assert s["vs_reference"]["train_peak_rss_b32"] == pytest.approx(0.5)
    assert s["targets"]["train_throughput_b32"] is True and s["targets"]["latency_b1"] is True
    assert report["reference"]["entry"] == bench_reference.DEFAULT_REFERENCE_ENTRY
    table = bench.format_table(report)
    assert "ours/ref" in table and "measured in this run on this machine" in table
    assert "Stored figures" not in table and "2.00" in table


def test_missed_targets_and_failed_measures_are_reported(monkeypatch, tmp_path, capsys):
    run_child, _ = _fake_child(
        step_s=30.0, rss=12.0, ks_s=2.0, fail=("latency",), ref_step_s=22.9, ref_rss=15.4
    )
    monkeypatch.setattr(bench_runner, "run_child", run_child)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    out = tmp_path / "r" / "bench.json"
    rc = cli_main(
        ["bench", "--only", "train,latency,attention", "--output", str(out)]
        + ["--reference-dir", str(tmp_path)]
    )
    assert rc == 1
    assert "latency_b1" in capsys.readouterr().err
    s = json.loads(out.read_text())["summary"]
    assert s["targets"]["train_throughput_b32"] is False
    assert s["targets"]["train_peak_rss_b32"] is False
    assert s["targets"]["attention_fwd"] is False
    assert s["targets"]["latency_b1"] is None  # failed: unknown, not "met"
    assert "error" in json.loads(out.read_text())["results"]["latency_b1"]


def test_gpu_defaults_to_mixed_float16_and_xla():
    assert bench.resolve_settings("auto", "auto", gpu=True) == (True, "mixed_float16", "float32")
    assert bench.resolve_settings("auto", "auto", gpu=False)[1:] == ("float32", "mixed_bfloat16")
    assert bench.resolve_settings("on", "mixed", gpu=False) == (True, "mixed_bfloat16", "float32")


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--only", "train,warp"], "--only"),
        (["--repeats", "0"], "--repeats"),
        (["--config", "no/such.yaml"], "no/such.yaml"),
        (["--set", "model.n_ccab=-1"], "model.n_ccab"),
    ],
)
def test_bad_arguments_are_clean_errors(argv, field, capsys, tmp_path):
    rc = cli_main(["bench", *argv, "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 1 and field in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_quick_benchmark_really_runs(tmp_path):
    """Real child processes on the tiny model: training, the attention pair and tf.data."""
    out = tmp_path / "quick.json"
    report = bench.run_benchmark(
        quick=True, only=("train", "pipeline"), output=out, repeats=1, progress=None
    )
    saved = json.loads(out.read_text())
    assert saved["meta"]["quick"] is True and saved["meta"]["precision"] == "float32"
    for name in ("train_b4", "train_b8", "pipeline"):
        result = saved["results"][name]
        assert "error" not in result, result.get("error")
        assert result["median_s"] > 0 and result["peak_rss_gib"] > 0
        timings = result["epoch_times_s" if name == "pipeline" else "times_s"]
        assert len(timings) >= 1 and all(t > 0 for t in timings)
    s = report["summary"]
    assert s["train"]["8"]["samples_per_s"] > 0
    assert s["trainable_params"] == saved["results"]["train_b8"]["trainable_params"] > 0
    pipe = s["comparisons"]["pipeline"]
    assert pipe["pipeline_samples_per_s"] > 0 and pipe["source"]
    assert saved["results"]["pipeline"]["samples_per_epoch"] > 0
    # A tiny model says nothing about the paper-size targets.
    assert set(s["targets"].values()) == {None}


@pytest.mark.large
def test_full_quick_run_through_the_cli(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert cli_main(["bench", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "Stored figures" in printed and "ours/ref" not in printed
    saved = json.loads(out.read_text())
    assert all("error" not in r for r in saved["results"].values())
    c = saved["summary"]["comparisons"]
    assert c["xla"]["train_speedup_jit_on"] > 0 and c["precision"]["mixed_speedup"] > 0
    assert c["attention"]["ratio_fwd"] > 0 and c["attention"]["ratio_fwd_bwd"] > 0


@pytest.mark.parametrize("user_value, twin", [(None, "off"), ("1", "off"), ("0", "on")])
def test_the_onednn_twin_flips_what_the_other_measures_get(
    monkeypatch, tmp_path, capsys, user_value, twin
):
    run_child, calls = _fake_child()
    envs = {}

    def with_env(spec, timeout_s, env=None):
        res = run_child(spec, timeout_s, env)
        envs[len(calls) - 1] = env
        if env and env.get("TF_ENABLE_ONEDNN_OPTS") == "0" and "median_s" in res:
            res["median_s"] *= 1.8  # Eigen's kernels: slower
        elif twin == "on" and spec["kind"] == "train" and not env:
            res["median_s"] *= 1.8  # the user switched oneDNN off for the headline
        enabled = (env or {}).get("TF_ENABLE_ONEDNN_OPTS", "0" if twin == "on" else "1") == "1"
        res["onednn"] = {"enabled": enabled, "source": "test", "tensorflow_default": False}
        return res

    if user_value is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", user_value)
    monkeypatch.setattr(bench_runner, "run_child", with_env)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--only", "train,onednn", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    names = list(json.loads(out.read_text())["results"])
    assert names[-1] == f"train_b32_onednn_{twin}"
    assert envs[len(calls) - 1] == {
        "TF_ENABLE_ONEDNN_OPTS": "1" if twin == "on" else "0",
        "KS_KERAS_SET_ONEDNN": "bench",
    }
    assert all(envs[i] is None for i in range(len(calls) - 1))  # the others: as the parent
    c = json.loads(out.read_text())["summary"]["comparisons"]["onednn"]
    assert c["speedup"] == pytest.approx(1.8) and c["train_step_s_off"] > c["train_step_s_on"]
    assert re.search(r"oneDNN speed-up, train \(vs Eigen kernels\)\s+1\.80\n", printed)
    # The headline line describes the other measures (the twin flips the setting on purpose).
    state = "off" if twin == "on" else "on"
    assert f"TensorFlow oneDNN kernels: {state} (test; TensorFlow's own default on " in printed


def test_a_comparison_twin_that_times_out_is_reported_not_fatal(monkeypatch, tmp_path, capsys):
    run_child, calls = _fake_child()

    def slow_xla(spec, timeout_s, env=None):
        if spec.get("short") and spec["jit"]:
            assert timeout_s <= 600
            return {"error": f"timed out after {timeout_s:.0f} s"}
        return run_child(spec, timeout_s, env)

    monkeypatch.setattr(bench_runner, "run_child", slow_xla)
    monkeypatch.setattr(bench_runner, "_gpu_present", lambda: False)
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--only", "train,xla", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timed out" in printed and "train_b32_xla_on" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["train_b32_xla_on"]["comparison_only"] is True
    assert saved["summary"]["comparisons"]["xla"]["train_speedup_jit_on"] is None


def test_realistic_lengths_are_seeded_cropped_and_iemocap_like():
    seconds = bench.utterance_seconds(20000, seed=0)
    assert seconds.mean() == pytest.approx(bench.UTTERANCE_MEAN_S, rel=0.03)
    assert 0.002 < (seconds > 20).mean() < 0.02  # a long tail past 20 s
    frames = bench.realistic_lengths(20000, seed=0)
    assert frames.dtype.kind == "i" and frames.min() >= 1 and frames.max() == 460
    assert 0.05 < (frames == 460).mean() < 0.15  # the tail is cropped at 460 frames
    # 50 frames/s at the paper's 460 frames: mean 4.5 s is 225 frames before the crop.
    assert 190 < frames.mean() < 225
    assert (bench.realistic_lengths(50, seed=3) == bench.realistic_lengths(50, seed=3)).all()
    assert (bench.realistic_lengths(50, seed=3) != bench.realistic_lengths(50, seed=4)).any()
    tiny = bench.realistic_lengths(500, seed=0, max_len=24)  # --quick: the same 9.2 s crop
    assert tiny.min() >= 1 and tiny.max() == 24


def test_realistic_length_measure_runs_on_a_tiny_model():
    """The new child measure, run in this process on the quick sizes: an epoch of bucketed
    training and of bucketed and padded inference gives finite figures (no timings checked)."""
    from ks_keras.config import load_config

    cfg = load_config(None, bench.QUICK_OVERRIDES)
    plan = dict(bench.plan_measures(cfg, True, ("lengths",), False, "float32", "mixed_bfloat16"))
    assert set(plan) == {
        f"lengths_{m}_{k}" for m in ("train", "infer") for k in ("bucketed", "padded")
    }
    for name in ("lengths_train_bucketed", "lengths_infer_bucketed", "lengths_infer_padded"):
        spec = {**plan[name], "samples": 12, "warmup": 1, "max_warmup": 1, "repeats": 1}
        result = bench.child_main(spec)
        assert result["samples_per_epoch"] == 12 and result["bucketed"] == ("bucketed" in name)
        assert result["median_s"] > 0 and result["samples_per_s"] > 0
        assert 0 < result["real_step_share"] <= 1 and result["batches_per_epoch"] >= 2
        if "padded" in name:  # cropped realistic lengths fill about 40 % of 24 steps
            assert result["real_step_share"] < 0.8


def test_profile_measures_trace_a_training_step_and_single_requests():
    """`--only profile` plans the training-step profile and the batch-1 serving-graph profile
    (the single-request thread setting); the latter, run in this process on the quick sizes,
    sums op time per category, tells the projections from the attention core by name, and
    counts the ops of a request (no timings checked)."""
    from ks_keras.config import load_config

    cfg = load_config(None, bench.QUICK_OVERRIDES)
    plan = dict(bench.plan_measures(cfg, True, ("profile",), False, "float32", "mixed_bfloat16"))
    assert set(plan) == {"profile_b8", "profile_latency_b1_serving_inter"}
    spec = plan["profile_latency_b1_serving_inter"]
    assert spec["batch"] == 1 and spec["serving"] == "crop" and spec["intra_threads"] == 1
    # Threads are set per child process; this process's TensorFlow is already running.
    spec = {k: v for k, v in spec.items() if k not in ("intra_threads", "inter_threads")}
    result = bench.child_main({**spec, "distinct": 2, "warmup": 2, "repeats": 2})
    categories = result["categories"]
    assert "attention projections (Q, K, V, O)" in categories
    assert "attention core (scores, softmax, weights x values)" in categories
    assert result["forward_backward_s"]["backward"] == 0.0
    assert result["ops_per_step"] > 100 and result["op_seconds_per_step"] > 0
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0, abs=0.01)
