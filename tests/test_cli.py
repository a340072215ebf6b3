"""The `ks-keras` entry point."""

import subprocess
import sys

from ks_keras.cli import main


def test_info_prints_versions_and_parameter_count(capsys):
    rc = main(
        [
            "info",
            "--set",
            "model.n_ccab=1",
            "--set",
            "model.audio_dim=16",
            "--set",
            "model.text_dim=16",
            "--set",
            "model.num_heads=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "tensorflow" in out and "keras" in out and "strategy" in out
    assert "trainable parameters:" in out
    # Whether TensorFlow runs its oneDNN kernels, and who decided (ks_keras/runtime.py).
    assert "oneDNN CPU kernels: " in out and "TensorFlow's own default on this CPU: " in out


def test_bad_override_is_a_clean_error(capsys):
    rc = main(["info", "--set", "model.n_ccab=-3"])
    err = capsys.readouterr().err
    assert rc == 1 and "model.n_ccab" in err and "Traceback" not in err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "ks_keras.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "info" in out.stdout


def test_library_chatter_is_quiet_by_default_and_shown_with_verbose(tmp_path):
    """TF's start-up log (incl. `E0000 … cuInit` on CPU-only machines) and the Hugging Face
    "Loading weights" bar: hidden by default, shown with --verbose. Rows left out by
    data.labels are counted per label."""
    import os
    import re

    import numpy as np
    import soundfile as sf
    import yaml

    rows = ["path,speaker,label,text"]
    for i, label in enumerate(["a", "b", "c", "c"]):
        sf.write(str(tmp_path / f"u{i}.wav"), np.zeros(8000, np.float32) + 0.01 * i, 16000)
        rows.append(f"u{i}.wav,s{i % 2},{label},hello number {i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = {
        "model": {"audio_dim": 16, "text_dim": 384, "num_heads": 2, "num_classes": 2},
        "features": {"audio": {"n_mels": 16}, "cache_dir": str(tmp_path / "cache")},
        "data": {"manifest": str(tmp_path / "m.csv"), "labels": ["a", "b"]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = [
        sys.executable,
        "-m",
        "ks_keras.cli",
        "features",
        "--config",
        str(tmp_path / "cfg.yaml"),
    ]
    quiet = subprocess.run([*argv, "--no-progress"], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "cuInit" not in quiet.stderr and "Loading weights" not in quiet.stderr
    assert not re.search(r"^[IWE]\d{4} ", quiet.stderr, re.M), quiet.stderr
    assert "left out 2 row(s) with other labels: c 2" in quiet.stderr
    # Fresh cache: the text model is loaded again.
    argv[-1:] = [str(tmp_path / "cfg.yaml"), "--set", f"features.cache_dir={tmp_path / 'c2'}"]
    loud = subprocess.run([*argv, "--verbose"], env=env, capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Loading weights" in loud.stderr
    assert re.search(r"^[IWE]\d{4} ", loud.stderr, re.M)  # TF's C++ log is back
