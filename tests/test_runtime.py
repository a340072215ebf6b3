"""ks_keras/runtime.py: TensorFlow's oneDNN kernels on for every x86-64 CPU, unless the user
says otherwise; TensorFlow imported first is reported, not silently slow."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from ks_keras import runtime

PROBE = """
import json, os
import ks_keras
import tensorflow as tf
from ks_keras import runtime
print("STATUS " + json.dumps({"env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), **runtime.onednn_status()}))
"""


def _probe(env_value):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_ENABLE_ONEDNN_OPTS", "KS_KERAS_SET_ONEDNN")
    }
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("STATUS ")][-1]
    return json.loads(line[len("STATUS ") :])


x86 = pytest.mark.skipif(
    runtime.tensorflow_default_onednn() is None, reason="oneDNN policy applies to x86-64 Linux"
)


@x86
def test_importing_ks_keras_turns_onednn_on_whatever_the_cpu():
    status = _probe(None)
    assert status["env"] == "1"
    assert status["enabled"] is True
    assert status["source"] == "TF_ENABLE_ONEDNN_OPTS=1 (set by ks_keras)"
    assert status["tensorflow_default"] in (True, False)


@x86
def test_a_value_the_user_set_wins():
    status = _probe("0")
    assert status["env"] == "0"
    assert status["enabled"] is False
    assert status["source"] == "TF_ENABLE_ONEDNN_OPTS=0 (set by the user)"


def test_tensorflow_loaded_first_with_onednn_off_warns(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: False)
    with pytest.warns(
        RuntimeWarning, match="Import ks_keras first, or set TF_ENABLE_ONEDNN_OPTS=1"
    ):
        runtime.prefer_onednn()
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ  # too late to matter: not pretended

    monkeypatch.setattr(runtime, "onednn_enabled", lambda: True)  # a CPU where TF's default is on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.prefer_onednn()


def test_the_status_names_who_set_the_variable(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("KS_KERAS_SET_ONEDNN", "bench")
    assert runtime.onednn_status()["source"] == (
        "TF_ENABLE_ONEDNN_OPTS=0 (set by the bench's oneDNN comparison)"
    )
    monkeypatch.delenv("KS_KERAS_SET_ONEDNN")
    assert runtime.onednn_status()["source"] == "TF_ENABLE_ONEDNN_OPTS=0 (set by the user)"
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert runtime.onednn_status()["source"] == "TensorFlow's default for this CPU"


def test_a_set_variable_is_never_touched(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "false")
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "false"


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx", "avx2", "fma"}, False),  # AMD EPYC Zen 2/3, Intel before Cascade Lake
        ({"avx2", "fma", "avx512f"}, False),  # Skylake-SP: AVX-512 without VNNI
        ({"avx2", "avx512f", "avx512_vnni"}, True),
        ({"avx2", "avx_vnni"}, True),
        ({"avx2", "amx_tile"}, True),
        (None, None),
    ],
)
def test_tensorflow_default_follows_its_cpu_feature_rule(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "read_cpuinfo", lambda: ("cpu", flags))
    assert runtime.tensorflow_default_onednn() is expected
    assert runtime.tensorflow_default_onednn(flags) is expected  # flags the caller read


def test_not_x86_is_unknown(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    assert runtime.tensorflow_default_onednn() is None


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma"}, False),
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # Cascade Lake: AVX-512, no bfloat16
        ({"avx512f", "avx512_bf16"}, True),  # Cooper Lake, AMD Zen 4
        ({"avx512f", "amx_tile", "amx_bf16"}, True),  # Sapphire Rapids
        (None, None),
    ],
)
def test_bfloat16_units_follow_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "read_cpuinfo", lambda: ("cpu", flags))
    assert runtime.bfloat16_units() is expected
    assert runtime.bfloat16_units(flags) is expected
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")  # other flag names
    assert runtime.bfloat16_units(flags) is None
