"""Config validation: cross-field and range checks that name the dotted field.

`validate_config` runs after a `Config` is built (types are checked while building it,
`ks_keras.config.loading`); `check_functionals` also checks `model.audio_functionals` where
models are built.
"""

from __future__ import annotations

import re
from typing import Any

from ks_keras.config.schema import MODALITIES, Config


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
    _check(
        1 <= t.checkpoint_ensemble <= max(t.epochs, 1),
        "train.checkpoint_ensemble",
        f"an integer in [1, train.epochs = {t.epochs}]",
        t.checkpoint_ensemble,
    )
    _check(t.mixup_alpha >= 0, "train.mixup_alpha", "a number >= 0 (0 = off)", t.mixup_alpha)

    e = cfg.eval
    _check(e.val_speakers >= 0, "eval.val_speakers", "an integer >= 0", e.val_speakers)
    _check(e.repeats >= 1, "eval.repeats", "an integer >= 1", e.repeats)
    _check(e.n_folds >= 2, "eval.n_folds", "an integer >= 2", e.n_folds)
    if e.fixed_schedule:
        _check(
            t.early_stopping_patience == 0,
            "train.early_stopping_patience",
            "0 with eval.val_speakers: 0 (early stopping watches validation speakers; without "
            "them the fixed schedule runs to its end)",
            t.early_stopping_patience,
        )
    if cfg.export.version is not None:
        _check(cfg.export.version >= 1, "export.version", "an integer >= 1", cfg.export.version)
