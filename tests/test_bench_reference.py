"""`ks-keras bench --reference-dir`: the loader contract, in real child processes, on a tiny
fake reference package written to a temporary folder (no timing checks)."""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from ks_keras import bench, bench_reference
from ks_keras.bench import runner as bench_runner
from ks_keras.cli import main as cli_main
from ks_keras.config import load_config

pytest.importorskip("torch")

# A tiny PyTorch model that follows the documented contract: keyword sizes in, forward takes
# the inputs and then their padding masks (True at padded steps), logits out.
FAKE_MODEL = textwrap.dedent(
    """
    import torch


    class TinyReference(torch.nn.Module):
        def __init__(self, input_dim, ffn_embed_dim, num_layers, num_heads, num_classes):
            super().__init__()
            self.sizes = dict(num_layers=num_layers, num_heads=num_heads)
            self.encoders = torch.nn.ModuleList(
                torch.nn.Linear(d, f) for d, f in zip(input_dim, ffn_embed_dim)
            )
            self.head = torch.nn.Linear(sum(ffn_embed_dim), num_classes)

        def forward(self, *args):
            n = len(args) // 2
            pooled = []
            for encoder, x, pad in zip(self.encoders, args[:n], args[n:]):
                keep = (~pad).unsqueeze(-1).to(x.dtype)
                h = torch.relu(encoder(x)) * keep
                pooled.append(h.sum(1) / keep.sum(1).clamp(min=1.0))
            return self.head(torch.cat(pooled, dim=-1))


    def build_ks_transformer(**kwargs):
        return TinyReference(**kwargs)


    not_callable = 3
    """
)


@pytest.fixture
def fake_reference(tmp_path):
    """A folder laid out like the authors' checkout: model/KS_transformer.py."""
    root = tmp_path / "reference_code"
    (root / "model").mkdir(parents=True)
    (root / "model" / "KS_transformer.py").write_text(FAKE_MODEL)
    return root


def _quick_cfg():
    return load_config(None, bench.QUICK_OVERRIDES)


def test_reference_kwargs_follow_the_config():
    cfg = load_config(None, ["model.n_ccab=2"])
    assert bench_reference.reference_kwargs(cfg.to_dict()["model"]) == {
        "input_dim": [512, 1024],
        "ffn_embed_dim": [256, 512],
        "num_layers": [5, 2, 2],
        "num_heads": 8,
        "num_classes": 4,
    }


def test_reference_model_is_built_and_measured_in_child_processes(fake_reference):
    cfg = _quick_cfg()
    checked = bench.check_reference(cfg, fake_reference, bench_reference.DEFAULT_REFERENCE_ENTRY)
    info = checked["info"]
    # Built in a child from the folder given, with the quick config's sizes.
    assert info["module_file"].startswith(str(fake_reference.resolve()))
    assert info["kwargs"]["input_dim"] == [16, 24] and info["kwargs"]["num_classes"] == 4
    assert info["trainable_params"] == (16 * 16 + 16) + (24 * 16 + 16) + (32 * 4 + 4)
    assert info["torch"] and info["device"] == "cpu"

    plan = bench.plan_measures(
        cfg,
        True,
        ("train", "infer", "latency"),
        False,
        "float32",
        "mixed_bfloat16",
        reference=checked["spec"],
    )
    names = [name for name, _ in plan]
    assert names == [
        "train_b8",
        "reference_train_b8",
        "train_b4",
        "reference_train_b4",
        "infer_b8",
        "reference_infer_b8",
        "latency_b1",
        "reference_latency_b1",
        "latency_b1_serving",
        "latency_b1_serving_inter",
        "latency_b1_serving_bf16",
    ]
    specs = dict(plan)
    # The twin gets our spec: same inputs, batch, warm-up and repetitions.
    ours, theirs = specs["latency_b1"], specs["reference_latency_b1"]
    for key in ("batch", "distinct", "warmup", "max_warmup", "repeats", "audio_len", "model"):
        assert theirs[key] == ours[key]
    for name in ("reference_train_b4", "reference_infer_b8", "reference_latency_b1"):
        spec = {**specs[name], "repeats": 1, "threads": 1}
        res = bench.run_child(spec, timeout_s=120)
        assert "error" not in res, res.get("error")
        assert math.isfinite(res["median_s"]) and res["median_s"] > 0
        assert math.isfinite(res["samples_per_s"]) and res["samples_per_s"] > 0
        assert res["peak_rss_gib"] > 0 and res["torch_threads"] == 1
        assert res["trainable_params"] == info["trainable_params"]


@pytest.mark.parametrize(
    "entry,expected",
    [
        ("model.no_such_module:build", "no module 'model.no_such_module'"),
        ("model.KS_transformer:no_such_builder", "no callable 'no_such_builder'"),
        ("model.KS_transformer:not_callable", "no callable 'not_callable'"),
    ],
)
def test_missing_module_or_callable_is_one_clear_message(fake_reference, entry, expected):
    with pytest.raises(ValueError) as caught:
        bench.check_reference(_quick_cfg(), fake_reference, entry)
    message = str(caught.value)
    assert expected in message and str(fake_reference.resolve()) in message and entry in message
    assert "Traceback" not in message and "\n" not in message


def test_a_forward_that_breaks_the_contract_is_named(fake_reference):
    (fake_reference / "adapter.py").write_text(
        "import torch\n\ndef build(**kwargs):\n    return torch.nn.Linear(3, 3)\n"
    )
    with pytest.raises(ValueError, match=r"model\(audio, text, audio_padding_mask"):
        bench.check_reference(_quick_cfg(), fake_reference, "adapter:build")


def test_missing_directory_and_bad_entry_fail_before_any_measure(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_runner, "run_child", lambda *a, **k: pytest.fail("ran a measure"))
    missing = tmp_path / "nowhere"
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--quick", "--reference-dir", str(missing), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"--reference-dir {missing}: no such directory" in err
    assert "Traceback" not in err and not out.exists()
    rc = cli_main(
        ["bench", "--reference-dir", str(tmp_path), "--reference-entry", "no_colon"]
        + ["--output", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "expected MODULE:CALLABLE" in err and "'no_colon'" in err
    rc = cli_main(["bench", "--reference-dir", str(tmp_path), "--only", "attention"])
    assert rc == 1 and "--only attention has none of them" in capsys.readouterr().err


def test_missing_torch_is_one_clear_message(fake_reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(bench_reference.ReferenceLoadError, match="needs PyTorch"):
        bench_reference.load_reference_model(
            fake_reference, bench_reference.DEFAULT_REFERENCE_ENTRY, {}
        )


def test_the_child_reports_a_contract_error_as_its_result(fake_reference):
    spec = {
        "kind": "reference",
        "measure": "load",
        "model": _quick_cfg().to_dict()["model"],
        "audio_len": 24,
        "text_len": 6,
        "reference": {"dir": str(fake_reference), "entry": "model.nothing:build"},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ks_keras.bench", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    result = json.loads(line[len(bench.RESULT_PREFIX) :])
    assert result["reference_error"] is True and "no module 'model.nothing'" in result["error"]
