"""The feature cache's on-disk format and read access: shard files, their indexes, `FeatureCache`.

`ks_keras.features.cache` describes the folder layout and re-exports these names. Here: the
format constants, the source key of an utterance, writing one shard and its index
(`_write_shard`, the commit point of extraction) and reading them back (`FeatureCache`,
`_read_indexes`, the TFRecord `Example` encoding and its parsers). Filling a folder (which
folder, invalidation, the extraction run) lives in `ks_keras.features.extract`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.corpora.manifest import Utterance
from ks_keras.files import sha256_file

# 2: source keys hash the audio content; shard indexes record the shard's size and SHA-256.
FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"
SHARD_GLOB = "shard-*.tfrecord"
MODALITIES = ("audio", "text")


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
