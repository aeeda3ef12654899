"""Sweep benchmarks, each a ratio measured within one run of this script.

1. Overhead: sweep wall ÷ (Σ trial wall ÷ concurrency) for the same sweep (target ≤ 1.15).
2. Early stopping: the same seeded trials (TPE's first 10 trials are its seeded random start-up,
   so both sweeps sample identical configs) run once to full budget (scheduler none) and once under
   ASHA; epoch compute saved and best OOF score kept (targets ≥ 40% saved, best within 2%).
3. The crop cache is built once per sweep: the number of cache folders after both sweeps.

Trial wall is run_trial's own wall (data, training, prediction, scoring); the ratio's other figures
tell its parts apart:
- `machinery_overhead_ratio`: sweep wall ÷ a zero-overhead list schedule of the same trial walls in
  their start order on the same slots (`ideal_makespan_s`): Ray, MLflow, the driver's setup.
- `packing_bound_ratio`: that schedule ÷ (Σ trial wall ÷ slots), what the overhead ratio would be if
  the sweep cost nothing: slots left idle while the last, longest trial finishes (8 trials on 2
  slots, one backbone 2.7x slower than the other).
- `slot_weighted_overhead_ratio`: once the last trial has started, trials still running take the
  threads of finished ones (`sweep.widen_tail`; `widened_trials`); a widened trial's borrowed
  slot-seconds (tag spine_ml.extra_thread_seconds) are counted with the trial walls here.
- `tune_wall_overhead_ratio`: trial wall as Ray Tune reports it (time_total_s: worker imports and
  the trial's MLflow logging included).
`--overhead-only` runs only the full-budget sweep (figure 1).

    .venv/bin/python bench/bench_sweep.py [--config sweeps/demo.yaml] [--trials 8] [--json out.json] [--overhead-only]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import project_copy, report  # noqa: E402 - bench/ is the script's folder

PROJECT = Path(__file__).resolve().parents[1]


def trial_costs(config) -> list[dict]:
    """Per trial run of the sweep: state, epochs trained (all folds), wall seconds, OOF score."""
    from spine_ml.sweep.records import EXTRA_THREAD_SECONDS_TAG, STATE_TAG, THREADS_TAG, trial_runs
    from spine_ml.tracking.store import client, ensure_experiment

    mlflow = client(config)
    out = []
    for run in trial_runs(config, ensure_experiment(config)):
        epochs = len(mlflow.get_metric_history(run.info.run_id, "val_score"))
        out.append({"state": run.data.tags.get(STATE_TAG), "epochs": epochs, "wall": run.data.metrics.get("wall_seconds"),
                    "score": run.data.metrics.get("score"), "threads": int(run.data.tags.get(THREADS_TAG, 0) or 0),
                    "extra_thread_s": float(run.data.tags.get(EXTRA_THREAD_SECONDS_TAG, 0) or 0),
                    "end": run.info.end_time or run.info.start_time})
    # start order: a trial's MLflow run is written when it ends, so order by end minus its own wall
    out.sort(key=lambda t: (t["end"] or 0) / 1000.0 - (t["wall"] or 0))
    return out


def tune_trial_walls(config) -> list[float]:
    """Each trial's wall as Ray Tune measures it (`time_total_s`: the trainable's whole run, worker
    imports and the trial's own MLflow logging included), from the sweep's Tune state."""
    import json

    from spine_ml.sweep.run import experiment_dir

    walls = []
    for path in sorted(experiment_dir(config).glob("*/result.json")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            walls.append(float(json.loads(lines[-1])["time_total_s"]))
    return walls


def list_schedule(walls: list[float], slots: int) -> float:
    """Makespan of running `walls` in this order, each on the first free slot, with no overhead."""
    free = [0.0] * slots
    for wall in walls:
        free[free.index(min(free))] += wall
    return max(free) if walls else 0.0


def run(config_path: Path, trials: int, root: Path, scheduler: str) -> dict:
    from spine_ml.config import load_config
    from spine_ml.sweep.run import run_sweep

    overrides = [f"sweep.num_samples={trials}", f"sweep.scheduler={scheduler}", f"sweep.name=bench-{scheduler}",
                 f"tracking.experiment=bench-{scheduler}"]
    config = load_config(config_path, overrides)
    started_at = time.time()
    start = time.perf_counter()
    run_sweep(config)
    wall = time.perf_counter() - start
    trials = trial_costs(config)
    tune_walls = tune_trial_walls(config)
    ends = [t["end"] / 1000.0 for t in trials if t["end"]]
    starts = [t["end"] / 1000.0 - (t["wall"] or 0) for t in trials if t["end"]]
    return {"wall": wall, "trials": trials, "concurrency": config.sweep.max_concurrent,
            # before the first trial's training starts (data, cache, Ray, parent run) and after the last
            # trial's MLflow run closes (plots, summary)
            "setup": min(starts) - started_at if starts else 0.0,
            "teardown": started_at + wall - max(ends) if ends else 0.0,
            "cpus": config.sweep.resources.cpu, "tune_walls": tune_walls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "sweeps" / "demo.yaml"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--overhead-only", action="store_true", help="only the full-budget sweep (figure 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
        root = Path(folder)
        config_copy = project_copy(Path(args.config).resolve(), root)
        full = run(config_copy, args.trials, root, "none")
        asha = None if args.overhead_only else run(config_copy, args.trials, root, "asha")
        cache_root = root / "data" / "cache"  # crop caches are folders; their .lock files are not caches
        caches = len([p for p in cache_root.glob("crops-*") if p.is_dir()]) if cache_root.exists() else 0

    trial_wall = sum(t["wall"] or 0 for t in full["trials"] if t["state"] == "finished")
    overhead = full["wall"] / (trial_wall / full["concurrency"])
    # a widened trial held more than one slot for part of its wall: count those slot-seconds too
    slot_seconds = trial_wall + sum(t["extra_thread_s"] for t in full["trials"]) / full["cpus"]
    ideal = list_schedule([t["wall"] or 0 for t in full["trials"] if t["state"] == "finished"], full["concurrency"])
    figures = {
        "sweep_overhead_ratio": round(overhead, 3),
        "sweep_wall_s": round(full["wall"], 1),
        "sum_trial_wall_s": round(trial_wall, 1),
        "concurrency": full["concurrency"],
        "ideal_makespan_s": round(ideal, 1),
        "machinery_overhead_ratio": round(full["wall"] / ideal, 3),
        "packing_bound_ratio": round(ideal / (trial_wall / full["concurrency"]), 3),  # the ratio at zero overhead
        "driver_setup_s": round(full["setup"], 1),
        "driver_teardown_s": round(full["teardown"], 1),
        "widened_trials": sum(t["threads"] > full["cpus"] for t in full["trials"]),
        "slot_weighted_overhead_ratio": round(full["wall"] / (slot_seconds / full["concurrency"]), 3),
        # the same ratio with each trial's wall as Tune reports it (imports and MLflow logging included)
        "tune_wall_overhead_ratio": round(full["wall"] / (sum(full["tune_walls"]) / full["concurrency"]), 3),
        "sum_tune_trial_wall_s": round(sum(full["tune_walls"]), 1),
        "trial_walls_s": [round(t["wall"] or 0, 1) for t in full["trials"]],
    }
    if asha is not None:
        figures.update(asha_figures(full, asha, cache_count=caches))
    report(figures, args.json)
    return 0


def asha_figures(full: dict, asha: dict, cache_count: int) -> dict:
    epochs_full = sum(t["epochs"] for t in full["trials"])
    epochs_asha = sum(t["epochs"] for t in asha["trials"])
    best_full = min(t["score"] for t in full["trials"] if t["score"] is not None)
    best_asha = min(t["score"] for t in asha["trials"] if t["score"] is not None)
    return {
        "epochs_full_budget": epochs_full,
        "epochs_asha": epochs_asha,
        "epoch_compute_saved": round(1 - epochs_asha / epochs_full, 3),
        "pruned_trials": sum(t["state"] == "pruned" for t in asha["trials"]),
        "best_score_full": round(best_full, 4),
        "best_score_asha": round(best_asha, 4),
        "best_score_ratio": round(best_asha / best_full, 4),
        "crop_caches_built": cache_count,
    }


if __name__ == "__main__":
    sys.exit(main())
