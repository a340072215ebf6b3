"""Feature cache: sharded TFRecords, no re-extraction, resume after a kill, invalidation."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ks_keras.audio import load_audio
from ks_keras.cli import main
from ks_keras.config import config_from_dict
from ks_keras.corpora.manifest import Corpus
from ks_keras.features import get_audio_extractor
from ks_keras.features.cache import FeatureCache, check_compatible, extract_corpus

REPO = Path(__file__).resolve().parents[2]


def make_cfg(cache_dir, modalities=("audio", "text"), **audio):
    return config_from_dict(
        {
            "model": {
                "modalities": list(modalities),
                "audio_dim": 16,
                "text_dim": 8,
                "num_heads": 2,
                "num_classes": 3,
            },
            "features": {
                "cache_dir": str(cache_dir),
                "shard_size": 3,
                "audio": {"n_mels": 16, **audio},
            },
        }
    )


class Counting:
    """Wraps an extractor and records how many inputs it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0
        self.modality, self.name, self.dim = inner.modality, inner.name, inner.dim
        self.frame_rate = inner.frame_rate

    @property
    def metadata(self):
        return self.inner.metadata

    def extract(self, batch):
        self.count += len(batch)
        return self.inner.extract(batch)


def extractors(cfg, fake_text, **text):
    return {
        "audio": Counting(get_audio_extractor(cfg.features.audio)),
        "text": Counting(fake_text(**text)),
    }


def test_extract_then_reuse(tmp_path, corpus, fake_text, capsys, f32_close):
    cfg = make_cfg(tmp_path / "cache")
    ex = extractors(cfg, fake_text)
    cache = extract_corpus(cfg, corpus, extractors=ex)
    assert ex["audio"].count == 7
    assert ex["text"].count == 6  # "the cat sat" appears twice: encoded once
    assert "extracted 7 utterance(s)" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == [".lock", "metadata.json"] + [
        f"shard-0000{i}.{e}" for i in range(3) for e in ("json", "tfrecord")
    ]
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert meta["complete"] and meta["num_utterances"] == 7
    assert meta["dims"] == {"audio": 16, "text": 8} and meta["frame_rates"]["audio"] == 100.0
    assert meta["extractors"]["audio"]["n_mels"] == 16

    logmel = get_audio_extractor(cfg.features.audio)
    for u in corpus.utterances:
        audio, text = cache.get(u.id)
        # The cache extracted utterances in batches, this one alone: other padding, other
        # rounding (1-2 ulp on some CPUs).
        f32_close(audio, logmel.extract([load_audio(u.path)])[0])
        np.testing.assert_array_equal(text, fake_text().extract([u.text])[0])
    assert cache.lengths(["u0", "u6"], "text").tolist() == [3, 3]
    assert [r[0] for r in cache.iter_records(["u5", "u1"])] == ["u1", "u5"]  # shard order

    again = extractors(cfg, fake_text)
    cache2 = extract_corpus(cfg, corpus, extractors=again)
    assert again["audio"].count == 0 and again["text"].count == 0
    assert "up to date" in capsys.readouterr().out
    assert cache2.entries == cache.entries
    reopened = FeatureCache.open(tmp_path / "cache")
    assert reopened.complete and len(reopened) == 7


def test_resume_after_interruption_with_leftovers(tmp_path, corpus, fake_text, f32_close):
    cfg = make_cfg(tmp_path / "cache")

    def stop_after_first(shard):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_corpus(
            cfg,
            corpus,
            progress=False,
            on_shard_done=stop_after_first,
            extractors=extractors(cfg, fake_text),
        )
    cache_dir = tmp_path / "cache"
    assert not json.loads((cache_dir / "metadata.json").read_text())["complete"]
    assert len(FeatureCache.open(cache_dir)) == 3
    # What a kill can leave: a half-written temp file, and a renamed shard whose index was
    # never written (killed between the two renames).
    (cache_dir / "shard-00001.tfrecord.tmp").write_bytes(b"partial")
    (cache_dir / "shard-00001.tfrecord").write_bytes(b"garbage, never indexed")
    ex = extractors(cfg, fake_text)
    cache = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert ex["audio"].count == 4  # only the unfinished utterances
    assert not list(cache_dir.glob("*.tmp"))
    assert cache.complete and sorted(cache.ids) == sorted(corpus.ids)
    fresh = extract_corpus(
        make_cfg(tmp_path / "fresh"), corpus, progress=False, extractors=extractors(cfg, fake_text)
    )
    for u in corpus.utterances:
        for a, b in zip(cache.get(u.id), fresh.get(u.id)):
            f32_close(a, b)  # other batches in the two runs: rounding may differ


def test_resume_after_sigkill(tmp_path, corpus_factory):
    """A real process killed (SIGKILL) right after its second shard; the next run resumes."""
    wav_dir, cache_dir = tmp_path / "wav", tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import make_corpus
        from pathlib import Path
        from ks_keras.config import config_from_dict
        from ks_keras.features.cache import extract_corpus
        cfg = config_from_dict({{"model": {{"modalities": ["audio"], "audio_dim": 16,
                                  "num_heads": 2, "num_classes": 3}},
                                "features": {{"cache_dir": {str(cache_dir)!r}, "shard_size": 3,
                                             "audio": {{"n_mels": 16}}}}}})
        def kill(shard):
            if shard == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        extract_corpus(cfg, make_corpus(Path({str(wav_dir)!r})), progress=False,
                       on_shard_done=kill)
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(FeatureCache.open(cache_dir)) == 6
    corpus = corpus_factory(wav_dir)
    cfg = make_cfg(cache_dir, modalities=("audio",))
    ex = {"audio": Counting(get_audio_extractor(cfg.features.audio))}
    cache = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert ex["audio"].count == 1 and cache.complete and len(cache) == 7
    audio, text = cache.get("u6")
    assert text is None and audio.shape[1] == 16


def test_changed_extractor_invalidates_with_message(tmp_path, corpus, fake_text, caplog):
    extract_corpus(
        make_cfg(tmp_path / "c"),
        corpus,
        progress=False,
        extractors=extractors(make_cfg(tmp_path / "c"), fake_text),
    )
    cfg = make_cfg(tmp_path / "c", n_mels=12)
    ex = extractors(cfg, fake_text)
    with caplog.at_level(logging.WARNING, logger="ks_keras.features.cache"):
        cache = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert "different extractor settings" in caplog.text
    assert "extractors.audio.n_mels: 16 → 12" in caplog.text
    assert ex["audio"].count == 7 and cache.dims["audio"] == 12
    assert cache.get("u0")[0].shape[1] == 12
    # A text-extractor change is detected as well (and named).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ks_keras.features.cache"):
        extract_corpus(
            cfg, corpus, progress=False, extractors=extractors(cfg, fake_text, version=2)
        )
    assert "extractors.text.version: 1 → 2" in caplog.text


def test_changed_and_new_utterances_only(tmp_path, corpus, corpus_factory, fake_text):
    cfg = make_cfg(tmp_path / "c")
    extract_corpus(cfg, corpus, progress=False, extractors=extractors(cfg, fake_text))
    utts = list(corpus.utterances)
    utts[2] = replace(utts[2], text="a corrected transcript")
    extra = corpus_factory(tmp_path / "more", n=8).utterances[7]
    bigger = Corpus(utts + [extra], corpus.labels)
    ex = extractors(cfg, fake_text)
    cache = extract_corpus(cfg, bigger, progress=False, extractors=ex)
    assert ex["audio"].count == 2 and ex["text"].count == 2
    assert cache.get("u2")[1].shape[0] == 3  # the new transcript has 3 words
    assert len(cache) == 8


def test_empty_transcripts_listed_before_any_work(tmp_path, corpus, fake_text):
    utts = [replace(u, text="") if u.id in ("u1", "u4") else u for u in corpus.utterances]
    cfg = make_cfg(tmp_path / "c")
    with pytest.raises(ValueError, match=r"2 utterance\(s\) have an empty transcript: u1, u4"):
        extract_corpus(cfg, Corpus(utts, corpus.labels), extractors=extractors(cfg, fake_text))
    assert not list((tmp_path / "c").glob("shard-*"))


def test_bad_audio_names_every_file_and_keeps_the_rest(tmp_path, corpus, fake_text):
    Path(corpus["u4"].path).write_bytes(b"RIFF nonsense")
    Path(corpus["u1"].path).write_bytes(Path(corpus["u6"].path).read_bytes()[:3000])
    cfg = make_cfg(tmp_path / "c")
    with pytest.raises(ValueError, match=r"2 audio file\(s\) cannot be used") as e:
        extract_corpus(cfg, corpus, progress=False, extractors=extractors(cfg, fake_text))
    assert "u4.wav: cannot decode" in str(e.value) and "u1.wav: truncated" in str(e.value)
    cache = FeatureCache.open(tmp_path / "c")
    assert sorted(cache.ids) == ["u0", "u2", "u3", "u5", "u6"]  # the good ones are kept
    assert not cache.complete


def test_bad_extractor_output_names_the_utterance(tmp_path, corpus, fake_text):
    class Broken(fake_text):
        def extract(self, batch):
            out = super().extract(batch)
            if any(t == "one" for t in batch):
                out[[t for t in batch].index("one")][0, 0] = np.nan
            return out

    class Failing(fake_text):
        def extract(self, batch):
            if "hello world" in batch:
                raise ValueError("text batch item 0: boom")
            return super().extract(batch)

    cfg = make_cfg(
        tmp_path / "c",
    )
    audio = get_audio_extractor(cfg.features.audio)
    with pytest.raises(ValueError, match="utterance u4: fake_text produced NaN"):
        extract_corpus(cfg, corpus, progress=False, extractors={"audio": audio, "text": Broken()})
    with pytest.raises(ValueError, match="utterance u1: text features: text batch item 0: boom"):
        extract_corpus(
            make_cfg(tmp_path / "d"),
            corpus,
            progress=False,
            extractors={"audio": audio, "text": Failing()},
        )


def test_open_and_compatibility_errors(tmp_path, corpus, fake_text):
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        FeatureCache.open(tmp_path / "none")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-00000.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="not a feature cache"):
        extract_corpus(make_cfg(tmp_path / "foreign"), corpus)
    cfg = make_cfg(tmp_path / "c", modalities=("audio",))
    cache = extract_corpus(cfg, corpus, progress=False)
    check_compatible(cache, cfg)
    with pytest.raises(ValueError, match="n_mels"):
        check_compatible(cache, make_cfg(tmp_path / "c", modalities=("audio",), n_mels=12))
    with pytest.raises(ValueError, match=r"not in the feature cache.*: nope"):
        cache.get("nope")
    with pytest.raises(ValueError, match="holds \\['audio'\\] features, not 'text'"):
        cache.lengths(["u0"], "text")
    (tmp_path / "c" / "metadata.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureCache.open(tmp_path / "c")


def test_cli_features_on_shipped_emodb(tmp_path, capsys):
    """Log-mel + the real MiniLM on the shipped EmoDB (4-class view); the second run is a no-op."""
    pytest.importorskip("transformers")
    config = tmp_path / "emodb.yaml"
    config.write_text(
        textwrap.dedent(f"""
        model: {{audio_dim: 80, text_dim: 384, num_heads: 4, num_classes: 4}}
        data: {{corpus: emodb, labels: [angry, happy, neutral, sad]}}
        features: {{cache_dir: {tmp_path / "cache"}, shard_size: 128}}
    """)
    )
    assert main(["features", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "339 utterances" in out and "extracted 339 utterance(s)" in out
    assert "batches [B, 460, 80]" in out and "batches [B, 20, 384]" in out
    assert main(["features", "--config", str(config), "--no-progress"]) == 0
    assert "nothing to extract" in capsys.readouterr().out
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.dims == {"audio": 80, "text": 384} and len(cache) == 339
    # The pipeline on it yields the documented shapes.
    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus
    from ks_keras.data import make_dataset

    cfg = load_config(config)
    corpus = load_corpus(cfg.data)
    ds = make_dataset(cache, corpus.ids, corpus.label_ids(), cfg.data, 16, shuffle=True, seed=0)
    inputs, labels = next(iter(ds))
    assert inputs["audio"].shape == (16, 460, 80) and inputs["text"].shape == (16, 20, 384)
    assert inputs["audio_mask"].shape == (16, 460) and inputs["text_mask"].shape == (16, 20)
    assert inputs["audio_mask"].dtype == "int32" and labels.shape == (16,)
    # A model/feature width mismatch is caught before any work, naming the field.
    assert (
        main(
            [
                "features",
                "--config",
                str(config),
                "--set",
                "model.text_dim=1024",
                "--set",
                "model.num_heads=8",
            ]
        )
        == 1
    )
    assert "model.text_dim=1024" in capsys.readouterr().err
    # ...but only for the modalities in use (the text model is not even looked up).
    assert (
        main(
            [
                "features",
                "--config",
                str(config),
                "--no-progress",
                "--set",
                "model.modalities=[audio]",
                "--set",
                "model.text_dim=1024",
                "--set",
                "features.cache_dir=" + str(tmp_path / "audio_only"),
            ]
        )
        == 0
    )


# ---------------------------------------------------------------------------------------------
# Reliability (issue 14): content-keyed entries, per-corpus default folder, shard checksums.


def test_audio_overwritten_with_the_same_size_is_extracted_again(tmp_path, corpus, fake_text):
    cfg = make_cfg(tmp_path / "c")
    before = extract_corpus(cfg, corpus, progress=False, extractors=extractors(cfg, fake_text))
    old = before.get("u3")[0]
    path = Path(corpus["u3"].path)
    size = path.stat().st_size
    wave = load_audio(path)
    sf.write(str(path), (0.5 * wave[::-1]).astype(np.float32), 16000)  # other audio, same size
    assert path.stat().st_size == size
    ex = extractors(cfg, fake_text)
    after = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert ex["audio"].count == 1 and after.last_run["extracted"] == 1
    assert not np.allclose(after.get("u3")[0], old)


def test_another_corpus_with_the_same_names_is_not_reused(tmp_path, corpus_factory, fake_text):
    first = corpus_factory(tmp_path / "one")
    cfg = make_cfg(tmp_path / "shared")
    extract_corpus(cfg, first, progress=False, extractors=extractors(cfg, fake_text))
    second = corpus_factory(tmp_path / "two")  # same ids, file names, sizes and transcripts
    for u in second.utterances:
        wave = load_audio(u.path)
        sf.write(u.path, (0.3 * np.sign(wave) * np.sqrt(np.abs(wave))).astype(np.float32), 16000)
    sizes = [Path(u.path).stat().st_size for u in first.utterances]
    assert [Path(u.path).stat().st_size for u in second.utterances] == sizes
    ex = extractors(cfg, fake_text)
    cache = extract_corpus(cfg, second, progress=False, extractors=ex)
    assert ex["audio"].count == 7  # nothing reported "up to date"
    reference = get_audio_extractor(cfg.features.audio).extract([load_audio(second["u2"].path)])
    np.testing.assert_allclose(cache.get("u2")[0], reference[0], atol=1e-4)


def test_default_cache_dir_is_one_folder_per_corpus_and_extractor(
    tmp_path, monkeypatch, corpus_factory, fake_text
):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(
        {
            "model": {"modalities": ["audio"], "audio_dim": 16, "num_heads": 2},
            "features": {"audio": {"n_mels": 16}},
        }
    )
    assert cfg.features.cache_dir == "cache/features"  # the default
    a = corpus_factory(tmp_path / "a", n=3)
    b = corpus_factory(tmp_path / "b", n=3)
    a.source, b.source = str(tmp_path / "a" / "m.csv"), str(tmp_path / "b" / "m.csv")
    cache_a = extract_corpus(cfg, a, progress=False)
    cache_b = extract_corpus(cfg, b, progress=False)
    other = replace(
        cfg, features=replace(cfg.features, audio=replace(cfg.features.audio, hop_ms=20))
    )
    cache_a2 = extract_corpus(other, a, progress=False)
    folders = {cache_a.cache_dir, cache_b.cache_dir, cache_a2.cache_dir}
    assert len(folders) == 3
    assert all(f.parent == Path("cache/features") and f.name.startswith("tiny-") for f in folders)
    again = extract_corpus(cfg, a, progress=False)  # nothing was invalidated
    assert again.cache_dir == cache_a.cache_dir and again.last_run["extracted"] == 0


def test_truncated_or_altered_shard_is_named_and_repaired(tmp_path, corpus, fake_text, caplog):
    cfg = make_cfg(tmp_path / "c")
    extract_corpus(cfg, corpus, progress=False, extractors=extractors(cfg, fake_text))
    shard = tmp_path / "c" / "shard-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(
        ValueError, match=r"shard-00001\.tfrecord holds .* bytes.*ks-keras features"
    ):
        FeatureCache.open(tmp_path / "c")
    ex = extractors(cfg, fake_text)
    with caplog.at_level(logging.WARNING, logger="ks_keras.features.cache"):
        cache = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert "damaged shard (shard-00001.tfrecord" in caplog.text
    assert ex["audio"].count == 3 and cache.complete  # only that shard's utterances
    assert len(FeatureCache.open(tmp_path / "c")) == 7
    # Same size, other bytes: the checksum catches it.
    shard = next(p for p in sorted((tmp_path / "c").glob("shard-*.tfrecord")))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name}: SHA-256 differs"):
        FeatureCache.open(tmp_path / "c")


def test_cache_of_an_older_format_says_how_to_rebuild(tmp_path, corpus, fake_text, caplog):
    cfg = make_cfg(tmp_path / "c")
    extract_corpus(cfg, corpus, progress=False, extractors=extractors(cfg, fake_text))
    meta_path = tmp_path / "c" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match=r"cache format 1 .*run `ks-keras features`"):
        FeatureCache.open(tmp_path / "c")
    ex = extractors(cfg, fake_text)
    with caplog.at_level(logging.WARNING, logger="ks_keras.features.cache"):
        cache = extract_corpus(cfg, corpus, progress=False, extractors=ex)
    assert "written by another ks_keras version (cache format 1" in caplog.text
    assert ex["audio"].count == 7 and cache.complete


def test_second_process_waits_for_the_first(tmp_path, corpus, fake_text, capsys):
    """Two runs extracting into one folder: the second waits on `.lock` instead of deleting
    the first one's temporary files (which crashed it)."""
    import fcntl
    import threading

    cfg = make_cfg(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    holder = open(tmp_path / "cache" / ".lock", "a")  # noqa: SIM115 (released below)
    fcntl.flock(holder, fcntl.LOCK_EX)
    done = {}
    worker = threading.Thread(
        target=lambda: done.update(
            cache=extract_corpus(cfg, corpus, extractors=extractors(cfg, fake_text))
        )
    )
    worker.start()
    worker.join(timeout=2.0)
    try:
        assert worker.is_alive() and "cache" not in done  # waits while the lock is held
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    worker.join(timeout=300)
    assert done["cache"].complete and len(done["cache"]) == 7
    assert "another process is extracting into" in capsys.readouterr().out
