"""Speaker-independent folds: leave-one-speaker-out, leave-one-session-out, grouped k-fold.

Under the default ("honest") protocol every fold also holds out **validation speakers** from
its training speakers; the best epoch is chosen on them and the test fold is touched once, at
the end. Under the authors' ("paper") protocol there is no validation split: the best epoch is
chosen on the test fold itself (optimistic; every report made that way says so).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

from ks_keras.config import EvalConfig
from ks_keras.corpora.manifest import Corpus


@dataclass
class Fold:
    """One train/validation/test split of a corpus (all speaker-disjoint)."""

    index: int
    name: str
    test_groups: list[str]
    test_speakers: list[str]
    val_speakers: list[str]
    train_speakers: list[str]
    train_ids: list[str] = field(repr=False)
    val_ids: list[str] = field(repr=False)
    test_ids: list[str] = field(repr=False)

    def summary(self) -> dict:
        return {
            "fold": self.index,
            "name": self.name,
            "test_speakers": self.test_speakers,
            "val_speakers": self.val_speakers,
            "n_train": len(self.train_ids),
            "n_val": len(self.val_ids),
            "n_test": len(self.test_ids),
        }


def _groups(corpus: Corpus, eval_cfg: EvalConfig, seed: int) -> list[tuple[str, list[str]]]:
    """[(fold name, [speakers in the test group])] in a deterministic order."""
    speakers = corpus.speakers
    if eval_cfg.folds == "loso":
        return [(f"speaker {s}", [s]) for s in speakers]
    if eval_cfg.folds == "loso_session":
        missing = sorted({u.id for u in corpus.utterances if not u.session})
        if missing:
            raise ValueError(
                f"eval.folds=loso_session: {len(missing)} utterance(s) have no session "
                f"(e.g. {', '.join(missing[:5])}); add a `session` column to the manifest or "
                "use eval.folds=loso"
            )
        by_session: dict[str, set[str]] = {}
        for u in corpus.utterances:
            by_session.setdefault(u.session, set()).add(u.speaker)
        shared = [s for s in speakers if sum(s in v for v in by_session.values()) > 1]
        if shared:
            raise ValueError(
                f"eval.folds=loso_session: speaker(s) {shared} appear in several sessions, so "
                "sessions are not speaker-disjoint"
            )
        return [(f"session {name}", sorted(v)) for name, v in sorted(by_session.items())]
    # Grouped k-fold: speakers shuffled by seed, dealt round-robin into n_folds groups.
    n = eval_cfg.n_folds
    if n > len(speakers):
        raise ValueError(
            f"eval.n_folds={n}: the corpus has only {len(speakers)} speakers, so some folds "
            "would have no test data"
        )
    order = list(speakers)
    random.Random(seed).shuffle(order)
    groups = [sorted(order[i::n]) for i in range(n)]
    return [(f"group {i + 1} ({', '.join(g)})", g) for i, g in enumerate(groups)]


def _pick_validation(
    candidates: list[str], n: int, gender: dict[str, str | None], offset: int
) -> list[str]:
    """Choose n validation speakers, rotating with `offset`, balancing gender.

    Each pick comes from the gender with the most speakers still left for training (so the
    training set stays as balanced as possible), ties going to the gender validated least
    (so two validation speakers are one of each gender where possible).
    """
    rotated = candidates[offset % len(candidates) :] + candidates[: offset % len(candidates)]
    chosen: list[str] = []
    for _ in range(n):
        left = [s for s in rotated if s not in chosen]
        known = Counter(gender[s] for s in left if gender.get(s))
        if known:
            picked = Counter(gender.get(s) for s in chosen)
            # Most speakers left for training first; on a tie, the gender validated least.
            target = max(sorted(known), key=lambda g: (known[g], -picked[g]))
            pick = next(s for s in left if gender.get(s) == target)
        else:
            pick = left[0]
        chosen.append(pick)
    return sorted(chosen)


def speaker_genders(corpus: Corpus) -> dict[str, str | None]:
    """`{speaker: gender}` (None where the manifest has none or it is inconsistent)."""
    seen: dict[str, set] = {}
    for u in corpus.utterances:
        seen.setdefault(u.speaker, set()).add(u.gender)
    return {s: (next(iter(g)) if len(g) == 1 else None) for s, g in seen.items()}


def make_folds(
    corpus: Corpus, eval_cfg: EvalConfig, seed: int = 0, max_folds: int | None = None
) -> list[Fold]:
    """Split `corpus` into speaker-independent folds.

    Args:
        corpus: the utterances (with speaker, and session for `loso_session`).
        eval_cfg: `folds` (loso | loso_session | kfold), `n_folds`, `val_speakers`, `protocol`.
        seed: varies the k-fold grouping and which training speakers validate.
        max_folds: keep only the first N folds (None = `eval_cfg.max_folds`, then all).

    Returns:
        The folds. Under `protocol: paper` they have no validation speakers.

    Raises:
        ValueError: fewer than two classes, too few speakers for the protocol, a fold with no
            test or no training data, or sessions that share speakers.
    """
    present = sorted({u.label for u in corpus.utterances})
    if len(present) < 2:
        raise ValueError(
            f"labels: cross-validation needs at least 2 classes, the corpus has {present}"
        )
    n_val = eval_cfg.val_speakers if eval_cfg.protocol == "honest" else 0
    groups = _groups(corpus, eval_cfg, seed)
    if len(groups) < 2:
        raise ValueError(
            f"eval.folds={eval_cfg.folds}: the corpus has {len(groups)} group(s) "
            f"({', '.join(corpus.speakers)}); at least 2 are needed"
        )
    gender = speaker_genders(corpus)
    by_speaker: dict[str, list[str]] = {}
    for u in corpus.utterances:
        by_speaker.setdefault(u.speaker, []).append(u.id)

    folds = []
    for index, (name, test_speakers) in enumerate(groups):
        rest = [s for s in corpus.speakers if s not in test_speakers]
        if len(rest) < n_val + 1:
            raise ValueError(
                f"eval.val_speakers={n_val}: fold '{name}' leaves {len(rest)} training "
                f"speaker(s) ({', '.join(rest)}); need at least {n_val + 1} (validation + "
                "training). Lower eval.val_speakers or use a corpus with more speakers."
            )
        val = _pick_validation(rest, n_val, gender, offset=index + seed) if n_val else []
        train = [s for s in rest if s not in val]
        test_ids = [i for s in test_speakers for i in by_speaker[s]]
        if not test_ids:
            raise ValueError(f"fold '{name}': no test utterances")
        folds.append(
            Fold(
                index=index,
                name=name,
                test_groups=[name],
                test_speakers=list(test_speakers),
                val_speakers=val,
                train_speakers=train,
                train_ids=[i for s in train for i in by_speaker[s]],
                val_ids=[i for s in val for i in by_speaker[s]],
                test_ids=test_ids,
            )
        )
    limit = max_folds if max_folds is not None else eval_cfg.max_folds
    if limit is not None:
        if limit < 1:
            raise ValueError(f"eval.max_folds: expected an integer >= 1, got {limit}")
        folds = folds[:limit]
    return folds


def rotate_validation(corpus: Corpus, fold: Fold, shift: int) -> Fold:
    """The same fold (same test speakers) with other validation speakers.

    Used by seed ensembles (`train.ensemble_val: rotate`): member j of a fold holds out the
    validation speakers picked with an offset shifted by j, so together the members train on
    every non-test speaker while each still chooses its epoch on speakers it never trained on.
    `shift=0` returns the fold unchanged; a fold without validation speakers (paper
    protocol) is returned unchanged.
    """
    n_val = len(fold.val_speakers)
    if shift == 0 or n_val == 0:
        return fold
    rest = [s for s in corpus.speakers if s not in fold.test_speakers]
    gender = speaker_genders(corpus)
    # Offsets of consecutive members differ by n_val, so their validation sets do not overlap
    # until the candidates run out.
    val = _pick_validation(rest, n_val, gender, offset=fold.index + shift * n_val)
    if sorted(val) == sorted(fold.val_speakers):
        val = _pick_validation(rest, n_val, gender, offset=fold.index + shift * n_val + 1)
    by_speaker: dict[str, list[str]] = {}
    for u in corpus.utterances:
        by_speaker.setdefault(u.speaker, []).append(u.id)
    train = [s for s in rest if s not in val]
    return replace(
        fold,
        val_speakers=val,
        train_speakers=train,
        train_ids=[i for s in train for i in by_speaker[s]],
        val_ids=[i for s in val for i in by_speaker[s]],
    )
