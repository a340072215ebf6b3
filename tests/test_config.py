"""Config tree: YAML load/save, dotted overrides, validation errors naming the field."""

import pytest

from ks_keras.config import Config, load_config, save_config


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert cfg.model.n_ccab == 3 and cfg.model.sparsity == 0.5 and cfg.model.num_heads == 8
    assert cfg.model.head_units == [768, 384] and cfg.model.head_dropout == 0.5
    assert cfg.train.lr == 5e-4 and cfg.train.step_epochs == 30 and cfg.train.optimizer == "adam"


def test_paper_yaml_loads():
    cfg = load_config("configs/paper.yaml")
    assert cfg.model.audio_dim == 512 and cfg.model.text_dim == 1024
    assert cfg.data.audio_max_len == 460 and cfg.data.text_max_len == 20


def test_overrides_parse_types():
    cfg = load_config(
        None,
        [
            "model.n_ccab=2",
            "train.lr=1e-4",
            "model.use_mim=false",
            "model.modalities=[audio]",
            "model.audio_d_model=256",
        ],
    )
    assert cfg.model.n_ccab == 2 and cfg.train.lr == 1e-4 and cfg.model.use_mim is False
    assert cfg.model.modalities == ["audio"] and cfg.model.audio_d_model == 256


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.n_ccab=1", "data.label_map={excited: happy}"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.n_cab=2", "model.n_cab"),
        ("modle.n_ccab=2", "modle"),
        ("model.n_ccab=two", "model.n_ccab"),
        ("model.n_ccab=-1", "model.n_ccab"),
        ("model.sparsity=1.0", "model.sparsity"),
        ("model.sparsity=-0.1", "model.sparsity"),
        ("model.num_heads=7", "model.num_heads"),
        ("model.k_from=all", "model.k_from"),
        ("model.modalities=[video]", "model.modalities"),
        ("train.schedule=linear", "train.schedule"),
        ("train.lr=0", "train.lr"),
        ("model.use_mim=maybe", "model.use_mim"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_override_without_equals():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["model.n_ccab"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  n_ccabs: 2\n")
    with pytest.raises(ValueError, match=r"unknown\.yaml.*model\.n_ccabs"):
        load_config(unknown)


def test_config_is_a_dataclass_tree():
    assert isinstance(load_config(), Config)


# ---------------------------------------------------------------------------------------------
# Reliability (issue 14): non-finite numbers, non-UTF-8 files.


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=.inf", "train.lr"),
        ("train.lr=1e999", "train.lr"),
        ("model.dropout=.nan", "model.dropout"),
        ("features.audio.mel_fmax=.inf", "features.audio.mel_fmax"),  # float | None
        ("train.weight_decay=-.inf", "train.weight_decay"),
    ],
)
def test_non_finite_numbers_are_rejected_everywhere(override, field):
    with pytest.raises(ValueError, match=rf"{field}: expected a finite number"):
        load_config(None, [override])


def test_non_finite_number_in_a_yaml_file_names_file_and_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: .inf\n")
    with pytest.raises(ValueError, match=r"cfg.yaml: train.lr: expected a finite number"):
        load_config(path)


def test_latin1_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes("# Übung\ntrain:\n  lr: 0.001\n# Stimme für Ärger\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"cfg.yaml: line 1, column 3: .*not UTF-8") as e:
        load_config(path)
    assert "0xdc" in str(e.value) and "codec" not in str(e.value)
