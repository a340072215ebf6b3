"""`ks-keras train`: one training run on a corpus, best epoch chosen on held-out speakers.

corpus (`data.*`) → cached features (`features.*`) → speaker split (`eval.val_speakers`
validation speakers, at least one, never seen in training) → `training.fit` → run folder.

Besides what `training.fit` writes (see `ks_keras.training`), the run folder gets:

```
best.keras + best.keras.json   the best epoch as a plain float32 model + the sidecar that
                               `ks-keras export` / `ks-keras predict` read; with
                               `train.ensemble: N`, one model averaging the N members'
                               probabilities (member k > 1 trains in `member_<k>/`)
split.json                     training and validation speakers and utterance counts
val_metrics.json               WA, UA, macro-F1 and confusion on the validation speakers
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


def run_train(args) -> int:
    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus
    from ks_keras.features import check_model_dims
    from ks_keras.training import get_strategy

    cfg = load_config(args.config, args.overrides)
    # First: multi-worker collectives must be configured before any other TF op, and an
    # unavailable strategy must fail before minutes of feature extraction.
    strategy = get_strategy(cfg.train)
    corpus = load_corpus(cfg.data)
    if len(corpus.labels) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes}, but the corpus has "
            f"{len(corpus.labels)} classes {corpus.labels}; set model.num_classes or data.labels"
        )
    check_model_dims(cfg)
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
        f"validation: {len(val_ids)} ({', '.join(val_speakers)})",
        flush=True,
    )
    return _train(args, cfg, strategy, corpus, train_ids, val_ids, train_speakers, val_speakers)


def _train(args, cfg, strategy, corpus, train_ids, val_ids, train_speakers, val_speakers) -> int:
    from ks_keras.data import (
        bucketing,
        compute_norm_stats,
        length_order,
        make_dataset,
        restore_order,
    )
    from ks_keras.ensemble import ensemble_model, member_seed
    from ks_keras.export import write_model_sidecar
    from ks_keras.features.cache import extract_corpus
    from ks_keras.features.functionals import model_functionals
    from ks_keras.metrics import compute_metrics
    from ks_keras.model import build_model
    from ks_keras.training import balanced_class_weights, fit, float32_copy, worker_role

    cache = extract_corpus(cfg, corpus, progress=not args.no_progress)
    functionals = model_functionals(cfg, corpus, progress=not args.no_progress)
    speaker_of = corpus.speaker_of()
    modalities = tuple(cfg.model.modalities)
    mode = cfg.features.audio.normalize
    normalizer = None
    if "audio" in modalities and mode != "none":
        # Global statistics from training speakers only; per-speaker statistics need every
        # speaker that will be normalised (labels are never used).
        norm_ids = train_ids if mode == "global" else train_ids + val_ids
        normalizer = compute_norm_stats(cache, norm_ids, mode, speaker_of)

    # Length-bucketed batches for training and validation alike (validation batches come
    # sorted by length; its predictions are put back in the order of `val_ids`).
    bucket = bucketing(cfg)

    def dataset(ids, shuffle, seed=cfg.train.seed):
        return make_dataset(
            cache,
            ids,
            corpus.label_ids(ids),
            cfg.data,
            batch_size=cfg.train.batch_size,
            shuffle=shuffle,
            bucket_by_length=bucket,
            seed=seed,
            modalities=modalities,
            normalizer=normalizer,
            speaker_of=speaker_of,
            num_classes=cfg.model.num_classes,
            functionals=functionals,
        )

    def member_split(j):
        """Member j's (train ids, val ids): other validation speakers under `rotate`."""
        if j == 0 or cfg.train.ensemble_val == "fixed":
            return train_ids, val_ids
        _, member_val = split_speakers(corpus, len(val_speakers), cfg.train.seed + j)
        return (
            [i for i in corpus.ids if speaker_of[i] not in member_val],
            [i for i in corpus.ids if speaker_of[i] in member_val],
        )

    class_weight = None
    if cfg.data.class_weights:
        class_weight = balanced_class_weights(corpus.label_ids(train_ids), cfg.model.num_classes)
    run_dir = Path(args.run_dir or Path(cfg.train.output_dir) / "train")
    val_ds = dataset(val_ids, False)
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
                f"validation speakers {', '.join(speakers)})",
                flush=True,
            )
        results.append(
            fit(
                lambda member_cfg=member_cfg: build_model(member_cfg),
                dataset(member_train, True, seed=member_cfg.train.seed),
                val_ds if j == 0 else dataset(member_val, False),
                member_cfg,
                run_dir if j == 0 else run_dir / f"member_{j + 1}",
                class_weight=class_weight,
                monitor="val_ua",
                strategy=strategy,
            )
        )
    result = results[0]

    # A plain float32 copy of the best weights (no optimizer state, no strategy) for export,
    # prediction and the validation report; predicting with it needs no collective ops. An
    # ensemble becomes one model averaging its members' probabilities.
    plains = [
        float32_copy(
            lambda j=j: build_model(
                cfg, name="ks_transformer" if n_members == 1 else f"member_{j + 1}"
            ),
            member.model,
        )
        for j, member in enumerate(results)
    ]
    plain = plains[0] if n_members == 1 else ensemble_model(plains)
    # Under `rotate`, members 2.. trained on member 1's validation speakers: score member 1
    # alone there, so the validation figures stay held-out.
    scored = plains[0] if n_members > 1 and cfg.train.ensemble_val == "rotate" else plain
    probs = scored.predict(val_ds, verbose=0)
    if bucket:
        probs = restore_order(probs, length_order(cache, val_ids, cfg.data, modalities))
    pred = probs.argmax(-1)
    metrics = compute_metrics(corpus.label_ids(val_ids), pred, cfg.model.num_classes)
    is_chief, _ = worker_role(strategy)
    if is_chief:
        model_path = run_dir / "best.keras"
        plain.save(model_path)
        extractors = cache.metadata["extractors"]
        write_model_sidecar(
            model_path,
            cfg,
            list(corpus.labels),
            {m: extractors[m] for m in modalities},
            # `global` statistics travel with the model (export applies them in-graph).
            norm_stats=normalizer if mode == "global" else None,
        )
        split = {
            "train_speakers": train_speakers,
            "val_speakers": val_speakers,
            "n_train": len(train_ids),
            "n_val": len(val_ids),
        }
        (run_dir / "split.json").write_text(json.dumps(split, indent=1))
        report = {**metrics, "confusion": metrics["confusion"].tolist(), "labels": corpus.labels}
        report.update(best_epoch=result.best_epoch, monitor=result.monitor)
        (run_dir / "val_metrics.json").write_text(json.dumps(report, indent=1))
        if normalizer is not None:
            (run_dir / "norm_stats.json").write_text(json.dumps(normalizer.to_dict()))
    best = "none" if result.best_epoch is None else f"{result.best_epoch + 1}"
    print(
        f"best epoch {best}/{cfg.train.epochs} by {result.monitor}; validation speakers "
        f"({', '.join(val_speakers)}"
        f"{'; member 1 alone' if scored is not plain else ''}): WA {metrics['wa']:.3f} UA {metrics['ua']:.3f} "
        f"macro-F1 {metrics['macro_f1']:.3f}\nrun folder: {run_dir}"
        + (f"\nmodel: {run_dir / 'best.keras'}" if is_chief else ""),
        flush=True,
    )
    return 0
