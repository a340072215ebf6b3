"""TensorFlow start-up settings that ks_keras makes before TensorFlow loads.

**oneDNN on every x86-64 CPU.** TensorFlow's Linux x86 wheel runs its oneDNN kernels (matmuls,
batched matmuls, fused ops; oneDNN picks AVX2/FMA or AVX-512 code at run time) only when
``TF_ENABLE_ONEDNN_OPTS`` says so or, when it is unset, on CPUs with AVX512-VNNI,
AVX512-BF16, AVX-VNNI or AMX (``DefaultOneDnnPolicy`` in ``tensorflow/core/util/util.cc``).
Every other CPU (AMD EPYC Zen 2/3, Intel Xeon before Cascade Lake) gets Eigen's kernels,
which the wheel compiles for AVX without FMA ("rebuild TensorFlow with the appropriate
compiler flags: AVX2 FMA" at start-up). With them a paper-size training step took 1.6-1.7x
as long as with oneDNN in the same run (docs/performance.md, issue 16), while PyTorch
dispatches to AVX2/FMA on the same CPU. Importing ``ks_keras`` therefore sets
``TF_ENABLE_ONEDNN_OPTS=1`` when the variable is unset and TensorFlow is not loaded yet; a
value the user set always wins
(``TF_ENABLE_ONEDNN_OPTS=0`` restores Eigen). TensorFlow reads the variable once, when it
loads: if it was imported before ``ks_keras`` with oneDNN off, ``prefer_onednn`` warns.

Nothing here imports TensorFlow unless it is already loaded.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# /proc/cpuinfo names of the features for which TensorFlow turns oneDNN on by itself.
ONEDNN_DEFAULT_FLAGS = (
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)

# Set next to the variable by whoever in ks_keras set it ("1": the import, "bench": the
# bench's oneDNN comparison), so child processes can tell who did.
MARKER_ENV = "KS_KERAS_SET_ONEDNN"


def read_cpuinfo() -> tuple[str | None, set[str] | None]:
    """This machine's CPU model name and feature flags from /proc/cpuinfo (None, None where
    that file does not exist or says neither)."""
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if model is None and key in ("model name", "cpu model", "hardware"):
                model = value.strip()
            elif flags is None and key in ("flags", "features"):
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def tensorflow_default_onednn(flags: set[str] | None = None) -> bool | None:
    """Whether TensorFlow would turn oneDNN on by itself on this CPU (Linux x86-64 wheels);
    None where that cannot be told (no /proc/cpuinfo, not x86-64). `flags`: this CPU's
    `read_cpuinfo()` flags when the caller has them already."""
    return _x86_cpu_has_any(ONEDNN_DEFAULT_FLAGS, flags)


def _x86_cpu_has_any(wanted: tuple[str, ...], flags: set[str] | None) -> bool | None:
    """Whether this x86-64 CPU lists any of the /proc/cpuinfo flags `wanted` (`flags`: this
    CPU's `read_cpuinfo()` flags if at hand); None when not x86-64 (other flag names) or
    without flags."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if flags is None:
        _, flags = read_cpuinfo()
    if flags is None:
        return None
    return any(flag in flags for flag in wanted)


# /proc/cpuinfo names of the bfloat16 units that make `ks-keras export --weights bfloat16` pay.
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def bfloat16_units(flags: set[str] | None = None) -> bool | None:
    """Whether this x86-64 CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16); None
    where that cannot be told (not x86-64, no /proc/cpuinfo flags). `flags`: `read_cpuinfo()`
    flags if at hand."""
    return _x86_cpu_has_any(BFLOAT16_FLAGS, flags)


def prefer_onednn() -> None:
    """Set ``TF_ENABLE_ONEDNN_OPTS=1`` unless the user set it or TensorFlow already loaded
    (then warn if its oneDNN kernels are off). Called when ``ks_keras`` is imported."""
    if ONEDNN_ENV in os.environ:
        return
    if "tensorflow" not in sys.modules:
        os.environ[ONEDNN_ENV] = "1"
        os.environ[MARKER_ENV] = "1"
    elif onednn_enabled() is False:
        warnings.warn(
            "TensorFlow was imported before ks_keras, with its oneDNN kernels off (its default "
            "on CPUs without AVX512-VNNI, AVX-VNNI or AMX): paper-size training steps take "
            f"~1.6x as long. Import ks_keras first, or set {ONEDNN_ENV}=1 before starting Python.",
            RuntimeWarning,
            stacklevel=2,
        )


def onednn_enabled() -> bool | None:
    """Whether the loaded TensorFlow runs its oneDNN kernels (None: TensorFlow not loaded or
    does not say). Asking loads nothing."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_status() -> dict[str, object]:
    """What decides oneDNN in this process: the variable's value and who set it, TensorFlow's
    own default on this CPU, and whether the loaded TensorFlow runs it (None if not loaded)."""
    value = os.environ.get(ONEDNN_ENV)
    if value is None:
        source = "TensorFlow's default for this CPU"
    elif value == "1" and os.environ.get(MARKER_ENV) == "1":
        source = f"{ONEDNN_ENV}={value} (set by ks_keras)"
    elif os.environ.get(MARKER_ENV) == "bench":
        source = f"{ONEDNN_ENV}={value} (set by the bench's oneDNN comparison)"
    else:
        source = f"{ONEDNN_ENV}={value} (set by the user)"
    return {
        "enabled": onednn_enabled(),
        "source": source,
        "tensorflow_default": tensorflow_default_onednn(),
    }


def describe_onednn_state(state: str, source: str, tensorflow_default: bool | None) -> str:
    """`state` (on / off / mixed / unknown), who decided, and TensorFlow's own default on this
    CPU, as `ks-keras info` and the bench's table head print them."""
    default = {True: "on", False: "off", None: "unknown"}[tensorflow_default]
    return f"{state} ({source}; TensorFlow's own default on this CPU: {default})"
