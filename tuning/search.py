"""Plain-Python KerasTuner search: the same steps as `ks-keras tune`, written out.

    python tuning/search.py --config configs/emodb_demo.yaml \
        --space tuning/emodb_demo_space.yaml --tuner random --trials 8

1. load the config (the default point) and the search space (YAML);
2. build one fold's datasets: training speakers, held-out validation speakers (the
   objective), test speakers (used once, at the end);
3. search (resumable: run it again to continue; `--overwrite` starts afresh);
4. retrain the best configuration, score it on the test speakers, export a SavedModel.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emodb_demo.yaml")
    parser.add_argument("--space", default="tuning/emodb_demo_space.yaml")
    parser.add_argument("--tuner", choices=["random", "bayesian", "hyperband"], default="random")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--project-dir", default="runs/tune/search_py")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    from ks_keras.config import load_config
    from ks_keras.tuning import (
        check_space,
        finish_search,
        load_space,
        prepare_fold_data,
        run_search,
    )

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    check_space(space, cfg, args.tuner)  # fails in seconds, before features are extracted

    data = prepare_fold_data(cfg, fold=args.fold)
    result = run_search(
        cfg,
        space,
        data.train_ds,
        data.val_ds,
        args.project_dir,
        tuner=args.tuner,
        trials=args.trials,
        overwrite=args.overwrite,
        class_weight=data.class_weight,
        fold_info=data.fold_info,
    )
    for row in sorted(result.completed, key=lambda r: -r.val_ua)[:5]:
        print(f"  trial {row.trial_id}: val UA {row.val_ua:.4f}  {row.values}")
    if result.best is None:
        print(f"no trial completed; see {result.summary_md}", file=sys.stderr)
        return 1

    final = finish_search(result, data)
    print(
        f"best config {result.best_config_path}: test WA {final.test_metrics['wa']:.4f} "
        f"UA {final.test_metrics['ua']:.4f} F1 {final.test_metrics['macro_f1']:.4f}; "
        f"SavedModel {final.export_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
