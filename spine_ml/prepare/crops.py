"""The single cropping function: one 2.5D sample around a point of a stack.

Training (through the crop cache) and test-time prediction both call `crop_sample`, so a model
sees the same pixels in both; it needs no label, only a stack, a slice and a point.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from spine_ml.dicom.geometry import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropSettings:
    """The prepare settings crop_sample reads; a plain stand-in for PrepareConfig that worker
    processes can unpickle without importing pydantic."""
    slices: int
    patch_mm: float
    pixel_mm: float
    percentiles: tuple[float, float]

    @property
    def patch_px(self) -> int:
        return int(round(self.patch_mm / self.pixel_mm))  # as PrepareConfig.patch_px

    @classmethod
    def of(cls, prepare_cfg) -> CropSettings:
        return cls(int(prepare_cfg.slices), float(prepare_cfg.patch_mm), float(prepare_cfg.pixel_mm),
                   (float(prepare_cfg.percentiles[0]), float(prepare_cfg.percentiles[1])))


def neighbour_slices(slice_index: int, slices: int, stack_slices: int) -> np.ndarray:
    """`slices` indices centred on slice_index; the edge slice repeats past either end of the stack."""
    offsets = np.arange(slices) - slices // 2
    return np.clip(slice_index + offsets, 0, stack_slices - 1)


def clip_point(stack: Stack, x: float, y: float) -> tuple[float, float, bool]:
    """(x, y) clipped into the image; True when it had to move (the caller warns with context)."""
    cx = float(np.clip(x, 0.0, stack.columns - 1))
    cy = float(np.clip(y, 0.0, stack.rows - 1))
    return cx, cy, (cx != x or cy != y)


def linear_taps(coords: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at `coords` (0-based in a region of `length` samples) as two taps:
    (index0, weight0, index1, weight1). Taps outside the region get weight 0 (they read as fill)."""
    floor = np.floor(coords)
    fraction = coords - floor
    index0 = floor.astype(np.int64)
    index1 = index0 + 1
    # ufuncs, not np.where/np.clip: this runs twice per sample and their wrappers cost more than the work
    weight0 = ((1.0 - fraction) * ((index0 >= 0) & (index0 < length))).astype(np.float32)
    weight1 = (fraction * ((index1 >= 0) & (index1 < length))).astype(np.float32)
    return (np.minimum(np.maximum(index0, 0), length - 1), weight0,
            np.minimum(np.maximum(index1, 0), length - 1), weight1)


def _window(centres: np.ndarray, half_extent: float, margin: int, size: int) -> tuple[int, int]:
    low = max(0, int(np.floor(centres.min() - half_extent)) - margin)
    high = min(size, int(np.ceil(centres.max() + half_extent)) + margin + 1)
    return low, max(low, high)


def _resample(region: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of region (k, H, W) on the grid rows × cols: two gathers per axis. rows and
    cols are (n,) for one grid shared by every slice, or (k, n) for a grid per slice."""
    r0, u0, r1, u1 = linear_taps(rows, region.shape[1])
    c0, v0, c1, v1 = linear_taps(cols, region.shape[2])
    if rows.ndim == 1:
        by_rows = region[:, r0, :] * u0[None, :, None] + region[:, r1, :] * u1[None, :, None]
        return by_rows[:, :, c0] * v0[None, None, :] + by_rows[:, :, c1] * v1[None, None, :]
    # one gather for all slices, each on its own grid: the same products as slice by slice
    k = np.arange(len(region))[:, None]
    by_rows = region[k, r0] * u0[:, :, None] + region[k, r1] * u1[:, :, None]
    k, n = k[:, :, None], np.arange(by_rows.shape[1])[None, :, None]
    return by_rows[k, n, c0[:, None, :]] * v0[:, None, :] + by_rows[k, n, c1[:, None, :]] * v1[:, None, :]


def _sample_patches(volume: np.ndarray, points: np.ndarray, step: np.ndarray, size: int, fill: float) -> np.ndarray:
    """size×size patches, one per slice of `volume` (k, R, C), centred on points[k] = (x, y), whose
    pixels are `step` = [rows, cols] source pixels apart.

    Down-sampling is anti-aliased with a Gaussian of σ = (step − 1)/2 (the usual choice), applied only
    to the region the patches cover. The patch grid is axis-aligned, so bilinear sampling separates
    into two gathers per axis: the same values as scipy's map_coordinates(order=1) at a fraction of
    its cost, which matters because prepare must stay close to the bare DICOM decode time.
    """
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    margin = np.ceil(3 * sigma).astype(int) + 2
    half = (size - 1) / 2.0 * step
    r0, r1 = _window(points[:, 1], half[0], margin[0], volume.shape[1])
    c0, c1 = _window(points[:, 0], half[1], margin[1], volume.shape[2])
    if r1 <= r0 or c1 <= c0:  # the patch lies wholly outside the image
        return np.full((len(points), size, size), fill, dtype=np.float32)
    region = volume[:, r0:r1, c0:c1] - np.float32(fill)
    if np.any(sigma > 0.3):
        from scipy.ndimage import gaussian_filter

        region = gaussian_filter(region, sigma=(0.0, sigma[0], sigma[1]), mode="nearest", truncate=3.0)
    if np.all(points == points[0]):  # neighbours share the in-plane origin: one grid for all
        patches = _resample(region, points[0, 1] + offsets * step[0] - r0, points[0, 0] + offsets * step[1] - c0)
    else:
        patches = _resample(region, points[:, 1:2] + offsets * step[0] - r0, points[:, 0:1] + offsets * step[1] - c0)
    return patches + np.float32(fill)


def crop_sample(stack: Stack, slice_index: int, x: float, y: float, prepare_cfg) -> np.ndarray:
    """`prepare.slices` neighbouring slices × a `patch_mm` square around pixel (x, y) of a slice,
    resampled to `pixel_mm`, intensities scaled to [0, 1] by the series' robust percentiles
    (`prepare.percentiles`, shared by all stacks of a series read with read_series).

    Returns float16 (slices, P, P) with P = prepare_cfg.patch_px. Neighbour slices get the same
    patient-space point projected into their own plane, so an in-plane shift between slices of
    a stack does not move the patch.
    """
    low, high = stack.intensity_window(tuple(prepare_cfg.percentiles))
    step = prepare_cfg.pixel_mm / np.asarray(stack.pixel_spacing, dtype=np.float64)
    centre = stack.pixel_to_patient(slice_index, x, y)
    indices = neighbour_slices(slice_index, prepare_cfg.slices, stack.slices)
    # the neighbours are a run of slices (edge slices repeat): resample each once, from a view of the
    # stack, so only the region around the point is ever copied
    first, last = int(indices[0]), int(indices[-1]) + 1
    relative = centre[None, :] - stack.positions[first:last]
    points = np.stack([relative @ stack.row_direction / stack.pixel_spacing[1],
                       relative @ stack.column_direction / stack.pixel_spacing[0]], axis=1)
    patches = _sample_patches(stack.pixels[first:last], points, step, prepare_cfg.patch_px,
                              fill=low)[indices - first]
    patches = (patches - low) * (1.0 / (high - low))
    return np.clip(patches, 0.0, 1.0).astype(np.float16)
