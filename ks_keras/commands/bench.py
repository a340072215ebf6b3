"""`ks-keras bench` and `python -m ks_keras.bench`: the `bench` options, the run and its table.

`python -m ks_keras.bench --child SPEC` (one measure in this process, started by
`ks_keras.bench.runner.run_child`) goes to the library's `ks_keras.bench.measures.child_entry`.
"""

from __future__ import annotations

import argparse
import sys

from ks_keras import bench as bench_package
from ks_keras import bench_reference
from ks_keras.bench.measures import child_entry
from ks_keras.bench.runner import run_benchmark
from ks_keras.bench.settings import MEASURES
from ks_keras.bench.table import format_table


def add_bench_args(p: argparse.ArgumentParser, config_args: bool = True) -> None:
    """The `bench` options (shared by `ks-keras bench` and scripts/benchmark.py).

    Args:
        p: the parser to extend.
        config_args: also add `--config` and `--set` (the CLI has its own helper for them).
    """
    if config_args:
        p.add_argument("--config", default=None, help="YAML config (default: paper model)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="dotted override, repeatable",
        )
    p.add_argument(
        "--quick", action="store_true", help="tiny model, few repetitions (seconds; a smoke test)"
    )
    p.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma list of measures (default all: {','.join(MEASURES)})",
    )
    p.add_argument(
        "--jit",
        choices=("auto", "on", "off"),
        default="auto",
        help="XLA for the headline figures (auto: on with a GPU, off on CPU)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "mixed"),
        default="auto",
        help="auto: mixed_float16 on a GPU, float32 on CPU",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per measure")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra/inter-op threads of every measure (TensorFlow; PyTorch for the reference)",
    )
    p.add_argument("--output", default="reports/benchmark.json", help="JSON report path")
    p.add_argument(
        "--reference-dir",
        default=None,
        metavar="PATH",
        help="a checkout of the authors' PyTorch code: measure its model in this run with the "
        "same protocol and print ours side by side with ratios (needs PyTorch; contract below)",
    )
    p.add_argument(
        "--reference-entry",
        default=bench_reference.DEFAULT_REFERENCE_ENTRY,
        metavar="MODULE:CALLABLE",
        help="the callable under --reference-dir that builds the reference model "
        "(default: %(default)s, the authors' builder)",
    )


def run_bench(args) -> int:
    """`ks-keras bench`: run, print the table, write the JSON. Exit 1 if a measure failed."""
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    report = run_benchmark(
        config=args.config,
        overrides=args.overrides,
        quick=args.quick,
        only=only,
        jit=args.jit,
        precision=args.precision,
        output=args.output,
        repeats=args.repeats,
        threads=args.threads,
        reference_dir=args.reference_dir,
        reference_entry=args.reference_entry,
    )
    print(format_table(report))
    print(f"wrote {args.output}")
    failed = [
        k for k, v in report["results"].items() if "error" in v and not v.get("comparison_only")
    ]
    slow = [k for k, v in report["results"].items() if "error" in v and v.get("comparison_only")]
    if slow:
        print(f"comparison measures without a figure: {', '.join(slow)} (see the JSON)")
    if failed:
        print(f"failed measures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ks_keras.bench`: the benchmark, or (`--child SPEC`) one measure."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_entry(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m ks_keras.bench",
        description=bench_package.__doc__,
        epilog=bench_reference.REFERENCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_args(parser)
    try:
        return run_bench(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 1
