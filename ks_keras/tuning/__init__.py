"""KerasTuner search over the KS-T + CCAB config: space from YAML, resumable, best model exported.

A search space is a YAML file (see `tuning/paper_space.yaml`) whose keys are **dotted config
fields**, so any `model.*` or `train.*` field can be tuned; each names a KerasTuner type, its
range and sampling, and optionally the values of earlier parameters it depends on (`when`):

```yaml
evaluate_config_first: true        # trial 0 = the config's own values (random/bayesian)
hyperparameters:
  model.n_ccab:  {type: choice, values: [0, 1, 2, 3]}
  model.sparsity: {type: float, min: 0.0, max: 0.9, step: 0.1}
  train.lr:      {type: float, min: 1.0e-5, max: 1.0e-3, sampling: log}
  train.schedule: {type: choice, values: [step, cosine, constant]}
  train.step_epochs: {type: int, min: 10, max: 60, step: 10, when: {train.schedule: step}}
```

The default of every hyperparameter is the config's value, so a search around
`configs/paper.yaml` starts from the paper's setting. The objective is **validation UA**
(`val_ua`, maximised, best epoch of each trial) on the validation speakers of one fold,
which are held out of its training speakers; the fold's test speakers are not touched by the
search. After the search, the best configuration is retrained with `training.fit`, scored
once on the test speakers (WA / UA / macro-F1) and exported as a SavedModel.

Project folder (`run_search` / `ks-keras tune --project-dir`):

```
search.json            what is searched: tuner, space, base config, fold (checked on resume)
space.yaml             the space file used
keras_tuner/           KerasTuner's project: oracle.json, trial_<id>/trial.json (re-run resumes)
tensorboard/<trial>/   per-trial TensorBoard logs with HParams
summary.csv, summary.md  one row per trial: id, status, val UA, best epoch, values, error
best_config.yaml       the full resolved config of the best trial (`ks-keras evaluate/train`)
best_trial_<id>/       retraining of the best config (training.fit run folder, best.keras)
final.json             best trial, its val UA, test WA/UA/F1, the export path
```

Example:

```python
space = load_space("tuning/emodb_demo_space.yaml")
data = prepare_fold_data(cfg, fold=0)
result = run_search(cfg, space, data.train_ds, data.val_ds, "runs/tune/demo", trials=10)
final = finish_search(result, data)          # retrain, test, export
```

Modules (every name is importable from `ks_keras.tuning` itself): `space` (YAML → checked
`SearchSpace`), `hypermodel` (`KSTHyperModel`), `tuners` (`make_tuner`), `search`
(`run_search`, summary, resume), `finish` (`finish_search`: retrain, test, export) and
`fold_data` (`prepare_fold_data`); each imports only the ones before it. The `ks-keras tune`
command is `ks_keras.commands.tune`.
"""

from __future__ import annotations

from ks_keras.tuning.finish import (
    FinalResult,
    FoldData,
    _config_digest,
    _predict,
    finish_search,
)
from ks_keras.tuning.fold_data import (
    default_project_dir,
    prepare_fold_data,
    select_fold,
)
from ks_keras.tuning.hypermodel import (
    KSTHyperModel,
    materialize,
)
from ks_keras.tuning.search import (
    _RESUME_IGNORED,
    FINAL_FILE,
    KT_DIR,
    SEARCH_FILE,
    SearchResult,
    TrialRow,
    _best_row,
    _check_resume,
    _check_strategy,
    _clear_project,
    _collect_rows,
    _csv_value,
    _flatten,
    _fmt_value,
    _require_tensorboard,
    _search_record,
    run_search,
    write_summary,
)
from ks_keras.tuning.space import (
    _HP_KEYS,
    _SPACE_KEYS,
    FROZEN_FIELDS,
    HP_TYPES,
    OBJECTIVE,
    SAMPLINGS,
    TUNABLE_SECTIONS,
    TUNERS,
    HyperParam,
    SearchSpace,
    _check_config,
    _field_annotation,
    _get_dotted,
    _number,
    _parse_param,
    _set_dotted,
    apply_values,
    check_space,
    load_space,
    space_from_dict,
)
from ks_keras.tuning.tuners import (
    _ConfigFirst,
    _ConfigFirstBayesianOracle,
    _ConfigFirstRandomOracle,
    _HyperbandTuner,
    _last_line,
    _ReportingTuner,
    _SearchTuner,
    make_tuner,
)

__all__ = [
    "OBJECTIVE",
    "TUNERS",
    "HP_TYPES",
    "SAMPLINGS",
    "TUNABLE_SECTIONS",
    "FROZEN_FIELDS",
    "HyperParam",
    "SearchSpace",
    "space_from_dict",
    "load_space",
    "apply_values",
    "check_space",
    "materialize",
    "KSTHyperModel",
    "make_tuner",
    "KT_DIR",
    "SEARCH_FILE",
    "FINAL_FILE",
    "TrialRow",
    "SearchResult",
    "write_summary",
    "run_search",
    "FoldData",
    "FinalResult",
    "finish_search",
    "select_fold",
    "prepare_fold_data",
    "default_project_dir",
    # Private helpers stay reachable as `ks_keras.tuning._name`, as before the split.
    "_HP_KEYS",
    "_SPACE_KEYS",
    "_field_annotation",
    "_number",
    "_parse_param",
    "_set_dotted",
    "_get_dotted",
    "_check_config",
    "_last_line",
    "_ReportingTuner",
    "_SearchTuner",
    "_HyperbandTuner",
    "_ConfigFirst",
    "_ConfigFirstRandomOracle",
    "_ConfigFirstBayesianOracle",
    "_RESUME_IGNORED",
    "_flatten",
    "_search_record",
    "_check_resume",
    "_collect_rows",
    "_best_row",
    "_fmt_value",
    "_csv_value",
    "_clear_project",
    "_check_strategy",
    "_require_tensorboard",
    "_config_digest",
    "_predict",
]
