"""`ks-keras predict`: the command glue (see `ks_keras.cli`).

One audio file + transcript, or a manifest, through a local model (`ks_keras.predict.Predictor`)
or a TF Serving server (`ks_keras.serving.serving_predictor`, with `--rest` / `--grpc`). The
library (`ks_keras.predict`) never imports `ks_keras.serving`; this module joins them.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from ks_keras.export import metadata_config
from ks_keras.predict import (
    BadAudioError,
    Prediction,
    Predictor,
    check_output_path,
    read_prediction_manifest,
)
from ks_keras.predict.manifest import _manifest_chunks


def _print_notes(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):  # unique, in order
        print(f"note: {note}", file=sys.stderr)


def run_predict(args) -> int:
    """`ks-keras predict` (see `ks_keras.cli`)."""
    if args.manifest and args.audio:
        raise ValueError("give either an audio file or --manifest, not both")
    if args.output:
        check_output_path(args.output, "--output")
    predictor = _make_predictor(args)
    signature = args.signature
    modalities = predictor.metadata["modalities"]
    if args.manifest:
        return _predict_manifest(predictor, args, signature)
    if "audio" in modalities and not args.audio:
        raise ValueError("the model reads audio: give an audio file (or --manifest)")
    if "text" in modalities and args.text is None:
        raise ValueError("the model reads text: give the transcript with --text")
    if args.audio and not Path(args.audio).is_file():
        raise FileNotFoundError(f"audio file not found: {args.audio}")
    paths = [args.audio] if "audio" in modalities else None
    texts = [args.text] if "text" in modalities else None
    [pred] = predictor.predict_files(paths, texts, signature=signature)
    ignored = [
        f"the model does not read {mod}; the given {what} was ignored"
        for mod, what, given in (("audio", "audio file", args.audio), ("text", "--text", args.text))
        if given is not None and mod not in modalities
    ]
    notes = predictor.featurizer.notes + ignored + pred.notes
    if args.json:
        print(
            json.dumps(
                {
                    **pred.to_dict(),
                    "notes": list(dict.fromkeys(notes)),
                    "model": predictor.source,
                    "signature": signature,
                },
                indent=2,
                allow_nan=False,  # NaN is not JSON; outputs were checked to be finite
            )
        )
        return 0
    _print_notes(notes)
    where = pred.path or "text"
    print(f"{where}: {pred.label} ({pred.probabilities[pred.label]:.3f})")
    width = max(len(lab) for lab in predictor.labels)
    for lab in predictor.labels:
        p = pred.probabilities[lab]
        print(f"  {lab:<{width}}  {p:6.3f}  {'#' * int(round(p * 30))}")
    return 0


def _make_predictor(args) -> Predictor:
    if args.rest or args.grpc:
        from ks_keras.serving import serving_predictor

        return serving_predictor(
            args.model,
            rest_url=args.rest,
            grpc_target=args.grpc,
            model_name=args.model_name,
            version=args.model_version,
            config=args.config,
            overrides=args.overrides,
            **({"timeout": args.timeout} if getattr(args, "timeout", None) is not None else {}),
        )
    return Predictor.load(args.model, args.config, args.overrides)


def _predict_manifest(predictor: Predictor, args, signature: str) -> int:
    modalities = predictor.metadata["modalities"]
    rows = read_prediction_manifest(args.manifest, modalities)
    if "text" in modalities:
        names = [f"line {r['line']}" + (f" ({r['id']})" if r["id"] else "") for r in rows]
        predictor.featurizer.check_texts([r["text"] for r in rows], names)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    predictions = _predict_rows(predictor, args, signature, rows)
    labels = predictor.labels
    # Manifest labels go through the model's label map (e.g. excited → happy) as in training.
    label_map = metadata_config(predictor.metadata).data.label_map
    truth = [label_map.get(r["label"], r["label"]) if r["label"] else None for r in rows]
    notes = predictor.featurizer.notes + [n for p in predictions for n in p.notes]
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.json:
            _write_predictions_json(out, predictor, signature, notes, predictions, truth)
        else:
            _write_predictions_csv(out, labels, predictions, truth)
    finally:
        if args.output:
            out.close()
    if not args.json:
        _print_notes(notes)
    _print_accuracy(predictions, truth, labels)
    if args.output:
        print(f"wrote {len(predictions)} predictions to {args.output}", file=sys.stderr)
    return 0


def _predict_rows(predictor: Predictor, args, signature: str, rows: list[dict]) -> list[Prediction]:
    """Predictions in row order, in chunks under a progress bar; every bad audio file is
    collected into one `BadAudioError`."""
    from tqdm import tqdm

    modalities = predictor.metadata["modalities"]
    results: list[Prediction | None] = [None] * len(rows)
    bad_audio: list[str] = []
    with tqdm(
        total=len(rows), unit="utt", desc="predict", file=sys.stderr, disable=args.no_progress
    ) as bar:
        for idx in _manifest_chunks(rows, args.batch_size, predictor.featurizer.per_speaker):
            chunk = [rows[i] for i in idx]
            paths = [r["path"] for r in chunk] if "audio" in modalities else None
            texts = [r["text"] for r in chunk] if "text" in modalities else None
            ids = [r["id"] or str(r["path"] or f"line {r['line']}") for r in chunk]
            speakers = [r["speaker"] for r in chunk]
            try:
                preds = predictor.predict_files(
                    paths, texts, ids, signature, speakers=speakers, batch_size=args.batch_size
                )
            except BadAudioError as e:
                bad_audio += e.errors  # keep going: the error names every bad file at once
                continue
            for i, pred in zip(idx, preds):
                results[i] = pred
            bar.update(len(idx))
    if bad_audio:
        raise BadAudioError(bad_audio)
    return list(results)  # type: ignore[arg-type]


def _write_predictions_json(
    out: TextIO,
    predictor: Predictor,
    signature: str,
    notes: list[str],
    predictions: list[Prediction],
    truth: list[str | None],
) -> None:
    records = [{**p.to_dict(), "true_label": t} for p, t in zip(predictions, truth)]
    json.dump(
        {
            "model": predictor.source,
            "signature": signature,
            "notes": list(dict.fromkeys(notes)),
            "predictions": records,
        },
        out,
        indent=2,
        allow_nan=False,
    )
    out.write("\n")


def _write_predictions_csv(
    out: TextIO, labels: list[str], predictions: list[Prediction], truth: list[str | None]
) -> None:
    writer = csv.writer(out)
    has_truth = any(t is not None for t in truth)
    writer.writerow(
        ["id", "path", "predicted", "class_id"]
        + [f"p_{lab}" for lab in labels]
        + (["label", "correct"] if has_truth else [])
    )
    for p, t in zip(predictions, truth):
        row = [p.id, p.path or "", p.label, p.class_id]
        row += [f"{p.probabilities[lab]:.6f}" for lab in labels]
        if has_truth:
            row += [t or "", "" if t is None else int(t == p.label)]
        writer.writerow(row)


def _print_accuracy(
    predictions: list[Prediction], truth: list[str | None], labels: list[str]
) -> None:
    """Accuracy over the rows with a label (nothing when none has one), on stderr."""
    labelled = [(p.label, t) for p, t in zip(predictions, truth) if t is not None]
    if labelled:
        unknown = sorted({t for _, t in labelled} - set(labels))
        acc = np.mean([p == t for p, t in labelled])
        msg = f"accuracy on {len(labelled)} labelled rows: {acc:.3f}"
        if unknown:
            msg += f" (labels the model does not know: {unknown})"
        print(msg, file=sys.stderr)
