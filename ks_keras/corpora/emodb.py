"""EmoDB (Berlin Database of Emotional Speech), shipped with the project under `data/emodb/`.

535 utterances, 10 speakers, 7 classes (CC0 packaging; see `data/emodb/README.md`). Views:

- 7-class (default): every label, sorted: angry, bored, disgusted, fearful, happy, neutral, sad;
- 4-class: `data.labels: [angry, happy, neutral, sad]` (339 utterances).

Where the shipped copy is found (first hit wins):

1. `data.manifest`, if set;
2. the folder in the environment variable `KS_KERAS_EMODB` (holding `manifest.csv`);
3. `data/emodb/manifest.csv` in a parent folder of this module (the repository root for a
   source checkout or an editable install);
4. `data/emodb/manifest.csv` under the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ks_keras.config import DataConfig
from ks_keras.corpora.manifest import Corpus, read_manifest

EMODB_LABELS = ("angry", "bored", "disgusted", "fearful", "happy", "neutral", "sad")
EMODB_4CLASS = ("angry", "happy", "neutral", "sad")
ENV_VAR = "KS_KERAS_EMODB"
RELATIVE = Path("data") / "emodb" / "manifest.csv"


def emodb_manifest_path() -> Path:
    """Locate the shipped `data/emodb/manifest.csv` (see the module docstring)."""
    tried: list[str] = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidate = Path(env).expanduser() / "manifest.csv"
        if candidate.is_file():
            return candidate
        tried.append(f"${ENV_VAR}={env}")
    for parent in Path(__file__).resolve().parents:
        candidate = parent / RELATIVE
        if candidate.is_file():
            return candidate
    tried.append(f"{RELATIVE} in the parents of {Path(__file__).resolve().parent}")
    candidate = Path.cwd() / RELATIVE
    if candidate.is_file():
        return candidate
    tried.append(str(candidate))
    raise FileNotFoundError(
        "the shipped EmoDB manifest was not found (tried " + "; ".join(tried) + "); run from a "
        f"source checkout, set {ENV_VAR} to the folder holding manifest.csv, or set data.manifest"
    )


def load_emodb(data_cfg: DataConfig) -> Corpus:
    """EmoDB as a `Corpus` with `data.label_map` and `data.labels` applied."""
    path = Path(data_cfg.manifest) if data_cfg.manifest else emodb_manifest_path()
    return read_manifest(path, label_map=data_cfg.label_map, labels=data_cfg.labels, name="emodb")
