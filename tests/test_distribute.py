"""tf.distribute: MirroredStrategy on 2 logical CPUs, MultiWorkerMirroredStrategy on 2 processes.

Both need a fresh process (logical devices and collective ops must be configured before
TensorFlow initialises), so each run is a subprocess of tests/_training_support.py. The
default tests train the fast stand-in model with the same dict inputs and int32 masks; the
`large` ones train the tiny KS-T.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SUPPORT = Path(__file__).with_name("_training_support.py")
MODELS = ["mlp", pytest.param("kst", marks=pytest.mark.large)]
TIMEOUT = 420


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    if "TF_CONFIG" not in extra:
        env.pop("TF_CONFIG", None)
    return env


def _result(returncode, stdout, stderr):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and lines, stdout[-2000:] + stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _free_ports(n):
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("model_name", MODELS)
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, model_name):
    args = ["--run-dir", str(tmp_path / "run"), "--strategy", "mirrored", "--logical-cpus", "2"]
    args += ["--epochs", "2", "--model", model_name]
    proc = subprocess.run(
        [sys.executable, str(SUPPORT), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    out = _result(proc.returncode, proc.stdout, proc.stderr)
    assert out["strategy"] == "MirroredStrategy" and out["replicas"] == 2
    # Every step consumed one global batch of 8 split over the replicas: 32 / 8 = 4 per epoch.
    assert out["iterations_at_end"] == 2 * 4
    assert all(v == v for v in out["history"]["loss"])  # finite, not NaN
    # The UA metric summed over the replicas equals scikit-learn's on the same predictions.
    assert out["eval_ua"] == pytest.approx(out["sklearn_ua"], abs=1e-6)
    assert out["best_value"] == pytest.approx(max(out["history"]["val_ua"]))
    assert (tmp_path / "run" / "best.weights.h5").is_file()


@pytest.mark.parametrize("model_name", MODELS)
def test_multiworker_strategy_with_two_local_workers(tmp_path, model_name):
    run_dir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        cmd = [sys.executable, str(SUPPORT), "--run-dir", str(run_dir)]
        cmd += ["--strategy", "multiworker", "--epochs", "2", "--model", model_name]
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(TF_CONFIG=tf_config),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:  # a worker whose peer died would wait forever
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    chief, worker = (_result(*o) for o in outputs)

    for out in (chief, worker):
        assert out["strategy"] == "CollectiveAllReduceStrategy" and out["replicas"] == 2
        assert out["iterations_at_end"] == 2 * 4  # global batches, split across workers
        assert out["history"]["epoch"] == [0, 1]
    # Synchronous data-parallel training: both workers saw the same losses and weights.
    assert chief["history"] == worker["history"]
    assert chief["weights_sum"] == pytest.approx(worker["weights_sum"], rel=1e-6)
    # The chief wrote the run folder; the other worker cleaned up its private folder.
    for name in ("best.weights.h5", "best.json", "history.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert not (run_dir / "workers").exists()
    assert not (run_dir / "backup").exists()
