"""IEMOCAP adapter: read the official release layout, write a manifest.

IEMOCAP is licensed; users bring their own copy (`IEMOCAP_full_release/`). The layout read:

- `SessionN/dialog/EmoEvaluation/<dialog>.txt`: one summary line per utterance,
  `[start - end]<TAB>utt_id<TAB>label<TAB>[V, A, D]` (codes ang, hap, exc, sad, neu, fru, sur,
  fea, dis, oth, xxx = no agreement);
- `SessionN/sentences/wav/<dialog>/<utt_id>.wav` (16 kHz mono);
- `SessionN/dialog/transcriptions/<dialog>.txt`: lines `utt_id [start-end]: words`; lines
  whose id does not start with `Ses` are not utterances.

Utterance ids look like `Ses01F_impro01_M013`: session 1; the speaker's gender is the first
letter of the last segment (`M`), so the speaker is `Ses01M` (10 speakers = 5 sessions × 2).

The default 4-class manifest merges excited into happy and keeps angry/happy/neutral/sad:
5531 utterances on the full release (angry 1103, neutral 1708, happy 1636, sad 1084).
`all_labels=True` writes every agreed label under its full name (excited kept apart), so a
config's `data.label_map` / `data.labels` can choose the classes.

Example:

```bash
ks-keras prepare iemocap --root IEMOCAP_full_release --out data/iemocap/manifest.csv
```
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path

from ks_keras.config import DataConfig
from ks_keras.corpora.manifest import (
    Corpus,
    ManifestError,
    Utterance,
    _listing,
    read_manifest,
    select_labels,
)

CODES = {
    "ang": "angry",
    "hap": "happy",
    "exc": "excited",
    "sad": "sad",
    "neu": "neutral",
    "fru": "frustrated",
    "sur": "surprised",
    "fea": "fearful",
    "dis": "disgusted",
    "oth": "other",
}
FOUR_CLASS = ("angry", "happy", "neutral", "sad")
FOUR_CLASS_MAP = {"excited": "happy"}
MANIFEST_COLUMNS = ("id", "path", "speaker", "session", "gender", "label", "text", "duration")

_EVAL_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\t(\S+)\t(\S+)\t")
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s*\[[^\]]*\]:\s?(.*)$")
_UTT_ID = re.compile(r"^Ses(\d\d)[MF]_.+_([MF])[^_]*$")


def _visible_txt(folder: Path) -> list[Path]:
    # The release carries macOS "._*" resource files next to the real ones: skip them.
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))


def parse_utterance_id(utt_id: str) -> tuple[str, str, str]:
    """`Ses01F_impro01_M013` → `(session "Ses01", speaker "Ses01M", gender "m")`."""
    m = _UTT_ID.match(utt_id)
    if not m:
        raise ValueError(f"not an IEMOCAP utterance id: {utt_id!r}")
    session = f"Ses{m.group(1)}"
    gender = m.group(2)
    return session, f"{session}{gender}", gender.lower()


def read_release(root: str | Path) -> list[Utterance]:
    """Every labelled utterance of an IEMOCAP release (labels as full names, `xxx` dropped).

    Raises:
        FileNotFoundError: `root` or its `SessionN` folders are missing.
        ManifestError: missing WAVs / transcripts and unparsable ids, all listed together.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IEMOCAP root not found: {root}")
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir())
    if not sessions:
        raise FileNotFoundError(
            f"{root}: no Session1 … Session5 folders; expected the official release layout "
            f"(IEMOCAP_full_release/SessionN/dialog/EmoEvaluation/*.txt)"
        )
    problems: dict[str, list[str]] = {}
    utterances: list[Utterance] = []
    for session_dir in sessions:
        eval_dir = session_dir / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            problems.setdefault("missing EmoEvaluation folder", []).append(str(eval_dir))
            continue
        for eval_file in _visible_txt(eval_dir):
            dialog = eval_file.stem
            transcripts = _read_transcripts(
                session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
            )
            for line in eval_file.read_text(errors="replace").splitlines():
                m = _EVAL_LINE.match(line)
                if not m:
                    continue
                start, end, utt_id, code = m.groups()
                if code == "xxx":
                    continue
                if code not in CODES:
                    problems.setdefault("unknown label code", []).append(f"{utt_id}: {code}")
                    continue
                try:
                    session, speaker, gender = parse_utterance_id(utt_id)
                except ValueError:
                    problems.setdefault("unparsable utterance id", []).append(utt_id)
                    continue
                wav = session_dir / "sentences" / "wav" / dialog / f"{utt_id}.wav"
                if not wav.is_file():
                    problems.setdefault("missing WAV", []).append(str(wav))
                if utt_id not in transcripts:
                    problems.setdefault("missing transcript", []).append(f"{utt_id} ({dialog})")
                utterances.append(
                    Utterance(
                        id=utt_id,
                        path=str(wav.resolve()),
                        speaker=speaker,
                        label=CODES[code],
                        text=transcripts.get(utt_id, ""),
                        session=session,
                        gender=gender,
                        duration=round(float(end) - float(start), 4),
                    )
                )
    dups = sorted(i for i, n in Counter(u.id for u in utterances).items() if n > 1)
    if dups:
        problems["duplicate utterance id"] = dups
    if problems:
        lines = [f"{root}: the IEMOCAP release is incomplete or not in the official layout:"]
        for kind, items in problems.items():
            lines.append(f"  {kind} ({len(items)}): {_listing(items)}")
        raise ManifestError("\n".join(lines))
    if not utterances:
        raise ManifestError(
            f"{root}: no labelled utterances found in SessionN/dialog/EmoEvaluation/*.txt"
        )
    return utterances


def _read_transcripts(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _TRANSCRIPT_LINE.match(line.strip())
        if m and m.group(1).startswith("Ses"):
            out[m.group(1)] = m.group(2).strip()
    return out


def prepare_iemocap(root: str | Path, out: str | Path, all_labels: bool = False) -> Corpus:
    """Write an IEMOCAP manifest CSV (paths relative to the manifest's folder).

    Args:
        root: the release folder (`IEMOCAP_full_release`).
        out: manifest CSV to write (parent folders are created).
        all_labels: keep every agreed label (full names, excited apart) instead of the
            4-class view with excited merged into happy.

    Returns:
        The written utterances as a `Corpus`.
    """
    utterances = read_release(root)
    if all_labels:
        kept, labels = select_labels(utterances, None, None, str(root))
    else:
        kept, labels = select_labels(utterances, FOUR_CLASS_MAP, list(FOUR_CLASS), str(root))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    base = out.resolve().parent
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for u in kept:
            rel = Path(os.path.relpath(u.path, base)).as_posix()
            writer.writerow(
                [u.id, rel, u.speaker, u.session, u.gender, u.label, u.text, u.duration]
            )
    os.replace(tmp, out)
    return Corpus(kept, labels, name="iemocap", source=str(out))


def load_iemocap(data_cfg: DataConfig) -> Corpus:
    """IEMOCAP from `data.manifest`: a prepared manifest CSV, or the release folder itself
    (then every agreed label is read and `data.label_map` / `data.labels` choose classes)."""
    if not data_cfg.manifest:
        raise ValueError(
            "data.manifest: IEMOCAP is not shipped (it is licensed); run `ks-keras prepare "
            "iemocap --root IEMOCAP_full_release --out data/iemocap/manifest.csv` and set "
            "data.manifest to the CSV (or to the release folder)"
        )
    source = Path(data_cfg.manifest)
    if source.is_dir():
        utterances = read_release(source)
        kept, labels = select_labels(utterances, data_cfg.label_map, data_cfg.labels, str(source))
        return Corpus(kept, labels, name="iemocap", source=str(source))
    return read_manifest(
        source, label_map=data_cfg.label_map, labels=data_cfg.labels, name="iemocap"
    )
