"""The `ks-keras` command line: one entry point, one subcommand per job.

Parsers are declared here (cheap); each command's glue lives in `ks_keras.commands.<name>`
and is imported only when that command runs, so `ks-keras --help` does not pay for importing
TensorFlow.

Output is quiet by default: TensorFlow's C++ start-up lines (oneDNN notices, "Could not find
cuda drivers", the `E0000 … cuInit … CUDA error` of a CPU-only machine) and the Hugging Face
"Loading weights" bar are hidden; every command takes `--verbose` to show them (it also sets
`KS_KERAS_VERBOSE=1` for the processes a command starts).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

# Commands whose parent process does not use TensorFlow (bench measures in child processes).
_NO_TENSORFLOW = ("prepare", "bench")
# The absl C++ log lines TensorFlow prints while it loads, before TF_CPP_MIN_LOG_LEVEL applies
# ("I0000 00:00:1796195433.191025    7290 port.cc:153] oneDNN custom operations are on…").
_TF_STARTUP_NOISE = re.compile(
    r"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: )"
)


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


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=["honest", "paper"],
        help="honest (default): best epoch on validation speakers; paper: on the test fold, as "
        "the authors' code (optimistic, labelled so in reports)",
    )
    p.add_argument("--repeats", type=int, help="seeds per fold (default eval.repeats)")
    p.add_argument("--max-folds", type=int, help="only the first N folds")
    p.add_argument("--report-dir", help="report folder (default eval.report_dir/<config name>)")
    p.add_argument("--no-baseline", action="store_true", help="skip the eGeMAPS + SVM baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_export_parser(sub) -> None:
    from ks_keras.export.exporting import WEIGHT_DTYPES  # no TensorFlow import

    p = sub.add_parser("export", help="export a trained .keras model as a TF Serving SavedModel")
    p.add_argument("--model", required=True, help="trained model file (run/best.keras)")
    _add_config_args(p)
    p.add_argument(
        "--labels",
        help="class names in output order, comma-separated (default: "
        "the model's sidecar, else data.labels)",
    )
    p.add_argument("--name", help="model name (default export.name)")
    p.add_argument("--base-dir", help="export root (default export.base_dir = saved_models)")
    p.add_argument("--version", type=int, help="integer version (default: next free)")
    p.add_argument(
        "--weights",
        choices=WEIGHT_DTYPES,
        default="float32",
        help="dtype of the exported weights: bfloat16 halves what a request reads and is "
        "faster on CPUs with AMX or AVX512-BF16; elsewhere expect no gain (docs/serving.md)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the fresh-process parity check and saved_model_cli listing",
    )
    p.set_defaults(target="ks_keras.commands.export:run_export")


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="emotion of an audio file + transcript (or a manifest)")
    p.add_argument("audio", nargs="?", help="audio file (WAV/FLAC/OGG; resampled if needed)")
    p.add_argument("--text", help="the transcript of the audio")
    p.add_argument(
        "--model",
        required=True,
        help="saved_models/<name>[/<version>] (base folder = latest) or a .keras file",
    )
    p.add_argument(
        "--manifest",
        help="CSV with columns path,text[,id,label] (paths relative "
        "to the CSV) → CSV of predictions",
    )
    p.add_argument("--output", help="where --manifest results go (default: stdout)")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    p.add_argument(
        "--signature",
        default="serving_default",
        choices=["serving_default", "serving_waveform"],
        help="serving_waveform: send raw audio, log-mel runs in the model graph",
    )
    p.add_argument("--batch-size", type=int, default=16, help="utterances per batch (manifest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--rest",
        metavar="URL",
        help="send requests to TF Serving's REST API, e.g. http://localhost:8501",
    )
    p.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        help="send requests to TF Serving's gRPC API, e.g. localhost:8500",
    )
    p.add_argument("--model-name", help="served model name (default: the export's name)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="deadline of each request to TF Serving, whole exchange (default 60)",
    )
    p.add_argument(
        "--model-version",
        type=int,
        help="served version (default: the version of the local export)",
    )
    _add_config_args(p)
    p.set_defaults(target="ks_keras.commands.predict:run_predict")


def _add_tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="KerasTuner search on one fold's validation speakers, then "
        "retrain the best config, test it and export it",
    )
    _add_config_args(p)
    p.add_argument("--space", required=True, help="search space YAML (tuning/paper_space.yaml)")
    p.add_argument("--tuner", choices=["random", "bayesian", "hyperband"], default="random")
    p.add_argument(
        "--trials",
        type=int,
        default=10,
        help="total trials of the project (a re-run resumes up to this number; Hyperband: a cap)",
    )
    p.add_argument(
        "--project-dir",
        help="search folder (default <train.output_dir>/tune/<config>_<space>_<tuner>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the project's earlier search instead of resuming it",
    )
    p.add_argument(
        "--fold",
        type=int,
        default=0,
        help="which fold of eval.folds to tune on "
        "(default 0, the first); its test speakers are used once, after the search",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="stop after this many failed trials in a row (default 3)",
    )
    p.add_argument(
        "--no-retrain",
        action="store_true",
        help="stop after the search (summary + best_config.yaml)",
    )
    p.add_argument("--no-export", action="store_true", help="retrain and test, do not export")
    p.add_argument("--export-dir", help="export root (default export.base_dir = saved_models)")
    p.add_argument("--export-name", help="exported model name (default export.name)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the export's fresh-process parity check"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(target="ks_keras.commands.tune:run_tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ks-keras",
        description="KS-Transformer + CCAB multimodal speech emotion recognition (Keras 3 / TF).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("info", help="versions, devices, distribution strategy, parameter count")
    _add_config_args(p)
    p.set_defaults(target="ks_keras.commands.info:run_info")

    _add_export_parser(sub)

    _add_predict_parser(sub)

    p = sub.add_parser("features", help="extract and cache features of the configured corpus")
    _add_config_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(target="ks_keras.commands.features:run_features")

    p = sub.add_parser("prepare", help="write a manifest CSV for a corpus you bring")
    prep = p.add_subparsers(dest="corpus", metavar="<corpus>", required=True)
    q = prep.add_parser("iemocap", help="IEMOCAP official release → 4-class manifest")
    q.add_argument("--root", required=True, help="IEMOCAP_full_release folder")
    q.add_argument("--out", required=True, help="manifest CSV to write")
    q.add_argument(
        "--all-labels",
        action="store_true",
        help="keep every agreed label (excited not merged) instead of 4 classes",
    )
    q.set_defaults(target="ks_keras.commands.prepare:run_prepare_iemocap")

    p = sub.add_parser("evaluate", help="cross-validated training + test with a report folder")
    _add_config_args(p)
    _add_evaluate_arguments(p)
    p.set_defaults(target="ks_keras.commands.evaluate:run_evaluate")

    p = sub.add_parser("demo", help="offline EmoDB demo: features, LOSO training, report")
    _add_config_args(p)
    p.add_argument("--full", action="store_true", help="all 10 speakers (default: a subset)")
    p.add_argument("--report-dir", help="report folder (default reports/emodb_demo)")
    p.add_argument("--no-baseline", action="store_true", help="skip the eGeMAPS + SVM baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(target="ks_keras.commands.demo:run_demo")

    _add_tune_parser(sub)

    from ks_keras.bench_reference import REFERENCE_HELP
    from ks_keras.commands.bench import add_bench_args  # no TensorFlow import

    p = sub.add_parser(
        "bench",
        help="speed/memory benchmark; side by side with the authors' PyTorch code when given "
        "--reference-dir (same run, same machine)",
        description="Speed and memory of the KS-T + CCAB model, one fresh process per measure "
        "(docs/performance.md).",
        epilog=REFERENCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    add_bench_args(p, config_args=False)
    p.set_defaults(target="ks_keras.commands.bench:run_bench")

    p = sub.add_parser("train", help="train one model; best epoch on held-out validation speakers")
    _add_config_args(p)
    p.add_argument(
        "--run-dir",
        help="run folder (default <train.output_dir>/train); "
        "re-run with the same folder to resume a killed run",
    )
    p.add_argument("--no-progress", action="store_true", help="no feature-extraction progress bar")
    p.set_defaults(target="ks_keras.commands.train:run_train")

    _add_verbose_args(parser)
    return parser


def _add_verbose_args(parser: argparse.ArgumentParser) -> None:
    """`--verbose` on every (sub)command that runs something."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose_args(sub)
    if parser.get_default("target") and not any(
        "--verbose" in a.option_strings for a in parser._actions
    ):
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="show TensorFlow's start-up log and library progress bars (hidden by default)",
        )


class _StderrHandler(logging.Handler):
    """Messages of the `ks_keras` loggers, as plain lines on the current `sys.stderr`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # never let a log line break a command
            self.handleError(record)


def configure_output(verbose: bool) -> None:
    """Quiet library chatter unless `verbose`; show `ks_keras` log messages on stderr.

    Environment variables the user set explicitly are kept.
    """
    if verbose:
        os.environ["KS_KERAS_VERBOSE"] = "1"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        # 3 also hides the E-level "failed call to cuInit" of a machine without a GPU.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        # TensorFlow's Python warnings (e.g. tf.function retracing of predict on length
        # buckets) are developer hints, not something a user can act on.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logger = logging.getLogger("ks_keras")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up INFO/WARNING log lines filtered out of stderr.

    Those lines are written before TensorFlow reads TF_CPP_MIN_LOG_LEVEL. A forked filter
    process forwards every other line at once, so a message TensorFlow prints before it aborts
    (e.g. a CPU without the instructions it was built for) still reaches the user.
    """
    if "tensorflow" in sys.modules or not hasattr(os, "fork"):
        return
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (captured, redirected)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter: runs until the parent's end of the pipe closes
        try:
            os.close(write_end)
            with os.fdopen(read_end, "rb") as lines:
                for line in lines:
                    if not _TF_STARTUP_NOISE.match(line.decode("utf-8", "replace")):
                        os.write(stderr_fd, line)
        finally:
            os._exit(0)
    os.close(read_end)
    saved = os.dup(stderr_fd)
    os.dup2(write_end, stderr_fd)
    os.close(write_end)
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, stderr_fd)  # closes the pipe: the filter drains it and exits
        os.close(saved)
        os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "target", None):
        parser.print_help()
        return 2
    previous = os.environ.get("KS_KERAS_VERBOSE")
    verbose = bool(getattr(args, "verbose", False)) or previous == "1"
    try:
        configure_output(verbose)
        if not verbose and args.command not in _NO_TENSORFLOW:
            import_tensorflow_quietly()
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
    finally:
        if previous is None:  # main() may run several times in one process (tests)
            os.environ.pop("KS_KERAS_VERBOSE", None)


if __name__ == "__main__":
    sys.exit(main())
