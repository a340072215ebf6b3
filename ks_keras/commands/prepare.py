"""`ks-keras prepare <corpus>`: write a manifest CSV for a corpus you bring."""

from __future__ import annotations

from ks_keras.corpora.iemocap import prepare_iemocap


def run_prepare_iemocap(args) -> int:
    """CLI: `ks-keras prepare iemocap --root DIR --out manifest.csv [--all-labels]`."""
    corpus = prepare_iemocap(args.root, args.out, all_labels=args.all_labels)
    counts = ", ".join(f"{k} {v}" for k, v in corpus.counts().items())
    print(f"wrote {args.out}: {len(corpus)} utterances, {len(corpus.speakers)} speakers ({counts})")
    return 0
