"""Config tree: YAML load/save, dotted overrides, validation errors naming the field."""

import pytest

from ks_keras.config import (
    Config,
    input_norm_placement,
    load_config,
    padding_invariant,
    save_config,
)


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
        ("model.input_layer_norm=sometimes", "model.input_layer_norm"),
        ("model.input_layer_norm=1", "model.input_layer_norm"),
        ("model.positional=everywhere", "model.positional"),
        ("model.fusion_self_attention_mask=maybe", "model.fusion_self_attention_mask"),
        ("model.ffn_activation_dropout=0.1", "model.ffn_activation_dropout"),
        ("model.initializer=xavier", "model.initializer"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_no_validation_speakers_is_honest_but_cannot_stop_early():
    cfg = load_config(None, ["eval.val_speakers=0"])
    assert cfg.eval.protocol == "honest" and cfg.eval.val_speakers == 0
    with pytest.raises(ValueError, match=r"train\.early_stopping_patience"):
        load_config(None, ["eval.val_speakers=0", "train.early_stopping_patience=3"])
    # The paper protocol stops on the test fold, as the authors' code: no conflict.
    load_config(
        None, ["eval.val_speakers=0", "eval.protocol=paper", "train.early_stopping_patience=3"]
    )


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


@pytest.mark.parametrize(
    "value,placement",
    [
        ("false", "none"),
        ("true", "every_layer"),
        ("every_layer", "every_layer"),
        ("per_block", "per_block"),
    ],
)
def test_input_layer_norm_keeps_its_old_spellings(value, placement, tmp_path):
    cfg = load_config(None, [f"model.input_layer_norm={value}"])
    assert input_norm_placement(cfg.model) == placement
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_new_model_options_default_to_ours():
    m = load_config().model
    assert m.input_layer_norm is False and m.positional == "input"
    assert m.fusion_self_attention_mask is True and m.ffn_activation_dropout is False
    assert m.initializer == "keras"


def test_official_code_yaml_switches_on_every_authors_behaviour():
    cfg = load_config("configs/official_code.yaml")
    paper = load_config("configs/paper.yaml")
    m = cfg.model
    assert m.k_from == "padded" and m.query_mask_in_scores is False
    assert m.fusion_self_attention_mask is False and m.positional == "attention_input"
    assert m.input_layer_norm == "per_block" and m.ffn_activation_dropout is True
    assert m.mim_skip == "official_code" and m.pooling == "include_padding"
    assert m.initializer == "official_code"
    assert not padding_invariant(m)
    sizes = (
        "audio_dim",
        "text_dim",
        "num_heads",
        "audio_ffn_dim",
        "text_ffn_dim",
        "dropout",
        "n_fem",
        "n_ccab",
        "n_dfm",
        "sparsity",
        "head_units",
        "head_dropout",
        "num_classes",
    )
    assert all(getattr(m, name) == getattr(paper.model, name) for name in sizes)
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.schedule) == ("sgd", 0.9, "cosine")
    assert cfg.train.cosine_final_ratio == 1e-3 and cfg.train.epochs == 120
    assert cfg.eval.protocol == "paper" and cfg.eval.folds == "loso_session"
    assert cfg.data == paper.data


def test_fusion_mask_off_is_not_padding_invariant():
    assert padding_invariant(load_config().model)
    off = load_config(None, ["model.fusion_self_attention_mask=false"]).model
    assert not padding_invariant(off)
