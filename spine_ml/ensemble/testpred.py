"""Test predictions of the chosen members, cached in MLflow, blended into the submission.

Each member's test predictions are stored as an artifact of the member's own run,
`test_predictions/<key>.csv`, keyed by the test data (spine_ml.predict's fingerprint of the series
list and every test image's path and size) and the localizer: re-running the ensemble with other
weights or another budget predicts nothing again. The localizer is resolved once and shared.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame
from spine_ml.ensemble.objective import CONDITION_INDEX, align_predictions
from spine_ml.ensemble.select import TEST_PREDICTIONS_ARTIFACT
from spine_ml.errors import UserError

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.ensemble.report import EnsembleSummary
    from spine_ml.ensemble.select import Member

log = logging.getLogger(__name__)
CACHE_FOLDER = TEST_PREDICTIONS_ARTIFACT


class SubmissionInvalid(UserError):
    """The blended submission failed validation (a bug upstream; the file is kept for inspection)."""


def prediction_key(data_root: Path, studies: list[int], localizer_key: str) -> str:
    from spine_ml.predict.crops import PREDICTION_CODE, code_fingerprint, test_data_fingerprint

    # the code is in the key: predictions cached before a decoder or pipeline change are not reused
    blob = f"{test_data_fingerprint(data_root, studies)}|{localizer_key}|{code_fingerprint(PREDICTION_CODE)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_predictions(mlflow_client, run_id: str, name: str, tracking_uri: str) -> pd.DataFrame | None:
    import mlflow.artifacts

    listed = {Path(item.path).name for item in mlflow_client.list_artifacts(run_id, CACHE_FOLDER)}
    if name not in listed:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CACHE_FOLDER}/{name}",
                                                   dst_path=folder, tracking_uri=tracking_uri)
        return pd.read_csv(path, dtype={"row_id": str})


def store_predictions(mlflow_client, run_id: str, name: str, frame: pd.DataFrame) -> None:
    from spine_ml.competition.submission import write_predictions

    with tempfile.TemporaryDirectory() as folder:
        path = write_predictions(frame, Path(folder) / name)
        mlflow_client.log_artifact(run_id, str(path), artifact_path=CACHE_FOLDER)


def member_predict_config(config: Config, run_id: str, folder: Path) -> Config:
    """The config a member predicts the test set with (here and in an exported bundle): the run's own,
    with this config's predict, tracking and localizer device settings."""
    from spine_ml.predict.run import run_config

    return run_config(config, run_id, folder).with_updates({
        "predict": config.predict.model_dump(mode="json"), "tracking": config.tracking.model_dump(mode="json"),
        "localizer.device": config.localizer.device})


def predict_member(config: Config, member: Member, localizer, data_root: Path, studies: list[int]) -> pd.DataFrame:
    """Run the member's fold models over the test studies, as `spine-ml predict --run` does."""
    from spine_ml.predict.run import predict_studies, run_checkpoints

    with tempfile.TemporaryDirectory(prefix="ensemble-member-") as folder:
        member_config = member_predict_config(config, member.run_id, Path(folder))
        checkpoints = run_checkpoints(config, member.run_id, Path(folder))
        return predict_studies(member_config, checkpoints, localizer, data_root, studies)


def member_test_predictions(config: Config, member: Member, localizer, data_root: Path, studies: list[int],
                            key: str) -> pd.DataFrame:
    """The member's test predictions, from its cache artifact when data and localizer are unchanged."""
    from spine_ml.tracking.store import client, tracking_uri

    mlflow_client = client(config)
    name = f"{key}.csv"
    cached = cached_predictions(mlflow_client, member.run_id, name, tracking_uri(config))
    if cached is not None:
        log.info("run %s: test predictions from its artifact %s/%s", member.short_id, CACHE_FOLDER, name)
        return cached
    log.info("run %s: predicting %d test studies", member.short_id, len(studies))
    frame = predict_member(config, member, localizer, data_root, studies)
    store_predictions(mlflow_client, member.run_id, name, frame)
    return frame


def submission_row_ids(studies: list[int]) -> np.ndarray:
    return np.array([row for study in studies for row in V.study_row_ids(study)])


def blended_frame(row_ids: np.ndarray, member_probabilities: np.ndarray, blend) -> pd.DataFrame:
    """Submission frame of a blend: (members, rows, 3) probabilities aligned to `row_ids` -> weighted,
    calibrated per condition, normalised. The one blending step of the ensemble and of a bundle."""
    conditions = np.array([CONDITION_INDEX[V.parse_row_id(r)[1]] for r in row_ids])
    return normalised_frame(row_ids, blend.apply(member_probabilities, conditions))


def score_on_test_labels(summary: EnsembleSummary, data_root: Path, frames: dict[int, pd.DataFrame],
                         blended: pd.DataFrame) -> None:
    """Synthetic data ships test_labels.csv: score the ensemble and every member against it."""
    from spine_ml.competition.metric import score
    from spine_ml.competition.tables import read_train_labels

    labels_path = data_root / "test_labels.csv"
    if not labels_path.is_file():
        return
    truth = read_train_labels(labels_path)
    summary.test_parts["ensemble"] = score(truth, blended, "ensemble submission").as_dict()
    for index, frame in frames.items():
        member = summary.members[index]
        summary.test_parts[f"{member.short_id} {member.backbone}"] = score(truth, frame, f"run {member.run_id}").as_dict()


@dataclass(frozen=True)
class TestSet:
    """The test studies to predict, the shared localizer and the key of their cached predictions."""
    data_root: Path
    studies: list[int]
    localizer: object  # a loaded Localizer (None when every member's predictions are cached)
    key: str


def prepare_test_set(config: Config, localizer=None) -> TestSet:
    """Resolve the localizer once for all members (a missing one fails here, before any fitting).
    `localizer`: a run id, a folder, None (the most recently chosen localizer run), or an already resolved
    (localizer, key) pair."""
    from spine_ml.competition.submission import expected_studies
    from spine_ml.localize.store import resolve_localizer

    data_root = config.path(config.data.root)
    studies = expected_studies(data_dir=data_root)
    loaded, localizer_key = localizer if isinstance(localizer, tuple) else resolve_localizer(config, localizer)
    return TestSet(data_root, studies, loaded, prediction_key(data_root, studies, localizer_key))


def chosen_test_predictions(config: Config, summary: EnsembleSummary, test: TestSet,
                            row_ids: np.ndarray) -> tuple[dict[int, np.ndarray], list[str]]:
    """(member index -> aligned test probabilities, run ids that could not give them): a member whose
    checkpoints or stored predictions turn out broken is reported, for the caller to refit without it."""
    from mlflow.exceptions import MlflowException

    arrays, failed = {}, []
    for index in summary.chosen.members:
        member = summary.members[index]
        try:
            frame = member_test_predictions(config, member, test.localizer, test.data_root, test.studies, test.key)
            arrays[int(index)] = align_predictions(frame, row_ids, f"run {member.run_id} test predictions")
        except (UserError, OSError, MlflowException, pd.errors.ParserError) as error:
            log.warning("run %s (%s): no test predictions (%s); skipped, the weights are refit without it",
                        member.run_id, member.name, str(error).splitlines()[0][:300])
            failed.append(member.run_id)
    return arrays, failed


def write_submission(config: Config, summary: EnsembleSummary, out: Path, test: TestSet,
                     arrays: dict[int, np.ndarray]) -> Path:
    """Blend and calibrate the chosen members' test predictions, write, validate, score if labelled."""
    from spine_ml.competition.submission import validate_submission, write_predictions

    row_ids = submission_row_ids(test.studies)
    stacked = np.zeros((len(summary.members), len(row_ids), 3))
    for index, values in arrays.items():
        stacked[index] = values
    blended = blended_frame(row_ids, stacked, summary.chosen.blend)
    path = write_predictions(blended, out)
    problems = validate_submission(path, test.studies)
    if problems:
        raise SubmissionInvalid(f"{path} failed validation: " + "; ".join(problems))
    score_on_test_labels(summary, test.data_root, {i: normalised_frame(row_ids, a) for i, a in arrays.items()},
                         blended)
    return path
