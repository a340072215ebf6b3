"""Cross-validation: one model (or ensemble) per fold and repeat, reusing finished members."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ks_keras.baseline import describe, functionals, opensmile_available, run_baseline
from ks_keras.config import Config
from ks_keras.corpora.manifest import Corpus
from ks_keras.ensemble import member_seed
from ks_keras.evaluation.attention import attention_examples, fold_normalizer
from ks_keras.evaluation.results import CVResult, FoldResult
from ks_keras.experiment import Experiment, check_classes
from ks_keras.folds import Fold, make_folds, rotate_validation
from ks_keras.metrics import compute_metrics
from ks_keras.training.callbacks import CHECKPOINT_DIR, LAST_EPOCH

# ---------------------------------------------------------------------------------------------
# Running


def baseline_normalization(cfg: Config) -> str:
    """The normalisation the baseline gets: `eval.baseline.normalize`, where `auto` means the
    model's own `features.audio.normalize` (a fair comparison)."""
    mode = cfg.eval.baseline.normalize
    return cfg.features.audio.normalize if mode == "auto" else mode


def _baseline_row(corpus, folds, features, seed, classifier, normalize, feature_set) -> dict:
    rows = run_baseline(
        corpus, folds, features, seed=seed, classifier=classifier, normalize=normalize
    )
    n = len(corpus.labels)
    truth = np.concatenate([r["y_true"] for r in rows])
    pred = np.concatenate([r["y_pred"] for r in rows])
    pooled = compute_metrics(truth, pred, n)
    per_fold = {r["fold"]: compute_metrics(r["y_true"], r["y_pred"], n) for r in rows}
    return {
        "method": describe(feature_set, classifier, normalize) + ", C chosen on training speakers",
        "normalize": normalize,
        "wa": pooled["wa"],
        "ua": pooled["ua"],
        "macro_f1": pooled["macro_f1"],
        "folds": {k: {m: v[m] for m in ("wa", "ua", "macro_f1")} for k, v in per_fold.items()},
        "predictions": {r["fold"]: np.asarray(r["y_pred"]).tolist() for r in rows},
        "C": {r["fold"]: r["C"] for r in rows},
    }


def baseline_metrics(
    corpus: Corpus,
    folds: list[Fold],
    cache_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    *,
    feature_set: str = "egemaps",
    classifier: str = "linear_svm",
    normalize: str = "none",
    unnormalized_row: bool = False,
) -> dict:
    """The classical baseline on the same folds; `{"skipped": reason}` without opensmile.

    Returns the row with the requested normalisation (the fair one when `normalize` is the
    model's) with pooled `wa`/`ua`/`macro_f1`, per-fold metrics and predictions; with
    `unnormalized_row` and a normalised main row, also `"unnormalized"`: the same without the
    per-speaker step.
    """
    if not opensmile_available():
        return {
            "skipped": "opensmile is not installed (pip install -e '.[baseline]')",
            "method": describe(feature_set, classifier, normalize),
        }
    features = functionals(corpus, cache_dir, feature_set, progress=progress)
    out = _baseline_row(corpus, folds, features, seed, classifier, normalize, feature_set)
    if unnormalized_row and normalize == "speaker":
        out["unnormalized"] = _baseline_row(
            corpus, folds, features, seed, classifier, "none", feature_set
        )
    return out


def cross_validate(
    cfg: Config,
    corpus: Corpus,
    cache,
    run_dir: str | Path,
    *,
    protocol: str | None = None,
    repeats: int | None = None,
    max_folds: int | None = None,
    verbose: int | str = "auto",
    log=print,
    functionals: dict | None = None,
) -> CVResult:
    """Train and test one model per fold and repeat.

    Args:
        cfg: full config; `eval` gives folds/protocol/repeats unless overridden here.
        corpus: the utterances (labels in `corpus.labels` order = class ids).
        cache: the feature cache (`ks_keras.features.cache.FeatureCache`).
        run_dir: per-fold training folders go to `run_dir/runs/`.
        protocol: "honest" (default from config) or "paper".
        repeats: number of seeds (`train.seed + r`).
        max_folds: only the first N folds.
        verbose: Keras progress-bar verbosity for `fit`.
        log: where one-line progress messages go.
        functionals: `{id: [D]}` openSMILE functionals for the model's `functionals` input
            (`ks_keras.features.functionals.model_functionals`); built here when None and the
            config asks for them.

    Returns:
        A `CVResult` (pass it to `write_report`).
    """
    protocol = protocol or cfg.eval.protocol
    repeats = repeats or cfg.eval.repeats
    eval_cfg = replace(cfg.eval, protocol=protocol, repeats=repeats)
    cfg = replace(cfg, eval=eval_cfg)
    check_classes(cfg, corpus)
    folds = make_folds(corpus, eval_cfg, seed=cfg.train.seed, max_folds=max_folds)
    if functionals is None and cfg.features.functionals != "none":
        from ks_keras.features.functionals import model_functionals

        functionals = model_functionals(cfg, corpus, progress=False)
    run_dir = Path(run_dir)
    exp = Experiment(cfg, corpus, cache, functionals)
    label_of, speaker_of = exp.label_of, exp.speaker_of
    results = []
    total = repeats * len(folds)
    # What stands in for validation speakers: the test fold under the paper protocol, nothing
    # under `eval.val_speakers: 0` (fixed schedule, last epoch).
    no_val = "test fold" if protocol == "paper" else "none: fixed schedule, last epoch"
    for r in range(repeats):
        seed = cfg.train.seed + r
        for fold in folds:
            done = len(results)
            log(
                f"[{done + 1}/{total}] repeat {r + 1}/{repeats}, fold {fold.name}: "
                f"train {len(fold.train_ids)} ({', '.join(fold.train_speakers)}), "
                f"val {len(fold.val_ids)} ({', '.join(fold.val_speakers) or no_val}), "
                f"test {len(fold.test_ids)}"
            )
            started = time.perf_counter()
            members = []
            for j in range(cfg.train.ensemble):
                member_fold = (
                    rotate_validation(corpus, fold, j)
                    if cfg.train.ensemble_val == "rotate"
                    else fold
                )
                member_exp = exp.with_normalizer(
                    member_fold.train_ids, member_fold.val_ids + member_fold.test_ids
                )
                fold_cfg = replace(cfg, train=replace(cfg.train, seed=member_seed(seed, j)))
                tag = f"repeat{r}_fold{fold.index}" + (f"_member{j}" if j else "")
                if cfg.train.ensemble > 1:
                    log(
                        f"    member {j + 1}/{cfg.train.ensemble} (seed {fold_cfg.train.seed}, "
                        f"val {', '.join(member_fold.val_speakers) or no_val})"
                    )
                members.append(
                    _fit_fold_member(
                        member_exp, fold_cfg, member_fold, protocol, run_dir / "runs" / tag, verbose
                    )
                )
                if cfg.train.ensemble > 1 and members[-1][0].epochs_run == 0:
                    log("      finished training reused")
            result = members[0][0]
            probs = np.mean([p for _, p, _ in members], axis=0)
            y_true = np.array([label_of[i] for i in fold.test_ids])
            y_pred = np.argmax(probs, axis=-1)
            metrics = compute_metrics(y_true, y_pred, cfg.model.num_classes)
            seconds = time.perf_counter() - started
            # Best validation UA of each member (none without validation speakers: the
            # "epoch" monitor's value is the epoch index, not a score).
            best_values = [
                m[0].best_value
                for m in members
                if m[0].best_value is not None and m[0].monitor != LAST_EPOCH
            ]
            ensemble_values = [m[2] for m in members if m[2] is not None]
            if cfg.eval.fixed_schedule:
                val_note = "no validation speakers: last epoch"
            elif best_values:
                val_note = f"val UA {np.mean(best_values):.3f}"
            else:
                val_note = "no finite val UA"
            if ensemble_values:
                k = cfg.train.checkpoint_ensemble
                val_note += f", {k}-checkpoint ensemble {np.mean(ensemble_values):.3f}"
            log(
                f"    best epoch {None if result.best_epoch is None else result.best_epoch + 1}"
                f" ({val_note}); test WA {metrics['wa']:.3f} "
                f"UA {metrics['ua']:.3f} F1 {metrics['macro_f1']:.3f} [{seconds:.0f}s"
                + (
                    ", finished training reused"
                    if all(m[0].epochs_run == 0 for m in members)
                    else ""
                )
                + "]"
            )
            results.append(
                FoldResult(
                    r,
                    seed,
                    fold,
                    y_true,
                    y_pred,
                    metrics,
                    result.best_epoch,
                    result.history,
                    seconds,
                    best_values,
                    probs,
                    ensemble_values,
                )
            )
            last_model = result.model
    cv = CVResult(cfg, list(corpus.labels), corpus.name, protocol, folds, results, repeats)
    try:
        cv.attention = attention_examples(
            last_model,
            cache,
            folds[-1].test_ids[:3],
            cfg,
            normalizer=fold_normalizer(cfg, cache, corpus, folds[-1]),
            speaker_of=speaker_of,
            functionals=functionals,
        )
    except Exception as e:  # a plot must never sink a finished evaluation
        log(f"    (attention plot skipped: {e})")
    return cv


def _fit_fold_member(exp: Experiment, fold_cfg: Config, fold: Fold, protocol, run_dir, verbose):
    """Train one model on a fold (reusing a finished one); returns `(FitResult, test
    probabilities [n_test, C], validation UA of its checkpoint ensemble or None)`. `exp`
    carries the fold's normalisation statistics."""
    from ks_keras.training import write_json_atomic

    # Length-bucketed batches for training and prediction alike (test and validation
    # batches come sorted by length; `exp.predict` puts the test predictions back in order).
    test_ds = exp.dataset(fold.test_ids, False)
    if protocol != "honest":
        val_ds = test_ds
    else:  # no validation speakers (`eval.val_speakers: 0`): fixed schedule, last epoch
        val_ds = exp.dataset(fold.val_ids, False) if fold.val_ids else None
    identity = _member_identity(fold_cfg, fold, protocol)
    result = finished_member(fold_cfg, run_dir, identity)
    if result is None:
        # A record of an earlier, different training must not outlive this one if it is
        # killed: the folder is about to hold other weights.
        (Path(run_dir) / FINISHED_FILE).unlink(missing_ok=True)
        result = exp.fit(fold_cfg, fold.train_ids, val_ds, run_dir, verbose=verbose)
        write_json_atomic(Path(run_dir) / FINISHED_FILE, identity)
    if not result.checkpoints:
        return result, exp.predict_probabilities(result, fold.test_ids, test_ds), None
    # Checkpoint ensemble: every checkpoint's probabilities are kept next to the checkpoints
    # (`probabilities.npz`: `test`, `val` [k, n, C], best first, and the ids), so the effect
    # of k can be read from one run (`scripts/checkpoint_ensemble_sweep.py`).
    test_each = exp.predict_probabilities(result, fold.test_ids, test_ds, each=True)
    arrays = {
        "test": test_each,
        "test_ids": np.array(fold.test_ids),
        "test_labels": np.array(exp.labels_of(fold.test_ids)),
    }
    val_ua = None
    if protocol == "honest" and fold.val_ids:
        # The checkpoint ensemble's own validation UA (its epochs were chosen on these
        # speakers, so it is optimistic like the best epoch's value, but comparable to it).
        val_each = exp.predict_probabilities(result, fold.val_ids, val_ds, each=True)
        arrays.update(
            val=val_each,
            val_ids=np.array(fold.val_ids),
            val_labels=np.array(exp.labels_of(fold.val_ids)),
            val_speakers=np.array([exp.speaker_of[i] for i in fold.val_ids]),
        )
        n = exp.cfg.model.num_classes
        val_pred = val_each.mean(0).argmax(-1)
        val_ua = compute_metrics(exp.labels_of(fold.val_ids), val_pred, n)["ua"]
    np.savez(Path(run_dir) / CHECKPOINT_DIR / "probabilities.npz", **arrays)
    return result, test_each.mean(0), val_ua


# A member's run folder gets this record once its training has finished; a re-run of the same
# evaluation (same report folder) reuses the finished member instead of training it again, so
# a killed multi-hour cross-validation loses at most the member that was training (which
# itself resumes from its backup).
FINISHED_FILE = "finished.json"


def _member_identity(fold_cfg: Config, fold: Fold, protocol: str) -> dict:
    """What a finished member was trained on: config, protocol and the fold's utterances."""
    import hashlib

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    return {
        "config": digest(fold_cfg.to_dict()),
        "protocol": protocol,
        "train_ids": digest(sorted(fold.train_ids)),
        "val_ids": digest(sorted(fold.val_ids)),
        "test_ids": digest(sorted(fold.test_ids)),
    }


# Config keys that do not change what one member trains: how many seeds or checkpoints are
# combined, and bookkeeping (the member's own utterances and protocol are compared
# separately). A finished member is reused across them, so growing an ensemble from 3 to 5
# seeds trains only the new members, and a run that kept k checkpoints serves any k' <= k.
MEMBER_NEUTRAL_KEYS = (
    "train.ensemble",
    "train.ensemble_val",
    "train.checkpoint_ensemble",
    "train.output_dir",
    "features.cache_dir",
    "eval",
    "export",
)


def _training_part(config: dict) -> dict:
    """A config dict without `MEMBER_NEUTRAL_KEYS`."""
    out = {
        section: dict(values) if isinstance(values, dict) else values
        for section, values in config.items()
    }
    for key in MEMBER_NEUTRAL_KEYS:
        section, _, name = key.partition(".")
        if not name:
            out.pop(section, None)
        elif isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def _saved_training_config(run_dir: Path) -> dict | None:
    """The config a finished member was trained with (its `config.yaml`), as a dict."""
    import yaml

    from ks_keras.config import from_dict

    try:
        return from_dict(
            Config, yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        ).to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return None


def finished_member(fold_cfg: Config, run_dir: str | Path, identity: dict):
    """The `FitResult` of a member that already finished in `run_dir`, or None.

    Reused only when its `finished.json` names the same protocol and the same train,
    validation and test utterances as `identity`, it was trained with the same config up to
    `MEMBER_NEUTRAL_KEYS`, it kept at least the `train.checkpoint_ensemble` checkpoints asked
    for, and its best weights, best epoch and history are there.
    """
    from ks_keras.model import build_model
    from ks_keras.training import BEST_WEIGHTS, FitResult, history_columns
    from ks_keras.training.loop import top_checkpoints

    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / FINISHED_FILE).read_text())
        best = json.loads((run_dir / "best.json").read_text())
        epochs = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(
        record.get(k) != v for k, v in identity.items() if k != "config"
    ):
        return None
    kept = fold_cfg.train.checkpoint_ensemble
    if record.get("config") != identity["config"]:
        saved = _saved_training_config(run_dir)
        if saved is None or _training_part(saved) != _training_part(fold_cfg.to_dict()):
            return None
        kept = saved["train"]["checkpoint_ensemble"]
    wanted = fold_cfg.train.checkpoint_ensemble
    if not (run_dir / BEST_WEIGHTS).is_file() or (wanted > 1 and kept < wanted):
        return None
    checkpoints = top_checkpoints(run_dir)[:wanted] if wanted > 1 else []
    if wanted > 1 and not checkpoints:
        return None
    model = build_model(fold_cfg)
    try:
        model.load_weights(run_dir / BEST_WEIGHTS)
    except Exception:  # torn or foreign weights: train again
        return None
    return FitResult(
        checkpoints=checkpoints,
        model=model,
        history=history_columns(epochs),
        best_epoch=best.get("epoch"),
        best_value=best.get("value"),
        monitor=best.get("monitor", "val_ua"),
        run_dir=run_dir,
        initial_epoch=len(epochs),
        epochs_run=0,
    )
