"""The single cropping function: one 2.5D sample around a point of a stack.

Training (through the crop cache) and test-time prediction both call `crop_sample`, so a model
sees the same pixels in both; it needs no label, only a stack, a slice and a point.
"""
from __future__ import annotations

import logging

import numpy as np

from spine_ml.dicom.geometry import Stack

log = logging.getLogger(__name__)


def neighbour_slices(slice_index: int, slices: int, stack_slices: int) -> np.ndarray:
    """`slices` indices centred on slice_index; the edge slice repeats past either end of the stack."""
    offsets = np.arange(slices) - slices // 2
    return np.clip(slice_index + offsets, 0, stack_slices - 1)


def clip_point(stack: Stack, x: float, y: float) -> tuple[float, float, bool]:
    """(x, y) clipped into the image; True when it had to move (the caller warns with context)."""
    cx = float(np.clip(x, 0.0, stack.columns - 1))
    cy = float(np.clip(y, 0.0, stack.rows - 1))
    return cx, cy, (cx != x or cy != y)


def _sample_patch(image: np.ndarray, x: float, y: float, step: np.ndarray, size: int, cval: float) -> np.ndarray:
    """A size×size patch centred on (x, y) whose pixels are `step` = [rows, cols] source pixels apart.

    Down-sampling is anti-aliased with a Gaussian of σ = (step − 1)/2 (the usual choice), applied
    only to the region the patch covers, not the whole slice.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    half = (size - 1) / 2.0
    grid = (np.arange(size, dtype=np.float64) - half)
    rows = y + grid * step[0]
    cols = x + grid * step[1]
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    margin = np.ceil(3 * sigma).astype(int) + 2
    r0 = max(0, int(np.floor(rows[0])) - margin[0])
    r1 = min(image.shape[0], int(np.ceil(rows[-1])) + margin[0] + 1)
    c0 = max(0, int(np.floor(cols[0])) - margin[1])
    c1 = min(image.shape[1], int(np.ceil(cols[-1])) + margin[1] + 1)
    if r1 <= r0 or c1 <= c0:  # the patch lies wholly outside the image
        return np.full((size, size), cval, dtype=np.float32)
    region = image[r0:r1, c0:c1]
    if np.any(sigma > 0.3):
        region = gaussian_filter(region, sigma=sigma, mode="nearest")
    coords = np.meshgrid(rows - r0, cols - c0, indexing="ij")
    # points outside the region are outside the image (the margin covers the filter's reach)
    return map_coordinates(region, coords, order=1, mode="constant", cval=cval).astype(np.float32)


def crop_sample(stack: Stack, slice_index: int, x: float, y: float, prepare_cfg) -> np.ndarray:
    """`prepare.slices` neighbouring slices × a `patch_mm` square around pixel (x, y) of a slice,
    resampled to `pixel_mm`, intensities scaled to [0, 1] by the stack's robust percentiles.

    Returns float16 (slices, P, P) with P = prepare_cfg.patch_px. Neighbour slices get the same
    patient-space point projected into their own plane, so an in-plane shift between slices of
    a stack does not move the patch.
    """
    size = prepare_cfg.patch_px
    low, high = stack.intensity_window(tuple(prepare_cfg.percentiles))
    step = prepare_cfg.pixel_mm / np.asarray(stack.pixel_spacing, dtype=np.float64)
    centre = stack.pixel_to_patient(slice_index, x, y)
    out = np.empty((prepare_cfg.slices, size, size), dtype=np.float32)
    for k, index in enumerate(neighbour_slices(slice_index, prepare_cfg.slices, stack.slices)):
        relative = centre - stack.positions[index]
        px = relative @ stack.row_direction / stack.pixel_spacing[1]
        py = relative @ stack.column_direction / stack.pixel_spacing[0]
        out[k] = _sample_patch(stack.pixels[index], px, py, step, size, cval=low)
    out = (out - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float16)
