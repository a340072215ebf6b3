"""Manifests: the CSV files `ks-keras predict --manifest` reads (`read_prediction_manifest`),
how their rows are grouped into extraction calls (`_manifest_chunks`), and the check that an
output file can be written (`check_output_path`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_prediction_manifest(path: str | Path, modalities: list[str]) -> list[dict[str, Any]]:
    """Rows of a CSV to predict: `path` (audio, relative to the CSV) and/or `text`, optional
    `id`, `speaker` (pools per-speaker normalisation) and `label` (then accuracy is
    reported). The training manifest format works as is. The error lists every bad row."""
    from ks_keras.corpora.manifest import extra_fields_problem, read_csv_rows

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    columns, numbered = read_csv_rows(path)
    need = [c for c, mod in (("path", "audio"), ("text", "text")) if mod in modalities]
    missing = [c for c in need if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} (has {columns}); the model reads {modalities}"
        )
    if not numbered:
        raise ValueError(f"{path}: no rows to predict")
    extra = [
        f"line {i}: {problem}"
        for i, row in numbered
        if (problem := extra_fields_problem(row, len(columns)))
    ]
    if extra:
        raise ValueError(
            f"{path}: {len(extra)} row(s) with more fields than the header: " + "; ".join(extra)
        )
    out, absent = [], []
    for i, raw in numbered:
        row = {k.strip(): v for k, v in raw.items() if isinstance(k, str)}
        item = {
            "id": (row.get("id") or "").strip() or None,
            "speaker": (row.get("speaker") or "").strip() or None,
            "line": i,
            "label": (row.get("label") or "").strip() or None,
            "text": row.get("text") if "text" in columns else None,
            "path": None,
        }
        if "path" in columns and (row.get("path") or "").strip():
            audio = Path(row["path"].strip())
            audio = audio if audio.is_absolute() else path.parent / audio
            item["path"] = audio
            if "audio" in modalities and not audio.is_file():
                absent.append(f"line {i}: {audio}")
        elif "audio" in modalities:
            absent.append(f"line {i}: empty path")
        out.append(item)
    if absent:
        raise ValueError(f"{path}: {len(absent)} audio file(s) not found: " + "; ".join(absent))
    return out


def _manifest_chunks(rows: list[dict], batch_size: int, per_speaker: bool) -> list[list[int]]:
    """Row indices per extraction call: fixed-size chunks, or (per-speaker normalisation)
    all rows of one speaker together so their statistics pool every utterance."""
    if not per_speaker:
        return [
            list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)
        ]
    by_speaker: dict[str, list[int]] = {}
    alone: list[int] = []
    for i, row in enumerate(rows):
        if row["speaker"]:
            by_speaker.setdefault(row["speaker"], []).append(i)
        else:
            alone.append(i)
    chunks = list(by_speaker.values())
    chunks += [alone[i : i + batch_size] for i in range(0, len(alone), batch_size)]
    return chunks


def check_output_path(path: str | Path, what: str) -> None:
    """Fail before any work if `path` cannot be written: its folder is missing or read-only,
    or it is a folder itself."""
    import os

    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder; give a file name, e.g. {path / 'out.csv'}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} {path}: the folder {folder} does not exist; create it first "
            f"(mkdir -p {folder})"
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path}: the folder {folder} is not writable")
