"""`ks-keras train`: one training run on a corpus, best epoch chosen on held-out speakers.

corpus (`data.*`) → cached features (`features.*`) → speaker split (`eval.val_speakers`
validation speakers, never seen in training; 0 = none: every speaker trains the fixed schedule
and the last epoch is kept) → `training.fit` → run folder.

Besides what `training.fit` writes (see `ks_keras.training`), the run folder gets:

```
best.keras + best.keras.json   the best epoch as a plain float32 model + the sidecar that
                               `ks-keras export` / `ks-keras predict` read; with
                               `train.ensemble: N`, one model averaging the N members'
                               probabilities (member k > 1 trains in `member_<k>/`)
split.json                     training and validation speakers and utterance counts
val_metrics.json               WA, UA, macro-F1 and confusion on the validation speakers
                               (absent with eval.val_speakers: 0)
norm_stats.json                audio normalisation statistics (when features.audio.normalize)
```

Running the same command again after a crash resumes from the last finished epoch (same
`--run-dir`). For cross-validated numbers use `ks-keras evaluate`.

Example:

    ks-keras train --config configs/emodb_demo.yaml --set train.epochs=30 --run-dir runs/emodb
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ks_keras.train_cli import split_speakers

NO_VALIDATION = "none: eval.val_speakers 0, fixed schedule, last epoch kept"


def run_train(args) -> int:
    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus
    from ks_keras.experiment import check_classes
    from ks_keras.features import check_model_dims
    from ks_keras.training import get_strategy

    cfg = load_config(args.config, args.overrides)
    # First: multi-worker collectives must be configured before any other TF op, and an
    # unavailable strategy must fail before minutes of feature extraction.
    strategy = get_strategy(cfg.train)
    corpus = load_corpus(cfg.data)
    check_classes(cfg, corpus, hint="; set model.num_classes or data.labels")
    check_model_dims(cfg)
    if cfg.eval.fixed_schedule:
        # No validation speakers: every speaker trains the fixed schedule, last epoch kept.
        train_speakers, val_speakers = sorted(corpus.speakers), []
    else:
        train_speakers, val_speakers = split_speakers(
            corpus, max(1, cfg.eval.val_speakers), cfg.train.seed
        )
    speaker_of = corpus.speaker_of()
    train_ids = [i for i in corpus.ids if speaker_of[i] in train_speakers]
    val_ids = [i for i in corpus.ids if speaker_of[i] in val_speakers]
    train_labels = corpus.label_ids(train_ids)
    if len(set(train_labels.tolist())) < 2:
        raise ValueError(
            f"training speakers {train_speakers} have only one class "
            f"({corpus.labels[int(train_labels[0])]}); training needs at least 2"
        )
    print(
        f"{corpus!r}\ntrain: {len(train_ids)} utterances ({', '.join(train_speakers)}); "
        f"validation: {len(val_ids)} ({', '.join(val_speakers) or NO_VALIDATION})",
        flush=True,
    )
    return _train(args, cfg, strategy, corpus, train_ids, val_ids, train_speakers, val_speakers)


def _train(args, cfg, strategy, corpus, train_ids, val_ids, train_speakers, val_speakers) -> int:
    from ks_keras.ensemble import checkpoint_copies, ensemble_model, member_seed
    from ks_keras.experiment import Experiment
    from ks_keras.metrics import compute_metrics
    from ks_keras.training import worker_role

    # Global statistics from training speakers only; per-speaker statistics need every
    # speaker that will be normalised (labels are never used).
    exp = Experiment.prepare(cfg, corpus, progress=not args.no_progress)
    exp = exp.with_normalizer(train_ids, val_ids)
    speaker_of = exp.speaker_of

    def member_split(j):
        """Member j's (train ids, val ids): other validation speakers under `rotate`."""
        if j == 0 or cfg.train.ensemble_val == "fixed" or not val_ids:
            return train_ids, val_ids
        _, member_val = split_speakers(corpus, len(val_speakers), cfg.train.seed + j)
        return (
            [i for i in corpus.ids if speaker_of[i] not in member_val],
            [i for i in corpus.ids if speaker_of[i] in member_val],
        )

    run_dir = Path(args.run_dir or Path(cfg.train.output_dir) / "train")
    # Length-bucketed batches for training and validation alike (validation batches come
    # sorted by length; `exp.predict` puts its predictions back in the order of `val_ids`).
    val_ds = exp.dataset(val_ids, False) if val_ids else None
    n_members = cfg.train.ensemble
    results = []
    for j in range(n_members):
        # Member 0 is the run itself (run-folder layout unchanged); others get a subfolder.
        member_cfg = replace(cfg, train=replace(cfg.train, seed=member_seed(cfg.train.seed, j)))
        member_train, member_val = member_split(j)
        if n_members > 1:
            speakers = sorted({speaker_of[i] for i in member_val})
            print(
                f"ensemble member {j + 1}/{n_members} (seed {member_cfg.train.seed}, "
                f"validation speakers {', '.join(speakers) or 'none'})",
                flush=True,
            )
        results.append(
            exp.fit(
                member_cfg,
                member_train,
                val_ds if j == 0 or not member_val else exp.dataset(member_val, False),
                run_dir if j == 0 else run_dir / f"member_{j + 1}",
                strategy=strategy,
            )
        )
    result = results[0]

    # A plain float32 copy of the best weights (no optimizer state, no strategy) for export,
    # prediction and the validation report; predicting with it needs no collective ops. An
    # ensemble (of seeds and/or of each member's best epochs, `train.checkpoint_ensemble`)
    # becomes one model averaging its members' probabilities.
    copies = [
        checkpoint_copies(cfg, member, "ks_transformer" if n_members == 1 else f"member_{j + 1}")
        for j, member in enumerate(results)
    ]
    plains = [m for member_copies in copies for m in member_copies]
    plain = plains[0] if len(plains) == 1 else ensemble_model(plains)
    # Under `rotate`, members 2.. trained on member 1's validation speakers: score member 1
    # alone there, so the validation figures stay held-out.
    scored = plain
    if n_members > 1 and cfg.train.ensemble_val == "rotate":
        scored = copies[0][0] if len(copies[0]) == 1 else ensemble_model(copies[0])
    metrics = None
    if val_ids:
        pred = exp.predict(scored, val_ids, val_ds).argmax(-1)
        metrics = compute_metrics(corpus.label_ids(val_ids), pred, cfg.model.num_classes)
    normalizer = exp.normalizer
    is_chief, _ = worker_role(strategy)
    if is_chief:
        # `global` statistics travel with the model (export applies them in-graph).
        exp.save(plain, run_dir / "best.keras")
        split = {
            "train_speakers": train_speakers,
            "val_speakers": val_speakers,
            "n_train": len(train_ids),
            "n_val": len(val_ids),
        }
        (run_dir / "split.json").write_text(json.dumps(split, indent=1))
        if metrics is not None:
            report = {
                **metrics,
                "confusion": metrics["confusion"].tolist(),
                "labels": corpus.labels,
            }
            report.update(best_epoch=result.best_epoch, monitor=result.monitor)
            (run_dir / "val_metrics.json").write_text(json.dumps(report, indent=1))
        else:  # a stale report of an earlier run in this folder must not pass for this one
            (run_dir / "val_metrics.json").unlink(missing_ok=True)
        if normalizer is not None:
            (run_dir / "norm_stats.json").write_text(json.dumps(normalizer.to_dict()))
    best = "none" if result.best_epoch is None else f"{result.best_epoch + 1}"
    if metrics is None:
        print(
            f"last epoch {best}/{cfg.train.epochs} kept (no validation speakers: trained on "
            f"all {len(train_speakers)} speakers{_checkpoint_note(results[0])})\n"
            f"run folder: {run_dir}" + (f"\nmodel: {run_dir / 'best.keras'}" if is_chief else ""),
            flush=True,
        )
        return 0
    print(
        f"best epoch {best}/{cfg.train.epochs} by {result.monitor}; validation speakers "
        f"({', '.join(val_speakers)}"
        f"{'; member 1 alone' if scored is not plain else ''}"
        f"{_checkpoint_note(results[0])}): WA {metrics['wa']:.3f} UA {metrics['ua']:.3f} "
        f"macro-F1 {metrics['macro_f1']:.3f}\nrun folder: {run_dir}"
        + (f"\nmodel: {run_dir / 'best.keras'}" if is_chief else ""),
        flush=True,
    )
    return 0


def _checkpoint_note(result) -> str:
    if not result.checkpoints:
        return ""
    epochs = ", ".join(str(e + 1) for e, _, _ in result.checkpoints)
    return f"; mean of epochs {epochs}"
