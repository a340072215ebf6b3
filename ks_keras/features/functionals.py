"""openSMILE utterance-level functionals: extraction (cached), and per-speaker normalisation.

Functionals are statistics of frame-level descriptors over a whole utterance, as designed for
paralinguistics: eGeMAPSv02 (88) or ComParE_2016 (6373). They serve twice:

- as the classical baseline's features (`ks_keras.baseline`);
- as an extra model input `functionals` [B, D] (`features.functionals`,
  `model.functionals_dim`), joining the pooled Transformer outputs before the head.

openSMILE runs in a separate Python process: its native library corrupts the heap when it is
loaded after TensorFlow in the same process ("malloc(): invalid size").

Normalisation: with `features.audio.normalize: speaker`, each speaker's functionals are
z-normalised with that speaker's own statistics (labels unused), the standard in SER and what
the model's frames get; otherwise they stay raw and the model's BatchNormalization
standardises them with training statistics.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FEATURE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
FUNCTIONAL_DIMS = {"egemaps": 88, "compare": 6373}


def opensmile_available() -> bool:
    return importlib.util.find_spec("opensmile") is not None


def _check_set(feature_set: str, field: str) -> None:
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"{field}: expected one of {sorted(FEATURE_SETS)}, got {feature_set!r}")
    if not opensmile_available():
        raise ImportError(
            f"{field}={feature_set!r} needs the opensmile package: pip install -e '.[baseline]'"
        )


def extract_files(
    paths: list[str | Path],
    feature_set: str,
    sample_rate: int = 16000,
    progress: bool = False,
    field: str = "features.functionals",
) -> np.ndarray:
    """`[N, D]` float32 functionals of audio files (decoded and resampled as everywhere else),
    computed in a child process. Raises RuntimeError naming the problem if it fails."""
    _check_set(feature_set, field)
    with tempfile.TemporaryDirectory(prefix="ks_keras_functionals_") as tmp:
        out = Path(tmp) / "out.npz"
        job = Path(tmp) / "job.json"
        items = [[str(i), str(p)] for i, p in enumerate(paths)]
        job.write_text(
            json.dumps(
                {
                    "items": items,
                    "out": str(out),
                    "progress": progress,
                    "set": feature_set,
                    "sample_rate": sample_rate,
                }
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "ks_keras.features.functionals", str(job)],
            stderr=None if progress else subprocess.PIPE,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not out.is_file():
            detail = (done.stderr or "").strip().splitlines()[-5:] if done.stderr else []
            raise RuntimeError(
                f"{FEATURE_SETS[feature_set]} functionals: extraction failed"
                + (": " + " | ".join(detail) if detail else "")
            )
        with np.load(out) as stored:
            return stored["features"]


def corpus_functionals(
    corpus,
    cache_dir: str | Path,
    feature_set: str,
    progress: bool = True,
    sample_rate: int = 16000,
) -> np.ndarray:
    """`[N, D]` functionals in corpus order, cached as `.npz` under `cache_dir`.

    The cache file is keyed on the feature set and on every utterance's id, path, size and
    modification time, so edited audio is extracted again.
    """
    _check_set(feature_set, "features.functionals")
    items = [[u.id, u.path] for u in corpus.utterances]
    stamps = []
    for _, path in items:
        try:
            st = os.stat(path)
            stamps.append([st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append(None)
    identity = [feature_set, items, stamps] + ([sample_rate] if sample_rate != 16000 else [])
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    prefix = "egemaps" if feature_set == "egemaps" else f"functionals_{feature_set}"
    cache = Path(cache_dir) / f"{prefix}_{key}.npz"
    if not cache.is_file():
        features = extract_files(
            [u.path for u in corpus.utterances], feature_set, progress=progress
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, ids=np.array(corpus.ids), features=features)
        os.replace(tmp, cache)
    with np.load(cache) as stored:
        if list(stored["ids"]) != corpus.ids:
            raise RuntimeError(f"{cache}: cached functional ids do not match the corpus; delete it")
        return stored["features"]


def speaker_normalize(features: np.ndarray, speakers) -> np.ndarray:
    """z-normalise each speaker's rows with that speaker's own mean and std (labels unused).

    Constant columns of a speaker (std 0) become 0. A speaker with one utterance gets zeros.
    """
    features = np.asarray(features, np.float64)
    speakers = np.asarray(speakers)
    if features.ndim != 2 or features.shape[0] != speakers.shape[0]:
        raise ValueError(
            f"speaker_normalize: expected [N, D] features and N speakers, got {features.shape} "
            f"and {speakers.shape}"
        )
    out = np.zeros_like(features)
    for s in np.unique(speakers):
        rows = speakers == s
        mean = features[rows].mean(axis=0)
        std = features[rows].std(axis=0)
        out[rows] = (features[rows] - mean) / np.where(std > 1e-12, std, 1.0)
    return out.astype(np.float32)


def model_functionals(cfg, corpus, progress: bool = True) -> dict[str, np.ndarray] | None:
    """`{utterance id: [D] float32}` for the model's `functionals` input, normalised as the
    config says (per speaker under `features.audio.normalize: speaker`), or None when
    `features.functionals` is `none`."""
    feature_set = cfg.features.functionals
    if feature_set == "none":
        return None
    matrix = normalized_functionals(cfg, corpus, feature_set, progress)
    return {u: matrix[i].astype(np.float32) for i, u in enumerate(corpus.ids)}


def normalized_functionals(cfg, corpus, feature_set: str, progress: bool = True) -> np.ndarray:
    """`[N, D]` functionals of `feature_set` in corpus order, cached under
    `features.cache_dir`, normalised as the model's input is (per speaker under
    `features.audio.normalize: speaker`).

    Raises:
        ValueError: NaN/inf functionals (naming the utterances).
    """
    matrix = corpus_functionals(
        corpus,
        Path(cfg.features.cache_dir) / "functionals",
        feature_set,
        progress=progress,
        sample_rate=cfg.features.audio.sample_rate,
    )
    if cfg.features.audio.normalize == "speaker":
        matrix = speaker_normalize(matrix, [u.speaker for u in corpus.utterances])
    if not np.isfinite(matrix).all():
        bad = [corpus.ids[i] for i in np.flatnonzero(~np.isfinite(matrix).all(axis=1))]
        raise ValueError(
            f"{FEATURE_SETS[feature_set]} functionals are NaN/inf for {len(bad)} utterance(s) "
            f"({', '.join(bad[:5])}); check those audio files (too short or silent?)"
        )
    return matrix


def _extract_job(job_path: str) -> None:
    """Child-process side of `extract_files` (no TensorFlow in this process)."""
    import opensmile
    from tqdm import tqdm

    from ks_keras.audio import load_audio

    job = json.loads(Path(job_path).read_text())
    feature_set = job.get("set", "egemaps")
    rate = int(job.get("sample_rate", 16000))
    smile = opensmile.Smile(
        feature_set=getattr(opensmile.FeatureSet, FEATURE_SETS[feature_set]),
        feature_level=opensmile.FeatureLevel.Functionals,
    )
    rows = []
    desc = f"{FEATURE_SETS[feature_set]} functionals"
    for _, path in tqdm(job["items"], desc=desc, unit="utt", disable=not job["progress"]):
        wave = load_audio(path, sample_rate=rate)
        rows.append(smile.process_signal(wave, rate).to_numpy()[0])
    out = Path(job["out"])
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, ids=np.array([i for i, _ in job["items"]]), features=np.asarray(rows, np.float32))
    os.replace(tmp, out)


if __name__ == "__main__":
    _extract_job(sys.argv[1])
