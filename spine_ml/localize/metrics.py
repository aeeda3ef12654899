"""How good a localizer is, on studies with known coordinates, through the test-time path.

Per labelled point (a coordinate row whose series type localises its condition):
- point error: mm between the predicted and the labelled point in patient space;
- correct level: of the study's labelled points of the same condition, the one nearest to the
  prediction is this level's (the error that matters: a crop of the wrong disc);
- correct slice: the predicted slice is the labelled instance of the labelled series.
A point the localizer could not place (series unreadable, level not covered) counts as wrong.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import tables
from spine_ml.competition import vocabulary as V

log = logging.getLogger(__name__)
UNIFORM_SQUARE_P90 = 1.1147  # p90 of the radial offset of a uniform jitter in [-1, 1]^2 (simulated, 10^6 draws)


def true_points(localization, coordinates: pd.DataFrame) -> pd.DataFrame:
    """Coordinate rows of one study with their patient-space point (from the series the study read)."""
    rows = []
    for point in coordinates.itertuples(index=False):
        series = localization.series.get(int(point.series_id))
        description = localization.descriptions.get(int(point.series_id))
        if series is None or V.CONDITION_INFO[point.condition].series != description:
            continue
        try:
            stack, slice_index = series.find_instance(int(point.instance_number))
        except KeyError:
            continue
        rows.append({"condition": point.condition, "level": point.level, "series_id": int(point.series_id),
                     "instance_number": int(point.instance_number),
                     "point": stack.pixel_to_patient(slice_index, float(point.x), float(point.y))})
    return pd.DataFrame(rows)


def score_study(localization, truth: pd.DataFrame) -> list[dict]:
    out = []
    for row in truth.itertuples(index=False):
        site = localization.sites.get((row.condition, row.level))
        record = {"study_id": localization.study_id, "condition": row.condition, "level": row.level,
                  "group": V.condition_group(row.condition), "found": site is not None,
                  "error_mm": np.nan, "correct_level": False, "correct_slice": False}
        if site is not None:
            predicted = site.point
            record["error_mm"] = float(np.linalg.norm(predicted - row.point))
            same = truth[truth.condition == row.condition]
            distances = [float(np.linalg.norm(predicted - p)) for p in same.point]
            record["correct_level"] = same.level.iloc[int(np.argmin(distances))] == row.level
            record["correct_slice"] = (site.series_id == row.series_id and site.instance_number == row.instance_number)
        out.append(record)
    return out


def summarise(records: pd.DataFrame) -> dict[str, float]:
    """mean/p90 error (found points), correct-level and correct-slice rates (all points), per group too."""
    def parts(frame: pd.DataFrame, prefix: str) -> dict[str, float]:
        errors = frame.error_mm.dropna().to_numpy()
        return {f"{prefix}mean_error_mm": float(errors.mean()) if len(errors) else float("nan"),
                f"{prefix}p90_error_mm": float(np.percentile(errors, 90)) if len(errors) else float("nan"),
                f"{prefix}correct_level_rate": float(frame.correct_level.mean()) if len(frame) else float("nan"),
                f"{prefix}correct_slice_rate": float(frame.correct_slice.mean()) if len(frame) else float("nan")}

    metrics = parts(records, "")
    metrics["found_rate"] = float(records.found.mean()) if len(records) else float("nan")
    metrics["points"] = float(len(records))
    for group in V.GROUPS:
        metrics.update(parts(records[records.group == group], f"{group}_"))
    return metrics


def score_localizer(localizer, root: Path, studies, images: str = "train_images",
                    coordinates_csv: str = "train_label_coordinates.csv",
                    series_csv: str = "train_series_descriptions.csv") -> pd.DataFrame:
    """One record per labelled point of `studies` (localised from their DICOM folders)."""
    from spine_ml.localize.infer import localize_study

    coordinates = tables.read_coordinates(root / coordinates_csv)
    descriptions = tables.read_series_descriptions(root / series_csv)
    records: list[dict] = []
    for study_id in studies:
        listed = descriptions[descriptions.study_id == int(study_id)]
        series = list(zip(listed.series_id.tolist(), listed.series_description.tolist()))
        localization = localize_study(localizer, root / images / str(study_id), series, int(study_id))
        truth = true_points(localization, coordinates[coordinates.study_id == int(study_id)])
        if not truth.empty:
            records.extend(score_study(localization, truth))
    return pd.DataFrame(records, columns=["study_id", "condition", "level", "group", "found", "error_mm",
                                          "correct_level", "correct_slice"])


def evaluate_localizer(localizer, root: Path, studies, **files) -> dict[str, float]:
    return summarise(score_localizer(localizer, root, studies, **files))


def suggested_shift_px(p90_error_mm: float, pixel_mm: float) -> float:
    """The classifier's coordinate jitter (`train.augment.shift_px`, uniform +-s cache pixels per
    axis) whose 90th-percentile offset equals the localizer's p90 point error: training crops then
    miss their centre as often and as far as test-time crops do (the winners' "crucial" jitter)."""
    return float(p90_error_mm) / (UNIFORM_SQUARE_P90 * float(pixel_mm))
