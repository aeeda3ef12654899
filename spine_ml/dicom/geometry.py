"""Patient-space geometry of one stack of parallel slices (LPS millimetres).

Conventions (shared with the writer; see shared/reference/dicom-geometry.md): pixel (column x, row y)
of slice s lies at ``IPP_s + x·Δcol·X + y·Δrow·Y`` where X, Y are the first and last three numbers of
ImageOrientationPatient and PixelSpacing = [Δrow, Δcol]; the slice normal is N = X × Y and slices
are ordered by ``IPP · N``. Pure numpy: nothing here opens a file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def unit_normal(orientation: np.ndarray) -> np.ndarray:
    """N = X × Y of an ImageOrientationPatient, normalised (scanners round the cosines)."""
    ax, ay, az, bx, by, bz = (float(v) for v in orientation)
    # written out: np.cross costs ~20x more on 3-vectors, and this runs for every stack read
    normal = np.array([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx])
    length = float(np.sqrt(normal @ normal))
    if not length > 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(orientation)} has parallel row and column directions")
    return normal / length


def subsample(pixels: np.ndarray, size: int = 32768) -> np.ndarray:
    """About `size` evenly strided voxels: the same percentiles to well under a grey level at a
    fraction of the cost of sorting every voxel of a 512² × 30 stack."""
    flat = pixels.reshape(-1)
    return flat[::max(1, flat.size // size)]


@dataclass(eq=False)
class Stack:
    """Parallel slices of one series, ordered by position along the slice normal (index 0 first)."""

    pixels: np.ndarray  # (S, R, C) float32, RescaleSlope/Intercept applied
    instance_numbers: np.ndarray  # (S,) int64, as in the files (not necessarily monotonic)
    positions: np.ndarray  # (S, 3) ImagePositionPatient of each slice, mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient shared by the slices
    pixel_spacing: np.ndarray  # (2,) [Δrow, Δcol] mm, after resampling any odd-sized slice
    slice_spacing: float  # mm between neighbours along the normal (median), from positions
    transfer_syntax: str  # name(s) of the transfer syntax the files were stored in
    files: tuple[Path, ...] = ()  # source file of each slice, same order as pixels
    # intensities the robust window is taken from; read_series sets one shared sample on every stack
    # of a series, so stacks of one series are normalised alike (None: this stack's own pixels)
    intensity_sample: np.ndarray | None = field(default=None, repr=False)
    _windows: dict = field(default_factory=dict, repr=False)  # percentiles -> (low, high), cached

    @property
    def normal(self) -> np.ndarray:
        return unit_normal(self.orientation)

    @property
    def row_direction(self) -> np.ndarray:
        """X: the direction in which the column index (x) grows."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_direction(self) -> np.ndarray:
        """Y: the direction in which the row index (y) grows."""
        return np.asarray(self.orientation[3:], dtype=np.float64)

    @property
    def slices(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def depths(self) -> np.ndarray:
        """Position of each slice along the normal (IPP · N), increasing with the slice index."""
        return self.positions @ self.normal

    def pixel_to_patient(self, slice_index: int, x: float, y: float) -> np.ndarray:
        """Pixel (column x, row y; sub-pixel allowed) of a slice -> patient point (3,) in mm."""
        origin = self.positions[int(slice_index)]
        return (origin + float(x) * self.pixel_spacing[1] * self.row_direction
                + float(y) * self.pixel_spacing[0] * self.column_direction)

    def patient_to_pixel(self, point: np.ndarray) -> tuple[int, float, float, float]:
        """Patient point -> (nearest slice index, x, y, distance in mm from that slice's plane).

        x, y are the point's in-plane projection; they may fall outside the image, which tells a
        caller (e.g. projecting a sagittal level into axial stacks) that this stack misses it.
        """
        point = np.asarray(point, dtype=np.float64)
        offsets = point @ self.normal - self.depths
        slice_index = int(np.argmin(np.abs(offsets)))
        relative = point - self.positions[slice_index]
        x = float(relative @ self.row_direction / self.pixel_spacing[1])
        y = float(relative @ self.column_direction / self.pixel_spacing[0])
        return slice_index, x, y, float(abs(offsets[slice_index]))

    def index_of_instance(self, instance_number: int) -> int:
        """Slice index of an InstanceNumber; KeyError naming the instances held when absent."""
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if hits.size == 0:
            held = ", ".join(str(n) for n in sorted(self.instance_numbers.tolist())[:12])
            raise KeyError(f"instance {instance_number} is not in this stack (holds {held}"
                           f"{', ...' if self.slices > 12 else ''})")
        return int(hits[0])

    def contains_instance(self, instance_number: int) -> bool:
        return bool(np.any(self.instance_numbers == int(instance_number)))

    def intensity_window(self, percentiles: tuple[float, float]) -> tuple[float, float]:
        """Robust (low, high) intensities of the series (see intensity_sample), cached per pair."""
        key = (float(percentiles[0]), float(percentiles[1]))
        if key not in self._windows:
            sample = self.intensity_sample if self.intensity_sample is not None else subsample(self.pixels)
            low, high = np.percentile(sample, key)
            if not high > low:  # a blank stack: any non-empty window keeps the crops finite
                high = low + 1.0
            self._windows[key] = (float(low), float(high))
        return self._windows[key]

    def describe(self) -> dict:
        """JSON-ready summary (what `spine-ml inspect --json` prints per stack)."""
        return {
            "slices": self.slices,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing": [round(float(v), 6) for v in self.pixel_spacing],
            "slice_spacing": round(float(self.slice_spacing), 4),
            "orientation": [round(float(v), 6) for v in self.orientation],
            "transfer_syntax": self.transfer_syntax,
            "instance_numbers": [int(n) for n in self.instance_numbers],
        }
