"""TF Serving layout: integer version folders under `<base_dir>/<name>/` and reading an
export's metadata without loading TensorFlow."""

from __future__ import annotations

from pathlib import Path

from ks_keras.export.metadata import (
    EXPORT_FORMAT,
    LABELS_FILE,
    METADATA_FILE,
    _check_format_version,
    _read_json,
    metadata_functionals,
)


def list_versions(model_dir: str | Path) -> list[int]:
    """Integer version folders under `model_dir` holding a SavedModel, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    versions = [
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").is_file()
    ]
    return sorted(versions)


def next_version(model_dir: str | Path) -> int:
    """The next free integer version under `model_dir` (1 for a new model)."""
    model_dir = Path(model_dir)
    taken = (
        [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(taken, default=0) + 1


def resolve_export_dir(path: str | Path) -> Path:
    """A version folder from either a version folder or a model base folder (→ latest).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: it is neither a SavedModel nor a folder of integer versions.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: expected an export folder (saved_models/<name>[/<version>])")
    if (path / "saved_model.pb").is_file():
        return path
    versions = list_versions(path)
    if not versions:
        raise ValueError(
            f"{path}: not a ks_keras export: expected saved_model.pb here or integer version "
            "folders (saved_models/<name>/<version>/) below it"
        )
    return path / str(versions[-1])


def load_export_metadata(path: str | Path) -> tuple[Path, dict]:
    """Read an export's `assets/ks_keras.json` without loading TensorFlow.

    Returns:
        `(version_dir, metadata)`.
    """
    version_dir = resolve_export_dir(path)
    meta_path = version_dir / "assets" / METADATA_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{version_dir}: a SavedModel, but not a ks_keras export (no assets/{METADATA_FILE})"
        )
    meta = _read_json(meta_path)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: not a ks_keras export (format={meta.get('format')!r})")
    _check_format_version(meta, meta_path)
    for key in ("labels", "modalities", "inputs", "features", "signatures"):
        if key not in meta:
            raise ValueError(f"{meta_path}: incomplete export metadata (no {key!r})")
    try:
        metadata_functionals(meta)
    except ValueError as e:
        raise ValueError(f"{meta_path}: {e}") from None
    labels_path = version_dir / "assets" / LABELS_FILE
    if labels_path.is_file():
        from ks_keras.files import read_utf8

        listed = [ln.strip() for ln in read_utf8(labels_path, LABELS_FILE).splitlines()]
        listed = [ln for ln in listed if ln]
        if listed != list(meta["labels"]):
            raise ValueError(
                f"{labels_path}: lists {listed}, but {meta_path.name} says {meta['labels']}; "
                "the export was edited or mixed up: export the model again"
            )
    return version_dir, meta
