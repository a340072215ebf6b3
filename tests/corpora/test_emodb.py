"""The shipped EmoDB copy: 7-class and 4-class views, and how it is located."""

from pathlib import Path

import pytest

from ks_keras.config import DataConfig
from ks_keras.corpora import EMODB_4CLASS, EMODB_LABELS, emodb_manifest_path, load_corpus

REPO = Path(__file__).resolve().parents[2]


def test_located_in_the_repository():
    assert emodb_manifest_path().resolve() == REPO / "data" / "emodb" / "manifest.csv"
    assert (REPO / "data" / "emodb" / "README.md").is_file()


def test_seven_class_view():
    corpus = load_corpus(DataConfig(corpus="emodb"))
    assert len(corpus) == 535
    assert corpus.labels == list(EMODB_LABELS)
    assert corpus.counts() == {
        "angry": 127,
        "bored": 81,
        "disgusted": 46,
        "fearful": 69,
        "happy": 71,
        "neutral": 79,
        "sad": 62,
    }
    assert len(corpus.speakers) == 10
    assert all(Path(u.path).is_file() for u in corpus.utterances)
    u = corpus["03a01Fa"]
    assert u.label == "happy" and u.speaker == "03" and u.gender == "m"
    assert u.text == "Der Lappen liegt auf dem Eisschrank."


def test_four_class_view():
    corpus = load_corpus(DataConfig(corpus="emodb", labels=list(EMODB_4CLASS)))
    assert len(corpus) == 339
    assert corpus.labels == ["angry", "happy", "neutral", "sad"]
    assert corpus.counts() == {"angry": 127, "happy": 71, "neutral": 79, "sad": 62}


def test_environment_variable_wins(tmp_path, monkeypatch):
    (tmp_path / "manifest.csv").write_text("path,speaker,label,text\n")
    monkeypatch.setenv("KS_KERAS_EMODB", str(tmp_path))
    assert emodb_manifest_path() == tmp_path / "manifest.csv"


def test_explicit_manifest_wins(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "manifest.csv").write_text("path,speaker,label,text\na.wav,s,sad,x\n")
    corpus = load_corpus(DataConfig(corpus="emodb", manifest=str(tmp_path / "manifest.csv")))
    assert len(corpus) == 1 and corpus.name == "emodb"


def test_not_found_message(tmp_path, monkeypatch):
    import ks_keras.corpora.emodb as emodb

    monkeypatch.setenv("KS_KERAS_EMODB", str(tmp_path / "nowhere"))
    monkeypatch.setattr(emodb, "__file__", str(tmp_path / "pkg" / "emodb.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="KS_KERAS_EMODB"):
        emodb.emodb_manifest_path()
