"""Fixtures for feature tests: a tiny synthetic corpus and a fast fake text extractor."""

import hashlib

import numpy as np
import pytest
import soundfile as sf

from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.features.base import FeatureExtractor

TEXTS = ["the cat sat", "hello world", "on the mat", "the cat sat", "one", "two words", "x y z"]


class FakeText(FeatureExtractor):
    """Deterministic word-hash embeddings (one row per word); counts what it encodes."""

    modality = "text"
    frame_rate = None

    def __init__(self, dim=8, version=1):
        self.name, self.dim, self.version = "fake_text", dim, version
        self.seen: list[str] = []

    @property
    def metadata(self):
        return {"type": "fake_text", "dim": self.dim, "version": self.version}

    def extract(self, batch):
        self.seen.extend(batch)
        out = []
        for text in batch:
            rows = []
            for word in text.split():
                seed = int(hashlib.md5(word.encode()).hexdigest()[:8], 16)
                rows.append(np.random.default_rng(seed).standard_normal(self.dim))
            out.append(np.array(rows, np.float32).reshape(-1, self.dim))
        return out


def make_corpus(folder, n=7, texts=TEXTS):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    utts = []
    for i in range(n):
        path = folder / f"u{i}.wav"
        seconds = 0.1 + 0.08 * i
        sf.write(
            str(path), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000
        )
        utts.append(
            Utterance(
                id=f"u{i}",
                path=str(path),
                speaker=f"s{i % 2}",
                label=["a", "b", "c"][i % 3],
                text=texts[i % len(texts)],
            )
        )
    return Corpus(utts, ["a", "b", "c"], name="tiny")


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "wav")


@pytest.fixture
def fake_text():
    return FakeText


@pytest.fixture
def corpus_factory():
    return make_corpus
