"""The level localizer: geometry of its targets and of the axial mapping (on hand-built stacks), the
augmentation keeping images and targets together, and training + scoring on the tiny data set."""
from __future__ import annotations

import numpy as np
import pytest

from spine_ml.dicom.geometry import Stack
from spine_ml.models import localizer as L


def make_stack(orientation, first_position, slices=5, spacing=4.0, rows=40, columns=50, pixel=(1.0, 0.8)):
    orientation = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray(first_position, dtype=np.float64) + np.arange(slices)[:, None] * spacing * normal
    rng = np.random.default_rng(0)
    return Stack(pixels=rng.random((slices, rows, columns), dtype=np.float32),
                 instance_numbers=np.arange(1, slices + 1), positions=positions, orientation=orientation,
                 pixel_spacing=np.asarray(pixel), slice_spacing=spacing, transfer_syntax="test")


SAGITTAL = [0, 1, 0, 0, 0, -1]
AXIAL = [1, 0, 0, 0, 1, 0]


def test_grid_mapping_round_trips_and_keeps_pixel_centres():
    x = np.array([0.0, 10.3, 63.0])
    assert np.allclose(L.from_grid(L.to_grid(x, 64, 16), 64, 16), x)
    # the image centre maps to the grid centre
    assert L.to_grid(31.5, 64, 16) == pytest.approx(7.5)


def test_refine_peak_finds_the_centre_between_cells():
    heat = np.zeros((8, 8))
    heat[3, 4], heat[3, 5] = 1.0, 1.0  # peak half-way between columns 4 and 5
    row, column = L.refine_peak(heat, 3, 4)
    assert row == pytest.approx(3.0) and column == pytest.approx(4.5)


def test_slice_peaks_fall_off_with_depth_and_land_on_the_point():
    from spine_ml.localize.dataset import slice_peaks

    stack = make_stack(SAGITTAL, [-8.0, -20.0, 30.0])  # slices at x = -8, -4, 0, 4, 8
    point = stack.pixel_to_patient(2, 20.0, 10.0)
    grid = 16
    peaks = [slice_peaks(stack, s, [(0, 0, point)], grid, sigma_mm=4.0, depth_sigma_mm=4.0) for s in range(5)]
    amplitudes = [p[0, 0, 2] for p in peaks]
    assert amplitudes[2] == pytest.approx(1.0)
    assert amplitudes[1] == pytest.approx(np.exp(-0.5)) and amplitudes[3] == pytest.approx(np.exp(-0.5))
    assert amplitudes[0] == pytest.approx(np.exp(-2.0))
    u, v = peaks[2][0, 0, :2]
    assert L.from_grid(u, stack.columns, grid) == pytest.approx(20.0)
    assert L.from_grid(v, stack.rows, grid) == pytest.approx(10.0)
    # sigma in grid cells: 4 mm / (0.8 mm * 50 px / 16 cells)
    assert peaks[2][0, 0, 3] == pytest.approx(4.0 / (0.8 * 50 / 16))
    assert not peaks[2][1:].any()  # other channels untouched


def test_nearest_axial_slice_picks_the_stack_whose_plane_passes_closest():
    from spine_ml.localize.infer import nearest_axial_slice

    low = make_stack(AXIAL, [-20.0, -20.0, 0.0], slices=4, spacing=4.0)  # z = 0, 4, 8, 12
    high = make_stack(AXIAL, [-20.0, -20.0, 40.0], slices=4, spacing=4.0)  # z = 40 .. 52
    point = np.array([0.0, 0.0, 45.0])
    series_id, stack, slice_index, distance = nearest_axial_slice(point, [(1, low), (2, high)])
    assert (series_id, stack, slice_index) == (2, high, 1) and distance == pytest.approx(1.0)
    assert nearest_axial_slice(np.array([0.0, 0.0, 9.0]), [(1, low), (2, high)])[2] == 2
    # a point beside every image is covered by no stack
    assert nearest_axial_slice(np.array([500.0, 0.0, 45.0]), [(1, low), (2, high)]) is None


def test_augmentation_moves_targets_with_the_image():
    import torch

    from spine_ml.localize.train import augment, render_targets

    grid, size = 16, 64
    peaks = torch.zeros(4, L.LANDMARKS, 2, 5)
    peaks[:, 3, 0] = torch.tensor([5.0, 9.0, 1.0, 1.0, 1.0])
    # the image: the target itself, upsampled, so a warped image must peak where the warped target does
    images = torch.nn.functional.interpolate(render_targets(peaks, grid)[:, 3:4], size=(size, size), mode="bilinear",
                                             align_corners=False).repeat(1, 3, 1, 1)
    moved_images, moved_peaks = augment(images, peaks, grid, torch.Generator().manual_seed(3))
    for b in range(4):
        image_peak = np.unravel_index(int(moved_images[b, 0].argmax()), (size, size))
        target_peak = moved_peaks[b, 3, 0, :2].numpy()  # (u, v) in grid cells
        assert L.from_grid(target_peak[0], size, grid) == pytest.approx(image_peak[1], abs=1.5)
        assert L.from_grid(target_peak[1], size, grid) == pytest.approx(image_peak[0], abs=1.5)


def test_heatmap_model_shapes_and_loss_mask():
    import torch

    from spine_ml.config import LocalizerConfig
    from spine_ml.localize.train import heatmap_loss

    model = L.build_localizer(LocalizerConfig(input_px=64))
    logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, L.LANDMARKS, 16, 16)
    targets = torch.zeros_like(logits)
    mask = torch.zeros(2, L.LANDMARKS)
    mask[:, :5] = 1
    loss = heatmap_loss(logits, targets, mask)
    changed = logits.detach().clone()
    changed[:, 5:] += 10.0  # unmasked channels do not count
    assert heatmap_loss(changed, targets, mask).item() == pytest.approx(loss.item(), rel=1e-5)


def test_unknown_backbone_is_a_clear_error():
    from spine_ml.config import LocalizerConfig
    from spine_ml.models.classifier import ModelError

    with pytest.raises(ModelError, match="resnet10"):
        L.build_localizer(LocalizerConfig(backbone="resnet10x"))


def test_ordered_decoder_gives_each_disc_to_the_level_whose_peak_it_is():
    """Per-channel arg-max crops the wrong disc when a level's channel fires higher on its neighbour;
    the ordered decoder keeps the levels head to foot, so the neighbour's disc goes to its own level."""
    from spine_ml.localize.infer import Site, ordered_levels

    stack = make_stack(SAGITTAL, [0.0, -30.0, 60.0], rows=60, pixel=(1.0, 1.0))  # rows run head -> foot
    disc_rows = [5.0, 15.0, 25.0, 35.0, 45.0]

    def site(row, score):
        return Site(1, stack, 2, 20.0, row, score)

    candidates = [[site(r, 0.9 if k == j else 0.1) for j, r in enumerate(disc_rows)] for k in range(5)]
    candidates[3] = [site(45.0, 0.7), site(35.0, 0.6), site(25.0, 0.1)]  # L4/L5 fires higher on L5/S1
    independent = [max(c, key=lambda s: s.score).y for c in candidates]
    assert independent[3] == independent[4] == 45.0  # the bug the decoder exists for
    decoded = ordered_levels(candidates)
    assert [s.y for s in decoded] == disc_rows
    # no head-to-foot ordering at all (every channel only on one disc) -> None (caller falls back)
    assert ordered_levels([[site(25.0, 0.9)] for _ in range(5)]) is None
    assert ordered_levels([[site(5.0, 0.9)], [], [], [], []]) is None


def test_spacing_term_pulls_an_end_level_back_from_the_disc_beyond():
    """L1/L2's channel firing higher on T12/L1 keeps the order intact, so only the spacing term
    (discs are near evenly spaced) can catch it; without it the first level jumps a disc."""
    from spine_ml.localize.infer import Site, ordered_levels

    stack = make_stack(SAGITTAL, [0.0, -30.0, 60.0], rows=70, pixel=(1.0, 1.0))
    disc_rows = [15.0, 25.0, 35.0, 45.0, 55.0]  # T12/L1 sits at row 5

    def site(row, score):
        return Site(1, stack, 2, 20.0, row, score)

    candidates = [[site(r, 0.9)] for r in disc_rows]
    candidates[0] = [site(5.0, 0.8), site(15.0, 0.6)]
    assert [s.y for s in ordered_levels(candidates, spacing_weight=0.0)] == [5.0] + disc_rows[1:]
    assert [s.y for s in ordered_levels(candidates)] == disc_rows


def test_suggested_jitter_matches_the_localizer_error_through_the_real_augmentation():
    from spine_ml.config import AugmentConfig
    from spine_ml.localize.metrics import suggested_shift_px
    from spine_ml.prepare.augment import draw_jitters

    shift = suggested_shift_px(p90_error_mm=4.8, pixel_mm=1.2)  # 4 cache px at 1.2 mm/px
    jitters = draw_jitters(np.random.default_rng(0), AugmentConfig(shift_px=shift), 20000)
    offsets_mm = np.hypot([j.shift_x for j in jitters], [j.shift_y for j in jitters]) * 1.2
    assert np.percentile(offsets_mm, 90) == pytest.approx(4.8, rel=0.02)
