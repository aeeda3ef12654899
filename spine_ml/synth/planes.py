"""Image planes in patient space, with the DICOM conventions of ../shared/reference/dicom-geometry.md.

A pixel (column c, row r) lies at ``position + c * col_spacing * row_direction + r * row_spacing *
column_direction``; ``row_direction`` is the first triple of ImageOrientationPatient (the way the
column index grows), ``column_direction`` the second; PixelSpacing is (row_spacing, col_spacing).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Plane:
    position: np.ndarray          # (3,) ImagePositionPatient: centre of pixel (row 0, column 0)
    row_direction: np.ndarray     # (3,) IOP[:3]
    column_direction: np.ndarray  # (3,) IOP[3:]
    row_spacing: float            # PixelSpacing[0]
    col_spacing: float            # PixelSpacing[1]
    rows: int
    cols: int

    @cached_property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def orientation(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.concatenate([self.row_direction, self.column_direction]))

    def pixel_points(self) -> np.ndarray:
        """(rows, cols, 3) patient coordinates of every pixel centre."""
        c = np.arange(self.cols) * self.col_spacing
        r = np.arange(self.rows) * self.row_spacing
        return (self.position + c[None, :, None] * self.row_direction
                + r[:, None, None] * self.column_direction)

    @property
    def centre(self) -> np.ndarray:
        return (self.position + (self.cols - 1) / 2 * self.col_spacing * self.row_direction
                + (self.rows - 1) / 2 * self.row_spacing * self.column_direction)

    def resized(self, rows: int, cols: int) -> "Plane":
        """The same field of view sampled by another matrix (another PixelSpacing)."""
        return centred_plane(self.centre, self.row_direction, self.column_direction,
                             (self.rows * self.row_spacing, self.cols * self.col_spacing), rows, cols)

    def to_pixel(self, point: np.ndarray) -> tuple[float, float, float]:
        """Patient point -> (column x, row y, distance from the plane along its normal)."""
        offset = np.asarray(point, dtype=np.float64) - self.position
        return (float(offset @ self.row_direction / self.col_spacing),
                float(offset @ self.column_direction / self.row_spacing),
                float(offset @ self.normal))


def centred_plane(centre: np.ndarray, row_direction: np.ndarray, column_direction: np.ndarray,
                  field_of_view: tuple[float, float], rows: int, cols: int) -> Plane:
    """A plane whose pixel grid covers ``field_of_view`` (height, width in mm) around ``centre``."""
    row_direction = np.asarray(row_direction, dtype=np.float64)
    column_direction = np.asarray(column_direction, dtype=np.float64)
    row_spacing, col_spacing = field_of_view[0] / rows, field_of_view[1] / cols
    position = (np.asarray(centre, dtype=np.float64)
                - (cols - 1) / 2 * col_spacing * row_direction
                - (rows - 1) / 2 * row_spacing * column_direction)
    return Plane(position, row_direction, column_direction, row_spacing, col_spacing, rows, cols)


def rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation about a unit axis (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
