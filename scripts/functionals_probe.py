#!/usr/bin/env python
"""Which openSMILE functionals carry the signal? A validation-only probe (no test fold).

Before a functionals set is wired into the model as its `functionals` input, this script asks
a cheap question on the config's folds: does a linear SVM on the set (or on two sets side by
side) classify the **validation speakers** of each fold better? For every fold of
`make_folds(corpus, cfg.eval, seed)` and every seed, the SVM is trained on the fold's training
speakers and scored (UA) on its validation speakers; the test speakers are never read. The
functionals are normalised as the model's are (per speaker under
`features.audio.normalize: speaker`) and cached like the baseline's.

Prints one row per (feature sets, C): the mean validation UA over folds and seeds, and the
mean per seed.

Example:
    python scripts/functionals_probe.py --config configs/emodb_accurate.yaml \\
        --sets compare egemaps compare+egemaps
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def load_sets(cfg, corpus, names: list[str], progress: bool) -> dict[str, np.ndarray]:
    """`{name: [N, D]}` for each name (`compare`, `egemaps`, or sets joined with `+`)."""
    from ks_keras.features.functionals import FEATURE_SETS, normalized_functionals

    cache: dict[str, np.ndarray] = {}
    out = {}
    for name in names:
        parts = name.split("+")
        unknown = [p for p in parts if p not in FEATURE_SETS]
        if unknown:
            raise SystemExit(
                f"--sets: unknown functionals set(s) {unknown} in {name!r}; expected "
                f"{sorted(FEATURE_SETS)} joined with '+'"
            )
        for part in parts:
            if part not in cache:
                cache[part] = normalized_functionals(cfg, corpus, part, progress)
        out[name] = np.hstack([cache[p] for p in parts])
    return out


def probe(cfg, corpus, sets: dict[str, np.ndarray], cs: list[float], seeds: list[int]):
    """Rows `{"set", "C", "val_ua", "per_seed"}`: linear SVM validation UA, test never read."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from ks_keras.folds import make_folds
    from ks_keras.stats import unweighted_recall

    labels = corpus.labels
    y = np.array([labels.index(u.label) for u in corpus.utterances])
    row_of = {u: i for i, u in enumerate(corpus.ids)}
    folds = {seed: make_folds(corpus, cfg.eval, seed=seed) for seed in seeds}
    if any(not f.val_ids for fs in folds.values() for f in fs):
        raise SystemExit(
            "the probe needs validation speakers: eval.protocol=honest, val_speakers>=1"
        )
    rows = []
    for name, x in sets.items():
        for c in cs:
            per_seed = []
            for seed in seeds:
                scores = []
                for fold in folds[seed]:
                    train = [row_of[i] for i in fold.train_ids]
                    val = [row_of[i] for i in fold.val_ids]
                    svm = make_pipeline(
                        StandardScaler(), LinearSVC(C=c, max_iter=20000, random_state=seed)
                    )
                    svm.fit(x[train], y[train])
                    scores.append(unweighted_recall(y[val], svm.predict(x[val]), len(labels)))
                per_seed.append(float(np.mean(scores)))
            rows.append(
                {"set": name, "C": c, "val_ua": float(np.mean(per_seed)), "per_seed": per_seed}
            )
    return rows


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the config whose folds and cache to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["compare", "egemaps", "compare+egemaps"],
        help="functionals sets to compare; join sets with '+' to put them side by side",
    )
    parser.add_argument("--C", dest="cs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-folds",
        type=int,
        help="use only the first N folds (default: all, whatever eval.max_folds says)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus

    cfg = load_config(args.config, args.overrides)
    # All folds unless asked: the config's eval.max_folds is a demo setting.
    cfg = replace(cfg, eval=replace(cfg.eval, max_folds=args.max_folds or 10**9))
    corpus = load_corpus(cfg.data)
    sets = load_sets(cfg, corpus, args.sets, progress=not args.no_progress)
    rows = probe(cfg, corpus, sets, args.cs, args.seeds)
    print("| functionals | C | val UA (mean) | per seed |")
    print("|---|---|---|---|")
    for row in rows:
        seeds = " / ".join(f"{v:.3f}" for v in row["per_seed"])
        print(f"| {row['set']} | {row['C']:g} | {row['val_ua']:.3f} | {seeds} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run())
