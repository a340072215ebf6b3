#!/usr/bin/env python
"""Accuracy levers, one at a time, on the same folds and seeds, next to the fair baseline.

Each variant is a list of `--set` overrides applied to a base config; every variant is
cross-validated with the same folds, protocol and repeats (one report folder each under
--out-dir), and a markdown table gives pooled UA / WA / F1 as mean ± std over the repeats, the
mean best validation UA (what choices should be made on: validation speakers only), the
number of folds on which the model beats the baseline, and the paired bootstrap interval of the
pooled UA difference. docs/accuracy.md was produced this way.

Example:
    python scripts/accuracy_ablation.py --config configs/emodb_accurate.yaml --repeats 3
    python scripts/accuracy_ablation.py --config configs/emodb_accurate.yaml \\
        --variants variants.yaml --max-folds 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

# (label, overrides) relative to configs/emodb_accurate.yaml.
# Each variant names its ensemble and validation settings, so the list keeps its meaning
# whatever the accurate config sets.
_VALIDATED = ["eval.val_speakers=2", "train.ensemble_val=rotate"]
DEFAULT_VARIANTS = [
    (
        "log-mel + MiniLM, single model (the demo model)",
        ["features.functionals=none", "model.functionals_dim=0", "train.ensemble=1", *_VALIDATED],
    ),
    (
        "+ 3-seed ensemble, rotated validation",
        ["features.functionals=none", "model.functionals_dim=0", "train.ensemble=3", *_VALIDATED],
    ),
    ("+ ComParE functionals input, single model", ["train.ensemble=1", *_VALIDATED]),
    (
        "+ ComParE functionals input + 3-seed ensemble, rotated validation",
        ["train.ensemble=3", *_VALIDATED],
    ),
    (
        "+ ComParE functionals input, no validation speakers, last epoch",
        ["train.ensemble=1", "eval.val_speakers=0"],
    ),
    (
        "+ ComParE functionals input, no validation speakers, last epoch, 3-seed ensemble"
        " (emodb_accurate)",
        ["train.ensemble=3", "eval.val_speakers=0"],
    ),
]


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--variants", help="YAML list of {label, overrides: [...]} (default: the built-in list)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-folds", type=int)
    parser.add_argument("--out-dir", default="reports/accuracy_ablation")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from ks_keras.config import load_config
    from ks_keras.evaluation import evaluate_corpus, summarize

    variants = DEFAULT_VARIANTS
    if args.variants:
        loaded = yaml.safe_load(Path(args.variants).read_text()) or []
        if not isinstance(loaded, list) or not all(
            isinstance(v, dict) and "label" in v for v in loaded
        ):
            parser.error(f"--variants {args.variants}: expected a list of {{label, overrides}}")
        variants = [(v["label"], list(v.get("overrides") or [])) for v in loaded]

    out_dir = Path(args.out_dir)
    header = (
        "| variant | UA (pooled) | WA | F1 | val UA | folds > baseline | UA − baseline "
        "[95% CI] |\n|---|---|---|---|---|---|---|"
    )
    rows, baseline_line = [], None
    for k, (label, extra) in enumerate(variants):
        cfg = load_config(args.config, [*args.overrides, *extra])
        if args.max_folds is None:
            cfg = replace(cfg, eval=replace(cfg.eval, max_folds=None))
        print(f"== {label}: {' '.join(extra) or '(base config)'}", flush=True)
        cv, report = evaluate_corpus(
            cfg,
            out_dir / f"variant_{k}",
            repeats=args.repeats,
            max_folds=args.max_folds,
            progress=not args.no_progress,
            verbose=0,
        )
        summary = summarize(cv)
        p = summary["pooled"]
        vals = [v for r in cv.results for v in r.val_values]
        val = f"{sum(vals) / len(vals):.3f}" if vals else "-"
        ens = [v for r in cv.results for v in r.ensemble_val_values]
        if ens:
            val += f" (checkpoint ensemble {sum(ens) / len(ens):.3f})"
        comparison = summary.get("comparison") or {}
        boot = comparison.get("bootstrap")
        wins = f"{comparison['wins']}/{len(comparison['per_fold'])}" if comparison else "-"
        ci = f"{boot['diff']:+.3f} [{boot['low']:+.3f}, {boot['high']:+.3f}]" if boot else "-"
        rows.append(
            f"| {label} | {_cell(p['ua'])} | {_cell(p['wa'])} | {_cell(p['macro_f1'])} | "
            f"{val} | {wins} | {ci} |"
        )
        if cv.baseline and "ua" in cv.baseline:
            b = cv.baseline
            baseline_line = (
                f"| baseline: {b['method']} | {b['ua']:.3f} | {b['wa']:.3f} | "
                f"{b['macro_f1']:.3f} | - | - | - |"
            )
        (out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
        print(rows[-1], flush=True)
    lines = [
        f"# Accuracy ablation ({args.config} {' '.join(args.overrides)}, {args.repeats} repeat(s))",
        "",
        header,
        *rows,
    ]
    if baseline_line:
        lines.append(baseline_line)
    (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run())
