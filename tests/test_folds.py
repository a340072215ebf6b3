"""Speaker-independent folds with validation speakers held out."""

import pytest

from ks_keras.config import EvalConfig
from ks_keras.corpora.manifest import Corpus, Utterance
from ks_keras.folds import make_folds


def corpus(n_speakers=6, labels=("a", "b", "c"), per=4, sessions=False, genders=True):
    utts = []
    for s in range(n_speakers):
        for k in range(per):
            utts.append(
                Utterance(
                    id=f"s{s}_{k}",
                    path=f"/x/s{s}_{k}.wav",
                    speaker=f"s{s}",
                    label=labels[k % len(labels)],
                    text="t",
                    session=f"S{s // 2}" if sessions else None,
                    gender=("m" if s % 2 else "f") if genders else None,
                )
            )
    return Corpus(utts, sorted(set(labels)), name="toy")


def _check_disjoint(fold):
    sets = [set(fold.train_ids), set(fold.val_ids), set(fold.test_ids)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert not set(fold.val_speakers) & set(fold.test_speakers)
    assert not set(fold.train_speakers) & (set(fold.val_speakers) | set(fold.test_speakers))


def test_loso_with_gender_balanced_validation():
    c = corpus(6)
    folds = make_folds(c, EvalConfig(folds="loso", val_speakers=2))
    assert len(folds) == 6
    for fold in folds:
        _check_disjoint(fold)
        assert len(fold.test_speakers) == 1 and len(fold.val_speakers) == 2
        genders = {("m" if int(s[1:]) % 2 else "f") for s in fold.val_speakers}
        assert genders == {"m", "f"}
        assert len(fold.train_ids) + len(fold.val_ids) + len(fold.test_ids) == len(c)
    # Validation speakers rotate across folds instead of always being the same.
    assert len({tuple(f.val_speakers) for f in folds}) > 1


def test_single_validation_speaker_keeps_training_balanced():
    folds = make_folds(corpus(6), EvalConfig(folds="loso", val_speakers=1))
    for fold in folds:
        test_gender = "m" if int(fold.test_speakers[0][1:]) % 2 else "f"
        val_gender = "m" if int(fold.val_speakers[0][1:]) % 2 else "f"
        # The test speaker leaves its gender one short; validation takes from the other.
        assert val_gender != test_gender


def test_loso_session():
    folds = make_folds(corpus(6, sessions=True), EvalConfig(folds="loso_session", val_speakers=1))
    assert [f.name for f in folds] == ["session S0", "session S1", "session S2"]
    for fold in folds:
        _check_disjoint(fold)
        assert len(fold.test_speakers) == 2


def test_kfold_groups_speakers():
    folds = make_folds(corpus(7), EvalConfig(folds="kfold", n_folds=3, val_speakers=1), seed=1)
    tested = sorted(s for f in folds for s in f.test_speakers)
    assert tested == [f"s{i}" for i in range(7)]
    for fold in folds:
        _check_disjoint(fold)


def test_paper_protocol_has_no_validation():
    folds = make_folds(corpus(4), EvalConfig(protocol="paper", folds="loso"))
    assert all(not f.val_ids and not f.val_speakers for f in folds)


def test_max_folds():
    assert len(make_folds(corpus(6), EvalConfig(val_speakers=1), max_folds=2)) == 2
    assert len(make_folds(corpus(6), EvalConfig(val_speakers=1, max_folds=3))) == 3


def test_errors_before_training():
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_folds(corpus(labels=("a",)), EvalConfig())
    with pytest.raises(ValueError, match="val_speakers"):
        make_folds(corpus(3), EvalConfig(val_speakers=2))
    with pytest.raises(ValueError, match="session"):
        make_folds(corpus(4), EvalConfig(folds="loso_session"))
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(corpus(3), EvalConfig(folds="kfold", n_folds=5, val_speakers=1))
    with pytest.raises(ValueError, match="at least 2"):
        make_folds(corpus(1), EvalConfig(val_speakers=0, protocol="paper"))


def test_missing_class_in_a_fold_is_fine():
    # Speaker s0 only has class "a": still a valid test fold.
    c = corpus(4)
    utts = [u for u in c.utterances if not (u.speaker == "s0" and u.label != "a")]
    folds = make_folds(Corpus(utts, c.labels), EvalConfig(val_speakers=1))
    assert len(folds[0].test_ids) >= 1


def test_rotated_validation_keeps_the_test_fold_and_holds_out_other_speakers():
    from ks_keras.folds import rotate_validation

    utts = [
        Utterance(f"{s}_{k}", "x.wav", s, "ab"[k % 2], "t", gender="mf"[i % 2])
        for i, s in enumerate(["s1", "s2", "s3", "s4", "s5", "s6", "s7"])
        for k in range(2)
    ]
    corpus = Corpus(utts, ["a", "b"], name="toy")
    folds = make_folds(corpus, EvalConfig(folds="loso", val_speakers=2))
    for fold in folds:
        assert rotate_validation(corpus, fold, 0) is fold
        seen = set(fold.val_speakers)
        for shift in (1, 2):
            other = rotate_validation(corpus, fold, shift)
            assert other.test_ids == fold.test_ids and other.test_speakers == fold.test_speakers
            assert len(other.val_speakers) == 2
            assert not set(other.val_speakers) & set(other.train_speakers)
            assert not set(other.val_speakers) & set(fold.test_speakers)
            assert sorted(other.train_ids + other.val_ids + other.test_ids) == sorted(corpus.ids)
            seen |= set(other.val_speakers)
        assert len(seen) >= 3  # the members validate on different speakers
