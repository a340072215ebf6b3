#!/usr/bin/env python
"""Paper Tables 1-2 on any prepared corpus: n_ccab 0-3 and module combinations.

Every variant is trained and tested with the same folds, protocol and seeds (one report folder
each under --out-dir); a markdown table puts WA/UA (mean ± std over repeats, predictions pooled
over folds) next to the paper's IEMOCAP numbers.

Example:
    python scripts/ablation.py --config configs/emodb_demo.yaml --max-folds 2 --repeats 1
    python scripts/ablation.py --config configs/paper.yaml --set data.manifest=iemocap.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# (label, overrides, paper WA, paper UA) — paper Tables 1 and 2 (IEMOCAP, audio + text).
TABLE_1 = [
    ("n_ccab = 0", ["model.n_ccab=0"], 0.726, 0.734),
    ("n_ccab = 1", ["model.n_ccab=1"], 0.724, 0.735),
    ("n_ccab = 2", ["model.n_ccab=2"], 0.731, 0.740),
    ("n_ccab = 3", ["model.n_ccab=3"], 0.743, 0.753),
]
TABLE_2 = [
    ("MIM + DFM", ["model.use_fem=false"], 0.701, 0.714),
    ("FEM + MIM", ["model.use_dfm=false"], 0.737, 0.748),
    ("FEM + MIM + DFM", [], 0.743, 0.753),
]


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tables", default="1,2", help="which tables: 1, 2 or 1,2")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--max-folds", type=int)
    parser.add_argument("--protocol", choices=["honest", "paper"])
    parser.add_argument("--out-dir", default="reports/ablation")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from ks_keras.config import load_config
    from ks_keras.evaluation import evaluate_corpus, summarize

    tables = {"1": ("Table 1: number of CCABs", TABLE_1), "2": ("Table 2: modules", TABLE_2)}
    chosen = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in tables]
    if unknown:
        parser.error(f"--tables: unknown table(s) {unknown}; use 1 and/or 2")

    out_dir = Path(args.out_dir)
    lines = [f"# Ablations ({args.config} {' '.join(args.overrides)})", ""]
    done: dict[tuple, dict] = {}
    first = True
    for key in chosen:
        title, rows = tables[key]
        lines += [
            f"## {title}",
            "",
            "| variant | WA (ours) | UA (ours) | WA (paper) | UA (paper) |",
            "|---|---|---|---|---|",
        ]
        for label, overrides, paper_wa, paper_ua in rows:
            cfg = load_config(args.config, args.overrides + overrides)
            signature = tuple(sorted(args.overrides + overrides))
            if signature not in done:
                slug = label.replace(" ", "").replace("+", "_").replace("=", "")
                cv, _ = evaluate_corpus(
                    cfg,
                    out_dir / slug,
                    protocol=args.protocol,
                    repeats=args.repeats,
                    max_folds=args.max_folds,
                    baseline=first,
                    progress=not args.no_progress,
                    verbose=0 if args.no_progress else 2,
                )
                first = False
                done[signature] = (cv, summarize(cv))
            cv, summary = done[signature]
            pooled = summary["pooled"]
            lines.append(
                f"| {label} | {_cell(pooled['wa'])} | {_cell(pooled['ua'])} | "
                f"{paper_wa:.3f} | {paper_ua:.3f} |"
            )
        lines.append("")
    protocol = args.protocol or load_config(args.config, args.overrides).eval.protocol
    lines.append(
        f"Ours: {cv.corpus_name}, protocol `{protocol}`, predictions pooled over folds, "
        "mean ± std over repeats. Paper: IEMOCAP 4 classes, 5-fold leave-one-session-out, "
        "best epoch chosen on the test fold."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out_dir / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
