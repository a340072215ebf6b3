"""`ks-keras features`: extract and cache the features of the configured corpus."""

from __future__ import annotations

import numpy as np

from ks_keras.features.cache import extract_corpus, run_summary


def run_features(args) -> int:
    """CLI: `ks-keras features --config … [--set …]`: extract the configured corpus."""
    from ks_keras.config import load_config
    from ks_keras.corpora import load_corpus
    from ks_keras.features import check_model_dims

    cfg = load_config(args.config, args.overrides)
    check_model_dims(cfg)
    corpus = load_corpus(cfg.data)
    counts = ", ".join(f"{k} {v}" for k, v in corpus.counts().items())
    print(
        f"corpus {corpus.name}: {len(corpus)} utterances, {len(corpus.speakers)} speakers "
        f"({counts})"
    )
    cache = extract_corpus(cfg, corpus, progress=not args.no_progress)
    if args.no_progress:
        print(run_summary(cache))
    max_len = {"audio": cfg.data.audio_max_len, "text": cfg.data.text_max_len}
    for m in cache.modalities:
        lengths = cache.lengths(corpus.ids, m)
        cropped = float(np.mean(lengths > max_len[m]))
        print(
            f"  {m:5s} {cache.metadata['names'][m]}: dim {cache.dims[m]}, length median "
            f"{int(np.median(lengths))} max {int(lengths.max())} → batches [B, {max_len[m]}, "
            f"{cache.dims[m]}] ({cropped:.0%} cropped)"
        )
    return 0
