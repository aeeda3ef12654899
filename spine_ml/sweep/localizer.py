"""Localizer sweeps (`sweep.target: localizer`): the trainable, the choice of the winner, the summary.

A trial runs the pure `train_localizer` and reports once, `objective` = held-out `mean_error_mm`.
One report means ASHA has nothing to compare early, so localizer sweeps run under FIFO: every
trial trains its full `localizer.epochs` (train_localizer exposes no per-epoch hook, and its
training loss would not rank trials that differ in sigma_mm or input_px anyway).

At the end of the sweep the driver tags the best finished trial as chosen
(`localize.store.choose_localizer`), so `latest_localizer_run` — what predict, ensemble and demo use
without --localizer — returns it until a newer `train-localizer` run or sweep choice.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spine_ml.config import Config

# Objective for a trial whose localizer found no held-out point at all (mean_error_mm is NaN):
# worse than any real error, finite so Optuna keeps the trial as COMPLETE.
NOTHING_FOUND_MM = 1000.0
SUMMARY_METRICS = ("mean_error_mm", "p90_error_mm", "correct_level_rate", "correct_slice_rate", "found_rate")


def objective(metrics: dict[str, float]) -> float:
    # held-out mean distance (mm) from each found landmark to its true point: a level jump costs ~30 mm
    # (one disc spacing), so wrong levels dominate it and slice/in-plane errors break ties. Misses are
    # not in it (found_rate is shown beside it in the summary).
    value = metrics.get("mean_error_mm", float("nan"))
    return NOTHING_FOUND_MM if math.isnan(value) else float(value)


def run_localizer_trial(sampled: dict[str, Any], *, base: dict[str, Any], project_root: str, experiment_id: str,
                        parent_run_id: str, cpus: float) -> None:
    """Ray Tune function trainable: train_localizer, log_localizer (before the one report), report."""
    from ray import tune

    from spine_ml.localize.store import log_localizer
    from spine_ml.localize.train import train_localizer
    from spine_ml.sweep.records import STATE_TAG, SWEEP_TAG, TRIAL_TAG, finished_trial_run
    from spine_ml.sweep.trainable import trial_output_dir, trial_setup

    config, trial_id = trial_setup(sampled, base, project_root, cpus)

    done = finished_trial_run(config, experiment_id, trial_id)
    if done is not None:  # resumed sweep: this trial finished before the driver died
        metrics = dict(done.data.metrics)
        tune.report({"objective": objective(metrics), **metrics, "mlflow_run_id": done.info.run_id, "final": 1})
        return

    result = train_localizer(config, trial_output_dir(Path(project_root), config.sweep.name, trial_id), progress=False)
    run_id = log_localizer(config, result, run_name=f"{config.sweep.name}-{trial_id}", parent_run_id=parent_run_id,
                           tags={SWEEP_TAG: config.sweep.name, TRIAL_TAG: trial_id, STATE_TAG: "finished"})
    metrics = {k: v for k, v in result.metrics.items() if not math.isnan(v)}
    tune.report({"objective": objective(result.metrics), **metrics, "mlflow_run_id": run_id, "final": 1,
                 "wall_seconds": result.wall_seconds})


def finished_rows(config: Config, runs: list) -> list[dict]:
    """The finished trials among a localizer sweep's trial `runs`, best (lowest objective) first."""
    from spine_ml.sweep import records

    rows = []
    for run in runs:
        if run.info.status != "FINISHED" or run.data.tags.get(records.STATE_TAG) != "finished":
            continue
        metrics = run.data.metrics
        rows.append({"run_id": run.info.run_id, "trial_id": run.data.tags.get(records.TRIAL_TAG),
                     "objective": objective(metrics), **{k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
                     "params": {k: run.data.params.get(k) for k in config.search}})
    return sorted(rows, key=lambda row: (row["objective"], row["run_id"]))


def choose_best(config: Config, rows: list[dict], parent_run_id: str) -> str | None:
    """Tag the best of `rows` (finished_rows) as the default localizer (and name it on the parent run)."""
    from spine_ml.localize.store import choose_localizer
    from spine_ml.sweep.records import _retry
    from spine_ml.tracking.store import client

    if not rows:
        return None
    best = rows[0]["run_id"]
    _retry(lambda: choose_localizer(config, best))
    _retry(lambda: client(config).set_tag(parent_run_id, "spine_ml.best_localizer", best))
    return best


def print_localizer_summary(summary, config: Config, config_path: str, top: int) -> None:
    from spine_ml.sweep.run import _short

    if summary.finished:
        print(f"{'rank':>4}  {'run_id':<32}  {'mean_mm':>7} {'p90_mm':>7} {'level':>6} {'slice':>6} {'found':>6}  params")
        for rank, row in enumerate(summary.finished[:top], start=1):
            params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row["params"].items() if v is not None)
            cells = [f"{row.get(k, float('nan')):{width}.{digits}f}"
                     for k, width, digits in (("mean_error_mm", 7, 2), ("p90_error_mm", 7, 2), ("correct_level_rate", 6, 3),
                                              ("correct_slice_rate", 6, 3), ("found_rate", 6, 3))]
            print(f"{rank:>4}  {row['run_id']:<32}  {' '.join(cells)}  {params}")
        print("(held-out studies; mean/p90 error over found landmarks, level/slice = correct-level/-slice rate)")
    if summary.chosen_localizer:
        print(f"\nChosen localizer: {summary.chosen_localizer} (lowest held-out mean_error_mm; tagged "
              f"spine_ml.localizer_chosen).\npredict, ensemble and demo use it by default: without --localizer they "
              f"take the most recently chosen localizer (this one, until a newer train-localizer run or sweep).")
        print(f"Pin it: spine-ml predict {config_path} --run RUN_ID --localizer {summary.chosen_localizer}")
    else:
        print("\nNo trial finished, so no localizer was chosen; predict keeps its previous default.")
