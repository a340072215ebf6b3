"""scripts/train_step_ops.py: a fingerprint of one traced training step (refactor check)."""

import pytest
from _scripts import load_script

ONE_LAYER_EACH = ["n_fem=1", "n_ccab=1", "n_dfm=1"]


def _script():
    return load_script("train_step_ops")


def test_same_model_gives_the_same_operations_and_another_model_does_not(tmp_path, capsys):
    script = _script()
    out = tmp_path / "ops.txt"
    assert script.main(["--output", str(out), *[f"--set={s}" for s in ONE_LAYER_EACH]]) == 0
    printed = capsys.readouterr().out
    ops = out.read_text().splitlines()
    assert f"{len(ops)} operations, sha256 " in printed
    assert any(line.startswith("MatMul ") or line.startswith("BatchMatMulV2 ") for line in ops)

    options = script.model_options(ONE_LAYER_EACH)
    assert script.step_operations(options, 4, 40, 10) == ops
    deeper = script.model_options(["n_fem=1", "n_ccab=2", "n_dfm=1"])
    assert len(script.step_operations(deeper, 4, 40, 10)) > len(ops)


def test_bad_option_is_one_clear_error():
    script = _script()
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        script.model_options(["n_ccab"])
    with pytest.raises(ValueError, match="unknown config key"):
        script.step_operations(script.model_options(["n_layers=2"]), 4, 40, 10)
