"""`ks-keras demo`: the offline EmoDB demo (the README's main command).

Log-mel audio + MiniLM text features of the shipped EmoDB (cached), the demo-sized KS-T + CCAB
model (`configs/emodb_demo.yaml`: FEM, MIM with CCABs and DFM all present, narrower and
shallower than the paper so it suits 2 CPU cores), leave-one-speaker-out with validation
speakers held out, the eGeMAPS + SVM baseline on the same folds, a table and a report folder.
By default a subset of folds runs (about 10 minutes on 2 cores); `--full` runs all 10 speakers.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_CONFIG = Path("configs") / "emodb_demo.yaml"


def demo_config_path() -> Path:
    """`configs/emodb_demo.yaml` of the source checkout (or under the working directory)."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / DEMO_CONFIG
        if candidate.is_file():
            return candidate
    candidate = Path.cwd() / DEMO_CONFIG
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"{DEMO_CONFIG} not found next to the package or in the working directory; run the demo "
        "from a source checkout or pass --config"
    )


def run_demo(args) -> int:
    from ks_keras.config import load_config
    from ks_keras.evaluation import evaluate_corpus, results_table

    started = time.perf_counter()
    path = Path(args.config) if args.config else demo_config_path()
    cfg = load_config(path, args.overrides)
    max_folds = None if args.full else cfg.eval.max_folds
    if args.full:
        from dataclasses import replace

        cfg = replace(cfg, eval=replace(cfg.eval, max_folds=None))
    report_dir = Path(
        args.report_dir
        or Path(cfg.eval.report_dir) / ("emodb_demo_full" if args.full else "emodb_demo")
    )
    print(
        f"ks-keras demo: config {path}, "
        f"{'all folds' if max_folds is None else f'first {max_folds} folds (--full for all)'}"
    )
    cv, out = evaluate_corpus(
        cfg,
        report_dir,
        max_folds=max_folds,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
        verbose=0 if args.no_progress else 2,
    )
    print()
    print(results_table(cv))
    minutes = (time.perf_counter() - started) / 60
    print(f"\nreport: {out}   ({minutes:.1f} min)")
    return 0
