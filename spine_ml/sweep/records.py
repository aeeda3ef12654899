"""The sweep's MLflow bookkeeping: the parent run, runs for pruned and failed trials (which never
reach their own logging), and the clean-up that leaves no run RUNNING after a sweep.

Finished trials log themselves from the worker (spine_ml.tracking.log_trial) *before* their last
report, because ASHA may stop a trial right after any report.
"""
from __future__ import annotations

import time
from typing import Any

from spine_ml.config import Config
from spine_ml.tracking.store import RUN_KIND_TAG as KIND_TAG
from spine_ml.tracking.store import client

SWEEP_TAG = "spine_ml.sweep"
TRIAL_TAG = "spine_ml.trial_id"
STATE_TAG = "spine_ml.trial_state"  # finished | pruned | failed
THREADS_TAG = "spine_ml.threads"  # the most torch threads a CPU trial used (above its CPUs: widened in the tail)
EXTRA_THREAD_SECONDS_TAG = "spine_ml.extra_thread_seconds"  # threads above its CPUs x seconds, in the tail


def trial_kind(config: Config) -> str:
    """The run kind of a trial: `trial` (a classifier, an ensemble candidate) or `localizer` (so that
    --localizer RUN_ID and latest_localizer_run see it)."""
    return "localizer" if config.sweep.target == "localizer" else "trial"


def _retry(call, attempts: int = 5):
    """SQLite allows one writer; concurrent trials can meet 'database is locked' for a moment."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps the sqlite error in several types
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


def parent_run(config: Config, experiment_id: str, resume: bool) -> str:
    """The sweep's parent run: reused on --resume (reopened), created otherwise."""
    mlflow = client(config)
    name = config.sweep.name
    existing = mlflow.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{KIND_TAG}` = 'sweep'",
                                  max_results=1)
    if existing and resume:
        run_id = existing[0].info.run_id
        mlflow.update_run(run_id, status="RUNNING")
        return run_id
    run = mlflow.create_run(experiment_id, run_name=f"sweep:{name}",
                            tags={SWEEP_TAG: name, KIND_TAG: "sweep"})
    searched = {f"search.{k}": v.model_dump_json(exclude_none=True) for k, v in config.search.items()}
    for key, value in {**config.flat(), **searched}.items():
        mlflow.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def trial_runs(config: Config, experiment_id: str, status: str | None = None) -> list:
    query = f"tags.`{SWEEP_TAG}` = '{config.sweep.name}' and tags.`{KIND_TAG}` = '{trial_kind(config)}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return client(config).search_runs([experiment_id], filter_string=query, max_results=10000)


def finished_trial_run(config: Config, experiment_id: str, trial_id: str):
    """A trial that already logged its final result (a resumed sweep must not train it again)."""
    for run in trial_runs(config, experiment_id, status="FINISHED"):
        if run.data.tags.get(TRIAL_TAG) == trial_id and run.data.tags.get(STATE_TAG) == "finished":
            return run
    return None


def log_stopped_trial(config: Config, experiment_id: str, parent_run_id: str, trial_id: str, state: str,
                      history: list[dict[str, Any]], error: str | None = None) -> str:
    """A run for a trial that ended without logging itself: pruned by ASHA, or failed."""
    mlflow = client(config)
    tags = {SWEEP_TAG: config.sweep.name, KIND_TAG: trial_kind(config), TRIAL_TAG: trial_id, STATE_TAG: state,
            "mlflow.parentRunId": parent_run_id}
    if history:
        tags["spine_ml.reached"] = f"fold 0, epoch {history[-1].get('epoch')}"
    if error:
        tags["spine_ml.error"] = error[-4000:]
    run = _retry(lambda: mlflow.create_run(experiment_id, run_name=f"{config.sweep.name}-{trial_id}", tags=tags))
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    params = [Param(k, str(v)[:6000]) for k, v in config.flat().items()]
    metrics = [Metric(name, float(record[name]), int(record.get("timestamp", time.time()) * 1000), step)
               for step, record in enumerate(history, start=1)
               for name in ("val_score", "val_loss", "train_loss") if name in record]
    if history:
        metrics.append(Metric("fold0_val_score", float(history[-1]["val_score"]), int(time.time() * 1000), 0))
    for start in range(0, max(len(params), len(metrics)), 100):
        _retry(lambda: mlflow.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100]))
    _retry(lambda: mlflow.set_terminated(run_id, status="FAILED" if state == "failed" else "FINISHED"))
    return run_id


def close_running(config: Config, experiment_id: str, parent_run_id: str | None, status: str = "KILLED") -> int:
    """Mark every run of this sweep still RUNNING (a killed worker or driver) as ended."""
    mlflow = client(config)
    closed = 0
    for run in trial_runs(config, experiment_id, status="RUNNING"):
        _retry(lambda: mlflow.set_terminated(run.info.run_id, status=status))
        closed += 1
    if parent_run_id:
        _retry(lambda: mlflow.set_terminated(parent_run_id, status="FINISHED" if status == "FINISHED" else status))
    return closed
