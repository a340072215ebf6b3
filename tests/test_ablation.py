"""scripts/ablation.py runs the Table 1/2 grids and writes the markdown table (large: trains)."""

from pathlib import Path

import pytest
from _scripts import load_file

from ks_keras.config import save_config

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    return load_file("ablation", ROOT / "scripts" / "ablation.py")


def test_tables_hold_the_paper_numbers():
    ablation = _load_script()
    assert [row[3] for row in ablation.TABLE_1] == [0.734, 0.735, 0.740, 0.753]
    assert [row[3] for row in ablation.TABLE_2] == [0.714, 0.748, 0.753]


def test_unknown_table_is_rejected(tmp_path):
    ablation = _load_script()
    with pytest.raises(SystemExit):
        ablation.run(["--config", "configs/emodb_demo.yaml", "--tables", "3"])


@pytest.mark.large
def test_ablation_grid_on_a_tiny_corpus(tmp_path):
    e2e = load_file("e2e", ROOT / "tests" / "test_evaluation_e2e.py")
    _cfg, _corpus = e2e._cfg, e2e._corpus
    manifest = _corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    cfg = _cfg(
        tmp_path,
        manifest,
        "model.modalities=[audio, text]",
        "model.text_dim=384",
        "model.text_d_model=16",
        "model.text_ffn_dim=8",
        "data.text_max_len=8",
        "train.epochs=1",
    )
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    ablation = _load_script()
    rc = ablation.run(
        [
            "--config",
            str(path),
            "--tables",
            "1,2",
            "--max-folds",
            "1",
            "--no-progress",
            "--out-dir",
            str(tmp_path / "abl"),
        ]
    )
    assert rc == 0
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "n_ccab = 3" in table and "FEM + MIM + DFM" in table and "0.753" in table
    assert table.count("±") >= 2 * 7


def test_accuracy_ablation_default_variants_apply_to_the_accurate_config():
    from ks_keras.config import load_config

    script = load_file("accuracy_ablation", ROOT / "scripts" / "accuracy_ablation.py")
    for label, overrides in script.DEFAULT_VARIANTS:
        cfg = load_config(ROOT / "configs" / "emodb_accurate.yaml", overrides)
        assert cfg.model.functionals_dim == (6373 if cfg.features.functionals == "compare" else 0)
        assert cfg.train.ensemble in (1, 3), label


def test_accuracy_ablation_on_a_tiny_corpus(tmp_path):
    e2e = load_file("e2e", ROOT / "tests" / "test_evaluation_e2e.py")
    manifest = e2e._corpus(tmp_path, speakers=("a", "b", "c"), per_class=2)
    path = tmp_path / "cfg.yaml"
    save_config(e2e._cfg(tmp_path, manifest, "train.epochs=1"), path)
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        "- {label: single, overrides: []}\n- {label: pair, overrides: [train.ensemble=2]}\n"
    )
    script = load_file("accuracy_ablation", ROOT / "scripts" / "accuracy_ablation.py")
    out = tmp_path / "out"
    rc = script.run(
        ["--config", str(path), "--variants", str(variants), "--repeats", "2"]
        + ["--max-folds", "1", "--out-dir", str(out), "--no-progress"]
    )
    assert rc == 0
    table = (out / "ablation.md").read_text()
    assert "| single |" in table and "| pair |" in table and "±" in table
