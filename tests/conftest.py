"""Shared test set-up: quiet TF, and no mixed-precision policy leaking between tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_dtype_policy():
    yield
    keras.config.set_dtype_policy("float32")
