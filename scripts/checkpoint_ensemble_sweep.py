#!/usr/bin/env python
"""How many checkpoints to average, read from one evaluation run (no training).

A run with `train.checkpoint_ensemble: K` keeps, for every fold member, the probabilities of
its K best epochs (by validation UA) on its validation and test utterances
(`runs/<tag>/checkpoints/probabilities.npz`). This script averages the k best of them for
k = 1..K and prints, per k, the mean validation UA of the members' k-checkpoint ensembles
next to the pooled test UA (mean ± std over repeats), the folds won against the report's
baseline and the paired bootstrap interval of the UA difference. k = 1 is the best epoch
alone, so the table's first row is the run without averaging.

The plain validation UA favours k = 1 by construction (the best epoch is the maximum of
validation UA over epochs; an average of k checkpoints is not). What k should be chosen on is
the **cross-fitted** validation UA: with two or more validation speakers, the k checkpoints
are ranked on the other validation speakers and scored on the held-out one, for each speaker
in turn (the kept checkpoints themselves were chosen on all validation speakers, a leak that
is the same for every k). It needs the validation speakers of each utterance: stored by
ks_keras since the sweep was added, or given with `--manifest` (ids = the manifest's `id`
column or file names without extension).

`--order last` averages the k *latest* kept epochs instead (what `train.checkpoint_ensemble`
keeps without validation speakers, `eval.val_speakers: 0`). Nothing is chosen on validation
then, so its validation UA, averaged over the validation speakers like the cross-fitted one,
is an unbiased figure to set beside the cross-fitted UA of the best epochs. Read both from a
run that kept every epoch (`train.checkpoint_ensemble` = `train.epochs`): does choosing
epochs on validation speakers beat a fixed schedule, on the same trainings?

Example:
    python scripts/checkpoint_ensemble_sweep.py reports/accuracy_ablation/variant_0
    python scripts/checkpoint_ensemble_sweep.py reports/all_epochs --order last
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

TAG = re.compile(r"^repeat(\d+)_fold(\d+)(?:_member(\d+))?$")


def load_members(
    report_dir: Path, max_members: int | None = None
) -> dict[tuple[int, int], list[dict]]:
    """`{(repeat, fold index): [member arrays]}` from a report folder's runs, members in
    seed-ensemble order (member 0 = the run without a `_member` suffix); with `max_members`,
    only the first that many of each fold (what a smaller `train.ensemble` would average)."""
    found: dict[tuple[int, int], list[tuple[int, dict]]] = defaultdict(list)
    for path in (report_dir / "runs").glob("*/checkpoints/probabilities.npz"):
        match = TAG.match(path.parent.parent.name)
        if not match:
            continue
        member = int(match[3] or 0)
        if max_members is not None and member >= max_members:
            continue
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        # The kept checkpoints' epochs, in the arrays' (best-first) order, for `--order last`.
        try:
            record = json.loads((path.parent / "top.json").read_text())
            if len(record) == arrays["test"].shape[0]:
                arrays["epochs"] = np.array([int(e["epoch"]) for e in record])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        found[(int(match[1]), int(match[2]))].append((member, arrays))
    if not found:
        raise SystemExit(
            f"{report_dir}: no runs/*/checkpoints/probabilities.npz; evaluate with "
            "`--set train.checkpoint_ensemble=K` (K > 1) first"
        )
    return {
        key: [a for _, a in sorted(ms, key=lambda m: m[0])] for key, ms in sorted(found.items())
    }


def _speakers_from_manifest(manifest: Path) -> dict[str, str]:
    import csv

    with open(manifest, newline="", encoding="utf-8") as f:
        return {
            (row.get("id") or "").strip() or Path(row["path"]).stem: row["speaker"].strip()
            for row in csv.DictReader(f)
        }


def cross_fitted_ua(member: dict, k: int, n_classes: int) -> float | None:
    """Mean over validation speakers s of: the k kept checkpoints best on the other validation
    speakers (by their UA), averaged, scored on s. None with fewer than two speakers."""
    from ks_keras.stats import unweighted_recall

    speakers = member.get("val_speakers")
    if speakers is None or len(set(speakers.tolist())) < 2:
        return None
    probs, labels = member["val"], member["val_labels"]
    scores = []
    for held_out in sorted(set(speakers.tolist())):
        rank_on, score_on = speakers != held_out, speakers == held_out
        ua = [unweighted_recall(labels[rank_on], p[rank_on].argmax(-1), n_classes) for p in probs]
        # Stable: ties keep the overall (best-first) order.
        chosen = sorted(range(len(ua)), key=lambda i: -ua[i])[:k]
        pred = probs[chosen].mean(0)[score_on].argmax(-1)
        scores.append(unweighted_recall(labels[score_on], pred, n_classes))
    return float(np.mean(scores))


def per_speaker_ua(member: dict, k: int, n_classes: int) -> float | None:
    """Mean over validation speakers of the UA of the first k checkpoints' average on that
    speaker alone (the same averaging over speakers as `cross_fitted_ua`, without its
    ranking); None without validation speakers."""
    from ks_keras.stats import unweighted_recall

    speakers = member.get("val_speakers")
    if speakers is None or "val" not in member:
        return None
    pred = member["val"][:k].mean(0).argmax(-1)
    labels = member["val_labels"]
    return float(
        np.mean(
            [
                unweighted_recall(labels[speakers == s], pred[speakers == s], n_classes)
                for s in sorted(set(speakers.tolist()))
            ]
        )
    )


def _latest_first(members: dict[tuple[int, int], list[dict]]) -> None:
    """Reorder every member's checkpoints by epoch, latest first (in place)."""
    for ms in members.values():
        for m in ms:
            if "epochs" not in m:
                raise SystemExit(
                    "--order last: a run lacks checkpoints/top.json (the kept epochs); "
                    "it needs the run folders as evaluate wrote them"
                )
            order = np.argsort(-m["epochs"], kind="stable")
            for key in ("test", "val", "epochs"):
                if key in m:
                    m[key] = m[key][order]


def sweep(
    report_dir: Path,
    manifest: Path | None = None,
    max_members: int | None = None,
    order: str = "best",
) -> list[dict]:
    """One row per k: validation UA, pooled test UA per repeat, wins and bootstrap (the
    first `max_members` seed-ensemble members of each fold, all when None). `order`:
    average the k best checkpoints by validation UA (`best`) or the k latest (`last`: no
    choice on validation, so the plain validation UA is not optimistic)."""
    from ks_keras.stats import paired_bootstrap_ua, sign_test, unweighted_recall

    members = load_members(report_dir, max_members)
    if order == "last":
        _latest_first(members)
    if manifest is not None:
        speaker_of = _speakers_from_manifest(manifest)
        for ms in members.values():
            for m in ms:
                if "val_ids" in m and "val_speakers" not in m:
                    m["val_speakers"] = np.array([speaker_of[str(i)] for i in m["val_ids"]])
    # The report's metrics.json gives the baseline (absent while the run is still going).
    metrics_path = report_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    n_classes = next(iter(members.values()))[0]["test"].shape[-1]
    baseline = metrics.get("baseline") or {}
    base_pred = {int(k): np.asarray(v) for k, v in (baseline.get("predictions") or {}).items()}
    base_ua = {int(k): v["ua"] for k, v in (baseline.get("folds") or {}).items()}
    repeats = sorted({r for r, _ in members})
    folds = sorted({f for _, f in members})
    kmax = min(m["test"].shape[0] for ms in members.values() for m in ms)
    rows = []
    for k in range(1, kmax + 1):
        val = [
            unweighted_recall(m["val_labels"], m["val"][:k].mean(0).argmax(-1), n_classes)
            for ms in members.values()
            for m in ms
            if "val" in m
        ]
        pred = {
            key: np.mean([m["test"][:k].mean(0) for m in ms], axis=0).argmax(-1)
            for key, ms in members.items()
        }
        truth = {key: ms[0]["test_labels"] for key, ms in members.items()}
        pooled = []
        for r in repeats:
            keys = [(r, f) for f in folds if (r, f) in pred]
            y = np.concatenate([truth[key] for key in keys])
            p = np.concatenate([pred[key] for key in keys])
            pooled.append(unweighted_recall(y, p, n_classes))
        # Held-out validation UA, averaged over validation speakers: cross-fitted when the
        # checkpoints were ranked on validation UA, plain for the latest k (nothing chosen).
        score = cross_fitted_ua if order == "best" else per_speaker_ua
        held = [score(m, k, n_classes) for ms in members.values() for m in ms]
        held = [c for c in held if c is not None]
        row = {
            "k": k,
            "order": order,
            "val_ua": float(np.mean(val)) if val else None,
            "val_ua_cross": float(np.mean(held)) if held else None,
            "ua": pooled,
        }
        if base_ua and all(f in base_ua for f in folds):
            fold_ua = {
                f: np.mean(
                    [unweighted_recall(truth[(r, f)], pred[(r, f)], n_classes) for r in repeats]
                )
                for f in folds
            }
            wins = sum(fold_ua[f] > base_ua[f] + 1e-9 for f in folds)
            losses = sum(fold_ua[f] < base_ua[f] - 1e-9 for f in folds)
            row.update(wins=int(wins), n_folds=len(folds), sign_p=sign_test(wins, losses))
            if all((r, f) in pred for r in repeats for f in folds) and base_pred:
                y = np.concatenate([truth[(repeats[0], f)] for f in folds])
                model = np.stack([np.concatenate([pred[(r, f)] for f in folds]) for r in repeats])
                base = np.concatenate([base_pred[f] for f in folds])
                groups = np.concatenate([np.full(len(truth[(repeats[0], f)]), f) for f in folds])
                row["bootstrap"] = paired_bootstrap_ua(y, model, base, n_classes, groups=groups)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    last = bool(rows) and rows[0].get("order") == "last"
    lines = [
        (
            "| latest checkpoints averaged (k) | val UA, per speaker | val UA | UA (pooled) | "
            if last
            else "| checkpoints averaged (k) | val UA, cross-fitted | val UA | UA (pooled) | "
        )
        + "folds > baseline | UA − baseline [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ua = np.asarray(row["ua"])
        boot = row.get("bootstrap")
        ci = f"{boot['diff']:+.3f} [{boot['low']:+.3f}, {boot['high']:+.3f}]" if boot else "-"
        wins = f"{row['wins']}/{row['n_folds']}" if "wins" in row else "-"
        val = "-" if row["val_ua"] is None else f"{row['val_ua']:.3f}"
        cross = "-" if row["val_ua_cross"] is None else f"{row['val_ua_cross']:.3f}"
        cells = [str(row["k"]), cross, val, f"{ua.mean():.3f} ± {ua.std():.3f}", wins, ci]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path, help="an evaluate/demo/ablation report folder")
    parser.add_argument(
        "--manifest", type=Path, help="speakers of the validation ids, for runs that lack them"
    )
    parser.add_argument(
        "--members",
        type=int,
        metavar="N",
        help="average only the first N seed-ensemble members of each fold (as train.ensemble=N "
        "would; the members are reused across ensemble sizes), default all",
    )
    parser.add_argument(
        "--order",
        choices=("best", "last"),
        default="best",
        help="average the k best checkpoints by validation UA (default; what "
        "train.checkpoint_ensemble keeps with validation speakers) or the k latest epochs "
        "(what it keeps with eval.val_speakers: 0; read from a run that kept every epoch, "
        "train.checkpoint_ensemble = train.epochs, to compare both on the same trainings)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.members is not None and args.members < 1:
        parser.error(f"--members: expected an integer >= 1, got {args.members}")
    rows = sweep(args.report_dir, args.manifest, args.members, args.order)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(run())
