"""Speaker split of `ks-keras train` (`ks_keras.commands.train`): `split_speakers` chooses the
held-out validation speakers (gender-balanced where the manifest gives genders)."""

from __future__ import annotations

import random

from ks_keras.corpora.manifest import Corpus


def split_speakers(corpus: Corpus, n_val: int, seed: int) -> tuple[list[str], list[str]]:
    """`(train_speakers, val_speakers)`: `n_val` validation speakers chosen by `seed`.

    Where the manifest gives genders, validation speakers alternate between them (one of
    each for `n_val=2`), so neither side loses a whole gender.

    Raises:
        ValueError: fewer than `n_val + 1` speakers.
    """
    speakers = sorted(corpus.speakers)
    if n_val < 1:
        raise ValueError(f"eval.val_speakers: expected at least 1, got {n_val}")
    if len(speakers) < n_val + 1:
        raise ValueError(
            f"eval.val_speakers={n_val}: the corpus has {len(speakers)} speaker(s) "
            f"({', '.join(speakers)}); need at least {n_val + 1} (validation + training)"
        )
    gender: dict[str, set] = {}
    for u in corpus.utterances:
        gender.setdefault(u.speaker, set()).add(u.gender)
    gender_of = {s: (next(iter(g)) if len(g) == 1 else None) for s, g in gender.items()}
    order = list(speakers)
    random.Random(seed).shuffle(order)
    chosen: list[str] = []
    for _ in range(n_val):
        left = [s for s in order if s not in chosen]
        used = [gender_of[s] for s in chosen if gender_of[s]]
        # Prefer a gender not validated yet; otherwise the next speaker in seeded order.
        fresh = [s for s in left if gender_of[s] and gender_of[s] not in used]
        chosen.append(fresh[0] if fresh else left[0])
    val = sorted(chosen)
    return [s for s in speakers if s not in val], val
