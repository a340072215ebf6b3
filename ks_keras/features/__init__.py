"""Feature extractors (log-mel, Hugging Face audio/text) and the on-disk feature cache.

Example:

```python
from ks_keras.config import load_config
from ks_keras.features import feature_dims, get_audio_extractor, get_text_extractor

cfg = load_config("configs/emodb_demo.yaml")
audio = get_audio_extractor(cfg.features.audio)   # LogMelExtractor, dim 80
text = get_text_extractor(cfg.features.text)      # HFTextExtractor (MiniLM), dim 384
feature_dims(cfg.features)                        # (80, 384), without loading any model
```
"""

from __future__ import annotations

from ks_keras.config import AudioFeatureConfig, FeaturesConfig, TextFeatureConfig
from ks_keras.features.base import FeatureExtractor


def get_audio_extractor(cfg: AudioFeatureConfig) -> FeatureExtractor:
    """The extractor for `features.audio` (models load lazily on the first `extract`)."""
    if cfg.sample_rate <= 0:
        raise ValueError(
            f"features.audio.sample_rate: expected a positive rate, got {cfg.sample_rate}"
        )
    if cfg.type == "logmel":
        from ks_keras.features.logmel import LogMelExtractor

        return LogMelExtractor(cfg)
    if cfg.type == "hf":
        from ks_keras.features.hf import HFAudioExtractor

        return HFAudioExtractor(cfg)
    if cfg.type in ("opensmile", "logmel+opensmile"):
        from ks_keras.features.opensmile_lld import OpenSmileLLDExtractor

        return OpenSmileLLDExtractor(cfg)
    raise ValueError(
        "features.audio.type: expected 'logmel', 'hf', 'opensmile' or 'logmel+opensmile', "
        f"got {cfg.type!r}"
    )


def get_text_extractor(cfg: TextFeatureConfig) -> FeatureExtractor:
    """The extractor for `features.text` (default: the offline MiniLM, 384-d)."""
    if cfg.type == "hf":
        from ks_keras.features.hf import HFTextExtractor

        return HFTextExtractor(cfg)
    raise ValueError(f"features.text.type: expected 'hf', got {cfg.type!r}")


def _audio_dim(audio: AudioFeatureConfig) -> int:
    if audio.type == "logmel":
        return audio.n_mels
    if audio.type in ("opensmile", "logmel+opensmile"):
        from ks_keras.features.opensmile_lld import LLD_DIMS

        lld = LLD_DIMS[audio.opensmile_set] * (2 if audio.opensmile_deltas else 1)
        return lld + (audio.n_mels if audio.type == "logmel+opensmile" else 0)
    from ks_keras.features.hf import _hidden_width, read_model_config, resolve_model_folder

    field = "features.audio.model_path"
    if audio.model_path is None:
        raise ValueError(f"{field}: required when features.audio.type is 'hf'")
    folder = resolve_model_folder(audio.model_path, field)
    return _hidden_width(read_model_config(folder), folder, field)


def _text_dim(text: TextFeatureConfig) -> int:
    from ks_keras.features.hf import _hidden_width, read_model_config, resolve_model_folder

    field = "features.text.model_path"
    folder = resolve_model_folder(text.model_path, field)
    return _hidden_width(read_model_config(folder), folder, field)


def feature_dims(features_cfg: FeaturesConfig) -> tuple[int, int]:
    """`(audio_dim, text_dim)` the configured extractors produce, read from settings and
    model `config.json` files only (no model is loaded).

    `model.audio_dim` / `model.text_dim` must equal these for the modalities in use.
    """
    return _audio_dim(features_cfg.audio), _text_dim(features_cfg.text)


def check_model_dims(cfg) -> None:
    """Raise a ValueError if `model.<modality>_dim` differs from the extractor's width, for
    the modalities in `model.modalities` only (an unused extractor is never resolved)."""
    problems = []
    for modality in cfg.model.modalities:
        dim = (
            _audio_dim(cfg.features.audio) if modality == "audio" else _text_dim(cfg.features.text)
        )
        want = getattr(cfg.model, f"{modality}_dim")
        if want != dim:
            problems.append(
                f"model.{modality}_dim={want} but the configured features."
                f"{modality} extractor gives {dim}-d features"
            )
    from ks_keras.features.functionals import FUNCTIONAL_DIMS

    want_f = FUNCTIONAL_DIMS.get(cfg.features.functionals, 0)
    if cfg.model.functionals_dim != want_f:
        problems.append(
            f"model.functionals_dim={cfg.model.functionals_dim} but features.functionals="
            f"{cfg.features.functionals!r} gives {want_f} (0 = no functionals input)"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + "; set the model dims to match "
            "(e.g. --set model.audio_dim=80 --set model.text_dim=384 for log-mel "
            "+ MiniLM)"
        )


__all__ = [
    "FeatureExtractor",
    "check_model_dims",
    "feature_dims",
    "get_audio_extractor",
    "get_text_extractor",
]
