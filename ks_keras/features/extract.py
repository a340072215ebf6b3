"""Filling a feature cache: its folder, its metadata and invalidation, the extraction run.

`ks_keras.features.cache` describes the folder layout and re-exports these names.
`extract_corpus` picks the folder (`resolve_cache_dir`), invalidates it when the extractors
changed (`_prepare_dir`), holds its lock (`_exclusive`) and extracts the missing or changed
utterances shard by shard (`_extract_into`), writing each with `store._write_shard`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.audio import AudioQualityWarning, change_speed, load_audio
from ks_keras.config import Config, FeaturesConfig
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.features.store import (
    FORMAT_VERSION,
    METADATA_FILE,
    MODALITIES,
    CacheEntry,
    FeatureCache,
    _atomic_write_text,
    _read_indexes,
    _shard_name,
    _write_shard,
    source_key,
)

# The cache's public module name: warnings and log filters keep naming it.
logger = logging.getLogger("ks_keras.features.cache")

LOCK_FILE = ".lock"
# Transcripts remembered across shards so repeated sentences are encoded once.
TEXT_MEMO_SIZE = 4096


# Extractor metadata that names where a model lives or which packages ran it, not what it
# computes (its files' hashes identify a model): left out of the folder name.
_MACHINE_KEYS = ("model_path", "packages")


def default_cache_subfolder(corpus: Corpus, metadata: dict[str, Any]) -> str:
    """`<corpus>-<10 hex digits>` of the corpus (name + manifest) and the extractors: the
    folder under the default `features.cache_dir` that this corpus and config use."""
    manifest = str(Path(corpus.source).resolve()) if corpus.source else None
    extractors = {
        m: {k: v for k, v in meta.items() if k not in _MACHINE_KEYS}
        for m, meta in metadata["extractors"].items()
    }
    identity = {"corpus": corpus.name, "manifest": manifest, "extractors": extractors}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in corpus.name) or "corpus"
    return f"{name}-{digest}"


def resolve_cache_dir(cfg: Config, corpus: Corpus, metadata: dict[str, Any]) -> Path:
    """The cache folder for `corpus` under `cfg`: `features.cache_dir` when set to anything
    but the default; under the default, a subfolder per corpus and extractor setting."""
    root = Path(cfg.features.cache_dir)
    if cfg.features.cache_dir != FeaturesConfig().cache_dir:
        return root
    return root / default_cache_subfolder(corpus, metadata)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{where} added")
            elif k not in new:
                out.append(f"{where} removed")
            else:
                out += _diff(old[k], new[k], where)
        return out
    if old != new:
        short = [json.dumps(v)[:60] for v in (old, new)]
        return [f"{prefix}: {short[0]} → {short[1]}"]
    return []


def build_extractors(cfg: Config) -> dict[str, Any]:
    """The configured extractors for `model.modalities` (models load lazily)."""
    from ks_keras.features import get_audio_extractor, get_text_extractor

    out = {}
    for m in MODALITIES:
        if m in cfg.model.modalities:
            out[m] = (
                get_audio_extractor(cfg.features.audio)
                if m == "audio"
                else get_text_extractor(cfg.features.text)
            )
    return out


def cache_metadata(extractors: dict[str, Any]) -> dict[str, Any]:
    """What `metadata.json` must say for features from these extractors."""
    return {
        "format_version": FORMAT_VERSION,
        "modalities": list(extractors),
        "extractors": {m: e.metadata for m, e in extractors.items()},
        "names": {m: e.name for m, e in extractors.items()},
        "dims": {m: e.dim for m, e in extractors.items()},
        "frame_rates": {m: e.frame_rate for m, e in extractors.items()},
    }


_IDENTITY_KEYS = ("format_version", "modalities", "extractors")


def check_compatible(cache: FeatureCache, cfg: Config) -> None:
    """Raise a ValueError if `cache` was not built with the extractors `cfg` configures."""
    expected = cache_metadata(build_extractors(cfg))
    diffs = _diff(
        {k: cache.metadata.get(k) for k in _IDENTITY_KEYS}, {k: expected[k] for k in _IDENTITY_KEYS}
    )
    if diffs:
        raise ValueError(
            f"the feature cache {cache.cache_dir} was built with other settings "
            f"({'; '.join(diffs[:5])}); run `ks-keras features` with this config"
        )


def _prepare_dir(cache_dir: Path, metadata: dict[str, Any]) -> None:
    """Create the folder, or invalidate it if it was built with different extractors."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / METADATA_FILE
    ours = list(cache_dir.glob("shard-*"))
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        diffs = _diff(
            {k: old.get(k) for k in _IDENTITY_KEYS}, {k: metadata[k] for k in _IDENTITY_KEYS}
        )
        if old.get("format_version") != metadata["format_version"]:
            logger.warning(
                "feature cache %s was written by another ks_keras version (cache format %r; "
                "this version writes %d, with content-hashed entries and shard checksums): "
                "extracting again",
                cache_dir,
                old.get("format_version"),
                metadata["format_version"],
            )
            for path in ours:
                path.unlink()
        elif diffs:
            shown = "; ".join(diffs[:5]) + (f"; … {len(diffs) - 5} more" if len(diffs) > 5 else "")
            logger.warning(
                "feature cache %s was built with different extractor settings "
                "(%s): invalidating it and extracting again",
                cache_dir,
                shown,
            )
            for path in ours:
                path.unlink()
        elif old.get("corpus") not in (None, metadata.get("corpus")):
            logger.info(
                "feature cache %s was last used for corpus %s; entries are matched by "
                "utterance id, audio content and transcript, so only what differs is extracted",
                cache_dir,
                old["corpus"],
            )
    elif ours:
        raise ValueError(
            f"{cache_dir}: holds shard files but no {METADATA_FILE}; it is not a "
            f"feature cache this version wrote; delete it or choose another "
            f"features.cache_dir"
        )
    # Leftovers of a killed run.
    for tmp in cache_dir.glob("*.tmp"):
        tmp.unlink()


def _extract_checked(extractor, inputs: list, ids: list[str]) -> list[np.ndarray]:
    """Run an extractor on a batch; errors and bad outputs name the utterance."""
    try:
        feats = extractor.extract(inputs)
    except ValueError:
        # Find the offending utterance(s) one by one so the message can name them.
        for utt_id, item in zip(ids, inputs):
            try:
                extractor.extract([item])
            except ValueError as e:
                raise ValueError(
                    f"utterance {utt_id}: {extractor.modality} features: {e}"
                ) from None
        raise
    for utt_id, x in zip(ids, feats):
        if x.ndim != 2 or x.shape[1] != extractor.dim:
            raise ValueError(
                f"utterance {utt_id}: {extractor.name} returned shape {x.shape}, "
                f"expected [T, {extractor.dim}]"
            )
        if not np.isfinite(x).all():
            raise ValueError(f"utterance {utt_id}: {extractor.name} produced NaN/inf features")
    return feats


def extract_corpus(
    cfg: Config,
    corpus: Corpus,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
    extractors: dict[str, Any] | None = None,
    speed: float = 1.0,
) -> FeatureCache:
    """Extract every utterance of `corpus` once into `features.cache_dir`.

    Modalities are those of `model.modalities`. Finished shards are kept; only missing or
    changed utterances are extracted (and those of damaged shards); changed extractor settings
    invalidate the cache. The folder is `resolve_cache_dir` (see the module docstring).

    Args:
        cfg: the config (`features.*`, `model.modalities`).
        corpus: the utterances to cover.
        progress: show a tqdm bar (utterances/s) and a summary line.
        on_shard_done: called with the shard number after each shard is committed.
        extractors: `{modality: extractor}` to use instead of the configured ones (tests,
            custom front-ends); each needs the `FeatureExtractor` interface.
        speed: extract from speed-perturbed audio (`ks_keras.audio.change_speed`) into the
            subfolder `speed-<factor>` of the cache folder. Left at 1.0, the run also
            extracts one such variant per factor of `features.audio.speed_perturb` and
            attaches them as `cache.variants`.

    Returns:
        The opened `FeatureCache`.

    Raises:
        ValueError: bad settings; empty transcripts (before any work); audio files that cannot
            be used (all of them listed, after the other utterances were extracted).
    """
    if cfg.features.shard_size < 1:
        raise ValueError(f"features.shard_size: expected >= 1, got {cfg.features.shard_size}")
    if extractors is None:
        extractors = build_extractors(cfg)
    unknown = sorted(set(extractors) - set(MODALITIES))
    if unknown or not extractors:
        raise ValueError(f"extractors: expected keys among {MODALITIES}, got {sorted(extractors)}")
    modalities = tuple(m for m in MODALITIES if m in extractors)
    extractors = {m: extractors[m] for m in modalities}
    metadata = cache_metadata(extractors)
    cache_dir = resolve_cache_dir(cfg, corpus, metadata)
    if speed != 1.0:
        if "audio" not in extractors:
            raise ValueError("speed perturbation needs audio features (no audio extractor)")
        metadata["extractors"]["audio"] = {**metadata["extractors"]["audio"], "speed": speed}
        cache_dir = cache_dir / f"speed-{speed:g}"
    metadata["corpus"] = f"{corpus.name} ({corpus.source or 'no manifest'})"
    with _exclusive(cache_dir):
        cache, bad_audio = _extract_into(
            cfg, corpus, cache_dir, metadata, extractors, progress, on_shard_done, speed
        )
    if progress:
        print(run_summary(cache))
    if bad_audio:
        _raise_bad_audio(bad_audio, cache_dir)
    if speed == 1.0 and "audio" in extractors:
        cache.variants = [
            extract_corpus(cfg, corpus, progress=progress, extractors=extractors, speed=factor)
            for factor in cfg.features.audio.speed_perturb
        ]
    return cache


@contextmanager
def _exclusive(cache_dir: Path):
    """Hold `cache_dir/.lock` while extracting: a second process extracting into the same
    folder (two runs sharing a cache) waits here instead of deleting the first one's
    temporary files. Advisory (`fcntl.flock`); a no-op where `fcntl` does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"features: another process is extracting into {cache_dir}; waiting for it",
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _extract_into(
    cfg: Config,
    corpus: Corpus,
    cache_dir: Path,
    metadata: dict[str, Any],
    extractors: dict[str, Any],
    progress: bool,
    on_shard_done: Callable[[int], None] | None,
    speed: float,
) -> tuple[FeatureCache, list[str]]:
    """`extract_corpus`'s work in one folder (held exclusively): the opened cache and the
    messages about unusable audio files."""
    modalities = tuple(extractors)
    _prepare_dir(cache_dir, metadata)
    entries = _intact_entries(cache_dir)
    keys = {u.id: source_key(u, modalities) for u in corpus.utterances}
    todo = [u for u in corpus.utterances if u.id not in entries or entries[u.id].key != keys[u.id]]
    if "text" in extractors and cfg.features.text.empty_text == "error":
        _check_transcripts(todo)
    _atomic_write_text(
        cache_dir / METADATA_FILE, json.dumps({**metadata, "complete": False}, indent=1)
    )
    started = time.perf_counter()
    audio_seconds, bad_audio = _extract_shards(
        cfg, cache_dir, todo, keys, extractors, progress, on_shard_done, speed
    )
    elapsed = time.perf_counter() - started
    cache = FeatureCache.open(cache_dir, verify=False)  # verified above or written just now
    missing = [u.id for u in corpus.utterances if u.id not in cache.entries]
    complete = not missing
    _atomic_write_text(
        cache_dir / METADATA_FILE,
        json.dumps({**metadata, "complete": complete, "num_utterances": len(cache)}, indent=1),
    )
    cache.metadata = json.loads((cache_dir / METADATA_FILE).read_text())
    cache.last_run = {
        "extracted": len(todo),
        "seconds": elapsed,
        "audio_seconds": audio_seconds,
        "corpus_size": len(corpus),
    }
    return cache, bad_audio


def _intact_entries(cache_dir: Path) -> dict[str, CacheEntry]:
    """The entries of the folder's intact shards; damaged shards are deleted (with a warning),
    so their utterances are extracted again."""
    entries, damaged = _read_indexes(cache_dir, verify=True)
    for number, problem in damaged.items():
        logger.warning(
            "feature cache %s: damaged shard (%s); extracting its utterances again",
            cache_dir,
            problem,
        )
        for suffix in (".json", ".tfrecord"):
            (cache_dir / f"{_shard_name(number)}{suffix}").unlink(missing_ok=True)
    return entries


def _check_transcripts(todo: list[Utterance]) -> None:
    """Refuse empty transcripts (all named) before any work (`features.text.empty_text`)."""
    from ks_keras.corpora.manifest import _listing

    empty = [u.id for u in todo if not u.text.strip()]
    if empty:
        raise ValueError(
            f"{len(empty)} utterance(s) have an empty transcript: {_listing(empty)}; fix the "
            f"manifest, leave 'text' out of model.modalities, or set "
            f"features.text.empty_text: placeholder"
        )


def _extract_shards(
    cfg: Config,
    cache_dir: Path,
    todo: list[Utterance],
    keys: dict[str, str],
    extractors: dict[str, Any],
    progress: bool,
    on_shard_done: Callable[[int], None] | None,
    speed: float,
) -> tuple[float, list[str]]:
    """Extract `todo` into new shards after the folder's last one, `features.shard_size`
    utterances each: `(seconds of audio extracted, messages about unusable audio files)`."""
    from tqdm.auto import tqdm

    modalities = tuple(extractors)
    next_shard = 1 + max(
        [int(p.stem.split("-")[1]) for p in cache_dir.glob("shard-*.json")], default=-1
    )
    shard_size = cfg.features.shard_size
    audio_seconds = 0.0
    text_memo: dict[str, np.ndarray] = {}
    bad_audio: list[str] = []
    bar = tqdm(
        total=len(todo),
        unit="utt",
        desc=f"features → {cache_dir}",
        disable=not progress or not todo,
        dynamic_ncols=True,
    )
    try:
        for start in range(0, len(todo), shard_size):
            batch = todo[start : start + shard_size]
            features: dict[str, list[np.ndarray]] = {}
            if "audio" in extractors:
                usable, features["audio"], seconds = _audio_features(
                    batch, extractors["audio"], cfg.features.audio, speed, bad_audio
                )
                audio_seconds += seconds
                if len(usable) < len(batch):
                    bar.update(len(batch) - len(usable))
                    batch = usable
                    if not batch:
                        continue
            if "text" in extractors:
                features["text"] = _text_features(batch, extractors["text"], text_memo)
            number = next_shard + start // shard_size
            _write_shard(cache_dir, number, batch, features, modalities, keys)
            bar.update(len(batch))
            if on_shard_done is not None:
                on_shard_done(number)
    finally:
        bar.close()
    return audio_seconds, bad_audio


def _audio_features(
    batch: list[Utterance], extractor, audio_cfg, speed: float, bad_audio: list[str]
) -> tuple[list[Utterance], list[np.ndarray], float]:
    """`(usable utterances, their audio features, seconds of their audio)` of a batch. An
    unusable audio file adds its message to `bad_audio` and the run goes on: all bad files
    are listed at the end."""
    waves, usable = [], []
    for u in batch:
        try:
            waves.append(_load_wave(u.path, audio_cfg, speed))
            usable.append(u)
        except (ValueError, FileNotFoundError) as e:
            bad_audio.append(str(e))
    if not usable:
        return [], [], 0.0
    seconds = sum(len(w) for w in waves) / audio_cfg.sample_rate
    return usable, _extract_checked(extractor, waves, [u.id for u in usable]), seconds


def _text_features(
    batch: list[Utterance], extractor, text_memo: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """The batch's text features. Identical transcripts are encoded once (EmoDB reads 10
    sentences 535 times), across shards too: `text_memo` (cleared past `TEXT_MEMO_SIZE`)."""
    unique = [t for t in dict.fromkeys(u.text for u in batch) if t not in text_memo]
    owners = [next(u.id for u in batch if u.text == t) for t in unique]
    if len(text_memo) > TEXT_MEMO_SIZE:
        text_memo.clear()
    text_memo.update(zip(unique, _extract_checked(extractor, unique, owners)))
    return [text_memo[u.text] for u in batch]


def _load_wave(path: str, audio_cfg, speed: float) -> np.ndarray:
    """The utterance's samples for extraction, speed-perturbed unless `speed` is 1.0 (the
    quality warnings were already given when the original was extracted)."""
    if speed == 1.0:
        return load_audio(path, audio_cfg.sample_rate, audio_cfg.min_seconds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioQualityWarning)
        wave = load_audio(path, audio_cfg.sample_rate, audio_cfg.min_seconds)
    return change_speed(wave, speed, audio_cfg.sample_rate)


def _raise_bad_audio(bad_audio: list[str], cache_dir: Path) -> None:
    """One error listing every unusable audio file of a run (at most 20 named)."""
    shown = bad_audio[:20] + ([f"… and {len(bad_audio) - 20} more"] if len(bad_audio) > 20 else [])
    raise ValueError(
        f"{len(bad_audio)} audio file(s) cannot be used (the other utterances were "
        f"extracted into {cache_dir} and are kept):\n  "
        + "\n  ".join(shown)
        + "\nfix or replace these files, or remove their rows from the manifest, then run "
        "again: only what is missing is extracted"
    )


def run_summary(cache: FeatureCache) -> str:
    """One line about the last `extract_corpus` run: work done, utterances/s, real-time factor."""
    run = cache.last_run or {}
    if not run.get("extracted"):
        return (
            f"features: {cache.cache_dir} is up to date ({run.get('corpus_size', len(cache))} "
            f"utterances); nothing to extract"
        )
    rate = run["extracted"] / max(run["seconds"], 1e-9)
    rtf = (
        f", real-time factor {run['seconds'] / run['audio_seconds']:.4f}"
        if run["audio_seconds"]
        else ""
    )
    return (
        f"features: extracted {run['extracted']} utterance(s) in {run['seconds']:.1f} s "
        f"({rate:.1f} utt/s{rtf}) into {cache.cache_dir}"
    )
