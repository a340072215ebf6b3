"""`ks-keras evaluate`: cross-validated training + test with a report folder."""

from __future__ import annotations

from pathlib import Path

from ks_keras.evaluation import evaluate_corpus, results_table


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
