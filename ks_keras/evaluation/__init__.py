"""Cross-validated training and evaluation, with reports a reviewer can trust.

`cross_validate` trains one model per fold (and per repeat, with a different seed each time),
picks each fold's best epoch on its **validation speakers** (honest protocol, default) or on
the test fold (the authors' "paper" protocol, labelled so everywhere), scores the test fold
once, and aggregates WA / UA / macro-F1 / confusion matrices. `write_report` turns the result
into a report folder:

```
metrics.json            everything below, machine-readable (+ config, versions, git commit)
folds.csv               one row per repeat × fold: speakers, sizes, best epoch, WA/UA/F1
confusion_matrix.csv    row-normalised confusion (true × predicted), pooled over folds
confusion_matrix.png    the same as a heat map (as paper Fig. 6)
curves.png              loss and UA per epoch, train and validation, every fold
attention.png           dense vs key-sparse weights and kept keys for a few test utterances
config.yaml             the resolved config
```
"""

# The package re-exports every name of the former `ks_keras/evaluation.py` (but `run_evaluate`,
# now `ks_keras.commands.evaluate`); the code lives in: results.py (results and summary
# statistics), running.py (cross-validation, baseline, finished members), attention.py
# (attention maps), reports.py (report folder, plots), end_to_end.py (`evaluate_corpus`).
from ks_keras.evaluation.attention import attention_examples, fold_normalizer
from ks_keras.evaluation.end_to_end import evaluate_corpus
from ks_keras.evaluation.reports import _baseline_line as _baseline_line
from ks_keras.evaluation.reports import _fmt as _fmt
from ks_keras.evaluation.reports import _git_commit as _git_commit
from ks_keras.evaluation.reports import _jsonable as _jsonable
from ks_keras.evaluation.reports import _plt as _plt
from ks_keras.evaluation.reports import (
    plot_attention,
    plot_confusion,
    plot_curves,
    results_table,
    write_report,
)
from ks_keras.evaluation.results import (
    FIXED_SCHEDULE_NOTE,
    HONEST_PROTOCOL_NOTE,
    PAPER_PROTOCOL_NOTE,
    CVResult,
    FoldResult,
    compare_with_baseline,
    summarize,
)
from ks_keras.evaluation.results import _pooled as _pooled
from ks_keras.evaluation.running import (
    FINISHED_FILE,
    baseline_metrics,
    baseline_normalization,
    cross_validate,
    finished_member,
)
from ks_keras.evaluation.running import _baseline_row as _baseline_row
from ks_keras.evaluation.running import _fit_fold_member as _fit_fold_member
from ks_keras.evaluation.running import _member_identity as _member_identity

__all__ = [
    "FINISHED_FILE",
    "FIXED_SCHEDULE_NOTE",
    "HONEST_PROTOCOL_NOTE",
    "PAPER_PROTOCOL_NOTE",
    "CVResult",
    "FoldResult",
    "attention_examples",
    "baseline_metrics",
    "baseline_normalization",
    "compare_with_baseline",
    "cross_validate",
    "evaluate_corpus",
    "finished_member",
    "fold_normalizer",
    "plot_attention",
    "plot_confusion",
    "plot_curves",
    "results_table",
    "summarize",
    "write_report",
]
