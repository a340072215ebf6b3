"""The benchmark runs on a tiny config and writes a complete JSON report (no timing checks)."""

import json

import pytest

from ks_keras import bench
from ks_keras.cli import main as cli_main

SUMMARY_KEYS = {
    "train",
    "trainable_params",
    "infer_samples_per_s",
    "latency_ms",
    "train_peak_rss_gib",
    "comparisons",
    "vs_reference",
    "targets",
}
COMPARISONS = {"xla", "precision", "attention", "pipeline"}


def _fake_child(step_s=10.0, latency_s=0.1, rss=8.0, ks_s=1.1, dense_s=1.0, fail=()):
    """A stand-in for the child process: fixed figures per measure kind."""
    calls = []

    def run_child(spec, timeout_s, env=None):
        calls.append(spec)
        kind = spec["kind"]
        if any(kind == f for f in fail):
            return {"error": "exit code 1: boom"}
        out = {"times_s": [1.0], "cpu_median_s": 1.0, "peak_rss_gib": rss, "wall_s": 1.0}
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
        if kind in ("train", "infer", "latency"):
            out["samples_per_s"] = spec["batch"] / out["median_s"]
        return out

    return run_child, calls


def test_plan_runs_every_measure_in_its_own_process(monkeypatch, tmp_path):
    run_child, calls = _fake_child()
    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "_gpu_present", lambda: False)
    out = tmp_path / "bench.json"
    report = bench.run_benchmark(output=out, progress=None)
    kinds = [c["kind"] for c in calls]
    # train 16 + 32, their XLA/precision twins, inference (+ XLA twin), latency (plain,
    # through the serving graph, and that with one thread per op), 4 attention runs, the
    # pipeline: each a separate child.
    assert kinds.count("train") == 4 and kinds.count("infer") == 2
    assert kinds.count("attention") == 4 and kinds.count("latency") == 3
    latency = [c for c in calls if c["kind"] == "latency"]
    assert [c.get("serving") for c in latency] == [None, "crop", "crop"]
    assert latency[2]["intra_threads"] == 1 and latency[2]["inter_threads"] >= 1
    assert kinds.count("pipeline") == 1
    assert sorted({c["batch"] for c in calls if c["kind"] == "train"}) == [16, 32]
    assert {c["jit"] for c in calls if c["kind"] == "train"} == {True, False}
    assert {c["precision"] for c in calls if c["kind"] == "train"} == {
        "float32",
        "mixed_bfloat16",
    }
    # The XLA / precision twins are comparisons: one warm-up step, at most two timed steps.
    twins = [c for c in calls if c.get("short")]
    assert len(twins) == 3 and all(c["warmup"] == 1 and c["repeats"] <= 2 for c in twins)
    # Paper shapes reach the children.
    assert calls[0]["audio_len"] == 460 and calls[0]["text_len"] == 20
    assert calls[0]["model"]["audio_dim"] == 512 and calls[0]["model"]["n_ccab"] == 3

    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    s = saved["summary"]
    assert SUMMARY_KEYS <= set(s) and COMPARISONS <= set(s["comparisons"])
    # 10 s per step of 32 → 3.2 samples/s; the reference trains 1.40/s at batch 32.
    assert s["train"]["32"]["samples_per_s"] == pytest.approx(3.2)
    assert s["vs_reference"]["train_throughput_b32"] == pytest.approx(3.2 / 1.40)
    assert s["latency_ms"] == pytest.approx(100.0)
    assert s["vs_reference"]["latency_b1"] == pytest.approx(100.0 / 176.0)
    assert s["comparisons"]["attention"]["ratio_fwd"] == pytest.approx(1.1)
    assert s["targets"] == {
        "train_throughput_b32": True,
        "train_throughput_b16": True,
        "latency_b1": True,
        "latency_b1_serving": True,
        "latency_b1_serving_inter": True,
        "train_peak_rss_b32": True,  # 8.0 / 15.4 GiB
        "attention_fwd": True,
        "attention_fwd_bwd": True,
    }
    assert s["comparisons"]["pipeline"]["pipeline_over_model"] == pytest.approx(5000 / 3.2)
    table = bench.format_table(report)
    assert "PyTorch ref" in table and "1.40" in table and "2.29" in table


def test_missed_targets_and_failed_measures_are_reported(monkeypatch, tmp_path, capsys):
    run_child, _ = _fake_child(step_s=30.0, rss=12.0, ks_s=2.0, fail=("latency",))
    monkeypatch.setattr(bench, "run_child", run_child)
    monkeypatch.setattr(bench, "_gpu_present", lambda: False)
    out = tmp_path / "r" / "bench.json"
    rc = cli_main(["bench", "--only", "train,latency,attention", "--output", str(out)])
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
    assert "PyTorch ref" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert all("error" not in r for r in saved["results"].values())
    c = saved["summary"]["comparisons"]
    assert c["xla"]["train_speedup_jit_on"] > 0 and c["precision"]["mixed_speedup"] > 0
    assert c["attention"]["ratio_fwd"] > 0 and c["attention"]["ratio_fwd_bwd"] > 0


def test_a_comparison_twin_that_times_out_is_reported_not_fatal(monkeypatch, tmp_path, capsys):
    run_child, calls = _fake_child()

    def slow_xla(spec, timeout_s, env=None):
        if spec.get("short") and spec["jit"]:
            assert timeout_s <= 600
            return {"error": f"timed out after {timeout_s:.0f} s"}
        return run_child(spec, timeout_s, env)

    monkeypatch.setattr(bench, "run_child", slow_xla)
    monkeypatch.setattr(bench, "_gpu_present", lambda: False)
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--only", "train,xla", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "timed out" in printed and "train_b32_xla_on" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["train_b32_xla_on"]["comparison_only"] is True
    assert saved["summary"]["comparisons"]["xla"]["train_speedup_jit_on"] is None
