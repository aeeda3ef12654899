"""What the crop cache will hold: one index row per (train study, condition, level), and per study
the series to read and the samples to cut from them. Reads only the CSVs, never an image."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import tables
from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError
from spine_ml.prepare.build import (  # noqa: F401 - the statuses are part of this module's vocabulary
    INSTANCE_NOT_FOUND, MISSING_SERIES, NO_COORDINATES, OK, UNKNOWN_SERIES, Request, StudyTask)

log = logging.getLogger(__name__)

TRAIN_LABELS = "train.csv"
COORDINATES = "train_label_coordinates.csv"
SERIES = "train_series_descriptions.csv"
IMAGES = "train_images"


class MissingDataError(UserError):
    """The data root lacks the competition files."""


def require_data(root: Path) -> None:
    if not (root / TRAIN_LABELS).is_file():
        raise MissingDataError(
            f"{root / TRAIN_LABELS} not found: data.root must hold the Kaggle competition files "
            "(train.csv, train_label_coordinates.csv, train_series_descriptions.csv, train_images/). "
            "Download 'RSNA 2024 Lumbar Spine Degenerative Classification' as data/README.md describes "
            "(kaggle competitions download -c rsna-2024-lumbar-spine-degenerative-classification), "
            "or try the synthetic stand-in: `make demo` or `spine-ml prepare sweeps/demo.yaml`.")


def read_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    require_data(root)
    labels = tables.read_train_labels(root / TRAIN_LABELS)
    coordinates = tables.read_coordinates(root / COORDINATES)
    series = tables.read_series_descriptions(root / SERIES)
    return labels, coordinates, series


def _attach_coordinates(labels: pd.DataFrame, coordinates: pd.DataFrame) -> pd.DataFrame:
    keys = ["study_id", "condition", "level"]
    duplicated = coordinates.duplicated(keys, keep="first")
    if duplicated.any():
        first = coordinates[duplicated].iloc[0]
        log.warning("%s: %d duplicate coordinate row(s) for the same study/condition/level (first: study %d "
                    "%s %s); using the first of each", COORDINATES, int(duplicated.sum()), first.study_id,
                    first.condition, first.level)
    coordinates = coordinates[~duplicated]
    strangers = ~coordinates.study_id.isin(labels.study_id)
    if strangers.any():
        log.warning("%s: %d coordinate row(s) of studies not in %s (e.g. study %d); ignored",
                    COORDINATES, int(strangers.sum()), TRAIN_LABELS, int(coordinates.study_id[strangers].iloc[0]))
    index = labels.merge(coordinates[~strangers], on=keys, how="left", validate="one_to_one")
    index["series_id"] = index.series_id.fillna(-1).astype(np.int64)
    index["instance_number"] = index.instance_number.fillna(-1).astype(np.int64)
    return index


def _series_status(index: pd.DataFrame, series: pd.DataFrame) -> np.ndarray:
    """Status of each index row before any image is read."""
    known = series.set_index(["study_id", "series_id"]).series_description
    status = np.where(index.series_id < 0, NO_COORDINATES, OK).astype(object)
    for (study_id, series_id), rows in index[index.series_id >= 0].groupby(["study_id", "series_id"]).groups.items():
        description = known.get((study_id, series_id))
        if description is None:
            log.warning("study %d: series %d is labelled in %s but not listed in %s; its samples are skipped",
                        study_id, series_id, COORDINATES, SERIES)
        elif description not in V.SERIES_DESCRIPTIONS:
            log.warning("study %d series %d: unknown series description %r (expected one of %s); series ignored",
                        study_id, series_id, description, ", ".join(V.SERIES_DESCRIPTIONS))
        else:
            continue
        status[index.index.get_indexer(rows)] = UNKNOWN_SERIES
    return status


def missing_series(labels: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """Per train study: the expected series descriptions that the descriptions CSV does not list."""
    studies = np.sort(labels.study_id.unique())
    present = series.groupby("study_id").series_description.agg(set)
    rows = []
    for study in studies:
        have = present.get(study, set())
        rows.append(";".join(d for d in V.SERIES_DESCRIPTIONS if d not in have))
    return pd.DataFrame({"study_id": studies, "missing_series": rows})


def plan(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[StudyTask]]:
    """(index, studies, tasks). index: one row per (study, condition, level) with a status; studies:
    one row per train study; tasks: per study the samples to cut (rows with status ok)."""
    labels, coordinates, series = read_tables(root)
    index = _attach_coordinates(labels, coordinates)
    index["status"] = _series_status(index, series)
    descriptions = series.set_index(["study_id", "series_id"]).series_description
    index["series_description"] = descriptions.reindex(
        pd.MultiIndex.from_arrays([index.study_id, index.series_id])).fillna("").to_numpy()
    index["x"] = index.x.astype(np.float64)
    index["y"] = index.y.astype(np.float64)
    studies = missing_series(labels, series)
    tasks = {int(s): StudyTask(int(s), root / IMAGES / str(int(s))) for s in studies.study_id}
    wanted = index[index.status == OK]
    for row, study, series_id, instance, x, y in zip(wanted.index, wanted.study_id, wanted.series_id,
                                                     wanted.instance_number, wanted.x, wanted.y):
        tasks[int(study)].requests.append(Request(int(row), int(series_id), int(instance), float(x), float(y)))
    return index, studies, list(tasks.values())
