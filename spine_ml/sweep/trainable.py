"""The Ray Tune function trainable: a thin adapter around the pure `run_trial`.

Multi-fidelity scheme for ASHA: a trial reports once per epoch of fold 0 (`objective` = fold 0's
held-out score at that epoch), trains the remaining folds without reporting, logs itself to MLflow,
then reports once more with `objective` = the full out-of-fold score (the metric of record).
So ASHA compares trials on the cheap fold-0 curve and only survivors pay for the full CV.
After every epoch (any fold) a CPU trial also asks the sweep's thread board for its share of the
CPUs (sweep/threads.py: in the sweep's tail it takes the threads of finished trials).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def trial_output_dir(project_root: Path, sweep_name: str, trial_id: str) -> Path:
    return project_root / "mlruns" / "trials" / sweep_name / trial_id


def trial_setup(sampled: dict[str, Any], base: dict[str, Any], project_root: str, cpus: float):
    """What every sweep trial does first: quiet logs, torch threads for its CPUs, its config (the
    sweep's base config with the sampled values), and its Tune trial id."""
    import torch
    from ray import tune

    from spine_ml.config import validate
    from spine_ml.sweep.space import sampled_updates

    os.environ.setdefault("SPINE_ML_QUIET", "1")
    torch.set_num_threads(max(1, int(cpus)))
    base_config = validate(base, Path(project_root), source="sweep config")
    return base_config.with_updates(sampled_updates(base_config, sampled)), tune.get_context().get_trial_id()


def run_sweep_trial(sampled: dict[str, Any], *, base: dict[str, Any], project_root: str, experiment_id: str,
                    parent_run_id: str, cpus: float, board: str | None = None) -> None:
    from ray import tune

    from spine_ml.sweep.records import (EXTRA_THREAD_SECONDS_TAG, KIND_TAG, STATE_TAG, SWEEP_TAG, THREADS_TAG, TRIAL_TAG,
                                        finished_trial_run)
    from spine_ml.sweep.threads import TrialThreads
    from spine_ml.tracking.store import log_trial
    from spine_ml.training.trial import run_trial

    config, trial_id = trial_setup(sampled, base, project_root, cpus)

    done = finished_trial_run(config, experiment_id, trial_id)
    if done is not None:  # resumed sweep: this trial finished before the driver died
        metrics = dict(done.data.metrics)
        tune.report({"objective": metrics["score"], **metrics, "mlflow_run_id": done.info.run_id, "final": 1})
        return

    threads = TrialThreads(board if config.sweep.resources.gpu == 0 else None, trial_id, cpus)

    def on_epoch(report) -> None:
        threads.follow()  # the sweep's tail: take the threads of trials that finished
        if report.fold == 0:
            tune.report({"objective": report.val_score, "val_score": report.val_score, "val_loss": report.val_loss,
                         "train_loss": report.train_loss, "fold": 0, "epoch": report.epoch,
                         "epochs": report.epochs_total})

    try:
        result = run_trial(config, trial_output_dir(Path(project_root), config.sweep.name, trial_id), on_epoch=on_epoch)
    finally:
        threads.close()
    run_id = log_trial(config, result, run_name=f"{config.sweep.name}-{trial_id}", parent_run_id=parent_run_id,
                       tags={SWEEP_TAG: config.sweep.name, KIND_TAG: "trial", TRIAL_TAG: trial_id,
                             STATE_TAG: "finished", THREADS_TAG: str(threads.most),
                             EXTRA_THREAD_SECONDS_TAG: f"{threads.extra_thread_seconds:.1f}"})
    tune.report({"objective": result.metrics["score"], **result.metrics, "mlflow_run_id": run_id, "final": 1,
                 "wall_seconds": result.wall_seconds})
