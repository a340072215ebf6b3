"""After the search: retrain the best config, test it once, export it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ks_keras.config import Config
from ks_keras.ensemble import checkpoint_copies, ensemble_model
from ks_keras.metrics import compute_metrics
from ks_keras.model import build_model
from ks_keras.training import fit
from ks_keras.tuning.hypermodel import materialize
from ks_keras.tuning.search import FINAL_FILE, SearchResult
from ks_keras.tuning.space import OBJECTIVE

# ---------------------------------------------------------------------------------------------
# After the search: retrain the best config, test it once, export it.


@dataclass
class FoldData:
    """The datasets of one fold, ready for `run_search` and `finish_search`.

    `train_ds` may be a function returning a fresh (identically shuffled) dataset.
    """

    train_ds: tf.data.Dataset | Callable[[], tf.data.Dataset]
    val_ds: tf.data.Dataset
    test_ds: tf.data.Dataset
    labels: list[str]
    feature_metadata: dict[str, dict]
    class_weight: dict[int, float] | None = None
    fold_info: dict | None = None
    # The training statistics under `features.audio.normalize: global` (sidecar + export).
    norm_stats: Any = None


@dataclass
class FinalResult:
    """The retrained best configuration and its test score."""

    trial_id: str
    val_ua: float | None
    test_metrics: dict[str, Any]
    run_dir: Path
    model_path: Path
    export_path: Path | None
    reused: bool = False


def _config_digest(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _predict(model: keras.Model, test_ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = [], []
    for batch in test_ds:
        inputs, labels = batch[0], batch[1]
        # A plain call, not predict_on_batch: under MirroredStrategy (Keras 3.15) that returns
        # every replica's outputs for the whole batch (twice the rows on 2 replicas).
        logits = model(inputs, training=False)
        truth.append(np.asarray(labels).reshape(-1))
        pred.append(np.argmax(np.asarray(logits), axis=-1))
    return np.concatenate(truth), np.concatenate(pred)


def finish_search(
    result: SearchResult,
    data: FoldData,
    *,
    export: bool = True,
    export_dir: str | Path | None = None,
    export_name: str | None = None,
    verify_export: bool = True,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
) -> FinalResult:
    """Retrain the best trial's config (`training.fit`, best epoch on the validation
    speakers), score it once on the test speakers and export it as a SavedModel.

    Done once per best trial: a re-run with the same best trial reuses `final.json` (and the
    export) instead of training again; a killed retraining resumes from its backup.

    Args:
        result: the `run_search` result.
        data: the same fold's datasets, with the test speakers' `test_ds`.
        export: write the SavedModel (`export.export_model`).
        export_dir: the export root (default `export.base_dir`, i.e. `saved_models`).
        export_name: the model name (default `export.name`).
        verify_export: reload the export in a fresh process and compare (slow, thorough).

    Raises:
        ValueError: no trial completed.
    """
    from ks_keras.export import export_model, write_model_sidecar

    if result.best is None or result.best_config is None:
        raise ValueError(
            f"no trial of the search in {result.project_dir} completed, so there is "
            f"no best configuration; see {result.summary_md}"
        )
    best, cfg = result.best, result.best_config
    digest = _config_digest(cfg)
    final_path = result.project_dir / FINAL_FILE
    if final_path.is_file():
        old = json.loads(final_path.read_text())
        export_ok = (not export) or (old.get("export_path") and Path(old["export_path"]).is_dir())
        if (
            old.get("trial_id") == best.trial_id
            and old.get("config_digest") == digest
            and export_ok
            and Path(old.get("model_path", "")).is_file()
        ):
            log(
                f"best trial {best.trial_id} was already retrained and tested: "
                f"test UA {old['test']['ua']:.4f} (see {final_path})"
            )
            return FinalResult(
                best.trial_id,
                best.val_ua,
                old["test"],
                Path(old["run_dir"]),
                Path(old["model_path"]),
                Path(old["export_path"]) if old.get("export_path") else None,
                reused=True,
            )

    run_dir = result.project_dir / f"best_trial_{best.trial_id}"
    log(
        f"retraining the best config (trial {best.trial_id}) for {cfg.train.epochs} epoch(s) "
        f"in {run_dir} ..."
    )
    fitted = fit(
        lambda: build_model(cfg),
        materialize(data.train_ds, "train_ds"),
        data.val_ds,
        cfg,
        run_dir,
        class_weight=data.class_weight,
        monitor=OBJECTIVE,
        verbose=verbose,
        strategy=result.strategy,
    )
    # Saved, tested and exported as `ks-keras train` does: a float32 copy outside the strategy
    # (of each kept checkpoint under `train.checkpoint_ensemble`, averaged).
    copies = checkpoint_copies(cfg, fitted, "ks_transformer")
    model = copies[0] if len(copies) == 1 else ensemble_model(copies)
    y_true, y_pred = _predict(model, data.test_ds)
    metrics = compute_metrics(y_true, y_pred, cfg.model.num_classes)
    test = {k: float(metrics[k]) for k in ("wa", "ua", "macro_f1")}
    test["confusion"] = np.asarray(metrics["confusion"]).tolist()
    test["n"] = int(y_true.size)
    log(
        f"test speakers: WA {test['wa']:.4f} UA {test['ua']:.4f} macro-F1 "
        f"{test['macro_f1']:.4f} ({test['n']} utterances; retrained val UA "
        f"{fitted.best_value if fitted.best_value is not None else float('nan'):.4f})"
    )

    model_path = run_dir / "best.keras"
    model.save(model_path)
    write_model_sidecar(
        model_path, cfg, data.labels, data.feature_metadata, norm_stats=data.norm_stats
    )
    export_path = None
    if export:
        export_path = export_model(
            model,
            cfg,
            data.labels,
            data.feature_metadata,
            base_dir=export_dir,
            name=export_name,
            verify=verify_export,
            norm_stats=data.norm_stats,
        )
        log(f"exported SavedModel: {export_path}")
    record = {
        "trial_id": best.trial_id,
        "search_val_ua": best.val_ua,
        "values": best.values,
        "config_digest": digest,
        "retrained_val_ua": fitted.best_value,
        "retrained_best_epoch": None if fitted.best_epoch is None else fitted.best_epoch + 1,
        "test": test,
        "fold": result.fold_info,
        "labels": data.labels,
        "run_dir": str(run_dir),
        "model_path": str(model_path),
        "export_path": None if export_path is None else str(export_path),
    }
    (run_dir / "test_metrics.json").write_text(json.dumps(test, indent=1) + "\n")
    final_path.write_text(json.dumps(record, indent=1) + "\n")
    return FinalResult(best.trial_id, best.val_ua, test, run_dir, model_path, export_path)
