"""What the localizer reads: whole slices of a stack, intensity-windowed and resized to a square.

Training and inference both go through `resize_stack` and `context_indices`, so the model sees
the same pixels in both. Coordinates move between native pixels and the heatmap grid with
`models.localizer.to_grid` / `from_grid` (one pixel-centre convention).
"""
from __future__ import annotations

import numpy as np

from spine_ml.dicom.geometry import Stack


def context_indices(slice_index: int, context_slices: int, stack_slices: int) -> np.ndarray:
    """`context_slices` indices centred on slice_index; the edge slice repeats past either end."""
    offsets = np.arange(context_slices) - context_slices // 2
    return np.clip(slice_index + offsets, 0, stack_slices - 1)


def resize_stack(stack: Stack, input_px: int, percentiles: tuple[float, float], slice_indices=None) -> np.ndarray:
    """Slices of a stack (default all) -> (n, input_px, input_px) float16 in [0, 1], windowed by the
    whole stack's robust percentiles.

    Non-square images are stretched to the square; the heatmap grid carries separate row and
    column scales, so no coordinate is lost.
    """
    import torch
    from torch.nn import functional as F

    low, high = stack.intensity_window(tuple(percentiles))
    chosen = stack.pixels if slice_indices is None else stack.pixels[np.asarray(slice_indices, dtype=np.int64)]
    pixels = torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.float32))
    pixels = ((pixels - low) / (high - low)).clamp_(0.0, 1.0)
    shrink = input_px < max(stack.rows, stack.columns)
    resized = F.interpolate(pixels[:, None], size=(input_px, input_px), mode="bilinear", align_corners=False,
                            antialias=shrink)[:, 0]
    return resized.clamp_(0.0, 1.0).numpy().astype(np.float16)


def model_inputs(stack: Stack, slice_indices, input_px: int, context_slices: int,
                 percentiles: tuple[float, float]) -> np.ndarray:
    """(n, context_slices, input_px, input_px) float16 inputs for the given slices; only the slices
    they need are resized."""
    indices = np.stack([context_indices(int(i), context_slices, stack.slices) for i in slice_indices])
    needed, inverse = np.unique(indices, return_inverse=True)
    return resize_stack(stack, input_px, percentiles, needed)[inverse.reshape(indices.shape)]


def slice_centres(stack: Stack) -> np.ndarray:
    """(S, 3) patient position of each slice's image centre."""
    return np.stack([stack.pixel_to_patient(s, (stack.columns - 1) / 2, (stack.rows - 1) / 2)
                     for s in range(stack.slices)])


def project_into_slice(stack: Stack, slice_index: int, point: np.ndarray) -> tuple[float, float, float]:
    """A patient point -> (x, y) in slice `slice_index`'s pixels and its signed distance from that plane, mm."""
    relative = np.asarray(point, dtype=np.float64) - stack.positions[slice_index]
    x = float(relative @ stack.row_direction / stack.pixel_spacing[1])
    y = float(relative @ stack.column_direction / stack.pixel_spacing[0])
    return x, y, float(relative @ stack.normal)


def cell_mm(stack: Stack, grid_px: int) -> tuple[float, float]:
    """(row, column) size of one heatmap cell in mm for this stack."""
    return (float(stack.pixel_spacing[0]) * stack.rows / grid_px, float(stack.pixel_spacing[1]) * stack.columns / grid_px)
