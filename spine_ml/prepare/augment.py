"""Cheap augmentation of one cached 2.5D patch (torch ops on a few small tensors, in the loader).

A left/right flip must move the label with the anatomy (a known bug source in this competition):
- axial samples (subarticular): image columns run across the patient (right → left), so mirroring
  the patient is a horizontal image flip, and left_subarticular becomes right_subarticular;
- sagittal samples (spinal, foraminal): the slice axis runs left ↔ right, so mirroring the patient
  reverses the slice order; a foraminal label swaps side, a spinal label stays.
A horizontal flip of a sagittal image would swap anterior and posterior: never done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spine_ml.competition import vocabulary as V


@dataclass(frozen=True)
class Jitter:
    shift_x: float = 0.0  # cache pixels
    shift_y: float = 0.0
    angle_deg: float = 0.0
    scale: float = 1.0  # >1 zooms in (anatomy looks bigger)
    contrast: float = 1.0
    brightness: float = 0.0
    flip: bool = False


def draw_jitters(rng: np.random.Generator, augment_cfg, count: int) -> list[Jitter]:
    """`count` independent draws within the AugmentConfig ranges, vectorised (one call per epoch
    instead of a generator per item). Shift/rotate/scale also jitter the labelled point."""
    shift, intensity = augment_cfg.shift_px, augment_cfg.intensity
    columns = zip(
        rng.uniform(-shift, shift, count), rng.uniform(-shift, shift, count),
        rng.uniform(-augment_cfg.rotate_deg, augment_cfg.rotate_deg, count),
        rng.uniform(1 - augment_cfg.scale, 1 + augment_cfg.scale, count),
        rng.uniform(1 - intensity, 1 + intensity, count), rng.uniform(-intensity, intensity, count),
        (rng.random(count) < 0.5) & bool(augment_cfg.flip),
    )
    return [Jitter(float(a), float(b), float(c), float(d), float(e), float(f), bool(g))
            for a, b, c, d, e, f, g in columns]


def draw_jitter(rng: np.random.Generator, augment_cfg) -> Jitter:
    return draw_jitters(rng, augment_cfg, 1)[0]


def centre_offset(patch_px: int, crop_px: int) -> int:
    return (patch_px - crop_px) // 2


def centre_crop(patch, crop_px: int):
    """(S, P, P) -> (S, crop_px, crop_px), exact pixels (no interpolation)."""
    start = centre_offset(patch.shape[-1], crop_px)
    return patch[:, start:start + crop_px, start:start + crop_px]


@lru_cache(maxsize=32)
def _output_grid(crop_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (u, v) of a crop_px² output, as affine_grid makes them."""
    centres = (2.0 * np.arange(crop_px, dtype=np.float32) + 1.0) / crop_px - 1.0
    v, u = np.meshgrid(centres, centres, indexing="ij")
    return u, v


def affine_crop(patch, crop_px: int, jitter: Jitter):
    """The centre crop, shifted, rotated about its centre and scaled, in one grid_sample.

    With no jitter it samples exactly the pixels `centre_crop` returns (pixel centres align), so
    training and evaluation see the same geometry; outside the patch is 0 (normalised black).
    The sampling grid is built from a cached base grid with numpy (F.affine_grid costs 3x the
    grid_sample itself on tensors this small).
    """
    import torch
    import torch.nn.functional as F

    size = patch.shape[-1]
    centre_px = centre_offset(size, crop_px) + crop_px / 2.0
    cx = (centre_px + jitter.shift_x) / size * 2 - 1
    cy = (centre_px + jitter.shift_y) / size * 2 - 1
    extent = crop_px / size / jitter.scale
    angle = math.radians(jitter.angle_deg)
    cos, sin = math.cos(angle) * extent, math.sin(angle) * extent
    u, v = _output_grid(crop_px)
    grid = np.stack([cos * u - sin * v + cx, sin * u + cos * v + cy], axis=-1).astype(np.float32)
    grid = torch.from_numpy(grid)[None].to(patch.dtype)
    return F.grid_sample(patch[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def adjust_intensity(image, jitter: Jitter):
    return image * jitter.contrast + jitter.brightness


def mirror_left_right(image, condition: str):
    """Mirror the patient left/right: (image, condition) -> (mirrored image, condition on the other side)."""
    if V.condition_group(condition) == "subarticular":
        image = image.flip(-1)  # axial: columns run across the patient
    else:
        image = image.flip(0)  # sagittal: slices run across the patient
    return image, V.mirror_condition(condition)


def resize(image, input_px: int | None):
    """(S, H, W) -> (S, input_px, input_px); anti-aliased when shrinking."""
    if input_px is None or image.shape[-1] == input_px:
        return image
    import torch.nn.functional as F

    return F.interpolate(image[None], size=(input_px, input_px), mode="bilinear", align_corners=False,
                         antialias=input_px < image.shape[-1])[0]
