"""Small file helpers shared by every stage: strict UTF-8 reading, atomic writes, checksums,
and naming what a file is when it is not what was expected.

Example:

```python
text = read_utf8("data/emodb/manifest.csv")   # ValueError naming the line if not UTF-8
atomic_write_text(Path("run/best.json"), "{}")  # readers see the old or the new file, never half
describe_file("model.keras")                    # 'an HDF5 file (a legacy .h5 model or ...)'
```
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def read_utf8(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped).

    Raises:
        ValueError: the file is not UTF-8; the message names the file, the line and column of
            the first bad byte, and how to fix it.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        byte = data[e.start]
        raise ValueError(
            f"{path}: line {line}, column {column}: the {what} is not UTF-8 text (byte "
            f"0x{byte:02x}; Latin-1/Windows-1252 encodes ä ö ü ß like this); save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name}`"
        ) from None
    return text.removeprefix("\ufeff")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`.

    A process killed at any moment leaves either the old file or the new one (plus perhaps a
    `*.tmp<pid>` file), never a half-written `path`.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """`atomic_write_text` of `data` as indented JSON (NaN/inf are refused, not written)."""
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: str | Path) -> str:
    """What a file looks like from its first bytes, for messages about a file of the wrong kind.

    Example:

    >>> describe_file("notes.txt")  # doctest: +SKIP
    'a text file starting with "hello"'
    """
    path = Path(path)
    if path.is_dir():
        return "a folder"
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(_HDF5_SIGNATURE):
        return (
            "an HDF5 file (a legacy .h5 model or a .weights.h5 weights file), not a Keras v3 "
            "archive"
        )
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"a damaged or truncated zip archive ({size} bytes)"
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if "config.json" in names:
            return "a Keras v3 archive"
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        return f"a zip archive without the config.json of a Keras model ({shown or 'empty'})"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file"
    if head.startswith((b"RIFF", b"fLaC", b"OggS")):
        return "an audio file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the sample
            return f"binary data ({size} bytes) of an unknown kind"
        text = head[: e.start].decode("utf-8")
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    if first.startswith(("{", "[")):
        return f"a JSON/text file starting with {first!r}"
    return f"a text file starting with {first!r}"
