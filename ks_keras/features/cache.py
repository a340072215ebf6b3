"""On-disk feature cache: sharded TFRecords plus JSON metadata.

Layout of the cache folder:

```
metadata.json          extractor metadata per modality, dims, frame rates, completeness
.lock                  held while a process extracts (a second one waits for it)
speed-0.9/ …           speed-perturbed variants (`features.audio.speed_perturb`), same layout
shard-00000.tfrecord   one tf.train.Example per utterance (id, shard, audio, text, lengths)
shard-00000.json       the shard's index: [id, source key, audio frames, text tokens] per row,
                       plus the shard file's size and SHA-256
```

Where: `features.cache_dir` as configured. Left at its default (`cache/features`), each corpus
(name + manifest) and extractor setting gets its own subfolder
`cache/features/<corpus>-<10 hex digits>`, so unrelated configs never share (and never
invalidate) one cache; the folder in use is printed.

Why TFRecords: `tf.data` streams them without holding the corpus in memory (wav2vec features
of IEMOCAP are several GB), shards give natural resume points, and the format needs no extra
dependency. Features are stored unpadded and unnormalised (float32); cropping, padding and
normalisation happen in `ks_keras.data`.

Atomicity and resume: a shard is written to `*.tmp` and renamed, then its index is written
the same way; a shard counts as finished only once its index exists. A killed run leaves at
most a temp file (removed on the next run) or a shard without an index (overwritten), so a
re-run extracts exactly the unfinished utterances. An utterance is re-extracted when its
*source key* (utterance id, SHA-256 of the audio file's bytes, transcript) changes: an audio
file overwritten with other audio of the same size, or another corpus with the same file
names in the same folder, is extracted again. Later shards win over earlier ones.

Integrity: every shard's size and SHA-256 are checked when a cache is opened. `extract_corpus`
(`ks-keras features`, `train`, `evaluate`, `tune`) re-extracts the utterances of a damaged
shard (with a warning naming it); `FeatureCache.open` raises a `ValueError` naming the shard.

Bad audio: every unusable audio file of a run is collected (the good utterances are still
extracted and kept), and one error lists them all at the end.

Invalidation: `metadata.json` records each extractor's `metadata` (settings, model folder and
file hashes, package versions). If the configured extractors differ, the cache is invalidated
with a message naming what changed, its shards are deleted, and extraction starts afresh.

Example:

```python
cache = extract_corpus(cfg, corpus)        # no-op when everything is already there
audio, text = cache.get("03a01Fa")         # [T, 80], [Tt, 384] float32
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.audio import AudioQualityWarning, change_speed, load_audio
from ks_keras.config import Config, FeaturesConfig
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.files import sha256_file

logger = logging.getLogger(__name__)

# 2: source keys hash the audio content; shard indexes record the shard's size and SHA-256.
FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"
LOCK_FILE = ".lock"
SHARD_GLOB = "shard-*.tfrecord"
MODALITIES = ("audio", "text")
# Transcripts remembered across shards so repeated sentences are encoded once.
TEXT_MEMO_SIZE = 4096


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_key(utt: Utterance, modalities: tuple[str, ...]) -> str:
    """What an utterance's features depend on besides the extractors: its id, its audio file's
    content (SHA-256 of the bytes: about 1 GB/s, cheap next to decoding) and its transcript."""
    parts = [utt.id]
    if "audio" in modalities:
        path = Path(utt.path)
        parts.append(sha256_file(path) if path.is_file() else "missing")
    if "text" in modalities:
        parts.append(utt.text)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


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


@dataclass(frozen=True)
class CacheEntry:
    shard: int
    key: str
    audio_len: int
    text_len: int


class FeatureCache:
    """Read access to an extracted feature cache (see the module docstring).

    Attributes:
        cache_dir: the folder.
        metadata: the parsed `metadata.json`.
        modalities: modalities stored, e.g. `("audio", "text")`.
        dims: `{modality: feature width}`.
        entries: `{utterance id: CacheEntry}` (latest version of each utterance).
    """

    def __init__(self, cache_dir: Path, metadata: dict[str, Any], entries: dict[str, CacheEntry]):
        self.cache_dir = cache_dir
        self.metadata = metadata
        self.modalities = tuple(metadata["modalities"])
        self.dims = {m: int(metadata["dims"][m]) for m in self.modalities}
        self.entries = entries
        # Set by `extract_corpus`: what its run did (for summaries).
        self.last_run: dict[str, Any] | None = None
        # Set by `extract_corpus` under `features.audio.speed_perturb`: one cache per extra
        # speed factor, same utterance ids (training draws from them, see `ks_keras.data`).
        self.variants: list[FeatureCache] = []
        self._shards: OrderedDict[int, dict[str, dict[str, np.ndarray]]] = OrderedDict()

    @classmethod
    def open(cls, cache_dir: str | Path, verify: bool = True) -> FeatureCache:
        """Open an existing cache (finished shards only).

        Args:
            cache_dir: the cache folder.
            verify: check every shard's size and SHA-256 against its index (reads every
                shard once; `False` checks sizes only).

        Raises:
            FileNotFoundError: no `metadata.json` in `cache_dir`.
            ValueError: unreadable metadata, a format this version does not know, or a
                damaged shard (named, with how to rebuild it).
        """
        cache_dir = Path(cache_dir)
        meta_path = cache_dir / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no feature cache at {cache_dir} ({METADATA_FILE} missing); run "
                f"`ks-keras features --config …` first"
            )
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: cache format {metadata.get('format_version')!r} (written by "
                f"another ks_keras version), this version reads format {FORMAT_VERSION}; run "
                "`ks-keras features` with the config that built it to rebuild it in place"
            )
        entries, damaged = _read_indexes(cache_dir, verify)
        if damaged:
            raise ValueError(
                f"the feature cache {cache_dir} has {len(damaged)} damaged shard(s): "
                + "; ".join(damaged.values())
                + "; run `ks-keras features` with the config that built it: it re-extracts "
                "the utterances of damaged shards"
            )
        return cls(cache_dir, metadata, entries)

    # -- lookup ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.entries

    @property
    def ids(self) -> list[str]:
        return list(self.entries)

    @property
    def complete(self) -> bool:
        return bool(self.metadata.get("complete"))

    @property
    def speed(self) -> float:
        """The speed factor of the audio these features come from (1.0: the original)."""
        return float(self.metadata.get("extractors", {}).get("audio", {}).get("speed", 1.0))

    def shard_path(self, number: int) -> Path:
        return self.cache_dir / f"{_shard_name(number)}.tfrecord"

    def shard_files(self) -> list[str]:
        """Finished shard files holding at least one current entry, in shard order."""
        return [str(self.shard_path(n)) for n in sorted({e.shard for e in self.entries.values()})]

    def lengths(self, utt_ids: list[str], modality: str) -> np.ndarray:
        """Unpadded frame/token counts of the given utterances."""
        self._check_modality(modality)
        self.check_ids(utt_ids)
        attr = f"{modality}_len"
        return np.array([getattr(self.entries[i], attr) for i in utt_ids], np.int64)

    def check_ids(self, utt_ids: list[str]) -> None:
        missing = [i for i in utt_ids if i not in self.entries]
        if missing:
            from ks_keras.corpora.manifest import _listing

            raise ValueError(
                f"{len(missing)} utterance(s) not in the feature cache {self.cache_dir}: "
                f"{_listing(missing)}; run `ks-keras features` with the same config"
            )

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(
                f"the feature cache {self.cache_dir} holds {list(self.modalities)}"
                f" features, not {modality!r}; extract with model.modalities "
                f"including {modality!r}"
            )

    def _load_shard(self, number: int) -> dict[str, dict[str, np.ndarray]]:
        if number in self._shards:
            self._shards.move_to_end(number)
            return self._shards[number]
        records = {}
        for utt_id, shard, arrays in _iter_shard_file(self.shard_path(number), self.dims):
            if shard == number:
                records[utt_id] = arrays
        self._shards[number] = records
        while len(self._shards) > 4:  # a few decoded shards are plenty for grouped access
            self._shards.popitem(last=False)
        return records

    def get(self, utt_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`(audio [T, Da], text [Tt, Dt])` float32 of one utterance (None if not stored)."""
        self.check_ids([utt_id])
        arrays = self._load_shard(self.entries[utt_id].shard)[utt_id]
        return arrays.get("audio"), arrays.get("text")

    def iter_records(
        self, utt_ids: list[str] | None = None
    ) -> Iterator[tuple[str, np.ndarray | None, np.ndarray | None]]:
        """Yield `(id, audio, text)` for the given ids (default: all), shard by shard."""
        wanted = self.ids if utt_ids is None else list(utt_ids)
        self.check_ids(wanted)
        by_shard: dict[int, list[str]] = {}
        for i in wanted:
            by_shard.setdefault(self.entries[i].shard, []).append(i)
        for number in sorted(by_shard):
            records = self._load_shard(number)
            for i in by_shard[number]:
                yield i, records[i].get("audio"), records[i].get("text")

    # -- tf.data --------------------------------------------------------------------------

    def parse_fn(self):
        """A function `serialized Example → {"id", "shard", "audio", "text"}` for tf.data."""
        import tensorflow as tf

        spec = {
            "id": tf.io.FixedLenFeature([], tf.string),
            "shard": tf.io.FixedLenFeature([], tf.int64),
        }
        for m in self.modalities:
            spec[m] = tf.io.FixedLenFeature([], tf.string)
            spec[f"{m}_len"] = tf.io.FixedLenFeature([], tf.int64)
        dims = dict(self.dims)

        def parse(serialized):
            ex = tf.io.parse_single_example(serialized, spec)
            out = {"id": ex["id"], "shard": ex["shard"]}
            for m, dim in dims.items():
                flat = tf.io.decode_raw(ex[m], tf.float32, little_endian=True)
                out[m] = tf.reshape(flat, [-1, dim])
            return out

        return parse


def _shard_problem(path: Path, index: dict[str, Any], verify: bool) -> str | None:
    """Why the shard file does not match its index (size, then SHA-256), or None."""
    want_bytes, want_sha = index.get("bytes"), index.get("sha256")
    if not isinstance(want_bytes, int) or not isinstance(want_sha, str):
        return f"{path.name}: its index records no size/checksum"
    size = path.stat().st_size
    if size != want_bytes:
        return f"{path.name} holds {size} bytes, its index recorded {want_bytes} (truncated?)"
    if verify and sha256_file(path) != want_sha:
        return f"{path.name}: SHA-256 differs from the one recorded when it was written"
    return None


def _read_indexes(cache_dir: Path, verify: bool = True) -> tuple[dict[str, CacheEntry], dict]:
    """`(entries, damaged)`: the current entry of every utterance in finished, intact shards,
    and `{shard number: problem}` of shards that do not match their index."""
    entries: dict[str, CacheEntry] = {}
    damaged: dict[int, str] = {}
    for index_path in sorted(cache_dir.glob("shard-*.json")):
        number = int(index_path.stem.split("-")[1])
        shard = cache_dir / f"{_shard_name(number)}.tfrecord"
        if not shard.is_file():
            continue
        try:
            index = json.loads(index_path.read_text())
            rows = index["utterances"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            damaged[number] = f"{index_path.name}: unreadable shard index ({e})"
            continue
        problem = _shard_problem(shard, index, verify)
        if problem:
            damaged[number] = problem
            continue
        for utt_id, key, audio_len, text_len in rows:
            entries[utt_id] = CacheEntry(number, key, int(audio_len), int(text_len))
    return entries, damaged


def _iter_shard_file(path: Path, dims: dict[str, int]):
    import tensorflow as tf

    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        ex = tf.train.Example.FromString(raw)
        f = ex.features.feature
        arrays = {}
        for m, dim in dims.items():
            flat = np.frombuffer(f[m].bytes_list.value[0], dtype="<f4")
            arrays[m] = flat.reshape(-1, dim).astype(np.float32)
        yield f["id"].bytes_list.value[0].decode(), int(f["shard"].int64_list.value[0]), arrays


def _example(utt_id: str, shard: int, arrays: dict[str, np.ndarray]) -> bytes:
    import tensorflow as tf

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    feats = {"id": b(utt_id.encode()), "shard": i(shard)}
    for m, x in arrays.items():
        feats[m] = b(np.ascontiguousarray(x, dtype="<f4").tobytes())
        feats[f"{m}_len"] = i(int(x.shape[0]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


# -- extraction ---------------------------------------------------------------------------


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
    from tqdm.auto import tqdm

    modalities = tuple(extractors)
    _prepare_dir(cache_dir, metadata)
    entries, damaged = _read_indexes(cache_dir, verify=True)
    for number, problem in damaged.items():
        logger.warning(
            "feature cache %s: damaged shard (%s); extracting its utterances again",
            cache_dir,
            problem,
        )
        for suffix in (".json", ".tfrecord"):
            (cache_dir / f"{_shard_name(number)}{suffix}").unlink(missing_ok=True)
    keys = {u.id: source_key(u, modalities) for u in corpus.utterances}
    todo = [u for u in corpus.utterances if u.id not in entries or entries[u.id].key != keys[u.id]]

    if "text" in extractors and cfg.features.text.empty_text == "error":
        from ks_keras.corpora.manifest import _listing

        empty = [u.id for u in todo if not u.text.strip()]
        if empty:
            raise ValueError(
                f"{len(empty)} utterance(s) have an empty transcript: {_listing(empty)}; fix the "
                f"manifest, leave 'text' out of model.modalities, or set "
                f"features.text.empty_text: placeholder"
            )
    _atomic_write_text(
        cache_dir / METADATA_FILE, json.dumps({**metadata, "complete": False}, indent=1)
    )

    next_shard = 1 + max(
        [int(p.stem.split("-")[1]) for p in cache_dir.glob("shard-*.json")], default=-1
    )
    shard_size = cfg.features.shard_size
    audio_cfg = cfg.features.audio
    started = time.perf_counter()
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
                waves, usable = [], []
                for u in batch:
                    try:
                        waves.append(_load_wave(u.path, audio_cfg, speed))
                        usable.append(u)
                    except (ValueError, FileNotFoundError) as e:
                        bad_audio.append(str(e))  # keep going: all bad files are listed at the end
                if len(usable) < len(batch):
                    bar.update(len(batch) - len(usable))
                    batch = usable
                    if not batch:
                        continue
                audio_seconds += sum(len(w) for w in waves) / audio_cfg.sample_rate
                features["audio"] = _extract_checked(
                    extractors["audio"], waves, [u.id for u in batch]
                )
            if "text" in extractors:
                # Identical transcripts are encoded once (EmoDB reads 10 sentences 535 times).
                unique = [t for t in dict.fromkeys(u.text for u in batch) if t not in text_memo]
                owners = [next(u.id for u in batch if u.text == t) for t in unique]
                if len(text_memo) > TEXT_MEMO_SIZE:
                    text_memo.clear()
                text_memo.update(zip(unique, _extract_checked(extractors["text"], unique, owners)))
                features["text"] = [text_memo[u.text] for u in batch]
            number = next_shard + start // shard_size
            _write_shard(cache_dir, number, batch, features, modalities, keys)
            bar.update(len(batch))
            if on_shard_done is not None:
                on_shard_done(number)
    finally:
        bar.close()
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


def _write_shard(
    cache_dir: Path,
    number: int,
    batch: list[Utterance],
    features: dict[str, list[np.ndarray]],
    modalities: tuple[str, ...],
    keys: dict[str, str] | None = None,
) -> None:
    import tensorflow as tf

    name = _shard_name(number)
    final = cache_dir / f"{name}.tfrecord"
    tmp = cache_dir / f"{name}.tfrecord.tmp"
    rows = []
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for k, utt in enumerate(batch):
            arrays = {m: features[m][k] for m in modalities}
            writer.write(_example(utt.id, number, arrays))
            rows.append(
                [
                    utt.id,
                    keys[utt.id] if keys is not None else source_key(utt, modalities),
                    int(arrays["audio"].shape[0]) if "audio" in arrays else 0,
                    int(arrays["text"].shape[0]) if "text" in arrays else 0,
                ]
            )
    checksum = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    os.replace(tmp, final)
    # The index is the commit point: a shard without one is unfinished.
    _atomic_write_text(
        cache_dir / f"{name}.json",
        json.dumps({"shard": number, "utterances": rows, **checksum}),
    )
