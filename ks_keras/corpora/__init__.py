"""Corpora: the generic manifest CSV, the shipped EmoDB, and the IEMOCAP adapter.

Example:

```python
from ks_keras.config import DataConfig
from ks_keras.corpora import load_corpus

corpus = load_corpus(DataConfig(corpus="emodb", labels=["angry", "happy", "neutral", "sad"]))
len(corpus), corpus.labels   # 339, ['angry', 'happy', 'neutral', 'sad']
```
"""

from __future__ import annotations

from ks_keras.config import DataConfig
from ks_keras.corpora.emodb import EMODB_4CLASS, EMODB_LABELS, emodb_manifest_path, load_emodb
from ks_keras.corpora.iemocap import load_iemocap, prepare_iemocap
from ks_keras.corpora.manifest import Corpus, ManifestError, Utterance, read_manifest


def load_corpus(data_cfg: DataConfig) -> Corpus:
    """The corpus named by `data.corpus`, with `data.label_map` and `data.labels` applied.

    - `manifest`: `data.manifest` (a CSV) is required;
    - `emodb`: the shipped copy (`data/emodb/manifest.csv`) unless `data.manifest` is set;
    - `iemocap`: `data.manifest` = a prepared CSV or the release folder.
    """
    if data_cfg.corpus == "emodb":
        return load_emodb(data_cfg)
    if data_cfg.corpus == "iemocap":
        return load_iemocap(data_cfg)
    if data_cfg.corpus == "manifest":
        if not data_cfg.manifest:
            raise ValueError(
                "data.manifest: required when data.corpus is 'manifest' "
                "(a CSV with columns path,speaker,label,text)"
            )
        return read_manifest(
            data_cfg.manifest, label_map=data_cfg.label_map, labels=data_cfg.labels
        )
    raise ValueError(
        f"data.corpus: expected 'manifest', 'emodb' or 'iemocap', got {data_cfg.corpus!r}"
    )


__all__ = [
    "EMODB_4CLASS",
    "EMODB_LABELS",
    "Corpus",
    "ManifestError",
    "Utterance",
    "emodb_manifest_path",
    "load_corpus",
    "prepare_iemocap",
    "read_manifest",
]
