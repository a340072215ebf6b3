"""Classical baseline for context in every report: eGeMAPS functionals + linear SVM.

eGeMAPSv02 functionals (88 per utterance, openSMILE via the optional PyPI package `opensmile`,
extra `baseline`) feed a standardised linear SVM. The SVM's C is chosen by grouped
cross-validation **on the training speakers only** (validation speakers included, test fold
never), then the model is refit on all training speakers and scored on the test fold, fold by
fold, on exactly the folds the neural model uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ks_keras.audio import load_audio
from ks_keras.corpora.manifest import Corpus
from ks_keras.folds import Fold

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FEATURE_SET = "eGeMAPSv02 functionals"


def opensmile_available() -> bool:
    return importlib.util.find_spec("opensmile") is not None


def egemaps_features(corpus: Corpus, cache_dir: str | Path, progress: bool = True) -> np.ndarray:
    """`[N, 88]` eGeMAPSv02 functionals in corpus order, cached as `.npz` under `cache_dir`.

    Extraction runs in a separate Python process: openSMILE's native library corrupts the heap
    when it is loaded after TensorFlow in the same process ("malloc(): invalid size"), and the
    evaluation process has TensorFlow loaded.

    Raises:
        ImportError: when `opensmile` is not installed (`pip install -e ".[baseline]"`).
        RuntimeError: when the extraction process fails (its error output is included).
    """
    if not opensmile_available():
        raise ImportError("opensmile is not installed: pip install -e '.[baseline]'")
    items = [[u.id, u.path] for u in corpus.utterances]
    key = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"egemaps_{key}.npz"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        job = cache.with_name(cache.name + ".job.json")
        job.write_text(json.dumps({"items": items, "out": str(cache), "progress": progress}))
        done = subprocess.run(
            [sys.executable, "-m", "ks_keras.baseline", str(job)],
            stderr=None if progress else subprocess.PIPE,
            text=True,
            check=False,
        )
        job.unlink(missing_ok=True)
        if done.returncode != 0 or not cache.is_file():
            detail = (done.stderr or "").strip().splitlines()[-5:] if done.stderr else []
            raise RuntimeError(
                "eGeMAPS extraction failed" + (": " + " | ".join(detail) if detail else "")
            )
    with np.load(cache) as stored:
        if list(stored["ids"]) != corpus.ids:
            raise RuntimeError(f"{cache}: cached eGeMAPS ids do not match the corpus; delete it")
        return stored["features"]


def _extract_job(job_path: str) -> None:
    """Child-process side of `egemaps_features` (no TensorFlow in this process)."""
    import opensmile
    from tqdm import tqdm

    job = json.loads(Path(job_path).read_text())
    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )
    rows = []
    for _, path in tqdm(job["items"], desc="eGeMAPS", unit="utt", disable=not job["progress"]):
        wave = load_audio(path, sample_rate=16000)
        rows.append(smile.process_signal(wave, 16000).to_numpy()[0])
    out = Path(job["out"])
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, ids=np.array([i for i, _ in job["items"]]), features=np.asarray(rows, np.float32))
    os.replace(tmp, out)


def _fit_svm(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int):
    """Standardise + LinearSVC; C picked by grouped CV (UA) on these speakers only."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    def make(c):
        return make_pipeline(
            StandardScaler(),
            LinearSVC(C=c, class_weight="balanced", max_iter=20000, random_state=seed),
        )

    n_groups = len(set(groups.tolist()))
    best_c, best_score = C_GRID[0], -1.0
    if n_groups >= 2:
        splitter = GroupKFold(n_splits=min(5, n_groups))
        for c in C_GRID:
            truth, pred = [], []
            for tr, va in splitter.split(x, y, groups):
                if len(set(y[tr].tolist())) < 2:
                    continue
                truth.append(y[va])
                pred.append(make(c).fit(x[tr], y[tr]).predict(x[va]))
            if truth:
                score = balanced_accuracy_score(np.concatenate(truth), np.concatenate(pred))
                if score > best_score:
                    best_c, best_score = c, score
    return make(best_c).fit(x, y), best_c


def run_baseline(
    corpus: Corpus, folds: list[Fold], features: np.ndarray, seed: int = 0
) -> list[dict]:
    """Train/score the SVM on each fold.

    Returns:
        Per fold: `{"fold", "name", "y_true", "y_pred", "C"}` (class ids as numpy arrays).
    """
    index = {utt_id: i for i, utt_id in enumerate(corpus.ids)}
    labels = corpus.label_ids()
    speaker = np.array([u.speaker for u in corpus.utterances])
    results = []
    for fold in folds:
        train = np.array([index[i] for i in fold.train_ids + fold.val_ids])
        test = np.array([index[i] for i in fold.test_ids])
        model, c = _fit_svm(features[train], labels[train], speaker[train], seed)
        results.append(
            {
                "fold": fold.index,
                "name": fold.name,
                "y_true": labels[test],
                "y_pred": model.predict(features[test]),
                "C": c,
            }
        )
    return results


if __name__ == "__main__":
    _extract_job(sys.argv[1])
