"""The CSV side of the synthetic data set: the competition's files plus our oracle, test labels and
test coordinates (the hidden truths that score a submission and the localizer).

Spellings come from spine_ml.competition.vocabulary only; the files read back with
spine_ml.competition.tables, and the submission-layout ones go through the project's writer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame, write_predictions
from spine_ml.competition.tables import labels_to_wide
from spine_ml.synth.study import StudyResult

COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
SERIES_COLUMNS = ("study_id", "series_id", "series_description")


def _long_labels(results: list[StudyResult]) -> pd.DataFrame:
    n = len(results)
    return pd.DataFrame({
        "study_id": np.repeat([r.study_id for r in results], len(V.LABEL_COLUMNS)),
        "condition": np.tile([c for c in V.CONDITIONS for _ in V.LEVELS], n),
        "level": np.tile([lv for _ in V.CONDITIONS for lv in V.LEVELS], n),
        "label": np.concatenate([r.labels for r in results]) if n else np.zeros(0, dtype=int),
    })


def write_labels(path: Path, results: list[StudyResult]) -> None:
    """train.csv layout: study_id + the 25 label columns, severities spelled out, blanks empty."""
    if results:
        wide = labels_to_wide(_long_labels(results))
    else:
        wide = pd.DataFrame(columns=("study_id",) + V.LABEL_COLUMNS)
    wide[["study_id", *V.LABEL_COLUMNS]].to_csv(path, index=False)


def write_coordinates(path: Path, results: list[StudyResult]) -> None:
    frame = pd.DataFrame([row for r in results for row in r.coordinates], columns=list(COORDINATE_COLUMNS))
    order = {t: i for i, t in enumerate(V.CONDITION_TITLES.values())}
    frame = frame.assign(_c=frame.condition.map(order)).sort_values(
        ["study_id", "series_id", "_c", "level"], kind="stable").drop(columns="_c")
    frame.to_csv(path, index=False, float_format="%.6f")


def write_series_descriptions(path: Path, results: list[StudyResult]) -> None:
    frame = pd.DataFrame([(r.study_id, sid, d) for r in results for sid, d in r.series], columns=list(SERIES_COLUMNS))
    frame.sort_values(["study_id", "series_id"]).to_csv(path, index=False)


def write_oracle(path: Path, results: list[StudyResult]) -> None:
    """True class probabilities of every row (blank labels included), submission layout."""
    row_ids = [rid for r in results for rid in V.study_row_ids(r.study_id)]
    probabilities = np.concatenate([r.probabilities for r in results]) if results else np.zeros((0, 3))
    write_predictions(normalised_frame(row_ids, probabilities), path)


def write_sample_submission(path: Path, results: list[StudyResult]) -> None:
    row_ids = [rid for r in results for rid in V.study_row_ids(r.study_id)]
    write_predictions(normalised_frame(row_ids, np.full((len(row_ids), 3), 1 / 3)), path)


def write_tables(out: Path, results: list[StudyResult]) -> None:
    """Every CSV of the data set; studies in ascending id order whatever order they were made in."""
    ordered = sorted(results, key=lambda r: r.study_id)
    train = [r for r in ordered if r.split == "train"]
    test = [r for r in ordered if r.split == "test"]
    write_coordinates(out / "train_label_coordinates.csv", train)
    write_series_descriptions(out / "train_series_descriptions.csv", train)
    write_series_descriptions(out / "test_series_descriptions.csv", test)
    write_sample_submission(out / "sample_submission.csv", test)
    write_oracle(out / "oracle_train.csv", train)
    write_oracle(out / "oracle_test.csv", test)
    write_labels(out / "test_labels.csv", test)
    write_coordinates(out / "test_label_coordinates.csv", test)  # hidden truth: scores the localizer
    write_labels(out / "train.csv", train)  # last: its presence marks a complete data set
