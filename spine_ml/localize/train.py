"""Train the level localizer on the train studies' coordinates, evaluate it on held-out studies.

Pure like `run_trial`: no MLflow here (localize/cli.py logs the run). Held-out studies are a seeded
random `localizer.holdout_fraction` of the studies with coordinates; they are scored through the
real test-time path (`localize_study` on their DICOM folders), not on cached samples.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from spine_ml.localize.dataset import LocalizerSamples, ensure_samples
from spine_ml.models import localizer as L

log = logging.getLogger(__name__)
POSITIVE_WEIGHT = 20.0  # extra loss weight on target pixels: peaks are a few cells of ~1000
AUGMENT_SHIFT = 0.08  # fraction of the half-image (normalised coordinates)
AUGMENT_SCALE = 0.12
AUGMENT_ROTATE_DEG = 8.0
NEGATIVE_SHARE = 0.35  # share of the slices without any target peak used in each epoch (easy negatives)
CHECKPOINT = "localizer.pt"
SETTINGS = "localizer.yaml"
TEST_COORDINATES = "test_label_coordinates.csv"  # synthetic data only: the test split's true points


@dataclass
class LocalizerResult:
    metrics: dict[str, float]
    folder: Path  # holds localizer.pt + localizer.yaml (load_localizer reads it)
    history: list[dict] = field(default_factory=list)
    train_studies: list[int] = field(default_factory=list)
    holdout_studies: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    samples: int = 0


def split_studies(studies: np.ndarray, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(np.sort(studies))
    held = int(round(len(order) * fraction)) if fraction > 0 else 0
    held = min(max(held, 1 if fraction > 0 else 0), len(order) - 1)
    return sorted(int(s) for s in order[held:]), sorted(int(s) for s in order[:held])


def random_affine(batch: int, generator) -> tuple:
    """Per-sample (theta for affine_grid, inverse map for points, scale): out -> in = M·out + t."""
    import torch

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator)

    scale = uniform(1 - AUGMENT_SCALE, 1 + AUGMENT_SCALE)
    angle = uniform(-AUGMENT_ROTATE_DEG, AUGMENT_ROTATE_DEG) * math.pi / 180
    shift = torch.stack([uniform(-AUGMENT_SHIFT, AUGMENT_SHIFT), uniform(-AUGMENT_SHIFT, AUGMENT_SHIFT)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    matrix = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([matrix, shift[:, :, None]], 2)
    return theta, torch.linalg.inv(matrix), shift, scale


def render_targets(peaks, grid: int):
    """(B, K, 2, PEAK) peaks -> (B, K, grid, grid) targets: the max of each slot's Gaussian."""
    import torch

    cells = torch.arange(grid, dtype=peaks.dtype)
    u, v, amplitude, sigma_u, sigma_v = (peaks[..., i, None, None] for i in range(5))
    du = (cells[None, :] - u) / sigma_u.clamp_min(1e-3)
    dv = (cells[:, None] - v) / sigma_v.clamp_min(1e-3)
    return (amplitude * torch.exp(-0.5 * (du ** 2 + dv ** 2))).amax(2)


def augment(images, peaks, grid: int, generator):
    """The same random affine on images and target peaks (peaks in grid cells)."""
    import torch
    from torch.nn import functional as F

    theta, inverse, shift, scale = random_affine(len(images), generator)
    sampling = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    peaks = peaks.clone()
    normalised = (peaks[..., :2] + 0.5) / grid * 2 - 1  # (B, K, 2, 2) input positions
    moved = torch.einsum("bij,bksj->bksi", inverse, normalised - shift[:, None, None, :])
    peaks[..., :2] = (moved + 1) / 2 * grid - 0.5
    peaks[..., 3:5] = peaks[..., 3:5] * scale[:, None, None, None]
    return images, peaks


def heatmap_loss(logits, targets, mask):
    """Weighted BCE over the channels a sample's series type labels (its optimum is the target)."""
    import torch
    from torch.nn import functional as F

    weight = (1 + POSITIVE_WEIGHT * targets) * mask[:, :, None, None]
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, weight=weight, reduction="sum")
    return loss / torch.clamp(weight.sum(), min=1.0)


def _batch(samples: LocalizerSamples, rows: np.ndarray):
    import torch

    images = torch.from_numpy(samples.slices[samples.context[rows]].astype(np.float32))
    return images, torch.from_numpy(samples.peaks[rows]), torch.from_numpy(samples.channel_mask[rows].astype(np.float32))


def fit(model, samples: LocalizerSamples, cfg, device, progress: bool = False) -> list[dict]:
    """Train `model` on `samples` for cfg.epochs; returns per-epoch loss and seconds."""
    import torch

    from spine_ml.progress import progress as progress_bar

    generator = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    grid = L.heatmap_size(cfg.input_px)
    peaked = (samples.peaks[..., 2].max(axis=2) * samples.channel_mask).max(axis=1) > 0.05
    positives, negatives = np.flatnonzero(peaked), np.flatnonzero(~peaked)
    per_epoch = len(positives) + int(round(NEGATIVE_SHARE * len(negatives)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, math.ceil(per_epoch / cfg.batch_size)) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    history = []
    for epoch in progress_bar(range(1, cfg.epochs + 1), desc="localizer", disable=not progress, unit="epoch"):
        started, total, count = time.perf_counter(), 0.0, 0
        model.train()
        chosen = rng.choice(negatives, per_epoch - len(positives), replace=False)
        order = rng.permutation(np.concatenate([positives, chosen]))
        for start in range(0, len(order), cfg.batch_size):
            rows = np.sort(order[start:start + cfg.batch_size])
            if len(rows) < 2:
                continue  # BatchNorm needs two samples
            images, peaks, mask = _batch(samples, rows)
            images, peaks = augment(images, peaks, grid, generator)
            targets = render_targets(peaks, grid)
            logits = model(images.to(device))
            loss = heatmap_loss(logits, targets.to(device), mask.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + float(loss.detach()), count + 1
        history.append({"epoch": epoch, "train_loss": total / max(count, 1),
                        "seconds": time.perf_counter() - started})
        log.info("localizer epoch %d/%d: loss %.4f (%.1f s)", epoch, cfg.epochs, history[-1]["train_loss"],
                 history[-1]["seconds"])
    return history


def save_localizer(model, config, folder: Path) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / CHECKPOINT)
    settings = {"localizer": config.localizer.model_dump(mode="json"),
                "percentiles": list(config.prepare.percentiles)}
    (folder / SETTINGS).write_text(yaml.safe_dump(settings, sort_keys=False))
    return folder


def labelled_studies(root: Path) -> np.ndarray:
    from spine_ml.competition import tables
    from spine_ml.prepare.plan import COORDINATES, require_data

    require_data(root)
    return np.unique(tables.read_coordinates(root / COORDINATES).study_id.to_numpy())


def train_localizer(config, output_dir: Path, progress: bool | None = None) -> LocalizerResult:
    """Train on the non-held-out studies, save to output_dir, score the held-out ones."""
    import torch

    from spine_ml.localize.infer import Localizer
    from spine_ml.localize.metrics import evaluate_localizer
    from spine_ml.training.device import cap_threads, resolve_device, seed_everything

    started = time.perf_counter()
    cfg = config.localizer
    if progress is None:
        progress = os.environ.get("SPINE_ML_QUIET") != "1"
    studies = labelled_studies(config.path(config.data.root))
    if cfg.max_studies:
        studies = np.random.default_rng(cfg.seed).permutation(studies)[:cfg.max_studies]
    train_ids, holdout_ids = split_studies(studies, cfg.holdout_fraction, cfg.seed)
    samples = ensure_samples(config, train_ids, progress)
    device = resolve_device(config.train.model_copy(update={"device": cfg.device}))
    cap_threads()
    seed_everything(cfg.seed)
    model = L.build_localizer(cfg).to(device)
    log.info("localizer: %d samples from %d train studies, %d held out, %s on %s", len(samples), len(train_ids),
             len(holdout_ids), cfg.backbone, device)
    history = fit(model, samples, cfg, device, progress)
    folder = save_localizer(model, config, Path(output_dir))
    metrics: dict[str, float] = {"train_loss": history[-1]["train_loss"]}
    localizer = Localizer(model, cfg, tuple(config.prepare.percentiles), str(device), cfg.batch_size)
    root = config.path(config.data.root)
    if holdout_ids:
        metrics.update(evaluate_localizer(localizer, root, holdout_ids))
    metrics.update(test_split_metrics(localizer, root))
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return LocalizerResult(metrics, folder, history, train_ids, holdout_ids, time.perf_counter() - started,
                           len(samples))


def test_split_metrics(localizer, root: Path) -> dict[str, float]:
    """`test_`-prefixed metrics on the test split where its hidden coordinates exist (synthetic data:
    test_label_coordinates.csv); {} on real data."""
    from spine_ml.competition import tables
    from spine_ml.localize.metrics import evaluate_localizer

    if not (root / TEST_COORDINATES).is_file() or not (root / "test_series_descriptions.csv").is_file():
        return {}
    studies = sorted(set(tables.read_series_descriptions(root / "test_series_descriptions.csv").study_id.tolist()))
    metrics = evaluate_localizer(localizer, root, studies, images="test_images", coordinates_csv=TEST_COORDINATES,
                                 series_csv="test_series_descriptions.csv")
    return {f"test_{key}": value for key, value in metrics.items()}


def load_localizer(folder: Path | str, device: str = "cpu", batch_size: int = 32):
    """A saved localizer folder (localizer.pt + localizer.yaml) -> a ready `Localizer`."""
    import torch

    from spine_ml.config import LocalizerConfig
    from spine_ml.errors import UserError
    from spine_ml.localize.infer import Localizer

    folder = Path(folder)
    if not (folder / CHECKPOINT).is_file() or not (folder / SETTINGS).is_file():
        raise UserError(f"{folder}: not a localizer folder (needs {CHECKPOINT} and {SETTINGS}); train one with "
                        f"`spine-ml train-localizer CONFIG`")
    settings = yaml.safe_load((folder / SETTINGS).read_text())
    cfg = LocalizerConfig.model_validate(settings["localizer"])
    model = L.HeatmapLocalizer(cfg.backbone, cfg.context_slices)
    model.load_state_dict(torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True))
    return Localizer(model.to(device), cfg, tuple(settings["percentiles"]), device, batch_size)
