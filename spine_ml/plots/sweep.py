"""Per-sweep plots from the sweep's Optuna study (`mlruns/optuna/optuna.db`, study = sweep.name),
logged as artifacts of the sweep's parent MLflow run.

- optimisation_history.png: each trial's objective as Optuna saw it, in sampling order, with the
  best OOF score so far. Under ASHA a trial's objective is its full out-of-fold score when it
  finished, or its fold-0 held-out score where ASHA stopped it; the two are told apart by the
  sweep's finished MLflow trial runs (whose `score` is exactly the objective they reported).
- param_importances.png: Optuna's fANOVA importances over the completed trials (needs >= 2
  completed trials and a parameter that varies; skipped with a log line otherwise).
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from spine_ml.config import Config

log = logging.getLogger(__name__)
ARTIFACT_FOLDER = "plots"
HISTORY_FILE = "optimisation_history.png"
IMPORTANCES_FILE = "param_importances.png"
DPI = 100


def optuna_storage_url(config: Config) -> str:
    """Where `spine-ml sweep` keeps its Optuna studies (spine_ml.sweep.run.build_tuner)."""
    return f"sqlite:///{config.path('mlruns/optuna') / 'optuna.db'}"


def load_study(config: Config) -> optuna.Study | None:
    """The sweep's study, or None (with a log line) when it was never created."""
    import optuna

    database = config.path("mlruns/optuna") / "optuna.db"
    if not database.is_file():
        log.info("no Optuna storage at %s: no sweep plots", database)
        return None
    storage = optuna.storages.RDBStorage(optuna_storage_url(config))
    if config.sweep.name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        log.info("no Optuna study %r in %s: no sweep plots", config.sweep.name, database)
        return None
    return optuna.load_study(study_name=config.sweep.name, storage=storage)


def finished_scores(config: Config, experiment_id: str, parent_run_id: str) -> set[float]:
    """The OOF `score` of every finished trial run under the sweep's parent run."""
    from spine_ml.tracking.store import client

    runs = client(config).search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`spine_ml.trial_state` "
                                       f"= 'finished'", max_results=10000)
    return {float(run.data.metrics["score"]) for run in runs if "score" in run.data.metrics}


def history_table(study: optuna.Study, finished: set[float]) -> pd.DataFrame:
    """Completed trials: number, objective, whether it is a finished trial's OOF score, best so far."""
    import optuna

    trials = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    known = np.array(sorted(finished))
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        value = float(trial.value)
        is_final = bool(len(known)) and bool(np.isclose(known, value, rtol=0, atol=1e-9).any())
        rows.append({"number": trial.number, "objective": value, "finished": is_final})
    table = pd.DataFrame(rows, columns=["number", "objective", "finished"])
    table["best_finished"] = table.objective.where(table.finished).cummin().ffill()
    return table


def history_figure(table: pd.DataFrame, sweep_name: str) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    done, stopped = table[table.finished], table[~table.finished]
    ax.scatter(done.number, done.objective, color="C0", zorder=3, label="finished: OOF score")
    if len(stopped):
        ax.scatter(stopped.number, stopped.objective, color="C1", marker="x", zorder=3,
                   label="stopped by ASHA: fold-0 score")
    if table.best_finished.notna().any():
        ax.step(table.number, table.best_finished, where="post", color="C0", alpha=0.6, label="best OOF score so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial (sampling order)", ylabel="objective (weighted log loss, lower is better)")
    ax.set_title(f"Optimisation history of sweep '{sweep_name}' ({len(table)} completed trials)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def param_importances(study: optuna.Study) -> dict[str, float] | None:
    """Optuna's (fANOVA) importances, or None with a log line when they cannot be computed."""
    import optuna

    completed = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    varying = {name for name in {k for t in completed for k in t.params}
               if len({repr(t.params.get(name)) for t in completed}) > 1}
    if len(completed) < 2 or not varying:
        log.info("sweep %r: parameter importances need >= 2 completed trials with varying parameters "
                 "(have %d completed, %d varying); skipped", study.study_name, len(completed), len(varying))
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning and the like
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as error:
        log.info("sweep %r: parameter importances skipped (%s)", study.study_name, error)
        return None
    return importances or None


def importances_figure(importances: dict[str, float], sweep_name: str, completed: int) -> Figure:
    from matplotlib.figure import Figure

    names = list(importances)[::-1]  # most important on top
    values = [importances[n] for n in names]
    figure = Figure(figsize=(8, 1.6 + 0.45 * len(names)), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    bars = ax.barh(names, values, color="C0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set(xlim=(0, max(1.0, max(values) * 1.15)), xlabel="importance (fANOVA, sums to 1)")
    ax.set_title(f"Parameter importances of sweep '{sweep_name}' ({completed} completed trials)", fontsize=10)
    return figure


def write_sweep_plots(study: optuna.Study, finished: set[float], folder: Path) -> list[Path]:
    """optimisation_history.png and, when computable, param_importances.png in `folder`."""
    table = history_table(study, finished)
    if table.empty:
        log.info("sweep %r: no completed trials in the Optuna study: no sweep plots", study.study_name)
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    history_figure(table, study.study_name).savefig(folder / HISTORY_FILE, dpi=DPI)
    paths = [folder / HISTORY_FILE]
    importances = param_importances(study)
    if importances:
        importances_figure(importances, study.study_name, len(table)).savefig(folder / IMPORTANCES_FILE, dpi=DPI)
        paths.append(folder / IMPORTANCES_FILE)
    return paths


def log_sweep_plots(config: Config, experiment_id: str, parent_run_id: str) -> list[str]:
    """Log the sweep's plots to its parent run; returns the artifact paths logged.

    Never raises: a failure is logged as a warning (plots must not fail a sweep).
    """
    try:
        study = load_study(config)
        if study is None:
            return []
        from spine_ml.tracking.store import client

        finished = finished_scores(config, experiment_id, parent_run_id)
        with tempfile.TemporaryDirectory(prefix="spine-ml-sweep-plots-") as folder:
            paths = write_sweep_plots(study, finished, Path(folder))
            for path in paths:
                client(config).log_artifact(parent_run_id, str(path), artifact_path=ARTIFACT_FOLDER)
        return [f"{ARTIFACT_FOLDER}/{path.name}" for path in paths]
    except Exception as error:  # noqa: BLE001 - plots are optional extras of a sweep
        log.warning("sweep %r: plots not logged to run %s (%s: %s)", config.sweep.name, parent_run_id,
                    type(error).__name__, error)
        return []
