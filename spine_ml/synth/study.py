"""One synthetic study, start to finish: truth, patient, series, DICOM files, coordinate rows.

``make_study(task)`` is a pure function of its task (the seed is in it), so studies can be made
in any order, in any process, and give the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.dicom.write import SeriesInfo, write_mr_slice
from spine_ml.synth import labels
from spine_ml.synth.anatomy import LEFT, RIGHT, Spine, make_spine
from spine_ml.synth.render import make_acquisition, make_contrast, render_slice
from spine_ml.synth.series import SEQUENCE_TAGS, SeriesSpec, plan_axial, plan_sagittal, study_sizes

# Irregularities: name -> rate per study. generate.py also forces each train one (and the test-only
# ones) onto at least one study of every generation.
TRAIN_IRREGULARITIES = {
    "blank_labels": None,            # from the label model (axial coverage starting below L1/L2)
    "two_axial_series": 0.15,
    "no_sagittal_t1": 0.005,
    "odd_instance_numbers": 0.10,
    "reversed_axial_stack": 0.10,
    "mixed_sizes": 0.08,
    "no_coordinates": 0.005,
    "rle": 0.20,
}
TEST_IRREGULARITIES = {
    "no_axial": 0.02,
    "no_spacing_tags": 0.15,
    "two_axial_series": 0.15,
    "odd_instance_numbers": 0.10,
    "reversed_axial_stack": 0.10,
    "mixed_sizes": 0.08,
    "rle": 0.20,
}
POINT_NOISE_MM = 1.5          # radiologists' clicks scatter by a few native pixels
WRONG_LEVEL_RATE = 0.015      # a coordinate placed on the neighbouring level


@dataclass(frozen=True)
class StudyTask:
    split: str                    # "train" | "test"
    index: int
    study_id: int
    series_ids: tuple[int, ...]   # unique ids to draw from (5 is enough)
    seed: int
    image_size: int
    forced: frozenset[str]        # irregularities this study must show
    images_dir: str               # OUT/train_images or OUT/test_images


@dataclass
class StudyResult:
    split: str
    study_id: int
    labels: np.ndarray
    probabilities: np.ndarray
    series: list[tuple[int, str]] = field(default_factory=list)           # (series_id, description)
    coordinates: list[tuple] = field(default_factory=list)                # coordinate CSV rows
    files: int = 0
    irregularities: set[str] = field(default_factory=set)


def _streams(task: StudyTask) -> list[np.random.Generator]:
    split_code = {"train": 0, "test": 1}[task.split]
    sequence = np.random.SeedSequence([task.seed, split_code, task.index])
    return [np.random.default_rng(s) for s in sequence.spawn(5)]


def _flags(task: StudyTask, rng: np.random.Generator) -> set[str]:
    rates = TRAIN_IRREGULARITIES if task.split == "train" else TEST_IRREGULARITIES
    draws = {name: rng.random() for name in rates}  # always draw, so streams never shift
    return {n for n, r in rates.items() if r is not None and draws[n] < r} | set(task.forced)


def _plan_series(task: StudyTask, spine: Spine, flags: set[str], first_level: int, rng: np.random.Generator) -> list[SeriesSpec]:
    sagittal_size, axial_size = study_sizes(rng, task.image_size)
    ids = list(task.series_ids)
    odd = "odd_instance_numbers" in flags
    t2_sequence = "STIR" if rng.random() < 0.15 else "T2"
    planned = [plan_sagittal(spine, rng, ids.pop(0), V.SAGITTAL_T1, "T1", sagittal_size, odd),
               plan_sagittal(spine, rng, ids.pop(0), V.SAGITTAL_T2, t2_sequence, sagittal_size, odd)]
    series_count = 2 if "two_axial_series" in flags else 1
    planned += plan_axial(spine, rng, ids, axial_size, first_level, series_count,
                          "reversed_axial_stack" in flags, "mixed_sizes" in flags, odd)
    if "no_sagittal_t1" in flags:
        planned = [s for s in planned if s.description != V.SAGITTAL_T1]
    if "no_axial" in flags:
        planned = [s for s in planned if s.description != V.AXIAL_T2]
    rle_ids = {s.series_id for s in planned if rng.random() < 0.5} or {planned[-1].series_id}
    for spec in planned:
        spec.rle = "rle" in flags and spec.series_id in rle_ids
        spec.spacing_tags = "no_spacing_tags" not in flags
    return planned


def _write_series(task: StudyTask, spine: Spine, spec: SeriesSpec, number: int, rng: np.random.Generator,
                  field_strength: float) -> int:
    contrast = make_contrast(spec.sequence, rng)
    acquisition = make_acquisition(rng, spine.to_patient(float(spine.disc_centre[4]), 20.0, 0.0))
    info = SeriesInfo(task.study_id, spec.series_id, number, spec.description,
                      {**SEQUENCE_TAGS[spec.sequence], "MagneticFieldStrength": field_strength})
    folder = Path(task.images_dir) / str(task.study_id) / str(spec.series_id)
    for slice_spec in spec.slices:
        plane = slice_spec.plane
        pixels = render_slice(spine, contrast, acquisition, plane, slice_spec.thickness, rng)
        write_mr_slice(folder / f"{slice_spec.instance_number}.dcm", pixels, info, slice_spec.instance_number,
                       position=plane.position, orientation=plane.orientation,
                       pixel_spacing=(plane.row_spacing, plane.col_spacing),
                       slice_thickness=slice_spec.thickness if spec.spacing_tags else None,
                       spacing_between_slices=spec.spacing if spec.spacing_tags else None,
                       slice_location=float(plane.position @ plane.normal), rle=spec.rle)
    return len(spec.slices)


def _landmark(spine: Spine, condition: str, level: str) -> np.ndarray:
    info = V.CONDITION_INFO[condition]
    side = LEFT if info.side == "left" else RIGHT
    if info.group == "spinal":
        return spine.canal_point(level)
    if info.group == "foraminal":
        return spine.foramen_point(level, side)
    return spine.recess_point(level, side)


def _coordinates(task: StudyTask, spine: Spine, planned: list[SeriesSpec], truth: labels.StudyTruth,
                 rng: np.random.Generator, exact: bool = False) -> list[tuple]:
    """One row per labelled (condition, level) whose series exists: the evidence's centre on the
    slice through it, with click noise and, rarely, the neighbouring level's point (train); `exact`
    (the test split's hidden truth, which scores the localizer) keeps the true point."""
    rows = []
    for condition in V.CONDITIONS:
        description = V.CONDITION_INFO[condition].series
        for li, level in enumerate(V.LEVELS):
            noise, wrong, step = rng.normal(0, POINT_NOISE_MM, 2), rng.random(), rng.choice([-1, 1])
            if truth.labels[truth.row(condition, level)] < 0:
                continue
            shown = level
            if exact:
                noise, wrong = np.zeros(2), 1.0
            if wrong < WRONG_LEVEL_RATE:
                shown = V.LEVELS[int(np.clip(li + step, 0, len(V.LEVELS) - 1))]
            point = _landmark(spine, condition, shown)
            holders = [s for s in planned if s.description == description
                       and any(sl.level in (None, shown) for sl in s.slices)]
            if not holders:
                continue
            series = holders[0]
            spec = series.nearest_slice(point, None if description != V.AXIAL_T2 else shown)
            x, y, _ = spec.plane.to_pixel(point)
            x = float(np.clip(x + noise[0] / spec.plane.col_spacing, 0, spec.plane.cols - 1))
            y = float(np.clip(y + noise[1] / spec.plane.row_spacing, 0, spec.plane.rows - 1))
            rows.append((task.study_id, series.series_id, spec.instance_number, V.CONDITION_TITLES[condition],
                         V.LEVEL_TITLES[level], round(x, 6), round(y, 6)))
    return rows


def make_study(task: StudyTask) -> StudyResult:
    truth_rng, anatomy_rng, plan_rng, coordinate_rng, render_rng = _streams(task)
    flags = _flags(task, plan_rng)
    first_level = labels.draw_axial_first_level(truth_rng)
    if "blank_labels" in flags:
        first_level = max(first_level, 1)
    truth = labels.draw_truth(truth_rng, first_level)
    spine = make_spine(truth, anatomy_rng)
    planned = _plan_series(task, spine, flags, first_level, plan_rng)
    field_strength = float(plan_rng.choice([1.5, 3.0]))
    result = StudyResult(task.split, task.study_id, truth.labels, truth.probabilities)
    for number, spec in enumerate(planned, start=1):
        result.files += _write_series(task, spine, spec, number, render_rng, field_strength)
        result.series.append((spec.series_id, spec.description))
    if task.split == "train" and "no_coordinates" not in flags:
        result.coordinates = _coordinates(task, spine, planned, truth, coordinate_rng)
    elif task.split == "test":
        result.coordinates = _coordinates(task, spine, planned, truth, coordinate_rng, exact=True)
    if (truth.labels < 0).any():
        flags.add("blank_labels")
    result.irregularities = flags
    return result
