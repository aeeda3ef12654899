"""`spine-ml sweep`: Ray Tune + OptunaSearch (TPE, seeded) + ASHA over the YAML search space.

The driver prepares the data and the crop cache once, opens the sweep's parent MLflow run, then
hands trials to Ray. Each trial is `run_trial` behind `trainable.run_sweep_trial` — or, with
`sweep.target: localizer`, `train_localizer` behind `localizer.run_localizer_trial` (FIFO, no crop
cache; the best trial becomes the default localizer, see sweep/localizer.py).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from spine_ml.config import Config, load_config
from spine_ml.errors import UserError

log = logging.getLogger(__name__)


class SweepError(UserError):
    """A sweep that cannot start or continue; the message says what to do."""


@dataclass
class SweepSummary:
    name: str
    experiment_id: str
    parent_run_id: str
    wall_seconds: float
    finished: list[dict] = field(default_factory=list)  # {run_id, trial_id, score, parts..., params}
    pruned: int = 0
    failed: int = 0
    target: str = "classifier"
    chosen_localizer: str | None = None  # localizer sweeps: the trial latest_localizer_run now returns


def experiment_dir(config: Config) -> Path:
    return config.path(config.ray.storage_path) / config.sweep.name


def quiet_libraries() -> None:
    """Our live table replaces Ray's boxes and Optuna's per-trial INFO lines."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a resumed trial that had already finished re-reports its final result: Optuna says so, harmlessly
    warnings.filterwarnings("ignore", message="The reported value is ignored", category=UserWarning)
    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)


def init_ray(config: Config) -> None:
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"SPINE_ML_QUIET": "1", "PYTHONWARNINGS": "ignore"}}
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, include_dashboard=False,
                 log_to_driver=False, runtime_env=env)


def build_tuner(config: Config, experiment_id: str, parent_run_id: str, resume: bool, board: str | None = None):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from spine_ml.sweep.callbacks import LiveTable, MlflowTrialRecords
    from spine_ml.sweep.localizer import run_localizer_trial
    from spine_ml.sweep.search import ResumableOptunaSearch
    from spine_ml.sweep.space import define_by_run, max_fold0_epochs
    from spine_ml.sweep.threads import TailSignal
    from spine_ml.sweep.trainable import run_sweep_trial

    resources = config.sweep.resources
    localizer = config.sweep.target == "localizer"
    extra = {} if localizer else {"board": board}  # a localizer trial has no epoch hook to follow the board
    trainable = tune.with_resources(
        tune.with_parameters(run_localizer_trial if localizer else run_sweep_trial, base=config.to_dict(),
                             project_root=str(config.project_root), experiment_id=experiment_id,
                             parent_run_id=parent_run_id, cpus=resources.cpu, **extra),
        {"cpu": resources.cpu, "gpu": resources.gpu})
    path = experiment_dir(config)
    if resume:
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=False)

    storage_dir = config.path("mlruns/optuna")
    storage_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_dir / 'optuna.db'}")
    if config.sweep.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=config.sweep.name, storage=storage)  # a stale study of an unstarted sweep
    # metric/mode given here too: a searcher built with its own space ignores TuneConfig's
    searcher = ResumableOptunaSearch(space=define_by_run(config), metric="objective", mode="min",
                            sampler=optuna.samplers.TPESampler(seed=config.sweep.seed),
                            study_name=config.sweep.name, storage=storage)
    if config.sweep.scheduler == "asha" and not localizer:  # a localizer trial reports once: nothing to prune
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_fold0_epochs(config) + 1,
                                  grace_period=config.sweep.grace_period,
                                  reduction_factor=config.sweep.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    from spine_ml.progress import quiet

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=searcher, scheduler=scheduler,
                                    num_samples=config.sweep.num_samples,
                                    max_concurrent_trials=config.sweep.max_concurrent,
                                    reuse_actors=config.sweep.reuse_workers),
        run_config=tune.RunConfig(
            name=config.sweep.name, storage_path=str(path.parent), verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.sweep.max_failures),
            callbacks=[MlflowTrialRecords(config.to_dict(), str(config.project_root), experiment_id, parent_run_id),
                       LiveTable(list(config.search), quiet=quiet(), score_label="err_mm" if localizer else "score"),
                       TailSignal(config.sweep.num_samples)]),
    )


def tracking_lost(config: Config, error: Exception) -> str:
    from spine_ml.tracking.store import tracking_uri

    return (f"the MLflow tracking store {tracking_uri(config)} stopped answering ({str(error).splitlines()[0][:200]}); "
            f"runs logged so far are kept; once it is back, continue with `spine-ml sweep CONFIG --resume`")


def run_sweep(config: Config, resume: bool = False) -> SweepSummary:
    from spine_ml.prepare.cache import ensure_cache
    from spine_ml.sweep import records
    from spine_ml.sweep.space import check_space
    from spine_ml.synth.generate import ensure_synthetic
    from spine_ml.tracking.store import ensure_experiment

    check_space(config)
    path = experiment_dir(config)
    if resume and not (path / "tuner.pkl").exists():
        raise SweepError(f"nothing to resume: no sweep state at {path}; run without --resume to start sweep "
                         f"'{config.sweep.name}'")
    if not resume and path.exists():
        raise SweepError(f"sweep '{config.sweep.name}' already exists at {path}; continue it with --resume, or "
                         f"start another with --set sweep.name=NEW_NAME")
    start = time.time()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spine-ml-store") as pool:
        # open the MLflow store on a thread while Ray starts (its start is mostly waiting on its processes)
        store = pool.submit(ensure_experiment, config)
        quiet_libraries()
        init_ray(config)
        experiment_id = store.result()  # fails early on an unwritable store, before any data work
    ensure_synthetic(config)
    if config.sweep.target == "classifier":  # localizer trials read the DICOM series, not the crop cache
        cache = ensure_cache(config)  # built once here, opened read-only by every trial
        log.info("crop cache ready: %s (%d samples)", cache.path, int((cache.index["sample"] >= 0).sum()))
    elif config.sweep.scheduler == "asha":
        log.info("localizer sweep: FIFO scheduler (a trial reports once, so ASHA could not stop any early)")
    parent = records.parent_run(config, experiment_id, resume)
    if resume:
        records.close_running(config, experiment_id, None)
    from mlflow.exceptions import MlflowException

    from spine_ml.sweep.threads import start_board, stop_board

    interrupted = True
    try:
        board = start_board() if config.sweep.widen_tail and config.sweep.target == "classifier" else None
        tuner = build_tuner(config, experiment_id, parent, resume, board)
        tuner.fit()
        interrupted = False
    except MlflowException as error:  # the tracking server went away mid-sweep: no buffering, a clear stop
        raise SweepError(tracking_lost(config, error)) from None
    finally:
        stop_board()
        try:
            records.close_running(config, experiment_id, parent, status="KILLED" if interrupted else "FINISHED")
        except MlflowException as error:
            log.warning("%s", tracking_lost(config, error))
    if config.sweep.target == "localizer":
        from spine_ml.sweep.localizer import choose_best

        try:
            summary = summarise(config, experiment_id, parent, time.time() - start)
            summary.chosen_localizer = choose_best(config, summary.finished, parent)
        except MlflowException as error:
            raise SweepError(tracking_lost(config, error)) from None
        return summary
    try:  # plots/optimisation_history.png, param_importances.png on the parent run; never fail a sweep
        from spine_ml.plots.sweep import log_sweep_plots

        log_sweep_plots(config, experiment_id, parent)
    except Exception as error:  # noqa: BLE001
        log.warning("sweep plots not logged: %s", error)
    return summarise(config, experiment_id, parent, time.time() - start)


def summarise(config: Config, experiment_id: str, parent_run_id: str, wall: float) -> SweepSummary:
    from spine_ml.sweep import records

    summary = SweepSummary(config.sweep.name, experiment_id, parent_run_id, wall, target=config.sweep.target)
    runs = records.trial_runs(config, experiment_id)
    localizer = config.sweep.target == "localizer"
    if localizer:
        from spine_ml.sweep.localizer import finished_rows

        summary.finished = finished_rows(config, runs)  # best first
    for run in runs:
        state = run.data.tags.get(records.STATE_TAG)
        if state == "finished" and not localizer and "score" in run.data.metrics:
            summary.finished.append({"run_id": run.info.run_id, "trial_id": run.data.tags.get(records.TRIAL_TAG),
                                     **{k: run.data.metrics[k] for k in ("score", "spinal", "foraminal", "subarticular",
                                                                        "any_severe_spinal") if k in run.data.metrics},
                                     "params": {k: run.data.params.get(k) for k in config.search}})
        elif state == "pruned":
            summary.pruned += 1
        elif state == "failed":
            summary.failed += 1
    if not localizer:
        summary.finished.sort(key=lambda r: r["score"])
    return summary


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def print_summary(summary: SweepSummary, config: Config, config_path: str = "CONFIG", top: int = 5) -> None:
    print(f"\nsweep '{summary.name}': {len(summary.finished)} finished, {summary.pruned} pruned, "
          f"{summary.failed} failed in {summary.wall_seconds:.0f}s")
    if summary.target == "localizer":
        from spine_ml.sweep.localizer import print_localizer_summary

        print_localizer_summary(summary, config, config_path, top)
    elif summary.finished:
        print(f"{'rank':>4}  {'run_id':<32}  {'score':>7} {'spinal':>7} {'foramin':>7} {'subart':>7} {'any_sev':>7}  params")
        for rank, row in enumerate(summary.finished[:top], start=1):
            params = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row["params"].items() if v is not None)
            print(f"{rank:>4}  {row['run_id']:<32}  {row['score']:7.4f} {row.get('spinal', float('nan')):7.4f} "
                  f"{row.get('foraminal', float('nan')):7.4f} {row.get('subarticular', float('nan')):7.4f} "
                  f"{row.get('any_severe_spinal', float('nan')):7.4f}  {params}")
    from spine_ml.tracking.store import tracking_uri

    print(f"\nMLflow experiment '{config.tracking.experiment}' ({tracking_uri(config)}).")
    print("Compare the trials: spine-ml ui  (then open http://127.0.0.1:5000)")
    if summary.target == "classifier":
        print(f"Blend the best runs: spine-ml ensemble {config_path}")


def cli(args) -> int:
    config = load_config(args.config, args.overrides)
    summary = run_sweep(config, resume=args.resume)
    print_summary(summary, config, args.config)
    return 0 if summary.finished else 1
