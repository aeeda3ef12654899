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


def axis_weights(coords: np.ndarray, start: int, length: int, sigma: float) -> np.ndarray:
    """(len(coords), length) matrix: linear interpolation at `coords` (image pixels) from the
    samples start..start+length-1, after a Gaussian of σ pixels when down-sampling (anti-aliasing).

    Taps that fall outside the image get no weight, so they read as the caller's fill value.
    """
    local = coords - start
    floor = np.floor(local)
    fraction = local - floor
    weights = np.zeros((len(coords), length), dtype=np.float64)
    rows = np.arange(len(coords))
    for tap, weight in ((floor, 1.0 - fraction), (floor + 1.0, fraction)):
        inside = (tap >= 0) & (tap < length)  # the two taps of a row are distinct columns: plain assignment
        weights[rows[inside], tap[inside].astype(np.int64)] = weight[inside]
    if sigma > 0.3:
        from scipy.ndimage import gaussian_filter1d

        # rows of the identity filtered = the Gaussian as a matrix ('nearest' edges, as on the full image)
        weights = weights @ gaussian_filter1d(np.eye(length), sigma, axis=0, mode="nearest", truncate=3.0)
    return weights


def _window(centres: np.ndarray, half_extent: float, margin: int, size: int) -> tuple[int, int]:
    low = max(0, int(np.floor(centres.min() - half_extent)) - margin)
    high = min(size, int(np.ceil(centres.max() + half_extent)) + margin + 1)
    return low, max(low, high)


def _sample_patches(volume: np.ndarray, points: np.ndarray, step: np.ndarray, size: int, fill: float) -> np.ndarray:
    """size×size patches, one per slice of `volume` (k, R, C), centred on points[k] = (x, y), whose
    pixels are `step` = [rows, cols] source pixels apart (anti-aliased when step > 1).

    The patch grid is axis-aligned, so the resampling is separable: Wrows @ region @ Wcolsᵀ with
    small dense weight matrices, one batched matmul for all slices. That is the same bilinear (+
    Gaussian) result as scipy's map_coordinates at a fraction of the cost, which matters because
    prepare must stay close to the bare DICOM decode time.
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
    if np.all(points == points[0]):  # the usual case: neighbours share the in-plane origin
        points = points[:1]
    row_weights = np.stack([axis_weights(y + offsets * step[0], r0, r1 - r0, sigma[0]) for y in points[:, 1]])
    col_weights = np.stack([axis_weights(x + offsets * step[1], c0, c1 - c0, sigma[1]) for x in points[:, 0]])
    patches = row_weights.astype(np.float32) @ region @ col_weights.astype(np.float32).transpose(0, 2, 1)
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
    relative = centre[None, :] - stack.positions[indices]
    points = np.stack([relative @ stack.row_direction / stack.pixel_spacing[1],
                       relative @ stack.column_direction / stack.pixel_spacing[0]], axis=1)
    unique, inverse = np.unique(indices, return_inverse=True)  # edge slices repeat: resample each once
    patches = _sample_patches(stack.pixels[unique], points[np.searchsorted(indices, unique)], step,
                              prepare_cfg.patch_px, fill=low)[inverse.reshape(-1)]
    patches = (patches - low) * (1.0 / (high - low))
    return np.clip(patches, 0.0, 1.0).astype(np.float16)
