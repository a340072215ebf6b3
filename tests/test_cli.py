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
