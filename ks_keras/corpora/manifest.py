"""The generic manifest CSV and the `Corpus` every later stage works with.

A manifest is a CSV with a header. Required columns: `path` (audio file, relative to the
manifest's folder or absolute), `speaker`, `label`, `text` (transcript; may be empty if the
text modality is not used). Optional: `id` (default: the file name without extension),
`session`, `gender`, `duration` (seconds). Other columns are ignored.

Labels: `label_map` (e.g. `{excited: happy}`) renames labels first; then `labels`, if given,
selects and orders the classes — rows whose (mapped) label is not among them are left out
(that is how the 4-class EmoDB view drops bored/disgusted/fearful), and how many per label is
logged (`Corpus.dropped` holds the counts). A name in `labels` that matches no row is an error
(it is almost always a typo).

CSV dialect: comma-separated, UTF-8 (a byte-order mark is allowed), fields containing commas,
quotes or line breaks in double quotes (`"Hallo, wie geht's"`). A row with more fields than
the header is an error naming its line: an unquoted comma in a transcript would otherwise cut
the text silently.

All problems found in a manifest (missing columns, empty fields, extra fields, duplicate ids,
bad durations, missing audio files, unknown labels) are reported together in one error.

Example:

```python
corpus = read_manifest("data/emodb/manifest.csv", labels=["angry", "happy", "neutral", "sad"])
corpus.labels                      # ['angry', 'happy', 'neutral', 'sad']
corpus.label_index("sad")          # 3
corpus.utterances[0].path          # absolute path of the WAV
```
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from ks_keras.files import read_utf8

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "speaker", "label", "text")
OPTIONAL_COLUMNS = ("id", "session", "gender", "duration")
# How many offenders of one kind an error message lists before summarising.
MAX_LISTED = 20


@dataclass(frozen=True)
class Utterance:
    """One recording with its transcript and label (the label after `label_map`)."""

    id: str
    path: str  # absolute
    speaker: str
    label: str
    text: str
    session: str | None = None
    gender: str | None = None
    duration: float | None = None


class Corpus:
    """Utterances plus the ordered class names.

    Attributes:
        name: corpus name (e.g. "emodb"), for reports.
        utterances: list of `Utterance`, in manifest order.
        labels: ordered class names; class index i is `labels[i]`.
        dropped: `{label: rows}` left out because the label is not among `data.labels`.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        labels: list[str],
        name: str = "corpus",
        source: str | None = None,
    ):
        self.name = name
        self.source = source
        self.utterances = list(utterances)
        self.labels = list(labels)
        self._label_index = {label: i for i, label in enumerate(self.labels)}
        self._by_id = {u.id: u for u in self.utterances}
        self.dropped: dict[str, int] = {}
        missing = sorted({u.label for u in self.utterances} - set(self.labels))
        if missing:
            raise ValueError(
                f"{name}: utterance labels {missing} are not among the classes {self.labels}"
            )

    def __len__(self) -> int:
        return len(self.utterances)

    def __repr__(self) -> str:
        return (
            f"Corpus({self.name!r}, {len(self)} utterances, {len(self.speakers)} speakers, "
            f"labels={self.labels})"
        )

    def label_index(self, label: str) -> int:
        """Class index of `label` (a name in `labels`)."""
        try:
            return self._label_index[label]
        except KeyError:
            raise ValueError(f"unknown label {label!r}; classes are {self.labels}") from None

    def __getitem__(self, utt_id: str) -> Utterance:
        try:
            return self._by_id[utt_id]
        except KeyError:
            raise KeyError(f"no utterance with id {utt_id!r} in {self.name}") from None

    @property
    def ids(self) -> list[str]:
        return [u.id for u in self.utterances]

    @property
    def speakers(self) -> list[str]:
        """Distinct speakers, sorted."""
        return sorted({u.speaker for u in self.utterances})

    def label_ids(self, ids: list[str] | None = None) -> np.ndarray:
        """Class indices (int32) of the given utterance ids (default: all, in order)."""
        utts = self.utterances if ids is None else [self[i] for i in ids]
        return np.array([self._label_index[u.label] for u in utts], np.int32)

    def speaker_of(self) -> dict[str, str]:
        """`{utterance id: speaker}`."""
        return {u.id: u.speaker for u in self.utterances}

    def counts(self) -> dict[str, int]:
        """Utterances per class, in class order."""
        c = Counter(u.label for u in self.utterances)
        return {label: c.get(label, 0) for label in self.labels}

    def subset(self, ids: list[str]) -> Corpus:
        return Corpus([self[i] for i in ids], self.labels, self.name, self.source)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", … and {more} more" if more > 0 else "")


class ManifestError(ValueError):
    """Everything wrong with a manifest, listed together."""


def select_labels(
    rows: list[Utterance],
    label_map: dict[str, str] | None,
    labels: list[str] | None,
    where: str,
) -> tuple[list[Utterance], list[str]]:
    """Apply `label_map`, then keep and order the `labels` subset (see the module doc)."""
    label_map = label_map or {}
    mapped = [Utterance(**{**u.__dict__, "label": label_map.get(u.label, u.label)}) for u in rows]
    present = {u.label for u in mapped}
    if labels:
        unknown = [label for label in labels if label not in present]
        if unknown:
            raise ManifestError(
                f"{where}: data.labels {unknown} match no utterance; labels present after "
                f"data.label_map: {sorted(present)}"
            )
        keep = set(labels)
        dropped = dropped_labels(mapped, labels)
        if dropped:
            logger.info(
                "%s: data.labels keeps %s; left out %d row(s) with other labels: %s",
                where,
                list(labels),
                sum(dropped.values()),
                ", ".join(f"{label} {n}" for label, n in dropped.items()),
            )
        return [u for u in mapped if u.label in keep], list(labels)
    return mapped, sorted(present)


def dropped_labels(rows: list[Utterance], labels: list[str] | None) -> dict[str, int]:
    """`{label: rows}` of the rows whose label is not among `labels` (sorted by label)."""
    if not labels:
        return {}
    counts = Counter(u.label for u in rows if u.label not in set(labels))
    return dict(sorted(counts.items()))


def read_csv_rows(path: Path, what: str = "manifest") -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and `(line, row)` pairs of a UTF-8 CSV (see the module docstring's dialect).

    Rows are `{column: text}`; a row with more fields than the header gets the extra fields
    under the key None (`csv.DictReader`'s rest key). `line` is the row's (last) line in the
    file: a quoted field may span lines.

    Raises:
        ValueError: not UTF-8 (naming the line), or not parseable as CSV.
    """
    text = read_utf8(path, what)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict]] = []
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: not a readable CSV ({e})") from None
    return columns, rows


def extra_fields_problem(row: dict, n_columns: int) -> str | None:
    """A description of a row's fields beyond the header, or None when it has none."""
    extra = row.get(None)
    if not extra:
        return None
    return (
        f"{n_columns + len(extra)} fields for {n_columns} columns (extra: "
        f"{', '.join(repr(v) for v in extra[:3])}); quote fields that contain commas"
    )


def _read_header_and_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """`read_csv_rows` of a manifest, its errors as `ManifestError`; every required column
    must be in the header."""
    try:
        columns, csv_rows = read_csv_rows(path)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing_cols:
        raise ManifestError(
            f"{path}: missing required column(s) {missing_cols}; found {columns}; "
            f"required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)}"
        )
    return columns, csv_rows


def _strip_rows(
    csv_rows: list[tuple[int, dict]], n_columns: int, problem: Callable[[str, str], None]
) -> list[tuple[int, dict[str, str]]]:
    """`(line, {column: text})` with stripped column names; fields beyond the header are
    reported and dropped."""
    raw_rows = []
    for line, row in csv_rows:
        extra = extra_fields_problem(row, n_columns)
        if extra:
            problem("more fields than the header", f"line {line}: {extra}")
        raw_rows.append(
            (line, {k.strip(): (v or "") for k, v in row.items() if isinstance(k, str)})
        )
    return raw_rows


def _row_utterance(
    line: int, r: dict[str, str], base: Path, problem: Callable[[str, str], None]
) -> Utterance | None:
    """The row's `Utterance` (None without a `path`); empty fields and a bad duration are
    reported."""
    for col in ("path", "speaker", "label"):
        if not r.get(col, "").strip():
            problem(f"empty {col}", f"line {line}")
    rel = r.get("path", "").strip()
    if not rel:
        return None
    audio = Path(rel) if Path(rel).is_absolute() else base / rel
    duration = None
    if r.get("duration", "").strip():
        try:
            duration = float(r["duration"])
            if not duration > 0:
                raise ValueError
        except ValueError:
            problem("bad duration (expected seconds > 0)", f"line {line}: {r['duration']!r}")
            duration = None
    return Utterance(
        id=r.get("id", "").strip() or Path(rel).stem,
        path=str(audio),
        speaker=r.get("speaker", "").strip(),
        label=r.get("label", "").strip(),
        text=r.get("text", "").strip(),
        session=r.get("session", "").strip() or None,
        gender=r.get("gender", "").strip() or None,
        duration=duration,
    )


def _raise_problems(path: Path, problems: dict[str, list[str]]) -> NoReturn:
    lines = [f"{path}: {sum(len(v) for v in problems.values())} problem(s):"]
    for kind, items in problems.items():
        lines.append(f"  {kind} ({len(items)}): {_listing(items)}")
    raise ManifestError("\n".join(lines))


def read_manifest(
    path: str | Path,
    label_map: dict[str, str] | None = None,
    labels: list[str] | None = None,
    name: str | None = None,
    check_files: bool = True,
) -> Corpus:
    """Read and validate a manifest CSV (see the module docstring for the format).

    Args:
        path: the CSV file; relative audio paths are resolved against its folder.
        label_map: rename labels, e.g. `{"excited": "happy"}`.
        labels: class subset and order; empty/None keeps every label, sorted.
        name: corpus name (default: the manifest's parent folder name).
        check_files: verify that every kept audio file exists.

    Returns:
        A `Corpus`.

    Raises:
        FileNotFoundError: the manifest itself is missing.
        ManifestError (a ValueError): everything wrong with its content, listed together.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.resolve().parent
    columns, csv_rows = _read_header_and_rows(path)

    problems: dict[str, list[str]] = {}

    def problem(kind: str, item: str) -> None:
        problems.setdefault(kind, []).append(item)

    raw_rows = _strip_rows(csv_rows, len(columns), problem)
    rows: list[Utterance] = []
    for line, r in raw_rows:
        utterance = _row_utterance(line, r, base, problem)
        if utterance is not None:
            rows.append(utterance)
    if not raw_rows:
        problem("no rows", str(path))

    id_counts = Counter(u.id for u in rows)
    dups = sorted(i for i, n in id_counts.items() if n > 1)
    for i in dups:
        problem("duplicate id (add a unique `id` column)", f"{i} ×{id_counts[i]}")

    where = str(path)
    kept: list[Utterance] = rows
    selected: list[str] = []
    if not problems:
        try:
            kept, selected = select_labels(rows, label_map, labels, where)
        except ManifestError as e:
            problem("unknown labels", str(e).split(": ", 1)[1])
    if check_files:
        for u in kept:
            if not Path(u.path).is_file():
                problem("missing audio file", u.path)
    if problems:
        _raise_problems(path, problems)
    if not kept:
        raise ManifestError(f"{path}: no utterances left after data.labels={labels}")
    corpus = Corpus(kept, selected, name=name or base.name, source=str(path))
    label_map = label_map or {}
    corpus.dropped = dropped_labels(
        [Utterance(**{**u.__dict__, "label": label_map.get(u.label, u.label)}) for u in rows],
        labels,
    )
    return corpus
