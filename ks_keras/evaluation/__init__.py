"""Cross-validated training and evaluation, with reports a reviewer can trust.

`cross_validate` trains one model per fold (and per repeat, with a different seed each time),
picks each fold's best epoch on its **validation speakers** (honest protocol, default) or on
the test fold (the authors' "paper" protocol, labelled so everywhere), scores the test fold
once, and aggregates WA / UA / macro-F1 / confusion matrices. `write_report` turns the result
into a report folder:

```
metrics.json            everything below, machine-readable (+ config, versions, git commit)
folds.csv               one row per repeat × fold: speakers, sizes, best epoch, WA/UA/F1
confusion_matrix.csv    row-normalised confusion (true × predicted), pooled over folds
confusion_matrix.png    the same as a heat map (as paper Fig. 6)
curves.png              loss and UA per epoch, train and validation, every fold
attention.png           dense vs key-sparse weights and kept keys for a few test utterances
config.yaml             the resolved config
```
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.baseline import describe, functionals, opensmile_available, run_baseline
from ks_keras.config import Config, save_config
from ks_keras.corpora.manifest import Corpus
from ks_keras.ensemble import member_seed
from ks_keras.folds import Fold, make_folds, rotate_validation
from ks_keras.info import package_versions
from ks_keras.metrics import compute_metrics, normalize_confusion

PAPER_PROTOCOL_NOTE = (
    "PAPER PROTOCOL (optimistic): the best epoch of each fold was chosen on the test fold, "
    "as in the authors' code; these numbers are not an unbiased estimate."
)
HONEST_PROTOCOL_NOTE = (
    "Honest protocol: each fold's best epoch was chosen on validation speakers held out from "
    "its training speakers; the test speakers were used once, for the final score."
)


@dataclass
class FoldResult:
    repeat: int
    seed: int
    fold: Fold
    y_true: np.ndarray
    y_pred: np.ndarray
    metrics: dict
    best_epoch: int | None
    history: dict[str, list[float]]
    seconds: float
    # Best monitored validation value of each ensemble member (empty if never finite).
    val_values: list[float] = field(default_factory=list)
    # Test-fold class probabilities [n_test, C] (the ensemble's mean).
    probs: np.ndarray | None = field(default=None, repr=False)


@dataclass
class CVResult:
    """Everything `cross_validate` measured."""

    config: Config
    labels: list[str]
    corpus_name: str
    protocol: str
    folds: list[Fold]
    results: list[FoldResult]
    repeats: int
    baseline: dict | None = None
    attention: dict | None = field(default=None, repr=False)

    @property
    def title(self) -> str:
        base = f"KS-T + CCAB on {self.corpus_name} ({len(self.labels)} classes)"
        if self.protocol == "paper":
            return f"{base} - PAPER PROTOCOL (best epoch chosen on the test fold)"
        return f"{base} - speaker-independent, validation speakers held out"


def _pooled(results: list[FoldResult], n_classes: int) -> dict:
    truth = np.concatenate([r.y_true for r in results])
    pred = np.concatenate([r.y_pred for r in results])
    return compute_metrics(truth, pred, n_classes)


def summarize(cv: CVResult) -> dict:
    """Per-repeat pooled metrics and their mean ± std; fold-averaged metrics too."""
    n = len(cv.labels)
    per_repeat = []
    for r in range(cv.repeats):
        rows = [x for x in cv.results if x.repeat == r]
        if not rows:
            continue
        pooled = _pooled(rows, n)
        fold_mean = {
            k: float(np.mean([x.metrics[k] for x in rows])) for k in ("wa", "ua", "macro_f1")
        }
        per_repeat.append({"repeat": r, "pooled": pooled, "fold_mean": fold_mean})

    def stats(getter):
        values = np.array([getter(p) for p in per_repeat], float)
        return {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}

    confusion = sum(p["pooled"]["confusion"] for p in per_repeat)
    out = {
        "pooled": {k: stats(lambda p, k=k: p["pooled"][k]) for k in ("wa", "ua", "macro_f1")},
        "fold_mean": {k: stats(lambda p, k=k: p["fold_mean"][k]) for k in ("wa", "ua", "macro_f1")},
        "confusion": np.asarray(confusion).tolist(),
        "confusion_normalized": normalize_confusion(confusion).tolist(),
    }
    if cv.baseline is not None and cv.baseline.get("folds"):
        out["baseline"] = {
            k: v for k, v in cv.baseline.items() if k not in ("folds", "predictions", "C")
        }
        comparison = compare_with_baseline(cv)
        if comparison is not None:
            out["comparison"] = comparison
    return out


def compare_with_baseline(cv: CVResult) -> dict | None:
    """Model vs the (fair) baseline on the same folds and utterances.

    Per fold (speaker): the model's UA as mean ± std over repeats next to the baseline's UA;
    how many folds the model wins / loses / ties, with the exact sign test; and a paired
    bootstrap interval of the pooled UA difference (utterances resampled within folds).
    None when the report has no baseline predictions.
    """
    from ks_keras.stats import paired_bootstrap_ua, sign_test

    base = cv.baseline or {}
    predictions = base.get("predictions")
    if "skipped" in base or not predictions or not cv.results:
        return None
    predictions = {int(k): v for k, v in predictions.items()}
    base_folds = {int(k): v for k, v in base["folds"].items()}
    folds = [f for f in cv.folds if f.index in predictions and f.index in base_folds]
    per_fold, wins, losses = [], 0, 0
    for fold in folds:
        uas = [r.metrics["ua"] for r in cv.results if r.fold.index == fold.index]
        if not uas:
            continue
        mean, base_ua = float(np.mean(uas)), float(base_folds[fold.index]["ua"])
        wins += mean > base_ua + 1e-9
        losses += mean < base_ua - 1e-9
        per_fold.append(
            {
                "fold": fold.index,
                "name": fold.name,
                "model_ua_mean": mean,
                "model_ua_std": float(np.std(uas)),
                "baseline_ua": base_ua,
            }
        )
    repeats = sorted({r.repeat for r in cv.results})
    by_key = {(r.repeat, r.fold.index): r for r in cv.results}
    complete = [rep for rep in repeats if all((rep, f.index) in by_key for f in folds)]
    out = {
        "per_fold": per_fold,
        "wins": int(wins),
        "losses": int(losses),
        "ties": len(per_fold) - int(wins) - int(losses),
        "sign_test_p": sign_test(int(wins), int(losses)),
    }
    if complete and folds:
        y_true = np.concatenate([by_key[(complete[0], f.index)].y_true for f in folds])
        model_preds = np.stack(
            [np.concatenate([by_key[(rep, f.index)].y_pred for f in folds]) for rep in complete]
        )
        base_pred = np.concatenate([np.asarray(predictions[f.index]) for f in folds])
        groups = np.concatenate([np.full(len(f.test_ids), f.index) for f in folds])
        out["bootstrap"] = paired_bootstrap_ua(
            y_true, model_preds, base_pred, len(cv.labels), groups=groups, seed=cv.config.train.seed
        )
    return out


# ---------------------------------------------------------------------------------------------
# Running


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}"
        )
    folds = make_folds(corpus, eval_cfg, seed=cfg.train.seed, max_folds=max_folds)
    if functionals is None and cfg.features.functionals != "none":
        from ks_keras.features.functionals import model_functionals

        functionals = model_functionals(cfg, corpus, progress=False)
    run_dir = Path(run_dir)
    label_of = dict(zip(corpus.ids, corpus.label_ids().tolist(), strict=True))
    speaker_of = corpus.speaker_of()
    results = []
    total = repeats * len(folds)
    for r in range(repeats):
        seed = cfg.train.seed + r
        for fold in folds:
            done = len(results)
            log(
                f"[{done + 1}/{total}] repeat {r + 1}/{repeats}, fold {fold.name}: "
                f"train {len(fold.train_ids)} ({', '.join(fold.train_speakers)}), "
                f"val {len(fold.val_ids)} ({', '.join(fold.val_speakers) or 'test fold'}), "
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
                normalizer = fold_normalizer(cfg, cache, corpus, member_fold)
                fold_cfg = replace(cfg, train=replace(cfg.train, seed=member_seed(seed, j)))
                tag = f"repeat{r}_fold{fold.index}" + (f"_member{j}" if j else "")
                if cfg.train.ensemble > 1:
                    log(
                        f"    member {j + 1}/{cfg.train.ensemble} (seed {fold_cfg.train.seed}, "
                        f"val {', '.join(member_fold.val_speakers) or 'test fold'})"
                    )
                members.append(
                    _fit_fold_member(
                        fold_cfg,
                        cache,
                        member_fold,
                        label_of,
                        speaker_of,
                        normalizer,
                        protocol,
                        run_dir / "runs" / tag,
                        verbose,
                        functionals,
                    )
                )
            result = members[0][0]
            probs = np.mean([p for _, p in members], axis=0)
            y_true = np.array([label_of[i] for i in fold.test_ids])
            y_pred = np.argmax(probs, axis=-1)
            metrics = compute_metrics(y_true, y_pred, cfg.model.num_classes)
            seconds = time.perf_counter() - started
            best_values = [m[0].best_value for m in members if m[0].best_value is not None]
            val_note = f"val UA {np.mean(best_values):.3f}" if best_values else "no finite val UA"
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


def _fit_fold_member(
    fold_cfg: Config,
    cache,
    fold: Fold,
    label_of: dict[str, int],
    speaker_of: dict[str, str],
    normalizer,
    protocol: str,
    run_dir: Path,
    verbose,
    functionals=None,
):
    """Train one model on a fold; returns `(FitResult, test probabilities [n_test, C])`."""
    from ks_keras.data import bucketing, length_order, make_dataset, restore_order
    from ks_keras.model import build_model
    from ks_keras.training import balanced_class_weights, fit, write_json_atomic

    seed = fold_cfg.train.seed
    # Length-bucketed batches for training and prediction alike (test and validation
    # batches come sorted by length; the test predictions are put back in fold order).
    bucket = bucketing(fold_cfg)

    def dataset(ids, shuffle):
        return make_dataset(
            cache,
            ids,
            [label_of[i] for i in ids],
            fold_cfg.data,
            batch_size=fold_cfg.train.batch_size,
            shuffle=shuffle,
            bucket_by_length=bucket,
            seed=seed,
            modalities=fold_cfg.model.modalities,
            normalizer=normalizer,
            speaker_of=speaker_of,
            num_classes=fold_cfg.model.num_classes,
            functionals=functionals,
        )

    train_ds = dataset(fold.train_ids, True)
    test_ds = dataset(fold.test_ids, False)
    val_ds = dataset(fold.val_ids, False) if protocol == "honest" else test_ds
    class_weight = None
    if fold_cfg.data.class_weights:
        class_weight = balanced_class_weights(
            [label_of[i] for i in fold.train_ids], fold_cfg.model.num_classes
        )
    identity = _member_identity(fold_cfg, fold, protocol)
    result = finished_member(fold_cfg, run_dir, identity)
    if result is None:
        result = fit(
            lambda: build_model(fold_cfg),
            train_ds,
            val_ds,
            fold_cfg,
            run_dir,
            class_weight=class_weight,
            monitor="val_ua",
            verbose=verbose,
        )
        write_json_atomic(Path(run_dir) / FINISHED_FILE, identity)
    logits = np.asarray(result.model.predict(test_ds, verbose=0), np.float64)
    if bucket:
        order = length_order(cache, fold.test_ids, fold_cfg.data, fold_cfg.model.modalities)
        logits = restore_order(logits, order)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return result, probs / probs.sum(axis=-1, keepdims=True)


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


def finished_member(fold_cfg: Config, run_dir: str | Path, identity: dict):
    """The `FitResult` of a member that already finished in `run_dir`, or None.

    Reused only when its `finished.json` matches `identity` (same config, same train,
    validation and test utterances) and its best weights, best epoch and history are there.
    """
    from ks_keras.model import build_model
    from ks_keras.training import BEST_WEIGHTS, FitResult, history_columns

    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / FINISHED_FILE).read_text())
        best = json.loads((run_dir / "best.json").read_text())
        epochs = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        return None
    if record != identity or not (run_dir / BEST_WEIGHTS).is_file():
        return None
    model = build_model(fold_cfg)
    try:
        model.load_weights(run_dir / BEST_WEIGHTS)
    except Exception:  # torn or foreign weights: train again
        return None
    return FitResult(
        model=model,
        history=history_columns(epochs),
        best_epoch=best.get("epoch"),
        best_value=best.get("value"),
        monitor=best.get("monitor", "val_ua"),
        run_dir=run_dir,
        initial_epoch=len(epochs),
        epochs_run=0,
    )


# ---------------------------------------------------------------------------------------------
# Attention maps (paper Fig. 7)


def fold_normalizer(cfg: Config, cache, corpus: Corpus, fold: Fold):
    """Audio normalisation statistics for one fold (`features.audio.normalize`).

    `global`: mean/std of the fold's training speakers only. `speaker`: every speaker of the
    fold with its own statistics (unsupervised: labels are never used), test speakers included.
    """
    from ks_keras.data import compute_norm_stats

    mode = cfg.features.audio.normalize
    if mode == "none" or "audio" not in cfg.model.modalities:
        return None
    ids = fold.train_ids if mode == "global" else fold.train_ids + fold.val_ids + fold.test_ids
    return compute_norm_stats(cache, ids, mode, speaker_of=corpus.speaker_of())


def attention_examples(
    model,
    cache,
    ids: list[str],
    cfg: Config,
    layer_name: str | None = None,
    normalizer=None,
    speaker_of=None,
    functionals=None,
):
    """Dense and key-sparse weights of one KS self-attention layer for a few utterances.

    The layer defaults to the first audio DFM layer (or the first key-sparse layer found).
    Returns `{"layer", "ids", "lengths", "dense" [n, T, T], "sparse" [n, T, T] (first head),
    "kept_head" [n, T] (first head's kept keys), "kept" [n, T] (fraction of heads keeping each
    key)}`.
    """
    import keras

    from ks_keras.data import load_arrays
    from ks_keras.layers import TransformerLayer
    from ks_keras.layers.masks import pair_mask

    candidates = [
        layer for layer in model.layers if isinstance(layer, TransformerLayer) and layer.key_sparse
    ]
    if layer_name:
        candidates = [layer for layer in candidates if layer.name == layer_name]
    if not candidates:
        return None
    layer = candidates[0]
    modality = "audio" if layer.name.startswith("audio") else "text"
    inputs = load_arrays(
        cache,
        ids,
        cfg.data,
        modalities=cfg.model.modalities,
        normalizer=normalizer,
        speaker_of=speaker_of,
        functionals=functionals,
    )
    node_input = layer._inbound_nodes[0].arguments.args[0]
    x = np.asarray(keras.Model(model.input, node_input)(inputs))
    mask = inputs[f"{modality}_mask"]
    if layer.input_norm is not None:
        x = layer.input_norm(x)
    if layer.positional is not None:
        x = layer.positional(x)
    details = layer.attention.attention_details(
        x, x, attention_mask=pair_mask(mask, mask, x.shape[1], x.shape[1])
    )
    return {
        "layer": layer.name,
        "sparsity": layer.sparsity,
        "ids": list(ids),
        "lengths": mask.sum(axis=1).tolist(),
        # One head shows the zeroed columns; averaging heads would blur them.
        "dense": np.asarray(details["dense"])[:, 0],
        "sparse": np.asarray(details["sparse"])[:, 0],
        "kept_head": np.asarray(details["kept"])[:, 0],
        "kept": np.asarray(details["kept"], np.float32).mean(axis=1),
    }


# ---------------------------------------------------------------------------------------------
# Reports


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _baseline_line(b: dict) -> str:
    return (
        f"  baseline      WA {b['wa']:.3f}           UA {b['ua']:.3f}"
        f"           F1 {b['macro_f1']:.3f}   ({b['method']})"
    )


def results_table(cv: CVResult, summary: dict | None = None) -> str:
    """Plain-text table: one row per fold (mean ± std over repeats), the pooled figures, the
    baseline(s) on the same folds, and how the model compares with the (fair) baseline."""
    summary = summary or summarize(cv)
    baseline_folds = (cv.baseline or {}).get("folds") or {}
    baseline_folds = {int(k): v for k, v in baseline_folds.items()}
    several = cv.repeats > 1
    lines = [cv.title]
    if cv.protocol == "paper":
        lines.append(PAPER_PROTOCOL_NOTE)
    ua_head = "UA ± sd" if several else "UA"
    header = f"{'fold':<22}{'test':>6}{'WA':>8}{ua_head:>{16 if several else 8}}{'F1':>8}"
    if baseline_folds:
        header += f"{'base UA':>10}"
    lines += [header, "-" * len(header)]
    for fold in cv.folds:
        rows = [r for r in cv.results if r.fold.index == fold.index]
        m = {k: np.mean([r.metrics[k] for r in rows]) for k in ("wa", "ua", "macro_f1")}
        ua = f"{m['ua']:.3f}"
        if several:
            ua = f"{m['ua']:.3f} ± {np.std([r.metrics['ua'] for r in rows]):.3f}"
        line = (
            f"{fold.name:<22}{len(fold.test_ids):>6}{m['wa']:>8.3f}{ua:>{16 if several else 8}}"
            f"{m['macro_f1']:>8.3f}"
        )
        if baseline_folds:
            b = baseline_folds.get(fold.index)
            line += f"{b['ua']:>10.3f}" if b else f"{'-':>10}"
        lines.append(line)
    lines.append("-" * len(header))
    p = summary["pooled"]
    lines.append(f"overall (pooled over folds, mean ± std over {cv.repeats} repeat(s)):")
    ensemble = cv.config.train.ensemble
    name = "KS-T + CCAB" if ensemble == 1 else f"KS-T + CCAB, {ensemble}-seed ensemble"
    lines.append(f"  {name}")
    lines.append(f"  {'':<12}  WA {_fmt(p['wa'])}   UA {_fmt(p['ua'])}   F1 {_fmt(p['macro_f1'])}")
    if cv.baseline:
        if "skipped" in cv.baseline:
            lines.append(f"  baseline      skipped: {cv.baseline['skipped']}")
        else:
            lines.append(_baseline_line(cv.baseline))
            if cv.baseline.get("unnormalized"):
                lines.append(_baseline_line(cv.baseline["unnormalized"]))
    comparison = summary.get("comparison")
    if comparison:
        n = len(comparison["per_fold"])
        lines.append(
            f"model vs baseline ({cv.baseline.get('normalize', 'none')} normalisation, same "
            f"folds): better on {comparison['wins']} of {n} folds, worse on "
            f"{comparison['losses']} (sign test p = {comparison['sign_test_p']:.3f})"
        )
        boot = comparison.get("bootstrap")
        if boot:
            lines.append(
                f"  pooled UA difference {boot['diff']:+.3f}, "
                f"{boot['confidence']:.0%} paired bootstrap interval "
                f"[{boot['low']:+.3f}, {boot['high']:+.3f}] "
                f"(test utterances resampled within folds, {boot['n_boot']} sets)"
            )
    return "\n".join(lines)


def write_report(cv: CVResult, report_dir: str | Path) -> Path:
    """Write the report folder (see module docstring); returns its path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(cv)
    save_config(cv.config, report_dir / "config.yaml")

    with open(report_dir / "folds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "repeat",
                "seed",
                "fold",
                "name",
                "test_speakers",
                "val_speakers",
                "n_train",
                "n_val",
                "n_test",
                "best_epoch",
                "wa",
                "ua",
                "macro_f1",
                "seconds",
            ]
        )
        for r in cv.results:
            writer.writerow(
                [
                    r.repeat,
                    r.seed,
                    r.fold.index,
                    r.fold.name,
                    " ".join(r.fold.test_speakers),
                    " ".join(r.fold.val_speakers),
                    len(r.fold.train_ids),
                    len(r.fold.val_ids),
                    len(r.fold.test_ids),
                    None if r.best_epoch is None else r.best_epoch + 1,
                    f"{r.metrics['wa']:.4f}",
                    f"{r.metrics['ua']:.4f}",
                    f"{r.metrics['macro_f1']:.4f}",
                    f"{r.seconds:.1f}",
                ]
            )

    confusion = np.asarray(summary["confusion_normalized"])
    with open(report_dir / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *cv.labels])
        for label, row in zip(cv.labels, confusion, strict=True):
            writer.writerow([label, *[f"{v:.4f}" for v in row]])

    metrics = {
        "title": cv.title,
        "protocol": cv.protocol,
        "protocol_note": PAPER_PROTOCOL_NOTE if cv.protocol == "paper" else HONEST_PROTOCOL_NOTE,
        "corpus": cv.corpus_name,
        "labels": cv.labels,
        "repeats": cv.repeats,
        "folds": [f.summary() for f in cv.folds],
        "per_fold": [
            {
                "repeat": r.repeat,
                "fold": r.fold.index,
                "name": r.fold.name,
                "best_epoch": None if r.best_epoch is None else r.best_epoch + 1,
                **{k: r.metrics[k] for k in ("wa", "ua", "macro_f1")},
                "confusion": np.asarray(r.metrics["confusion"]).tolist(),
            }
            for r in cv.results
        ],
        **summary,
        "baseline": cv.baseline,
        "versions": package_versions(),
        "git_commit": _git_commit(),
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_jsonable))
    (report_dir / "results.txt").write_text(results_table(cv, summary) + "\n")
    try:
        plot_confusion(confusion, cv.labels, report_dir / "confusion_matrix.png", cv)
        plot_curves(cv, report_dir / "curves.png")
        if cv.attention is not None:
            plot_attention(cv.attention, report_dir / "attention.png")
    except ImportError as e:  # matplotlib is a dependency; be explicit if it is broken
        raise ImportError(f"plots need matplotlib: {e}") from e
    return report_dir


def _jsonable(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, cv: CVResult) -> None:
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n, 0.8 + 0.8 * n))
    im = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            v = confusion[i, j]
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if v > 0.5 else "black",
                fontsize=9,
            )
    title = "Confusion (row-normalised, pooled)"
    if cv.protocol == "paper":
        title += "\nPAPER PROTOCOL: epoch chosen on test fold"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(cv: CVResult, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    val_name = "test fold (paper protocol)" if cv.protocol == "paper" else "validation speakers"
    for r in cv.results:
        h = r.history
        epochs = np.arange(1, len(h.get("loss", [])) + 1)
        tag = f"{r.fold.name}" + (f" r{r.repeat}" if cv.repeats > 1 else "")
        line = axes[0].plot(epochs, h.get("loss", []), lw=1, alpha=0.8)[0]
        if "val_loss" in h:
            axes[0].plot(epochs, h["val_loss"], lw=1, ls="--", color=line.get_color())
        axes[1].plot(epochs, h.get("ua", []), lw=1, alpha=0.8, color=line.get_color(), label=tag)
        if "val_ua" in h:
            axes[1].plot(epochs, h["val_ua"], lw=1, ls="--", color=line.get_color())
        if r.best_epoch is not None and "val_ua" in h:
            axes[1].plot(
                r.best_epoch + 1, h["val_ua"][r.best_epoch], "o", color=line.get_color(), ms=4
            )
    axes[0].set_title("loss (solid: train, dashed: " + val_name + ")", fontsize=9)
    axes[1].set_title("UA (solid: train, dashed: " + val_name + "; dot: best epoch)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    if len(cv.results) <= 12:
        axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(cv.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(att: dict, path: Path) -> None:
    """Per utterance: dense weights, key-sparse weights, fraction of heads keeping each key."""
    plt = _plt()
    n = len(att["ids"])
    fig, axes = plt.subplots(
        n, 3, figsize=(12, 3.4 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1.2]}
    )
    for row, utt in enumerate(att["ids"]):
        length = int(att["lengths"][row])
        dense = att["dense"][row][:length, :length]
        sparse = att["sparse"][row][:length, :length]
        vmax = float(dense.max()) or 1.0
        axes[row, 0].imshow(dense, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        axes[row, 0].set_title(f"{utt}: dense weights (head 1)", fontsize=9)
        axes[row, 1].imshow(sparse, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        axes[row, 1].set_title(f"key-sparse, head 1 (sparsity {att['sparsity']:.2f})", fontsize=9)
        for ax in axes[row, :2]:
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        axes[row, 2].bar(
            np.arange(length), att["kept"][row][:length], width=1.0, color="tab:orange"
        )
        axes[row, 2].set_ylim(0, 1)
        axes[row, 2].set_xlabel("key")
        axes[row, 2].set_ylabel("fraction of heads keeping it")
        axes[row, 2].set_title("kept keys", fontsize=9)
    fig.suptitle(f"attention of key-sparse layer {att['layer']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# End to end: corpus → features → folds → baseline → training → report


def evaluate_corpus(
    cfg: Config,
    report_dir: str | Path,
    *,
    protocol: str | None = None,
    repeats: int | None = None,
    max_folds: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    verbose: int | str = "auto",
    log=print,
) -> tuple[CVResult, Path]:
    """Run the whole evaluation of `cfg` and write the report folder.

    Everything that can be checked before training is checked first (corpus, labels, folds,
    feature dims, strategy), so a bad setting fails in seconds, not after an hour.
    """
    from ks_keras.corpora import load_corpus
    from ks_keras.features import check_model_dims
    from ks_keras.features.cache import extract_corpus
    from ks_keras.training import get_strategy

    protocol = protocol or cfg.eval.protocol
    corpus = load_corpus(cfg.data)
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}; set model.num_classes or data.labels"
        )
    folds = make_folds(
        corpus, replace(cfg.eval, protocol=protocol), seed=cfg.train.seed, max_folds=max_folds
    )
    check_model_dims(cfg)
    get_strategy(cfg.train)  # fails now if the strategy is unavailable
    log(f"{corpus!r}; {len(folds)} fold(s), protocol {protocol}")
    cache = extract_corpus(cfg, corpus, progress=progress)

    base = None
    if baseline:
        b = cfg.eval.baseline
        method = describe(b.features, b.classifier, baseline_normalization(cfg))
        log(f"classical baseline ({method}) on the same folds ...")
        base = baseline_metrics(
            corpus,
            folds,
            Path(cfg.features.cache_dir) / "baseline",
            seed=cfg.train.seed,
            progress=progress,
            feature_set=b.features,
            classifier=b.classifier,
            normalize=baseline_normalization(cfg),
            unnormalized_row=b.unnormalized_row,
        )
    cv = cross_validate(
        cfg,
        corpus,
        cache,
        report_dir,
        protocol=protocol,
        repeats=repeats,
        max_folds=max_folds,
        verbose=verbose,
        log=log,
    )
    cv.baseline = base
    path = write_report(cv, report_dir)
    return cv, path


def run_evaluate(args) -> int:
    from ks_keras.config import load_config

    cfg = load_config(args.config, args.overrides)
    name = Path(args.config).stem if args.config else "default"
    report_dir = Path(args.report_dir or Path(cfg.eval.report_dir) / name)
    cv, path = evaluate_corpus(
        cfg,
        report_dir,
        protocol=args.protocol,
        repeats=args.repeats,
        max_folds=args.max_folds,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
        verbose=0 if args.no_progress else "auto",
    )
    print()
    print(results_table(cv))
    print(f"\nreport: {path}")
    return 0
