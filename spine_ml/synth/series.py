"""Where the scanner puts its slices: sagittal T1 and T2/STIR series, oblique axial stacks per disc.

Only geometry and bookkeeping here (planes, thicknesses, instance numbers, which series holds
which level); render.py makes the pixels and study.py writes the files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.synth.anatomy import Spine
from spine_ml.synth.planes import Plane, centred_plane, rotation

SEQUENCE_TAGS = {
    "T1": {"ScanningSequence": "SE", "RepetitionTime": 550.0, "EchoTime": 10.0},
    "T2": {"ScanningSequence": "SE", "RepetitionTime": 3500.0, "EchoTime": 100.0},
    "STIR": {"ScanningSequence": "IR", "RepetitionTime": 4000.0, "EchoTime": 60.0, "InversionTime": 150.0},
}


@dataclass
class SliceSpec:
    plane: Plane
    thickness: float
    instance_number: int = 0
    level: str | None = None  # axial: the level whose stack holds this slice


@dataclass
class SeriesSpec:
    series_id: int
    description: str          # one of vocabulary.SERIES_DESCRIPTIONS
    sequence: str             # T1 | T2 | STIR
    spacing: float            # SpacingBetweenSlices
    slices: list[SliceSpec] = field(default_factory=list)
    rle: bool = False
    spacing_tags: bool = True  # write SliceThickness / SpacingBetweenSlices

    def nearest_slice(self, point: np.ndarray, level: str | None = None) -> SliceSpec:
        """The slice whose plane passes closest to a patient point (of one level's stack if given)."""
        candidates = [s for s in self.slices if level is None or s.level == level]
        return min(candidates, key=lambda s: abs(s.plane.to_pixel(point)[2]))


def study_sizes(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(sagittal, axial) matrix sizes: vary between studies around image_size, multiples of 8."""
    def pick() -> int:
        return max(32, int(round(image_size * rng.choice([0.8, 1.0, 1.0, 1.2]) / 8)) * 8)
    return pick(), pick()


def _number(slices: list[SliceSpec], rng: np.random.Generator, odd: bool, stack_breaks: list[int] = ()) -> None:
    """Instance numbers in list order: 1, 2, ... or, when odd, a late start and gaps."""
    number = int(rng.integers(2, 40)) if odd else 1
    skip_at = int(rng.integers(1, len(slices))) if odd and len(slices) > 1 else -1
    for i, spec in enumerate(slices):
        if i == skip_at or (odd and i in stack_breaks):
            number += int(rng.integers(1, 12))
        spec.instance_number = number
        number += 1


def plan_sagittal(spine: Spine, rng: np.random.Generator, series_id: int, description: str, sequence: str,
                  size: int, odd_numbers: bool) -> SeriesSpec:
    """12-21 parallel sagittal slices across the spine, wide enough to reach both foramina."""
    spacing = float(rng.uniform(3.5, 4.8))
    needed = int(np.ceil(2 * (spine.foramen_side + 10.0) / spacing)) + 1
    count = int(np.clip(needed + rng.integers(0, 4), 12, 21))
    tilt = rotation([0.0, 0.0, 1.0], np.deg2rad(rng.normal(0, 1.5))) @ rotation([1.0, 0.0, 0.0], np.deg2rad(rng.normal(0, 2.0)))
    row_direction, column_direction = tilt @ [0.0, 1.0, 0.0], tilt @ [0.0, 0.0, -1.0]
    normal = np.cross(row_direction, column_direction)
    top = spine.foramen_centre_tn(spine.level_disc("l1_l2"))[0] - 15.0
    bottom = float(spine.disc_centre[spine.level_disc("l5_s1")]) + 10.0
    fov = float(rng.uniform(max(195.0, bottom - top + 25.0), 240.0))
    slack = (fov - (bottom - top)) / 2 - 8.0
    centre = spine.to_patient((top + bottom) / 2 + rng.uniform(-slack, slack), rng.normal(14.0, 6.0), 0.0)
    wide = rng.random() < 0.15
    cols = max(32, int(round(size * 0.8 / 8)) * 8) if wide else size
    offset = rng.uniform(-1.5, 1.5)
    series = SeriesSpec(series_id, description, sequence, spacing)
    for k in range(count):
        shift = (k - (count - 1) / 2) * spacing + offset
        plane = centred_plane(centre + shift * normal, row_direction, column_direction, (fov, fov * cols / size), size, cols)
        series.slices.append(SliceSpec(plane, spacing * float(rng.uniform(0.85, 1.0))))
    if rng.random() < 0.5:  # scanners number sagittal slices from either side
        series.slices.reverse()
    _number(series.slices, rng, odd_numbers)
    return series


def _axial_stack(spine: Spine, rng: np.random.Generator, level: str, size: int) -> list[SliceSpec]:
    disc = spine.level_disc(level)
    t = float(spine.disc_centre[disc])
    normal = rotation([1.0, 0.0, 0.0], np.deg2rad(rng.normal(0, 2.5))) @ spine.superior_direction(t)
    row_direction = rotation(normal, np.deg2rad(rng.normal(0, 2.0))) @ [1.0, 0.0, 0.0]
    column_direction = np.cross(normal, row_direction)
    count, spacing = int(rng.integers(3, 7)), float(rng.uniform(3.0, 5.0))
    fov = float(rng.uniform(160.0, 200.0))
    centre = spine.to_patient(t, rng.normal(12.0, 6.0), rng.normal(0.0, 5.0)) + rng.normal(0, 1.5) * normal
    stack = []
    for k in range(count):  # superior to inferior
        shift = ((count - 1) / 2 - k) * spacing
        plane = centred_plane(centre + shift * normal, row_direction, column_direction, (fov, fov), size, size)
        stack.append(SliceSpec(plane, 0.9 * spacing, level=level))
    return stack


def _mix_sizes(groups: list[list[list[SliceSpec]]], rng: np.random.Generator) -> None:
    """Give part of one series another matrix size: a whole stack where the series has several,
    else the lower half of its only stack."""
    group = max(groups, key=len)
    slices = group[-1] if len(group) > 1 else group[0][len(group[0]) // 2:]
    factor = float(rng.choice([0.75, 1.25]))
    for spec in slices:
        rows = max(32, int(round(spec.plane.rows * factor / 8)) * 8)
        spec.plane = spec.plane.resized(rows, rows)


def plan_axial(spine: Spine, rng: np.random.Generator, series_ids: list[int], size: int, first_level: int,
               series_count: int, reversed_stack: bool, mixed_sizes: bool, odd_numbers: bool) -> list[SeriesSpec]:
    """One oblique stack per covered level, split over ``series_count`` series (top levels first)."""
    stacks = [_axial_stack(spine, rng, level, size) for level in V.LEVELS[first_level:]]
    if reversed_stack:  # numbered inferior to superior, against the others
        stacks[int(rng.integers(len(stacks)))].reverse()
    series_count = min(series_count, len(stacks))
    bounds = np.linspace(0, len(stacks), series_count + 1).round().astype(int)
    groups = [stacks[bounds[i]:bounds[i + 1]] for i in range(series_count)]
    if mixed_sizes:
        _mix_sizes(groups, rng)
    out = []
    for series_id, group in zip(series_ids, groups):
        spec = SeriesSpec(series_id, V.AXIAL_T2, "T2", float(np.mean([_spacing(s) for s in group])))
        spec.slices = [s for stack in group for s in stack]
        _number(spec.slices, rng, odd_numbers, list(np.cumsum([len(s) for s in group])[:-1]))
        out.append(spec)
    return out


def _spacing(stack: list[SliceSpec]) -> float:
    if len(stack) < 2:
        return stack[0].thickness
    return float(abs((stack[1].plane.position - stack[0].plane.position) @ stack[0].plane.normal))
