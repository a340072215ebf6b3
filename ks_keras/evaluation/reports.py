"""Report folder: results table, CSV/JSON files and plots."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ks_keras.config import save_config
from ks_keras.evaluation.results import (
    PAPER_PROTOCOL_NOTE,
    CVResult,
    summarize,
)
from ks_keras.info import package_versions

# ---------------------------------------------------------------------------------------------
# Reports


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _baseline_line(b: dict) -> str:
    return (
        f"  baseline      WA {b['wa']:.3f}           UA {b['ua']:.3f}"
        f"           F1 {b['macro_f1']:.3f}   ({b['method']})"
    )


def results_table(cv: CVResult, summary: dict | None = None) -> str:
    """Plain-text table: one row per fold (mean ± std over repeats), the pooled figures, the
    baseline(s) on the same folds, and how the model compares with the (fair) baseline."""
    summary = summary or summarize(cv)
    baseline_folds = (cv.baseline or {}).get("folds") or {}
    baseline_folds = {int(k): v for k, v in baseline_folds.items()}
    several = cv.repeats > 1
    lines = [cv.title]
    if cv.protocol == "paper":
        lines.append(PAPER_PROTOCOL_NOTE)
    ua_head = "UA ± sd" if several else "UA"
    header = f"{'fold':<22}{'test':>6}{'WA':>8}{ua_head:>{16 if several else 8}}{'F1':>8}"
    if baseline_folds:
        header += f"{'base UA':>10}"
    lines += [header, "-" * len(header)]
    for fold in cv.folds:
        rows = [r for r in cv.results if r.fold.index == fold.index]
        m = {k: np.mean([r.metrics[k] for r in rows]) for k in ("wa", "ua", "macro_f1")}
        ua = f"{m['ua']:.3f}"
        if several:
            ua = f"{m['ua']:.3f} ± {np.std([r.metrics['ua'] for r in rows]):.3f}"
        line = (
            f"{fold.name:<22}{len(fold.test_ids):>6}{m['wa']:>8.3f}{ua:>{16 if several else 8}}"
            f"{m['macro_f1']:>8.3f}"
        )
        if baseline_folds:
            b = baseline_folds.get(fold.index)
            line += f"{b['ua']:>10.3f}" if b else f"{'-':>10}"
        lines.append(line)
    lines.append("-" * len(header))
    p = summary["pooled"]
    lines.append(f"overall (pooled over folds, mean ± std over {cv.repeats} repeat(s)):")
    ensemble = cv.config.train.ensemble
    name = "KS-T + CCAB" if ensemble == 1 else f"KS-T + CCAB, {ensemble}-seed ensemble"
    checkpoints = cv.config.train.checkpoint_ensemble
    if checkpoints > 1:
        kept = f"last {checkpoints}" if cv.config.eval.fixed_schedule else f"{checkpoints} best"
        name += f", {kept} epochs averaged" + (" each" if ensemble > 1 else "")
    lines.append(f"  {name}")
    lines.append(f"  {'':<12}  WA {_fmt(p['wa'])}   UA {_fmt(p['ua'])}   F1 {_fmt(p['macro_f1'])}")
    if cv.baseline:
        if "skipped" in cv.baseline:
            lines.append(f"  baseline      skipped: {cv.baseline['skipped']}")
        else:
            lines.append(_baseline_line(cv.baseline))
            if cv.baseline.get("unnormalized"):
                lines.append(_baseline_line(cv.baseline["unnormalized"]))
    comparison = summary.get("comparison")
    if comparison:
        n = len(comparison["per_fold"])
        lines.append(
            f"model vs baseline ({cv.baseline.get('normalize', 'none')} normalisation, same "
            f"folds): better on {comparison['wins']} of {n} folds, worse on "
            f"{comparison['losses']} (sign test p = {comparison['sign_test_p']:.3f})"
        )
        boot = comparison.get("bootstrap")
        if boot:
            lines.append(
                f"  pooled UA difference {boot['diff']:+.3f}, "
                f"{boot['confidence']:.0%} paired bootstrap interval "
                f"[{boot['low']:+.3f}, {boot['high']:+.3f}] "
                f"(test utterances resampled within folds, {boot['n_boot']} sets)"
            )
    return "\n".join(lines)


def write_report(cv: CVResult, report_dir: str | Path) -> Path:
    """Write the report folder (see the `ks_keras.evaluation` docstring); returns its path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(cv)
    save_config(cv.config, report_dir / "config.yaml")

    with open(report_dir / "folds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "repeat",
                "seed",
                "fold",
                "name",
                "test_speakers",
                "val_speakers",
                "n_train",
                "n_val",
                "n_test",
                "best_epoch",
                "wa",
                "ua",
                "macro_f1",
                "seconds",
            ]
        )
        for r in cv.results:
            writer.writerow(
                [
                    r.repeat,
                    r.seed,
                    r.fold.index,
                    r.fold.name,
                    " ".join(r.fold.test_speakers),
                    " ".join(r.fold.val_speakers),
                    len(r.fold.train_ids),
                    len(r.fold.val_ids),
                    len(r.fold.test_ids),
                    None if r.best_epoch is None else r.best_epoch + 1,
                    f"{r.metrics['wa']:.4f}",
                    f"{r.metrics['ua']:.4f}",
                    f"{r.metrics['macro_f1']:.4f}",
                    f"{r.seconds:.1f}",
                ]
            )

    confusion = np.asarray(summary["confusion_normalized"])
    with open(report_dir / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *cv.labels])
        for label, row in zip(cv.labels, confusion, strict=True):
            writer.writerow([label, *[f"{v:.4f}" for v in row]])

    metrics = {
        "title": cv.title,
        "protocol": cv.protocol,
        "protocol_note": cv.protocol_note,
        "corpus": cv.corpus_name,
        "labels": cv.labels,
        "repeats": cv.repeats,
        "folds": [f.summary() for f in cv.folds],
        "per_fold": [
            {
                "repeat": r.repeat,
                "fold": r.fold.index,
                "name": r.fold.name,
                "best_epoch": None if r.best_epoch is None else r.best_epoch + 1,
                **{k: r.metrics[k] for k in ("wa", "ua", "macro_f1")},
                "confusion": np.asarray(r.metrics["confusion"]).tolist(),
            }
            for r in cv.results
        ],
        **summary,
        "baseline": cv.baseline,
        "versions": package_versions(),
        "git_commit": _git_commit(),
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_jsonable))
    (report_dir / "results.txt").write_text(results_table(cv, summary) + "\n")
    try:
        plot_confusion(confusion, cv.labels, report_dir / "confusion_matrix.png", cv)
        plot_curves(cv, report_dir / "curves.png")
        if cv.attention is not None:
            plot_attention(cv.attention, report_dir / "attention.png")
    except ImportError as e:  # matplotlib is a dependency; be explicit if it is broken
        raise ImportError(f"plots need matplotlib: {e}") from e
    return report_dir


def _jsonable(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, cv: CVResult) -> None:
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n, 0.8 + 0.8 * n))
    im = ax.imshow(confusion, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            v = confusion[i, j]
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if v > 0.5 else "black",
                fontsize=9,
            )
    title = "Confusion (row-normalised, pooled)"
    if cv.protocol == "paper":
        title += "\nPAPER PROTOCOL: epoch chosen on test fold"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(cv: CVResult, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    val_name = "test fold (paper protocol)" if cv.protocol == "paper" else "validation speakers"
    for r in cv.results:
        h = r.history
        epochs = np.arange(1, len(h.get("loss", [])) + 1)
        tag = f"{r.fold.name}" + (f" r{r.repeat}" if cv.repeats > 1 else "")
        line = axes[0].plot(epochs, h.get("loss", []), lw=1, alpha=0.8)[0]
        if "val_loss" in h:
            axes[0].plot(epochs, h["val_loss"], lw=1, ls="--", color=line.get_color())
        axes[1].plot(epochs, h.get("ua", []), lw=1, alpha=0.8, color=line.get_color(), label=tag)
        if "val_ua" in h:
            axes[1].plot(epochs, h["val_ua"], lw=1, ls="--", color=line.get_color())
        if r.best_epoch is not None and "val_ua" in h:
            axes[1].plot(
                r.best_epoch + 1, h["val_ua"][r.best_epoch], "o", color=line.get_color(), ms=4
            )
    axes[0].set_title("loss (solid: train, dashed: " + val_name + ")", fontsize=9)
    axes[1].set_title("UA (solid: train, dashed: " + val_name + "; dot: best epoch)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    if len(cv.results) <= 12:
        axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(cv.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(att: dict, path: Path) -> None:
    """Per utterance: dense weights, key-sparse weights, fraction of heads keeping each key."""
    plt = _plt()
    n = len(att["ids"])
    fig, axes = plt.subplots(
        n, 3, figsize=(12, 3.4 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 1, 1.2]}
    )
    for row, utt in enumerate(att["ids"]):
        length = int(att["lengths"][row])
        dense = att["dense"][row][:length, :length]
        sparse = att["sparse"][row][:length, :length]
        vmax = float(dense.max()) or 1.0
        axes[row, 0].imshow(dense, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        axes[row, 0].set_title(f"{utt}: dense weights (head 1)", fontsize=9)
        axes[row, 1].imshow(sparse, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        axes[row, 1].set_title(f"key-sparse, head 1 (sparsity {att['sparsity']:.2f})", fontsize=9)
        for ax in axes[row, :2]:
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        axes[row, 2].bar(
            np.arange(length), att["kept"][row][:length], width=1.0, color="tab:orange"
        )
        axes[row, 2].set_ylim(0, 1)
        axes[row, 2].set_xlabel("key")
        axes[row, 2].set_ylabel("fraction of heads keeping it")
        axes[row, 2].set_title("kept keys", fontsize=9)
    fig.suptitle(f"attention of key-sparse layer {att['layer']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
