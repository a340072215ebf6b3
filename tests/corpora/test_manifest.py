"""ks_keras.corpora.manifest: the generic CSV, label map/subset, and all-offenders errors."""

import csv

import numpy as np
import pytest
import soundfile as sf

from ks_keras.config import DataConfig
from ks_keras.corpora import Corpus, ManifestError, load_corpus, read_manifest

HEADER = ["path", "speaker", "label", "text"]


def write_manifest(folder, rows, header=HEADER, make_audio=True):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if make_audio:
        for r in rows:
            rel = r[header.index("path")]
            if rel and not rel.startswith("missing"):
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(folder / rel), np.zeros(1600, np.float32), 16000)
    return folder / "manifest.csv"


ROWS = [
    ["wav/a1.wav", "s1", "angry", "hello"],
    ["wav/a2.wav", "s1", "excited", "hi there"],
    ["wav/b1.wav", "s2", "sad", ""],
    ["wav/b2.wav", "s2", "neutral", "ok"],
    ["wav/b3.wav", "s2", "bored", "meh"],
]


def test_reads_rows_with_absolute_paths(tmp_path):
    corpus = read_manifest(write_manifest(tmp_path / "c", ROWS))
    assert isinstance(corpus, Corpus) and len(corpus) == 5
    u = corpus.utterances[0]
    assert u.id == "a1" and u.speaker == "s1" and u.text == "hello"
    assert u.path == str((tmp_path / "c" / "wav" / "a1.wav").resolve())
    assert u.session is None and u.gender is None and u.duration is None
    assert corpus.labels == ["angry", "bored", "excited", "neutral", "sad"]  # sorted
    assert corpus.speakers == ["s1", "s2"]
    assert corpus.name == "c"


def test_optional_columns_and_extra_columns(tmp_path):
    header = ["id", "path", "speaker", "label", "text", "session", "gender", "duration", "x"]
    rows = [
        ["u1", "a.wav", "s1", "sad", "t", "Ses01", "f", "1.5", "ignored"],
        ["u2", "b.wav", "s2", "sad", "t", "", "", "", ""],
    ]
    corpus = read_manifest(write_manifest(tmp_path, rows, header))
    u1, u2 = corpus.utterances
    assert (u1.id, u1.session, u1.gender, u1.duration) == ("u1", "Ses01", "f", 1.5)
    assert (u2.session, u2.gender, u2.duration) == (None, None, None)


def test_label_map_then_subset_in_given_order(tmp_path):
    path = write_manifest(tmp_path, ROWS)
    corpus = read_manifest(
        path, label_map={"excited": "happy"}, labels=["sad", "happy", "angry", "neutral"]
    )
    assert corpus.labels == ["sad", "happy", "angry", "neutral"]
    assert [u.id for u in corpus.utterances] == ["a1", "a2", "b1", "b2"]  # bored dropped
    assert corpus.utterances[1].label == "happy"
    assert corpus.label_index("happy") == 1
    np.testing.assert_array_equal(corpus.label_ids(), [2, 1, 0, 3])
    np.testing.assert_array_equal(corpus.label_ids(["b2", "a1"]), [3, 2])
    assert corpus.counts() == {"sad": 1, "happy": 1, "angry": 1, "neutral": 1}
    with pytest.raises(ValueError, match="unknown label 'bored'"):
        corpus.label_index("bored")


def test_load_corpus_manifest_uses_config(tmp_path):
    path = write_manifest(tmp_path, ROWS)
    cfg = DataConfig(
        corpus="manifest",
        manifest=str(path),
        label_map={"excited": "happy"},
        labels=["angry", "happy"],
    )
    corpus = load_corpus(cfg)
    assert corpus.labels == ["angry", "happy"] and len(corpus) == 2
    assert corpus.speaker_of() == {"a1": "s1", "a2": "s1"}


def test_load_corpus_manifest_requires_path():
    with pytest.raises(ValueError, match="data.manifest"):
        load_corpus(DataConfig(corpus="manifest"))


def test_missing_manifest_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        read_manifest(tmp_path / "nothere.csv")


def test_missing_columns_listed(tmp_path):
    path = write_manifest(tmp_path, [["a.wav", "s1"]], header=["path", "speaker"])
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['label', 'text'\]"):
        read_manifest(path)


def test_unknown_subset_labels_listed(tmp_path):
    path = write_manifest(tmp_path, ROWS)
    with pytest.raises(ManifestError, match=r"\['happy', 'fear'\] match no utterance") as e:
        read_manifest(path, labels=["angry", "happy", "fear"])
    assert "excited" in str(e.value)  # lists what is present


def test_all_offenders_reported_together(tmp_path):
    rows = [
        ["wav/a.wav", "s1", "sad", "x"],
        ["wav/a.wav", "s1", "sad", "dup"],
        ["missing/m1.wav", "s1", "sad", "x"],
        ["missing/m2.wav", "s2", "sad", "x"],
        ["wav/c.wav", "", "", "x"],
    ]
    path = write_manifest(tmp_path, rows)
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert "duplicate id" in msg and "a ×2" in msg
    assert "m1.wav" in msg and "m2.wav" in msg  # both missing files, not just the first
    assert "empty speaker" in msg and "empty label" in msg and "line 6" in msg


def test_duplicate_explicit_ids(tmp_path):
    header = ["id", "path", "speaker", "label", "text"]
    rows = [
        ["u", "a.wav", "s", "sad", ""],
        ["u", "b.wav", "s", "sad", ""],
        ["v", "c.wav", "s", "sad", ""],
        ["v", "d.wav", "s", "sad", ""],
    ]
    with pytest.raises(ManifestError, match=r"duplicate id.*\(2\): u ×2, v ×2"):
        read_manifest(write_manifest(tmp_path, rows, header))


def test_bad_duration(tmp_path):
    header = HEADER + ["duration"]
    rows = [["a.wav", "s", "sad", "", "abc"], ["b.wav", "s", "sad", "", "-1"]]
    with pytest.raises(ManifestError, match=r"bad duration.*line 2: 'abc', line 3: '-1'"):
        read_manifest(write_manifest(tmp_path, rows, header))


def test_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(write_manifest(tmp_path, []))


def test_missing_files_only_for_kept_rows(tmp_path):
    rows = [["a.wav", "s", "sad", ""], ["missing/b.wav", "s", "bored", ""]]
    path = write_manifest(tmp_path, rows)
    assert len(read_manifest(path, labels=["sad"])) == 1
    with pytest.raises(ManifestError, match="missing audio file"):
        read_manifest(path)
    assert len(read_manifest(path, check_files=False)) == 2


def test_long_offender_lists_are_summarised(tmp_path):
    rows = [[f"missing/{i}.wav", "s", "sad", ""] for i in range(30)]
    with pytest.raises(ManifestError, match=r"missing audio file \(30\).*and 10 more"):
        read_manifest(write_manifest(tmp_path, rows))


# ---------------------------------------------------------------------------------------------
# Reliability (issue 14): unquoted commas, non-UTF-8 files, dropped labels.


def test_unquoted_comma_in_a_transcript_is_an_error_naming_the_line(tmp_path):
    folder = tmp_path / "c"
    write_manifest(folder, ROWS[:2])
    path = folder / "manifest.csv"
    with path.open("a") as f:  # hand-written rows: one quoted (fine), one not
        f.write('wav/a1.wav,s3,sad,"Hallo, wie geht\'s"\n')
        f.write("wav/a2.wav,s3,sad,Hallo, wie geht's\n")
    with pytest.raises(ManifestError, match=r"more fields than the header") as e:
        read_manifest(path)
    msg = str(e.value)
    assert "line 5: 5 fields for 4 columns" in msg and "wie geht" in msg
    assert "line 4" not in msg  # the quoted comma is fine


def test_quoted_comma_keeps_the_whole_transcript(tmp_path):
    path = write_manifest(tmp_path, [["wav/a.wav", "s", "sad", "Hallo, wie geht's"]])
    assert read_manifest(path).utterances[0].text == "Hallo, wie geht's"


def test_latin1_manifest_names_the_file_and_line(tmp_path):
    path = write_manifest(tmp_path, [["wav/a.wav", "s", "sad", "ok"]])
    with path.open("ab") as f:
        f.write("wav/b.wav,s,sad,Stimme für Ärger\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"manifest.csv: line 3, column 25: .*not UTF-8"):
        read_manifest(path)


def test_dropped_labels_are_counted_per_label(tmp_path, caplog):
    path = write_manifest(tmp_path, ROWS + [["wav/b4.wav", "s2", "bored", "meh"]])
    with caplog.at_level("INFO", logger="ks_keras.corpora.manifest"):
        corpus = read_manifest(path, labels=["angry", "sad"])
    assert corpus.dropped == {"bored": 2, "excited": 1, "neutral": 1}
    assert "left out 4 row(s) with other labels: bored 2, excited 1, neutral 1" in caplog.text
    assert read_manifest(path).dropped == {}  # every label kept
