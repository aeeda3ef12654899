"""The single cropping function: one 2.5D sample around a point of a stack.

Training (through the crop cache) and test-time prediction both call `crop_sample` (prepare through
`crop_samples`, the same function for all sites of a stack at once), so a model sees the same pixels
in both; it needs no label, only a stack, a slice and a point.
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


def neighbour_slices(slice_index, slices: int, stack_slices: int) -> np.ndarray:
    """`slices` indices centred on slice_index (an int, or a column of them: one row each); the edge
    slice repeats past either end of the stack."""
    offsets = np.arange(slices) - slices // 2
    return np.clip(slice_index + offsets, 0, stack_slices - 1)


def clip_point(stack: Stack, x: float, y: float) -> tuple[float, float, bool]:
    """(x, y) clipped into the image; True when it had to move (the caller warns with context)."""
    cx = float(np.clip(x, 0.0, stack.columns - 1))
    cy = float(np.clip(y, 0.0, stack.rows - 1))
    return cx, cy, (cx != x or cy != y)


def linear_taps(coords: np.ndarray, length) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at `coords` (0-based in a region of `length` samples; an int, or an array
    that broadcasts against coords) as two taps: (index0, weight0, index1, weight1). Taps outside the
    region get weight 0 (they read as fill)."""
    floor = np.floor(coords)
    fraction = coords - floor
    index0 = floor.astype(np.int64)
    index1 = index0 + 1
    # ufuncs, not np.where/np.clip: their wrappers cost more than the work on a few hundred values
    weight0 = ((1.0 - fraction) * ((index0 >= 0) & (index0 < length))).astype(np.float32)
    weight1 = (fraction * ((index1 >= 0) & (index1 < length))).astype(np.float32)
    last = np.asarray(length) - 1
    return (np.minimum(np.maximum(index0, 0), last), weight0, np.minimum(np.maximum(index1, 0), last), weight1)


def _windows(centres: np.ndarray, half_extent: float, margin: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the [low, high) pixel range its patches (centres: (m, k)) read, margin included."""
    low = np.maximum(0, np.floor(centres.min(axis=1) - half_extent).astype(np.int64) - margin)
    high = np.minimum(size, np.ceil(centres.max(axis=1) + half_extent).astype(np.int64) + margin + 1)
    return low, np.maximum(low, high)


def _sample_patch_batch(volume: np.ndarray, slices: np.ndarray, points: np.ndarray, step: np.ndarray, size: int,
                        fill: float) -> np.ndarray:
    """size×size patches (m, k, size, size): sample i, slice j is centred on points[i, j] = (x, y) of
    volume[slices[i, j]] (volume: (S, R, C)), its pixels `step` = [rows, cols] source pixels apart.

    Down-sampling is anti-aliased with a Gaussian of σ = (step − 1)/2 (the usual choice), applied only
    to the region each sample covers. The patch grid is axis-aligned, so bilinear sampling separates
    into two gathers per axis: the same values as scipy's map_coordinates(order=1) at a fraction of
    its cost. All samples of a stack go through one set of gathers (their regions padded to one
    shape), because per-sample numpy calls, not arithmetic, dominated prepare's cropping time.
    """
    count, per_sample = slices.shape
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    margin = np.ceil(3 * sigma).astype(int) + 2
    half = (size - 1) / 2.0 * step
    row_low, row_high = _windows(points[:, :, 1], half[0], margin[0], volume.shape[1])
    col_low, col_high = _windows(points[:, :, 0], half[1], margin[1], volume.shape[2])
    heights, widths = row_high - row_low, col_high - col_low
    regions = np.zeros((count, per_sample, max(1, int(heights.max())), max(1, int(widths.max()))), dtype=np.float32)
    smooth = bool(np.any(sigma > 0.3))
    if smooth:
        from scipy.ndimage import gaussian_filter
    for i in range(count):
        if heights[i] and widths[i]:  # else: the patch lies wholly outside the image and reads as fill
            region = volume[slices[i], row_low[i]:row_high[i], col_low[i]:col_high[i]] - np.float32(fill)
            if smooth:
                region = gaussian_filter(region, sigma=(0.0, sigma[0], sigma[1]), mode="nearest", truncate=3.0)
            regions[i, :, :heights[i], :widths[i]] = region
    rows = points[:, :, 1:2] + offsets * step[0] - row_low[:, None, None]  # (m, k, size), region pixels
    cols = points[:, :, 0:1] + offsets * step[1] - col_low[:, None, None]
    r0, u0, r1, u1 = linear_taps(rows, heights[:, None, None])
    c0, v0, c1, v1 = linear_taps(cols, widths[:, None, None])
    i, j = np.arange(count)[:, None, None], np.arange(per_sample)[None, :, None]
    by_rows = regions[i, j, r0] * u0[..., None] + regions[i, j, r1] * u1[..., None]  # (m, k, size, W)
    i, j, n = i[..., None], j[..., None], np.arange(size)[None, None, :, None]
    patches = (by_rows[i, j, n, c0[:, :, None, :]] * v0[:, :, None, :]
               + by_rows[i, j, n, c1[:, :, None, :]] * v1[:, :, None, :])
    return patches + np.float32(fill)


def _sample_patches(volume: np.ndarray, points: np.ndarray, step: np.ndarray, size: int, fill: float) -> np.ndarray:
    """One sample: a size×size patch per slice of `volume` (k, R, C), centred on points[k] = (x, y)."""
    return _sample_patch_batch(volume, np.arange(len(volume))[None, :], points[None], step, size, fill)[0]


def crop_samples(stack: Stack, sites, prepare_cfg) -> np.ndarray:
    """`crop_sample` for several (slice_index, x, y) sites of one stack at once (the same values):
    float16 (len(sites), slices, P, P)."""
    low, high = stack.intensity_window(tuple(prepare_cfg.percentiles))
    step = prepare_cfg.pixel_mm / np.asarray(stack.pixel_spacing, dtype=np.float64)
    site_slices = np.array([int(site[0]) for site in sites], dtype=np.int64)
    xs = np.array([float(site[1]) for site in sites])
    ys = np.array([float(site[2]) for site in sites])
    row_direction, column_direction = stack.row_direction, stack.column_direction
    # as Stack.pixel_to_patient, one row per site
    centres = (stack.positions[site_slices] + (xs * stack.pixel_spacing[1])[:, None] * row_direction
               + (ys * stack.pixel_spacing[0])[:, None] * column_direction)
    slices = neighbour_slices(site_slices[:, None], prepare_cfg.slices, stack.slices)  # (sites, slices)
    # each neighbour gets the site's patient point projected into its own plane (explicit sums, not
    # a matmul: the same bits for one site or many)
    relative = centres[:, None, :] - stack.positions[slices]
    points = np.stack([_dot3(relative, row_direction) / stack.pixel_spacing[1],
                       _dot3(relative, column_direction) / stack.pixel_spacing[0]], axis=-1)
    patches = _sample_patch_batch(stack.pixels, slices, points, step, prepare_cfg.patch_px, fill=low)
    patches = (patches - low) * (1.0 / (high - low))
    return np.minimum(np.maximum(patches, 0.0), 1.0).astype(np.float16)


def _dot3(vectors: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return vectors[..., 0] * direction[0] + vectors[..., 1] * direction[1] + vectors[..., 2] * direction[2]


def crop_sample(stack: Stack, slice_index: int, x: float, y: float, prepare_cfg) -> np.ndarray:
    """`prepare.slices` neighbouring slices × a `patch_mm` square around pixel (x, y) of a slice,
    resampled to `pixel_mm`, intensities scaled to [0, 1] by the series' robust percentiles
    (`prepare.percentiles`, shared by all stacks of a series read with read_series).

    Returns float16 (slices, P, P) with P = prepare_cfg.patch_px. Neighbour slices get the same
    patient-space point projected into their own plane, so an in-plane shift between slices of
    a stack does not move the patch; the edge slice repeats past either end of the stack.
    """
    return crop_samples(stack, [(slice_index, x, y)], prepare_cfg)[0]
