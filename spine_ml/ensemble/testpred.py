"""Test predictions of the chosen members, cached in MLflow, blended into the submission.

Each member's test predictions are stored as an artifact of the member's own run,
`test_predictions/<fingerprint>.csv`, keyed by a fingerprint of the test data (the series list and
every test image's path and size) and the localizer used: re-running the ensemble with other weights,
or another budget, predicts nothing again.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.ensemble.objective import CONDITION_INDEX, align_predictions
from spine_ml.errors import UserError

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.ensemble.report import EnsembleSummary
    from spine_ml.ensemble.select import Member

log = logging.getLogger(__name__)
CACHE_FOLDER = "test_predictions"


class SubmissionInvalid(UserError):
    """The blended submission failed validation (a bug upstream; the file is kept for inspection)."""


def fingerprint_test_data(data_root: Path, salt: str = "") -> str:
    """sha256 over test_series_descriptions.csv and (relative path, size) of every test image, + salt."""
    digest = hashlib.sha256(salt.encode())
    descriptions = data_root / "test_series_descriptions.csv"
    digest.update(descriptions.read_bytes() if descriptions.is_file() else b"")
    images = data_root / "test_images"
    if images.is_dir():
        for path in sorted(images.rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(images).as_posix()}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:20]


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


def member_config(config: Config, run_id: str, tracking_uri: str) -> Config:
    """The member's resolved config.yaml, its paths read against this project."""
    import mlflow.artifacts
    import yaml

    from spine_ml.config import validate

    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=folder,
                                                   tracking_uri=tracking_uri)
        raw = yaml.safe_load(Path(path).read_text())
    return validate(raw, config.project_root, source=f"run {run_id} config.yaml")


def predict_member(config: Config, member: Member, data_root: Path, studies: list[int], folder: Path) -> pd.DataFrame:
    """Run the member's fold models over the test studies (spine_ml.predict)."""
    import mlflow.artifacts

    from spine_ml.predict.run import predict_studies
    from spine_ml.tracking.store import tracking_uri

    uri = tracking_uri(config)
    checkpoints_dir = Path(mlflow.artifacts.download_artifacts(run_id=member.run_id, artifact_path="checkpoints",
                                                               dst_path=str(folder), tracking_uri=uri))
    checkpoints = sorted(p for p in checkpoints_dir.iterdir() if p.is_file())
    return predict_studies(member_config(config, member.run_id, uri), checkpoints, None, data_root, studies)


def member_test_predictions(config: Config, member: Member, data_root: Path, studies: list[int],
                            fingerprint: str) -> pd.DataFrame:
    """The member's test predictions, from its cache artifact when the test data is unchanged."""
    from spine_ml.tracking.store import client, tracking_uri

    mlflow_client = client(config)
    name = f"{fingerprint}.csv"
    cached = cached_predictions(mlflow_client, member.run_id, name, tracking_uri(config))
    if cached is not None:
        log.info("run %s: test predictions from cache %s/%s", member.short_id, CACHE_FOLDER, name)
        return cached
    log.info("run %s: predicting %d test studies", member.short_id, len(studies))
    with tempfile.TemporaryDirectory() as folder:
        frame = predict_member(config, member, data_root, studies, Path(folder))
    store_predictions(mlflow_client, member.run_id, name, frame)
    return frame


def submission_row_ids(studies: list[int]) -> np.ndarray:
    return np.array([row for study in studies for row in V.study_row_ids(study)])


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


def write_submission(config: Config, summary: EnsembleSummary, out: Path) -> Path:
    """Predict (or read cached) test rows per chosen member, blend, calibrate, write, validate."""
    from spine_ml.competition.submission import expected_studies, normalised_frame, validate_submission, write_predictions

    data_root = config.path(config.data.root)
    studies = expected_studies(data_dir=data_root)
    fingerprint = fingerprint_test_data(data_root)
    chosen = summary.chosen
    frames = {int(i): member_test_predictions(config, summary.members[i], data_root, studies, fingerprint)
              for i in chosen.members}
    row_ids = submission_row_ids(studies)
    arrays = np.zeros((len(summary.members), len(row_ids), 3))
    for index, frame in frames.items():
        arrays[index] = align_predictions(frame, row_ids, f"run {summary.members[index].run_id} test predictions")
    conditions = np.array([CONDITION_INDEX[V.parse_row_id(r)[1]] for r in row_ids])
    blended = normalised_frame(row_ids, chosen.blend.apply(arrays, conditions))
    path = write_predictions(blended, out)
    problems = validate_submission(path, studies)
    if problems:
        raise SubmissionInvalid(f"{path} failed validation: " + "; ".join(problems))
    score_on_test_labels(summary, data_root, frames, blended)
    return path
