"""The level localizer: a timm encoder with a small feature-pyramid head that paints one heatmap
per landmark on every slice it reads.

Why heatmaps and not coordinate regression: with a few hundred labelled series a heatmap model
learns far faster (a convolution stays translation-equivariant, so each pixel is a training
example), and its peak height is a confidence that compares across slices. Targets fall off with
the slice's distance from the labelled point, so one 2D model also picks the slice: the level's
slice is the one whose heatmap peaks highest. That is how the sagittal T2 slice of each spinal
level and the parasagittal T1 slice of each foramen are chosen; public top solutions
(5th, 9th place) used heatmap models for the same reason.

Channels (LANDMARKS): five spinal-canal levels (read on Sagittal T2/STIR), five foraminal levels
(Sagittal T1; left and right share a channel and are told apart by the slice's side of the
midline), and the left and right subarticular recess (Axial T2; the level comes from geometry).
A sample's loss covers only the channels of its series type.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from spine_ml.competition import vocabulary as V

if TYPE_CHECKING:
    from spine_ml.config import LocalizerConfig

SPINAL_CHANNELS = tuple(range(0, 5))  # spinal canal at LEVELS[k]
FORAMINAL_CHANNELS = tuple(range(5, 10))  # a foramen at LEVELS[k], either side
SUBARTICULAR_CHANNELS = (10, 11)  # left, right subarticular recess (any level)
LANDMARKS = 12
CHANNELS_OF_SERIES: dict[str, tuple[int, ...]] = {
    V.SAGITTAL_T2: SPINAL_CHANNELS, V.SAGITTAL_T1: FORAMINAL_CHANNELS, V.AXIAL_T2: SUBARTICULAR_CHANNELS}
HEATMAP_STRIDE = 4
PYRAMID_CHANNELS = 64


class HeatmapLocalizer(nn.Module):
    """images (B, context_slices, H, W) in [0, 1] -> heatmap logits (B, LANDMARKS, H/4, W/4)."""

    def __init__(self, backbone: str, in_chans: int, pretrained: bool = False):
        super().__init__()
        import timm

        # strides 4, 8, 16 (32 adds little for points and costs most of the compute at 128 px)
        self.encoder = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                         in_chans=in_chans, out_indices=(1, 2, 3))
        reductions = self.encoder.feature_info.reduction()
        if reductions[0] != HEATMAP_STRIDE:
            raise ValueError(f"localizer backbone {backbone}: first feature map has stride {reductions[0]}, "
                             f"expected {HEATMAP_STRIDE}; choose a CNN backbone such as resnet10t or resnet18")
        self.lateral = nn.ModuleList(nn.Conv2d(c, PYRAMID_CHANNELS, 1) for c in self.encoder.feature_info.channels())
        self.head = nn.Sequential(
            nn.Conv2d(PYRAMID_CHANNELS, PYRAMID_CHANNELS, 3, padding=1), nn.BatchNorm2d(PYRAMID_CHANNELS),
            nn.ReLU(inplace=True), nn.Conv2d(PYRAMID_CHANNELS, LANDMARKS, 1))
        # start with a low peak everywhere (sigmoid ≈ 0.01): targets are mostly zero
        nn.init.constant_(self.head[-1].bias, -4.6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        fused = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            fused = lateral(feature) + F.interpolate(fused, size=feature.shape[-2:], mode="bilinear",
                                                     align_corners=False)
        return self.head(fused)


def build_localizer(localizer_cfg: LocalizerConfig) -> HeatmapLocalizer:
    from spine_ml.models.classifier import check_backbone_name

    check_backbone_name(localizer_cfg.backbone)
    return HeatmapLocalizer(localizer_cfg.backbone, localizer_cfg.context_slices)


def heatmap_size(input_px: int) -> int:
    return (input_px + HEATMAP_STRIDE - 1) // HEATMAP_STRIDE


# Pixel-centre convention shared by the targets and the decoder: an image of n pixels maps onto a
# grid of m cells with cell centre j at image coordinate (j + 0.5) * n / m - 0.5.
def to_grid(coordinate: np.ndarray | float, image_px: int, grid_px: int):
    return (np.asarray(coordinate, dtype=np.float64) + 0.5) * grid_px / image_px - 0.5


def from_grid(coordinate: np.ndarray | float, image_px: int, grid_px: int):
    return (np.asarray(coordinate, dtype=np.float64) + 0.5) * image_px / grid_px - 0.5


def refine_peak(heatmap: np.ndarray, row: int, column: int) -> tuple[float, float]:
    """Sub-cell peak: the weighted centroid of the 3x3 cells around the arg-max (row, column)."""
    r0, r1 = max(row - 1, 0), min(row + 2, heatmap.shape[0])
    c0, c1 = max(column - 1, 0), min(column + 2, heatmap.shape[1])
    window = np.clip(heatmap[r0:r1, c0:c1].astype(np.float64), 0, None)
    total = window.sum()
    if total <= 0:
        return float(row), float(column)
    rows, columns = np.mgrid[r0:r1, c0:c1]
    return float((window * rows).sum() / total), float((window * columns).sum() / total)
