"""Find every (condition, level) of a study without coordinates: the site each crop is cut around.

- Sagittal T2/STIR: the five spinal level channels decoded together (`decode_levels`): each
  channel's strongest local maxima over the slices are candidates, and the levels take the
  candidates with the highest summed log peak heights that run head to foot. A channel firing
  higher on the neighbouring disc (the commonest error) then loses that disc to its own level.
- Sagittal T1: the same per side, among the slices on that side of the midline (patient +x is
  Left; the midline is the spinal points' x when T2 was read, else the middle of the T1 stack).
- Axial T2: each level's point (spinal, else the midpoint of the two foramina) is projected into
  every axial stack with the DICOM geometry; the stack whose plane passes closest (with the point
  inside its image) gives the slice, and the subarticular channels refine the left/right points
  on that slice.
A series that is missing or unreadable leaves its conditions without sites (the caller falls back
to the prior for those rows); nothing here raises for bad data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.dicom.geometry import Stack
from spine_ml.localize import slices as S
from spine_ml.models import localizer as L

log = logging.getLogger(__name__)
SPINAL, LEFT_FORAMEN, RIGHT_FORAMEN, LEFT_SUBARTICULAR, RIGHT_SUBARTICULAR = V.CONDITIONS
LEFT_IS_POSITIVE_X = True  # LPS: +x points to the patient's left


@dataclass
class Site:
    """Where one (condition, level) was found: a slice of a stack and a native pixel (x, y) on it."""
    series_id: int
    stack: Stack
    slice_index: int
    x: float
    y: float
    score: float  # heatmap peak height in [0, 1]; for axial sites also the stack choice

    @property
    def instance_number(self) -> int:
        return int(self.stack.instance_numbers[self.slice_index])

    @property
    def point(self) -> np.ndarray:
        return self.stack.pixel_to_patient(self.slice_index, self.x, self.y)


@dataclass
class StudyLocalization:
    study_id: int
    sites: dict[tuple[str, str], Site] = field(default_factory=dict)  # (condition, level) -> site
    problems: list[str] = field(default_factory=list)  # one sentence per missing/unreadable series
    series: dict[int, object] = field(default_factory=dict)  # series_id -> SeriesRead (for evaluation)
    descriptions: dict[int, str] = field(default_factory=dict)  # series_id -> series description


class Localizer:
    """A trained heatmap model, ready to run on stacks (eval mode, no gradients)."""

    def __init__(self, model, cfg, percentiles: tuple[float, float], device: str = "cpu", batch_size: int = 32):
        self.model, self.cfg, self.percentiles = model.eval(), cfg, tuple(percentiles)
        self.device, self.batch_size = device, batch_size
        self.grid = L.heatmap_size(cfg.input_px)
        self.key: str | None = None  # identity for caches (hash of the saved weights), set by loaders

    def heatmaps(self, stack: Stack, slice_indices=None) -> np.ndarray:
        """(n, LANDMARKS, grid, grid) peak heights in [0, 1] for slices of a stack (default: all)."""
        import torch

        indices = range(stack.slices) if slice_indices is None else slice_indices
        inputs = S.model_inputs(stack, list(indices), self.cfg.input_px, self.cfg.context_slices, self.percentiles)
        out = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                batch = torch.from_numpy(inputs[start:start + self.batch_size].astype(np.float32)).to(self.device)
                out.append(torch.sigmoid(self.model(batch).float()).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, L.LANDMARKS, self.grid, self.grid), np.float32)


def _refined_site(series_id: int, stack: Stack, maps: np.ndarray, slice_indices, grid: int, n: int, row: int,
                  column: int) -> Site:
    """The site of grid cell (row, column) of maps[n] (n, grid, grid), refined sub-cell on that slice."""
    v, u = L.refine_peak(maps[n], row, column)
    return Site(series_id, stack, int(slice_indices[n]), float(L.from_grid(u, stack.columns, grid)),
                float(L.from_grid(v, stack.rows, grid)), float(maps[n, row, column]))


def _peak_site(series_id: int, stack: Stack, maps: np.ndarray, slice_indices, grid: int) -> Site:
    """The arg-max over (slice, row, column) of one channel's maps (n, grid, grid), refined sub-cell."""
    n, row, column = np.unravel_index(int(np.argmax(maps)), maps.shape)
    return _refined_site(series_id, stack, maps, slice_indices, grid, int(n), int(row), int(column))


CANDIDATES = 6  # local maxima per level channel that the ordered decoder considers
MIN_LEVEL_GAP_MM = 6.0  # consecutive levels' points at least this far apart along the spine (discs: ~25-40 mm)
SPACING_WEIGHT = 2.0  # log-height cost of a gap between levels unlike the others (see ordered_levels)


def _candidates(series_id: int, stack: Stack, maps: np.ndarray, slice_indices, grid: int) -> list[Site]:
    """Up to CANDIDATES sites of one channel's maps (n, grid, grid): the local maxima (3x3 cells) of
    its best-slice projection, highest first, each refined sub-cell on its own slice."""
    from scipy.ndimage import maximum_filter

    projection, best_slice = maps.max(axis=0), maps.argmax(axis=0)
    peaks = np.argwhere((projection == maximum_filter(projection, size=3, mode="constant")) & (projection > 0))
    peaks = peaks[np.argsort(-projection[peaks[:, 0], peaks[:, 1]], kind="stable")][:CANDIDATES]
    # projection[row, column] is maps[best_slice[row, column], row, column]: the site's score as before
    return [_refined_site(series_id, stack, maps, slice_indices, grid, int(best_slice[row, column]), int(row),
                          int(column)) for row, column in peaks]


def ordered_levels(candidates: list[list[Site]], spacing_weight: float = None) -> list[Site] | None:
    """One site per level (LEVELS order, head to foot) maximising the summed log peak heights with
    every level below the previous one: a level channel that also fires on a neighbouring disc
    (the commonest localizer error, a crop of the wrong disc) loses that disc to the channel whose
    peak it is. The axis is patient +z (superior in DICOM's LPS). None when no ordering exists.

    A second pass adds `spacing_weight` x log(gap / median gap)^2 per step: lumbar discs are close
    to evenly spaced, so an end level that jumped to the disc beyond (T12/L1 for L1/L2) leaves a
    gap far from the others and costs more than its slightly weaker true peak."""
    spacing_weight = SPACING_WEIGHT if spacing_weight is None else spacing_weight
    if any(not c for c in candidates):
        return None
    heights = [np.array([s.point[2] for s in c]) for c in candidates]
    gains = [np.log(np.clip([s.score for s in c], 1e-6, None)) for c in candidates]

    def decode(expected_gap: float | None) -> list[int] | None:
        best, back = gains[0], []
        for k in range(1, len(candidates)):
            gap = heights[k - 1][None, :] - heights[k][:, None]  # (this, previous)
            step = np.where(gap >= MIN_LEVEL_GAP_MM, 0.0, -np.inf)
            if expected_gap:
                step = step - spacing_weight * np.log(np.clip(gap, 1e-3, None) / expected_gap) ** 2
            total = best[None, :] + step
            back.append(total.argmax(axis=1))
            best = total.max(axis=1) + gains[k]
        if not np.isfinite(best.max()):
            return None
        path = [int(best.argmax())]
        for pointers in reversed(back):
            path.append(int(pointers[path[-1]]))
        return path[::-1]

    path = decode(None)
    if path is None:
        return None
    if spacing_weight > 0:
        gaps = [heights[k][path[k]] - heights[k + 1][path[k + 1]] for k in range(len(path) - 1)]
        path = decode(float(np.median(gaps))) or path
    return [c[i] for c, i in zip(candidates, path)]


def decode_levels(series_id: int, stack: Stack, maps: np.ndarray, slice_indices, grid: int,
                  channels) -> tuple[list[Site], float]:
    """The five level sites of one stack from its level channels (ordered when an ordering exists,
    else each channel's own arg-max) and their summed log heights (to compare stacks)."""
    candidates = [_candidates(series_id, stack, maps[:, channel], slice_indices, grid) for channel in channels]
    sites = ordered_levels(candidates)
    if sites is None:
        sites = [_peak_site(series_id, stack, maps[:, channel], slice_indices, grid) for channel in channels]
    return sites, float(sum(np.log(max(s.score, 1e-6)) for s in sites))


def localize_spinal(localizer: Localizer, series_id: int, stacks: list[Stack]) -> dict[str, Site]:
    decoded = []
    for stack in stacks:
        maps = localizer.heatmaps(stack)
        decoded.append(decode_levels(series_id, stack, maps, range(stack.slices), localizer.grid, L.SPINAL_CHANNELS))
    if not decoded:
        return {}
    sites, _ = max(decoded, key=lambda d: d[1])
    return dict(zip(V.LEVELS, sites))


def localize_foramina(localizer: Localizer, series_id: int, stacks: list[Stack],
                      midline_x: float | None) -> dict[tuple[str, str], Site]:
    decoded: dict[str, list] = {}
    for stack in stacks:
        maps = localizer.heatmaps(stack)
        centres_x = S.slice_centres(stack)[:, 0]
        middle = float(np.median(centres_x)) if midline_x is None else midline_x
        on_left = centres_x > middle if LEFT_IS_POSITIVE_X else centres_x < middle
        for condition, side in ((LEFT_FORAMEN, on_left), (RIGHT_FORAMEN, ~on_left)):
            slices = np.flatnonzero(side) if side.any() else np.arange(stack.slices)
            decoded.setdefault(condition, []).append(
                decode_levels(series_id, stack, maps[slices], slices, localizer.grid, L.FORAMINAL_CHANNELS))
    found = {}
    for condition, options in decoded.items():
        sites, _ = max(options, key=lambda d: d[1])
        found.update({(condition, level): site for level, site in zip(V.LEVELS, sites)})
    return found


def level_points(sites: dict[tuple[str, str], Site]) -> dict[str, np.ndarray]:
    """Patient point per level for the axial projection: spinal canal, else the foramina's midpoint."""
    points = {}
    for level in V.LEVELS:
        if (SPINAL, level) in sites:
            points[level] = sites[(SPINAL, level)].point
        else:
            sides = [sites[(c, level)].point for c in (LEFT_FORAMEN, RIGHT_FORAMEN) if (c, level) in sites]
            if sides:
                points[level] = np.mean(sides, axis=0)
    return points


def nearest_axial_slice(point: np.ndarray, axial: list[tuple[int, Stack]]) -> tuple[int, Stack, int, float] | None:
    """(series_id, stack, slice index, distance mm) of the axial slice whose plane passes closest to
    `point` with the point's projection inside the image; None when no stack contains it in-plane."""
    best = None
    for series_id, stack in axial:
        slice_index, x, y, distance = stack.patient_to_pixel(point)
        inside = 0 <= x <= stack.columns - 1 and 0 <= y <= stack.rows - 1
        if inside and (best is None or distance < best[3]):
            best = (series_id, stack, slice_index, distance)
    return best


def localize_subarticular(localizer: Localizer, points: dict[str, np.ndarray],
                          axial: list[tuple[int, Stack]], problems: list[str]) -> dict[tuple[str, str], Site]:
    sites = {}
    for level, point in points.items():
        nearest = nearest_axial_slice(point, axial)
        if nearest is None or nearest[3] > localizer.cfg.axial_max_distance_mm:
            problems.append(f"level {V.LEVEL_TITLES[level]} is covered by no axial stack (nearest slice: "
                            f"{'none' if nearest is None else f'{nearest[3]:.1f} mm'} away)")
            continue
        series_id, stack, slice_index, distance = nearest
        maps = localizer.heatmaps(stack, [slice_index])
        for condition, channel in zip((LEFT_SUBARTICULAR, RIGHT_SUBARTICULAR), L.SUBARTICULAR_CHANNELS):
            sites[(condition, level)] = _peak_site(series_id, stack, maps[:, channel], [slice_index], localizer.grid)
    return sites


def _read_by_description(study_folder: Path, series: list[tuple[int, str]], result: StudyLocalization):
    from spine_ml.dicom.read import read_series

    stacks: dict[str, list[tuple[int, Stack]]] = {d: [] for d in V.SERIES_DESCRIPTIONS}
    for series_id, description in series:
        if description not in stacks:
            result.problems.append(f"series {series_id}: unknown description {description!r}; ignored")
            continue
        read = read_series(study_folder / str(series_id))
        result.series[int(series_id)], result.descriptions[int(series_id)] = read, description
        if not read.stacks:
            reason = read.problems[-1] if read.problems else "no slices"
            result.problems.append(f"{description} series {series_id}: {reason}")
        stacks[description].extend((int(series_id), stack) for stack in read.stacks)
    for description in (V.SAGITTAL_T2, V.SAGITTAL_T1, V.AXIAL_T2):
        if not stacks[description]:
            result.problems.append(f"no readable {description} series")
    return stacks


def _main_series(stacks: list[tuple[int, Stack]]) -> tuple[int, list[Stack]] | None:
    """Of several series of one sagittal type, the one with the most slices."""
    if not stacks:
        return None
    totals: dict[int, int] = {}
    for series_id, stack in stacks:
        totals[series_id] = totals.get(series_id, 0) + stack.slices
    chosen = max(totals, key=totals.get)
    return chosen, [stack for series_id, stack in stacks if series_id == chosen]


def localize_study(localizer: Localizer, study_folder: Path | str, series: list[tuple[int, str]],
                   study_id: int | None = None) -> StudyLocalization:
    """Sites of every condition and level that the study's readable series allow."""
    study_folder = Path(study_folder)
    result = StudyLocalization(int(study_id if study_id is not None else study_folder.name))
    stacks = _read_by_description(study_folder, series, result)
    t2 = _main_series(stacks[V.SAGITTAL_T2])
    if t2 is not None:
        for level, site in localize_spinal(localizer, *t2).items():
            result.sites[(SPINAL, level)] = site
    t1 = _main_series(stacks[V.SAGITTAL_T1])
    if t1 is not None:
        spinal = [s.point[0] for (c, _), s in result.sites.items() if c == SPINAL]
        midline = float(np.median(spinal)) if spinal else None
        result.sites.update(localize_foramina(localizer, *t1, midline))
    if stacks[V.AXIAL_T2]:
        result.sites.update(localize_subarticular(localizer, level_points(result.sites), stacks[V.AXIAL_T2],
                                                  result.problems))
    return result
