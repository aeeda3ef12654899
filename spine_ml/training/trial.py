"""One trial: train a model per CV fold, predict each held-out fold -> out-of-fold predictions.

Pure: no Ray, Optuna or MLflow here (the sweep and the CLI wrap it). Folds run in order, all epochs
of fold 0 first, because the sweep's ASHA uses fold 0's per-epoch scores as the early fidelity.
Files: ``output_dir/checkpoints/fold{k}.pt`` (written when fold k ends) and ``output_dir/oof.csv``
(written last, atomically: a trial aborted by `on_epoch` never leaves an oof.csv behind).
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch

from spine_ml.competition import metric
from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame, write_predictions
from spine_ml.errors import UserError
from spine_ml.models.classifier import build_classifier
from spine_ml.training.device import cap_threads, resolve_device, seed_everything, use_bf16
from spine_ml.training.losses import SeverityLoss
from spine_ml.training.loop import Predictions, evaluate, make_optimizer, make_scheduler, predict, train_one_epoch
from spine_ml.training.prior import FILL_PSEUDO_COUNT, prior_probabilities, prior_table
from spine_ml.training.result import EpochReport, TrialFailed, TrialResult

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.prepare.cache import CropCache

log = logging.getLogger(__name__)
EpochCallback = Callable[[EpochReport], None]
TRUTH_COLUMNS = ["row_id", "study_id", "condition", "level", "label", "sample_weight"]


@dataclass
class FoldOutcome:
    checkpoint: Path
    best_epoch: int
    predictions: Predictions  # held-out predictions of the best epoch
    predict_seconds_per_study: float


def run_trial(config: Config, output_dir: Path, on_epoch: EpochCallback | None = None,
              cache: CropCache | None = None) -> TrialResult:
    """Train and evaluate `config` on every fold; returns OOF metrics, predictions and checkpoints.

    `on_epoch` is called after every epoch of every fold and may raise to abort the trial (the
    exception propagates unchanged).
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    if cache is None:
        from spine_ml.prepare.cache import ensure_cache

        cache = ensure_cache(config)
    check_slices(config, cache)
    index = cache.index.reset_index(drop=True)
    folds = check_folds(config, index)
    device = resolve_device(config.train)
    bf16 = use_bf16(config.train, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    threads = cap_threads()
    log.info("trial on %s (%s, %d threads): %d folds x %d epochs, %s", device, "bf16" if bf16 else "fp32",
             threads, folds, config.train.epochs, config.model.backbone)
    study_of_row = torch.as_tensor(pd.factorize(index.study_id)[0], dtype=torch.long)

    history: list[dict] = []
    outcomes = [train_fold(config, cache, index, fold, folds, output_dir, device, bf16,
                           study_of_row, history, on_epoch) for fold in range(folds)]

    oof = out_of_fold_frame(index, outcomes)
    truth = index.loc[index.label >= 0, TRUTH_COLUMNS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a part with no rows (tiny data) is reported as NaN
        metrics = metric.score(truth, oof, where="out-of-fold predictions").as_dict()
    oof_path = write_predictions(oof, output_dir / "oof.csv")
    per_study = [o.predict_seconds_per_study for o in outcomes if o.predict_seconds_per_study > 0]
    return TrialResult(
        metrics=metrics, oof=oof, oof_path=oof_path, checkpoints=[o.checkpoint for o in outcomes],
        config=config, history=history, wall_seconds=time.perf_counter() - start,
        inference_seconds_per_study=float(np.median(per_study)) if per_study else 0.0,
        device=str(device), best_epochs=[o.best_epoch for o in outcomes])


def check_slices(config: Config, cache: CropCache) -> None:
    """A cache passed in by the caller must match the config (ensure_cache's own always does)."""
    if cache.slices != config.prepare.slices:
        raise UserError(f"the crop cache {getattr(cache, 'path', '')} holds {cache.slices} slices per sample but "
                        f"prepare.slices is {config.prepare.slices}; open the cache of this config (ensure_cache)")


def check_folds(config: Config, index: pd.DataFrame) -> int:
    present = set(index.fold.unique().tolist())
    expected = set(range(config.cv.folds))
    if not present <= expected:
        raise UserError(f"the crop cache's folds {sorted(present)} do not match cv.folds={config.cv.folds}; "
                        f"rebuild it with `spine-ml prepare`")
    return config.cv.folds


def _loader(cache: CropCache, rows: np.ndarray, config: Config, *, train: bool, seed: int,
            device: torch.device, generator: torch.Generator | None = None):
    from torch.utils.data import DataLoader

    from spine_ml.prepare.dataset import CropDataset

    dataset = CropDataset(cache, rows, config.model.crop_px, config.model.input_px or config.model.crop_px,
                          config.train.augment if train else None, seed)
    batch_size = config.train.batch_size if train else config.train.batch_size * 2
    workers = config.train.num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator, num_workers=workers,
                      # a final batch of one sample breaks BatchNorm in train mode
                      drop_last=train and len(rows) > batch_size, pin_memory=device.type == "cuda",
                      # training workers restart each epoch so they see the dataset's new augmentation epoch
                      persistent_workers=workers > 0 and not train)


def _steps_per_epoch(loader, config: Config) -> int:
    steps = len(loader)
    return min(steps, config.train.max_batches_per_epoch) if config.train.max_batches_per_epoch else steps


def train_fold(config: Config, cache: CropCache, index: pd.DataFrame, fold: int, folds: int, output_dir: Path,
               device: torch.device, bf16: bool, study_of_row: torch.Tensor, history: list[dict],
               on_epoch: EpochCallback | None) -> FoldOutcome:
    """Train one fold for all epochs; keep the best epoch (by held-out score); save its weights."""
    held_out = (index.fold == fold).to_numpy()
    has_sample = (index["sample"] >= 0).to_numpy()
    train_rows = np.flatnonzero(~held_out & has_sample & (index.label >= 0).to_numpy())
    val_rows = np.flatnonzero(held_out & has_sample)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise TrialFailed(f"fold {fold}: {len(train_rows)} training and {len(val_rows)} held-out samples; "
                          f"too few studies for cv.folds={folds}", fold=fold)
    seed = config.train.seed + 1000 * fold
    generator = seed_everything(seed)
    model = build_classifier(config.model, cache.slices, config.project_root).to(device)
    train_loader = _loader(cache, train_rows, config, train=True, seed=seed, device=device, generator=generator)
    val_loader = _loader(cache, val_rows, config, train=False, seed=seed, device=device)
    steps = _steps_per_epoch(train_loader, config)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, steps * config.train.epochs)
    ema = _make_ema(model, config)
    loss_fn = SeverityLoss(config.loss).to(device)
    device_study_of_row = study_of_row.to(device)
    val_truth = index.loc[val_rows[(index.label.to_numpy()[val_rows] >= 0)], TRUTH_COLUMNS]
    val_studies = max(1, len(np.unique(index.study_id.to_numpy()[val_rows])))

    best: tuple[float, int, dict, Predictions] | None = None
    predict_seconds: list[float] = []
    for epoch in range(1, config.train.epochs + 1):
        epoch_start = time.perf_counter()
        train_loader.dataset.set_epoch(epoch)
        train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, device=device, bf16=bf16,
                                     grad_clip=config.train.grad_clip, ema=ema,
                                     max_batches=config.train.max_batches_per_epoch, study_of_row=device_study_of_row)
        if not math.isfinite(train_loss):
            raise TrialFailed(f"fold {fold} epoch {epoch}: the training loss is {train_loss}; lower train.lr "
                              f"(now {config.train.lr}) or set train.grad_clip", fold=fold, epoch=epoch)
        scored_model = ema.module if ema is not None else model
        predictions = predict(scored_model, val_loader, device=device, bf16=bf16)
        predict_seconds.append(predictions.seconds / val_studies)
        val_loss = evaluate(predictions, loss_fn, study_of_row)
        parts = _score_rows(index, predictions, val_truth)
        report = EpochReport(fold=fold, epoch=epoch, folds_total=folds, epochs_total=config.train.epochs,
                             train_loss=train_loss, val_loss=val_loss, val_score=parts["score"], val_parts=parts,
                             seconds=time.perf_counter() - epoch_start)
        history.append(report.as_dict())
        if best is None or _better(parts["score"], best[0]):
            best = (parts["score"], epoch, _cpu_state(scored_model), predictions)
        if on_epoch is not None:
            on_epoch(report)
    assert best is not None
    checkpoint = _save_weights(best[2], output_dir / "checkpoints" / f"fold{fold}.pt")
    return FoldOutcome(checkpoint, best[1], best[3], float(np.median(predict_seconds)))


def _make_ema(model: torch.nn.Module, config: Config):
    if not config.train.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=config.train.ema)


def _better(score: float, best: float) -> bool:
    if math.isnan(best):
        return not math.isnan(score)
    return score < best


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Weights only (loadable with torch.load(weights_only=True)), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _score_rows(index: pd.DataFrame, predictions: Predictions, truth: pd.DataFrame) -> dict[str, float]:
    """The metric and its parts on the held-out samples with a label."""
    if truth.empty:
        return {k: float("nan") for k in V.METRIC_PARTS}
    frame = normalised_frame(index.row_id.to_numpy()[predictions.rows], predictions.probabilities)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric.score(truth, frame, where="held-out fold").as_dict()


def out_of_fold_frame(index: pd.DataFrame, outcomes: list[FoldOutcome]) -> pd.DataFrame:
    """Submission layout for all 25 rows of every study in the cache index.

    Rows with a held-out prediction take it; the rest (no sample: missing series, unlabelled point)
    take the prior of that fold's training studies, so no row is ever NaN.
    """
    studies = index.drop_duplicates("study_id")[["study_id", "fold"]]
    rows = pd.DataFrame([(s, f, c, lv, V.make_row_id(s, c, lv)) for s, f in studies.itertuples(index=False)
                         for c in V.CONDITIONS for lv in V.LEVELS],
                        columns=["study_id", "fold", "condition", "level", "row_id"])
    probabilities = np.full((len(rows), len(V.SEVERITIES)), np.nan)
    position = pd.Series(np.arange(len(rows)), index=rows.row_id.to_numpy())
    for fold, outcome in enumerate(outcomes):
        in_fold = (rows.fold == fold).to_numpy()
        table = prior_table(index[index.fold != fold], pseudo_count=FILL_PSEUDO_COUNT)
        probabilities[in_fold] = prior_probabilities(rows[in_fold], table)
        predicted = position.reindex(index.row_id.to_numpy()[outcome.predictions.rows]).to_numpy()
        probabilities[predicted.astype(np.int64)] = outcome.predictions.probabilities
    return normalised_frame(rows.row_id, probabilities)
