"""scripts/functionals_probe.py on synthetic functionals (no openSMILE, no audio)."""

import numpy as np
import pytest
from _scripts import load_script

from ks_keras.config import load_config
from ks_keras.corpora.manifest import Corpus, Utterance


def _corpus(n_speakers=6, per_class=6, labels=("a", "b", "c")):
    utterances = []
    for s in range(n_speakers):
        for label in labels:
            for k in range(per_class):
                utterances.append(
                    Utterance(
                        id=f"s{s}_{label}{k}",
                        path=f"/nowhere/s{s}_{label}{k}.wav",
                        speaker=f"{s:02d}",
                        label=label,
                        text="",
                        gender="m" if s % 2 else "f",
                    )
                )
    return Corpus(utterances, list(labels), name="synthetic")


def test_probe_scores_validation_speakers_and_never_the_test_fold(tmp_path):
    module = load_script("functionals_probe")
    corpus = _corpus()
    rng = np.random.default_rng(0)
    y = np.array([corpus.labels.index(u.label) for u in corpus.utterances])
    informative = np.eye(3)[y] * 3 + rng.normal(size=(len(y), 3)) * 0.3
    noise = rng.normal(size=(len(y), 5))
    cfg = load_config(None, ["eval.val_speakers=2", "eval.folds=loso"])
    rows = module.probe(cfg, corpus, {"good": informative, "noise": noise}, cs=[1.0], seeds=[0, 1])
    by_set = {row["set"]: row for row in rows}
    assert by_set["good"]["val_ua"] > 0.9
    assert by_set["noise"]["val_ua"] < 0.7
    assert len(by_set["good"]["per_seed"]) == 2


def test_probe_never_reads_the_test_speakers():
    module = load_script("functionals_probe")
    corpus = _corpus()
    rng = np.random.default_rng(1)
    y = np.array([corpus.labels.index(u.label) for u in corpus.utterances])
    x = np.eye(3)[y] + rng.normal(size=(len(y), 3)) * 0.8
    cfg = load_config(None, ["eval.val_speakers=2", "eval.folds=loso", "eval.max_folds=1"])
    from ks_keras.folds import make_folds

    test = set(make_folds(corpus, cfg.eval, seed=0)[0].test_speakers)
    spoiled = x.copy()
    spoiled[[u.speaker in test for u in corpus.utterances]] = 1e6
    kwargs = {"cs": [1.0], "seeds": [0]}
    clean = module.probe(cfg, corpus, {"x": x}, **kwargs)[0]["val_ua"]
    assert module.probe(cfg, corpus, {"x": spoiled}, **kwargs)[0]["val_ua"] == pytest.approx(clean)


def test_unknown_set_names_the_option(tmp_path):
    module = load_script("functionals_probe")
    cfg = load_config(None)
    with pytest.raises(SystemExit, match="--sets: unknown"):
        module.load_sets(cfg, _corpus(), ["compare+mfcc"], progress=False)
