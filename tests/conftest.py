"""Shared test set-up: quiet TF, and no mixed-precision policy leaking between tests."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test modules are imported with --import-mode=importlib (tests/ is not on sys.path); the
# shared helper modules (`_tiny`) are imported by name, so this folder goes on the path.
sys.path.append(str(Path(__file__).parent))

# ks_keras before TensorFlow, as in the CLI: it turns TensorFlow's oneDNN kernels on for CPUs
# where TensorFlow would not (ks_keras/runtime.py), so the suite runs the kernels users get.
# isort: off
import ks_keras  # noqa: E402, F401

# isort: on
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_dtype_policy():
    yield
    keras.config.set_dtype_policy("float32")


# ---------------------------------------------------------------------------------------------
# Comparing floats from two code paths

EPS32 = float(np.finfo(np.float32).eps)


def assert_f32_close(actual, desired, *, scale=None, ulps=16.0, err_msg=""):
    """Assert two float32 results of the same computation agree up to float32 rounding.

    Two code paths (batched vs single, graph vs eager, another CPU's oneDNN or Eigen kernels)
    round differently: results differ by a few units in the last place (ulp) of the magnitudes
    involved, not bit for bit. The tolerance is `ulps` float32 rounding steps of `scale`
    (default: the largest |desired|, which the rounding errors are relative to); pass a larger
    `scale` when the values come from sums of larger terms (cancellation).
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, f"{err_msg} shapes {actual.shape} != {desired.shape}"
    if scale is None:
        scale = float(np.abs(desired).max()) if desired.size else 0.0
    atol = ulps * EPS32 * max(float(scale), np.finfo(np.float32).tiny)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol, err_msg=err_msg)


@pytest.fixture
def f32_close():
    """`assert_f32_close` as a fixture (tests are imported without a package)."""
    return assert_f32_close


# ---------------------------------------------------------------------------------------------
# The tiny model config every test builds on (tests/_tiny.py)


@pytest.fixture
def tiny_config():
    """`_tiny.tiny_config`: the suite's one tiny config, with overrides merged in."""
    from _tiny import tiny_config as build

    return build
