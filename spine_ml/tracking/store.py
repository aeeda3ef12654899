"""Which MLflow tracking store a config uses, and its experiment.

Never MLflow's implicit default (a `mlflow.db` or `./mlruns` in whatever folder the command runs
from): the URI is always explicit, resolved in this order:
1. ``tracking.uri`` in the config (e.g. an MLflow server on a cluster),
2. the MLFLOW_TRACKING_URI environment variable,
3. ``sqlite:///<project_root>/mlruns/mlflow.db`` with artifacts under ``<project_root>/mlruns/artifacts``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from spine_ml.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from spine_ml.config import Config

log = logging.getLogger(__name__)
STORE_FOLDER = "mlruns"
# Every run the project logs says what it is: trial (sweep) | train | sweep | ensemble | localizer
RUN_KIND_TAG = "spine_ml.run_kind"
MIN_FREE_MB = 64  # below this a trial cannot store its fold checkpoints; fail before training instead


class TrackingError(UserError):
    """The tracking store cannot be used; the message names it and says what to do."""


def store_dir(config: Config) -> Path:
    """The project's own tracking folder (used when no other store is named)."""
    return config.path(STORE_FOLDER)


def uses_project_store(config: Config) -> bool:
    return not config.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(config: Config) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store_dir(config) / 'mlflow.db'}"


def artifact_location(config: Config) -> str | None:
    """file://<project>/mlruns/artifacts/<experiment> for the project store; the server decides otherwise."""
    if not uses_project_store(config):
        return None
    folder = re.sub(r"[^\w.-]", "_", config.tracking.experiment)
    return (store_dir(config) / "artifacts" / folder).as_uri()


def _quiet_mlflow_loggers() -> None:
    # Creating a SQLite store logs each schema migration at INFO; they mean nothing to a user.
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_store_writable(config: Config) -> None:
    """The project store's folder exists and takes files: fail before any training, not after."""
    folder = store_dir(config)
    try:
        (folder / "artifacts").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise TrackingError(
            f"the MLflow store folder {folder} is not writable ({error.strerror or error}); fix its "
            f"permissions, or point tracking.uri (or MLFLOW_TRACKING_URI) at another store") from None
    free_mb = shutil.disk_usage(folder).free / 2 ** 20
    if free_mb < MIN_FREE_MB:  # runs write checkpoints and OOF files here: a full disk fails them late
        raise TrackingError(f"only {free_mb:.1f} MB free for the MLflow store {folder} (runs need at least "
                            f"{MIN_FREE_MB} MB for checkpoints and artifacts); free some space or point "
                            f"tracking.uri (or MLFLOW_TRACKING_URI) at another store")


def client(config: Config) -> MlflowClient:
    from mlflow import MlflowClient

    _quiet_mlflow_loggers()
    if not uses_project_store(config):
        return MlflowClient(tracking_uri=tracking_uri(config))
    from filelock import FileLock

    check_store_writable(config)
    # Processes opening a fresh SQLite store at once (a sweep and `spine-ml ui`, trial workers) race
    # in its schema migration and all but one fail (alembic: "expected to match one row"): one at a
    # time, the later ones find the schema current.
    with FileLock(str(store_dir(config) / ".mlflow.db.lock"), timeout=300):
        return MlflowClient(tracking_uri=tracking_uri(config))


def ensure_experiment(config: Config) -> str:
    """The id of ``tracking.experiment`` in the config's store, created when absent."""
    from mlflow.exceptions import MlflowException

    name = config.tracking.experiment
    uri = tracking_uri(config)
    try:
        mlflow_client = client(config)
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is None:
            try:
                return mlflow_client.create_experiment(name, artifact_location=artifact_location(config))
            except MlflowException:  # created meanwhile by another process (parallel trials)
                existing = mlflow_client.get_experiment_by_name(name)
                if existing is None:
                    raise
    except MlflowException as error:
        raise TrackingError(f"MLflow store {uri}: cannot open or create experiment {name!r}: {error.message}") from None
    if existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} in {uri} is deleted; restore it (`mlflow experiments restore "
            f"--experiment-id {existing.experiment_id}`) or set tracking.experiment to a new name")
    return existing.experiment_id


def download_artifact(config: Config, run_id: str, artifact_path: str, folder: Path, error: type[Exception],
                      hint: str) -> Path:
    """One artifact (file or folder) of a run into `folder`; a failure is `error` naming the run and `hint`."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(folder), tracking_uri=tracking_uri(config)))
    except (MlflowException, OSError) as failure:
        raise error(f"run {run_id}: cannot fetch artifact {artifact_path!r} from {tracking_uri(config)} "
                    f"({str(failure)[:300]}); {hint}") from None


def log_trial(config: Config, result, run_name: str | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """See spine_ml.tracking.logging.log_trial (re-exported here, where the sweep imports it)."""
    from spine_ml.tracking.logging import log_trial as log

    return log(config, result, run_name=run_name, tags=tags, parent_run_id=parent_run_id)
