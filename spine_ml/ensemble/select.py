"""Which MLflow runs become ensemble members, and their OOF predictions.

A candidate is a FINISHED run of the config's experiment that carries the final OOF metric `score`
and the artifact `oof.csv`: sweep trials (`spine_ml.run_kind=trial`, state finished) and
`spine-ml train` runs (`train`). Pruned and failed trials, sweep parents and ensembles never are.
Candidates are ranked by `score` (lower is better); at most `per_backbone` per `model.backbone`.
A candidate whose artifacts cannot be read is skipped with a warning and the next one takes its place.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spine_ml.errors import UserError
from spine_ml.tracking.store import RUN_KIND_TAG as KIND_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from spine_ml.config import Config

log = logging.getLogger(__name__)
STATE_TAG = "spine_ml.trial_state"
MEMBER_KINDS = ("trial", "train")
OOF_ARTIFACT = "oof.csv"
CHECKPOINTS_ARTIFACT = "checkpoints"
TEST_PREDICTIONS_ARTIFACT = "test_predictions"  # <prediction key>.csv, written by ensemble.testpred


class SelectionError(UserError):
    """No usable member runs; the message names the experiment or run and says what to do."""


@dataclass
class Member:
    """One ensemble member: a finished run and what the ensemble needs from it."""
    run_id: str
    name: str
    backbone: str
    logged_score: float  # the run's own OOF `score` metric
    folds: int  # fold models run at test time
    seconds_per_study: float | None  # inference of ONE fold model, as the run measured it
    oof: pd.DataFrame  # submission layout

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    def hours(self, studies: int) -> float | None:
        """Test-time cost of this member on `studies` studies (all its fold models), in hours."""
        if self.seconds_per_study is None:
            return None
        return self.folds * self.seconds_per_study * studies / 3600.0


def is_candidate(run) -> bool:
    tags = run.data.tags
    return (run.info.status == "FINISHED" and tags.get(KIND_TAG, "trial") in MEMBER_KINDS
            and tags.get(STATE_TAG, "finished") == "finished" and "score" in run.data.metrics)


def candidate_runs(mlflow_client: MlflowClient, experiment_id: str) -> list:
    """Every candidate run of the experiment, best `score` first."""
    runs = mlflow_client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                     order_by=["metrics.score ASC"], max_results=50000)
    candidates = [run for run in runs if is_candidate(run)]
    return sorted(candidates, key=lambda run: run.data.metrics["score"])


def explicit_runs(mlflow_client: MlflowClient, run_ids: list[str]) -> list:
    """`--runs ID...`: each must exist; one that is not a finished member is skipped with a warning."""
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in run_ids:
        try:
            run = mlflow_client.get_run(run_id)
        except MlflowException:
            raise SelectionError(f"--runs: no MLflow run {run_id!r} in this tracking store; list runs with "
                                 f"`spine-ml ui` or drop --runs to pick the best ones") from None
        if is_candidate(run):
            runs.append(run)
        else:
            log.warning("run %s (%s, status %s, kind %s) is not a finished trial with an OOF score; skipped",
                        run_id, run.info.run_name, run.info.status, run.data.tags.get(KIND_TAG, "?"))
    return runs


def folds_of(mlflow_client: MlflowClient, run) -> int:
    """Fold models of a run: its `cv.folds` param, else its checkpoint files."""
    value = run.data.params.get("cv.folds")
    if value and value.isdigit():
        return int(value)
    return max(1, len(mlflow_client.list_artifacts(run.info.run_id, CHECKPOINTS_ARTIFACT)))


def quiet_downloads() -> None:
    """One progress bar per small artifact download is noise in the ensemble's report."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def read_oof(run_id: str, tracking_uri: str) -> pd.DataFrame:
    """The run's oof.csv; raises OSError/MlflowException when the artifact is absent or unreadable."""
    import mlflow.artifacts

    quiet_downloads()
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OOF_ARTIFACT, dst_path=folder,
                                                   tracking_uri=tracking_uri)
        return pd.read_csv(path, dtype={"row_id": str})


def can_predict(mlflow_client: MlflowClient, run_id: str, prediction_key: str) -> bool:
    """Fold checkpoints to predict with, or test predictions already stored for this test data."""
    if any(not item.is_dir for item in mlflow_client.list_artifacts(run_id, CHECKPOINTS_ARTIFACT)):
        return True
    stored = mlflow_client.list_artifacts(run_id, TEST_PREDICTIONS_ARTIFACT)
    return any(Path(item.path).name == f"{prediction_key}.csv" for item in stored)


def to_member(mlflow_client: MlflowClient, run, tracking_uri: str, prediction_key: str | None) -> Member | None:
    """A Member, or None (with a warning naming the run) when its artifacts are missing.
    With a `prediction_key` (test predictions wanted) the run must be able to predict them."""
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    if prediction_key is not None and not can_predict(mlflow_client, run_id, prediction_key):
        log.warning("run %s (%s): no checkpoints/ artifact (nor stored test predictions), so it cannot predict "
                    "the test set; skipped", run_id, run.info.run_name)
        return None
    try:
        oof = read_oof(run_id, tracking_uri)
    except (OSError, MlflowException, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        log.warning("run %s (%s): its %s cannot be read (%s); skipped", run_id, run.info.run_name,
                    OOF_ARTIFACT, str(error).splitlines()[0][:200])
        return None
    seconds = run.data.metrics.get("inference_seconds_per_study")
    if seconds is None or not np.isfinite(seconds):
        log.warning("run %s (%s): no inference_seconds_per_study metric; its inference cost counts as 0",
                    run_id, run.info.run_name)
        seconds = None
    backbone = run.data.params.get("model.backbone") or run.data.tags.get("spine_ml.backbone", "?")
    return Member(run_id=run_id, name=run.info.run_name or run_id[:8], backbone=backbone,
                  logged_score=float(run.data.metrics["score"]), folds=folds_of(mlflow_client, run),
                  seconds_per_study=seconds, oof=oof)


def select_members(config: Config, top_k: int, per_backbone: int | None = None, run_ids: list[str] | None = None,
                   prediction_key: str | None = None) -> list[Member]:
    """The ensemble's candidate members, best first (see the module docstring for the rules).
    `prediction_key`: test predictions are wanted for this test data (see ensemble.testpred)."""
    from spine_ml.tracking.store import client, tracking_uri

    mlflow_client = client(config)
    uri = tracking_uri(config)
    if run_ids:
        runs = explicit_runs(mlflow_client, run_ids)
    else:
        experiment = mlflow_client.get_experiment_by_name(config.tracking.experiment)
        if experiment is None:
            raise SelectionError(f"no MLflow experiment {config.tracking.experiment!r} in {uri}; run "
                                 f"`spine-ml sweep` or `spine-ml train` with this config first")
        runs = candidate_runs(mlflow_client, experiment.experiment_id)
        if not runs:
            raise SelectionError(f"experiment {config.tracking.experiment!r} in {uri} has no finished runs "
                                 f"with an OOF score; run `spine-ml sweep` or `spine-ml train` first")
    members: list[Member] = []
    per_backbone_count: dict[str, int] = {}
    for run in runs:
        if not run_ids and len(members) >= top_k:
            break
        backbone = run.data.params.get("model.backbone") or run.data.tags.get("spine_ml.backbone", "?")
        if not run_ids and per_backbone and per_backbone_count.get(backbone, 0) >= per_backbone:
            continue
        member = to_member(mlflow_client, run, uri, prediction_key)
        if member is not None:
            members.append(member)
            per_backbone_count[backbone] = per_backbone_count.get(backbone, 0) + 1
    if not members:
        raise SelectionError(f"none of the {len(runs)} candidate run(s) has readable artifacts "
                             f"({OOF_ARTIFACT}{' and checkpoints/' if prediction_key else ''}); see the warnings above")
    return members
