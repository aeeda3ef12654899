"""Log a finished trial as one MLflow run: params, per-epoch and final metrics, artifacts.

Works from a TrialResult alone (files on the local disk), so the sweep's Ray driver can call it
for trials that ran in workers.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from spine_ml.competition import vocabulary as V
from spine_ml.tracking.store import RUN_KIND_TAG, client, ensure_experiment

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.training.result import TrialResult

# Config sections that decide a trial's outcome; tracking/ray/sweep/ensemble/search are not params
# of a trial, and neither are settings that change speed but not results.
PARAM_SECTIONS = ("data", "prepare", "model", "loss", "train", "cv")
NOT_PARAMS = {"prepare.workers", "prepare.cache_dir", "train.num_workers", "train.device", "train.precision"}
EPOCH_METRICS = ("train_loss", "val_loss", "val_score") + tuple(f"val_{g}" for g in V.METRIC_PARTS[1:])
MLFLOW_BATCH = 500  # log_batch accepts at most 1000 metrics and 100 params per call


def trial_params(config: Config) -> dict[str, str]:
    """The flattened config keys that matter for a trial's result, as MLflow param strings."""
    return {key: str(value) for key, value in config.flat().items()
            if key.split(".")[0] in PARAM_SECTIONS and key not in NOT_PARAMS}


def epoch_metrics(history: Iterable[dict[str, Any]], epochs_total: int, timestamp_ms: int) -> list:
    """Per-epoch metrics: `val_score` etc. at the global epoch step, `fold{k}_val_score` at the fold's epoch."""
    from mlflow.entities import Metric

    metrics = []
    for entry in history:
        fold, epoch = int(entry["fold"]), int(entry["epoch"])
        step = fold * epochs_total + epoch - 1
        for name in EPOCH_METRICS:
            if name in entry:
                metrics.append(Metric(name, float(entry[name]), timestamp_ms, step))
        for name in ("val_score", "val_loss"):
            metrics.append(Metric(f"fold{fold}_{name}", float(entry[name]), timestamp_ms, epoch))
    return metrics


def final_metrics(result: TrialResult, timestamp_ms: int) -> list:
    from mlflow.entities import Metric

    values = {**{k: result.metrics[k] for k in V.METRIC_PARTS}, "wall_seconds": result.wall_seconds,
              "inference_seconds_per_study": result.inference_seconds_per_study}
    return [Metric(name, float(value), timestamp_ms, 0) for name, value in values.items()]


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_trial(config: Config, result: TrialResult, run_name: str | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """One MLflow run for a finished trial; returns its run id. The run ends FAILED if logging fails."""
    from mlflow.entities import Param, RunStatus

    from spine_ml.config import save_config

    mlflow_client = client(config)
    experiment_id = ensure_experiment(config)
    run_tags = {RUN_KIND_TAG: "trial", "spine_ml.device": result.device, "spine_ml.backbone": config.model.backbone,
                **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in trial_params(config).items()]
        metrics = epoch_metrics(result.history, config.train.epochs, now) + final_metrics(result, now)
        for chunk in _chunks(params, 100):
            mlflow_client.log_batch(run_id, params=chunk)
        for chunk in _chunks(metrics, MLFLOW_BATCH):
            mlflow_client.log_batch(run_id, metrics=chunk)
        if result.best_epochs:
            mlflow_client.set_tag(run_id, "spine_ml.best_epochs", ",".join(map(str, result.best_epochs)))
        mlflow_client.log_artifact(run_id, str(result.oof_path))
        for checkpoint in result.checkpoints:
            mlflow_client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoints")
        with tempfile.TemporaryDirectory() as folder:
            mlflow_client.log_artifact(run_id, str(save_config(result.config, Path(folder) / "config.yaml")))
            if result.history:
                import pandas as pd

                history_path = Path(folder) / "history.csv"
                pd.DataFrame(result.history).to_csv(history_path, index=False)
                mlflow_client.log_artifact(run_id, str(history_path))
        from spine_ml.plots.trial import log_trial_plots  # never raises: plots/confusion.png, reliability.png

        log_trial_plots(mlflow_client, run_id, config, result.oof)
    except BaseException:
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id
