"""Arrays in memory: class weights, normalisation statistics, input checks, cropped arrays.

The numpy side of `ks_keras.data` (which re-exports every name): `class_weights`,
`NormStats` and `compute_norm_stats`, the checks `make_dataset` and `load_arrays` share
(`_validate`), `load_arrays` (cropped, padded, normalised arrays in the given order),
`functional_rows`, and the length order of evaluation batches (`length_order`,
`restore_order`). The tf.data side is `ks_keras.data.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ks_keras.config import DataConfig
from ks_keras.features.cache import FeatureCache
from ks_keras.sequences import normalize_np, pad_or_crop

MODALITIES = ("audio", "text")
STD_FLOOR = 1e-5


def class_weights(labels, n_classes: int) -> np.ndarray:
    """Balanced class weights `n / (n_classes * count_c)` (float32, mean over samples = 1).

    A class absent from `labels` gets weight 1.0 (neutral; it never occurs in training).
    `training.balanced_class_weights` is this function as the `{class: weight}` dict that
    `fit(class_weight=...)` takes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(
            f"class_weights: expected a non-empty 1-D array of class indices, got "
            f"shape {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"class_weights: labels must lie in [0, {n_classes}), got "
            f"{labels.min()}..{labels.max()}"
        )
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, labels.size / (n_classes * np.maximum(counts, 1)), 1.0)
    return weights.astype(np.float32)


@dataclass
class NormStats:
    """Mean/std per feature dim, global or per speaker (JSON round-trip via to/from_dict)."""

    mode: str  # "global" or "speaker"
    modality: str = "audio"
    mean: np.ndarray | None = None  # [D] (global)
    std: np.ndarray | None = None
    speakers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "modality": self.modality,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "speakers": {s: [m.tolist(), d.tolist()] for s, (m, d) in self.speakers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        arr = lambda v: None if v is None else np.asarray(v, np.float32)  # noqa: E731
        return cls(
            d["mode"],
            d.get("modality", "audio"),
            arr(d.get("mean")),
            arr(d.get("std")),
            {s: (arr(m), arr(v)) for s, (m, v) in d.get("speakers", {}).items()},
        )

    def stats_for(
        self, utt_id: str, speaker_of: dict[str, str] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "global":
            return self.mean, self.std
        if not speaker_of or utt_id not in speaker_of:
            raise ValueError(
                f"speaker normalisation: no speaker known for utterance {utt_id}; "
                f"pass speaker_of (e.g. corpus.speaker_of())"
            )
        speaker = speaker_of[utt_id]
        if speaker not in self.speakers:
            raise ValueError(
                f"speaker normalisation: no statistics for speaker {speaker!r} "
                f"(utterance {utt_id}); compute_norm_stats must see that speaker"
            )
        return self.speakers[speaker]


def _mean_std(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    frames = np.concatenate([a for a in arrays if a.shape[0] > 0]).astype(np.float64)
    return (
        frames.mean(axis=0).astype(np.float32),
        np.maximum(frames.std(axis=0), STD_FLOOR).astype(np.float32),
    )


def compute_norm_stats(
    cache: FeatureCache,
    utt_ids: list[str],
    mode: str,
    speaker_of: dict[str, str] | None = None,
    modality: str = "audio",
) -> NormStats | None:
    """Mean/variance statistics of `modality` features over `utt_ids` (all real frames).

    Args:
        cache: the feature cache.
        utt_ids: for `global`, the training utterances only; for `speaker`, every utterance
            of every speaker to normalise.
        mode: `features.audio.normalize`: "none" (returns None), "global" or "speaker".
        speaker_of: `{id: speaker}` (required for `speaker`).
    """
    if mode == "none":
        return None
    if mode not in ("global", "speaker"):
        raise ValueError(
            f"features.audio.normalize: expected none, global or speaker, got {mode!r}"
        )
    if not utt_ids:
        raise ValueError("compute_norm_stats: no utterances given")
    arrays = {}
    for utt_id, audio, text in cache.iter_records(utt_ids):
        arrays[utt_id] = audio if modality == "audio" else text
        if arrays[utt_id] is None:
            raise ValueError(f"the feature cache holds no {modality} features")
    if mode == "global":
        mean, std = _mean_std(list(arrays.values()))
        return NormStats("global", modality, mean, std)
    if speaker_of is None:
        raise ValueError("speaker normalisation needs speaker_of (e.g. corpus.speaker_of())")
    missing = [i for i in utt_ids if i not in speaker_of]
    if missing:
        raise ValueError(f"speaker normalisation: no speaker for utterance(s) {missing[:10]}")
    groups: dict[str, list[np.ndarray]] = {}
    for utt_id, x in arrays.items():
        groups.setdefault(speaker_of[utt_id], []).append(x)
    return NormStats(
        "speaker", modality, speakers={s: _mean_std(xs) for s, xs in sorted(groups.items())}
    )


def _validate(
    cache: FeatureCache,
    utt_ids: list[str],
    labels,
    modalities: tuple[str, ...],
    num_classes: int | None,
) -> np.ndarray:
    utt_ids = list(utt_ids)
    if not utt_ids:
        raise ValueError("make_dataset: no utterance ids given")
    dups = (
        sorted({i for i in utt_ids if utt_ids.count(i) > 1})
        if len(set(utt_ids)) != len(utt_ids)
        else []
    )
    if dups:
        raise ValueError(f"make_dataset: duplicate utterance id(s) {dups[:10]}")
    labels = np.asarray(labels)
    if labels.shape != (len(utt_ids),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"make_dataset: labels must be {len(utt_ids)} integer class indices "
            f"(one per id), got shape {labels.shape} dtype {labels.dtype}"
        )
    upper = num_classes if num_classes is not None else np.iinfo(np.int32).max
    bad = [(i, int(y)) for i, y in zip(utt_ids, labels) if not 0 <= y < upper]
    if bad:
        raise ValueError(f"make_dataset: label(s) out of range [0, {num_classes}): {bad[:10]}")
    for m in modalities:
        if m not in MODALITIES:
            raise ValueError(f"make_dataset: unknown modality {m!r}; expected audio/text")
        cache._check_modality(m)
    cache.check_ids(utt_ids)
    for m in modalities:
        empty = [i for i, n in zip(utt_ids, cache.lengths(utt_ids, m)) if n == 0]
        if empty:
            raise ValueError(
                f"utterance(s) {empty[:20]} have no {m} frames: the {m}_mask would be all "
                f"padding; remove them from the split or re-extract their features"
            )
    return labels.astype(np.int32)


def load_arrays(
    cache: FeatureCache,
    utt_ids: list[str],
    data_cfg: DataConfig,
    modalities: tuple[str, ...] | list[str] | None = None,
    normalizer: NormStats | None = None,
    speaker_of: dict[str, str] | None = None,
    functionals: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Cropped/padded (and normalised) arrays of the given utterances, in the given order.

    With `functionals` (`{id: [D]}`, see `ks_keras.features.functionals.model_functionals`)
    the result also holds `"functionals": [N, D]`.

    Returns:
        `{"audio": [N, audio_max_len, Da], "audio_mask": [N, audio_max_len] int32, "text": …,
        "text_mask": …}` for the requested modalities (default: all in the cache).
    """
    modalities = tuple(modalities or cache.modalities)
    _validate(cache, utt_ids, np.zeros(len(utt_ids), np.int32), modalities, None)
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}
    out = {m: np.zeros((len(utt_ids), max_len[m], cache.dims[m]), np.float32) for m in modalities}
    out.update({f"{m}_mask": np.zeros((len(utt_ids), max_len[m]), np.int32) for m in modalities})
    position = {utt_id: k for k, utt_id in enumerate(utt_ids)}
    for utt_id, audio, text in cache.iter_records(utt_ids):
        k = position[utt_id]
        arrays = {"audio": audio, "text": text}
        for m in modalities:
            x, mask = pad_or_crop(arrays[m], max_len[m])
            if normalizer is not None and normalizer.modality == m:
                x = normalize_np(x, mask, *normalizer.stats_for(utt_id, speaker_of))
            out[m][k], out[f"{m}_mask"][k] = x, mask
    if functionals is not None:
        out["functionals"] = functional_rows(functionals, utt_ids)
    return out


def functional_rows(functionals: dict[str, np.ndarray], utt_ids: list[str]) -> np.ndarray:
    """`[N, D]` float32 rows of `functionals` for `utt_ids` (clear error for missing ids)."""
    missing = [i for i in utt_ids if i not in functionals]
    if missing:
        raise ValueError(
            f"no openSMILE functionals for {len(missing)} utterance(s) ({', '.join(missing[:5])})"
        )
    return np.stack([np.asarray(functionals[i], np.float32) for i in utt_ids])


def length_order(
    cache: FeatureCache,
    utterance_ids: list[str],
    data_cfg: DataConfig,
    modalities: tuple[str, ...] | list[str] | None = None,
) -> np.ndarray:
    """Indices into `utterance_ids` from the shortest to the longest utterance: the order in
    which `make_dataset(..., shuffle=False, bucket_by_length=True)` yields them.

    Sorted by the cropped length of the first modality, then of the others; ties keep the
    given order (a stable sort), so the same arguments always give the same order.

    Example:

    ```python
    ds = make_dataset(cache, ids, labels, cfg.data, 32, bucket_by_length=True)
    probs = restore_order(model.predict(ds), length_order(cache, ids, cfg.data))
    ```
    """
    modalities = tuple(modalities or cache.modalities)
    max_len = {"audio": data_cfg.audio_max_len, "text": data_cfg.text_max_len}
    ids = list(utterance_ids)
    keys = [np.minimum(cache.lengths(ids, m), max_len[m]) for m in modalities]
    # np.lexsort sorts by its last key first, and is stable.
    return np.lexsort(keys[::-1]) if keys else np.arange(len(ids))


def restore_order(rows, order: np.ndarray) -> np.ndarray:
    """Rows produced in `order` (e.g. predictions of a length-sorted dataset) put back in
    the original order: `restore_order(x[order], order)` is `x`."""
    rows = np.asarray(rows)
    order = np.asarray(order)
    if len(rows) != len(order):
        raise ValueError(f"restore_order: {len(rows)} rows for an order of {len(order)} items")
    out = np.empty_like(rows)
    out[order] = rows
    return out
