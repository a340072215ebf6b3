"""The `ks-keras` command line: one entry point, one subcommand per job.

Parsers are declared here (cheap); each command's work lives in its module and is imported
only when that command runs, so `ks-keras --help` does not pay for importing TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config file (partial trees allowed)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set model.n_ccab=2 --set train.lr=1e-4",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ks-keras",
        description="KS-Transformer + CCAB multimodal speech emotion recognition (Keras 3 / TF).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("info", help="versions, devices, distribution strategy, parameter count")
    _add_config_args(p)
    p.set_defaults(target="ks_keras.info:run_info")

    return parser


def main(argv: list[str] | None = None) -> int:
    # Keep TF's C++ start-up chatter out of user-facing output unless asked for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "target", None):
        parser.print_help()
        return 2
    module_name, func_name = args.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        result = func(args)
    except (ValueError, FileNotFoundError) as e:
        # Boundary errors are already worded for the user: no traceback.
        print(f"ks-keras {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
