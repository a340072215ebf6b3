"""Import a file of scripts/ (not a package) as a module, for the tests of those scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_file(name: str, path: Path):
    """The module `name` executed from `path`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """`scripts/<name>.py` as a module."""
    return load_file(name, ROOT / "scripts" / f"{name}.py")
