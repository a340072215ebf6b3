"""`ks-keras tune`: KerasTuner search on one fold's validation speakers, then retrain the best
config, test it on the fold's test speakers and export it."""

from __future__ import annotations

import sys
from pathlib import Path

from ks_keras.training import get_strategy
from ks_keras.tuning.finish import finish_search
from ks_keras.tuning.fold_data import default_project_dir, prepare_fold_data
from ks_keras.tuning.search import _check_strategy, _require_tensorboard, run_search
from ks_keras.tuning.space import check_space, load_space


def run_tune(args) -> int:
    """`ks-keras tune --config C --space S --tuner random|bayesian|hyperband --trials N`."""
    from ks_keras.config import load_config

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    check_space(space, cfg, args.tuner)  # before any feature extraction
    _require_tensorboard()
    strategy = get_strategy(cfg.train)
    _check_strategy(strategy)
    project_dir = Path(
        args.project_dir or default_project_dir(cfg, args.config, args.space, args.tuner)
    )
    verbose = 0 if args.no_progress else "auto"
    data = prepare_fold_data(cfg, args.fold, progress=not args.no_progress)
    result = run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        project_dir,
        tuner=args.tuner,
        trials=args.trials,
        overwrite=args.overwrite,
        class_weight=data.class_weight,
        strategy=strategy,
        fold_info=data.fold_info,
        max_consecutive_failures=args.max_failures,
        verbose=verbose,
    )
    if result.best is None:
        print(
            f"ks-keras tune: error: no trial completed ({len(result.failed)} failed); see "
            f"{result.summary_md}",
            file=sys.stderr,
        )
        return 1
    print(f"best config: {result.best_config_path}")
    if args.no_retrain:
        return 0
    final = finish_search(
        result,
        data,
        export=not args.no_export,
        export_dir=args.export_dir,
        export_name=args.export_name,
        verify_export=not args.no_verify,
        verbose=verbose,
    )
    print(
        f"test speakers ({', '.join((result.fold_info or {}).get('test_speakers', []))}): "
        f"WA {final.test_metrics['wa']:.4f} UA {final.test_metrics['ua']:.4f} "
        f"macro-F1 {final.test_metrics['macro_f1']:.4f}"
    )
    if final.export_path is not None:
        print(f"SavedModel: {final.export_path}")
    return 0
