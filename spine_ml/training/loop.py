"""The inner loops: one training epoch, prediction, evaluation; optimiser and schedule.

Lean on purpose (bench/bench_training.py holds it to >= 0.9x a bare timm loop): no host sync per
batch (the loss is summed on the device and read once per epoch), no per-sample Python work.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from spine_ml.training.device import autocast

if TYPE_CHECKING:
    from spine_ml.config import TrainConfig
    from spine_ml.training.losses import SeverityLoss

Batch = Mapping[str, torch.Tensor]  # image, condition, label, row (+ weight) as CropDataset yields them


def make_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm layers (timm's optimizer factory)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int):
    """Per-step learning-rate schedule; None for ``constant``."""
    total_steps = max(1, total_steps)
    if train_cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=train_cfg.lr * 0.01)
    if train_cfg.schedule == "onecycle" and total_steps >= 3:  # fewer steps leave no room for a warm-up phase
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train_cfg.lr, total_steps=total_steps,
                                                   pct_start=0.25 if total_steps >= 8 else 0.5)
    return None


def _to_device(batch: Batch, device: torch.device, study_of_row: torch.Tensor | None):
    images = batch["image"].to(device, non_blocking=True)
    conditions = batch["condition"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    rows = batch["row"].to(device, non_blocking=True)
    studies = study_of_row[rows] if study_of_row is not None else None
    return images, conditions, labels, rows, studies


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], loss_fn: SeverityLoss,
                    optimizer: torch.optim.Optimizer, scheduler=None, *, device: torch.device,
                    bf16: bool = False, grad_clip: float | None = None, ema=None,
                    max_batches: int | None = None, study_of_row: torch.Tensor | None = None) -> float:
    """Train over `batches` once; returns the mean batch loss (NaN/inf are returned, not hidden)."""
    model.train()
    total = torch.zeros((), device=device)
    count = 0
    for batch in batches:
        if max_batches is not None and count >= max_batches:
            break
        images, conditions, labels, _, studies = _to_device(batch, device, study_of_row)
        with autocast(device, bf16):
            logits = model(images, conditions)
        loss = loss_fn(logits, labels, conditions, studies)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        total += loss.detach()
        count += 1
    return float(total / max(count, 1))  # the one host sync of the epoch


@dataclass
class Predictions:
    """Model outputs for a set of cache rows, on the CPU, in the loader's order."""
    rows: np.ndarray  # positions in cache.index
    logits: torch.Tensor  # (N, 3) float32
    labels: torch.Tensor  # (N,), -1 = no truth
    conditions: torch.Tensor  # (N,)
    seconds: float  # wall time of the pass (data + model), for inference-cost estimates

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(self.logits, dim=1).double().numpy()


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[Batch], *, device: torch.device, bf16: bool = False) -> Predictions:
    """Logits for every sample of `batches` (eval mode, no gradients)."""
    start = time.perf_counter()
    model.eval()
    outputs, labels, conditions, rows = [], [], [], []
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        condition = batch["condition"].to(device, non_blocking=True)
        with autocast(device, bf16):
            outputs.append(model(images, condition).float())
        labels.append(batch["label"])
        conditions.append(batch["condition"])
        rows.append(batch["row"])
    if not outputs:
        empty = torch.zeros(0, dtype=torch.long)
        return Predictions(np.zeros(0, dtype=np.int64), torch.zeros(0, 3), empty, empty, time.perf_counter() - start)
    logits = torch.cat(outputs).cpu()  # one device->host copy (and the sync that ends the timing)
    return Predictions(torch.cat(rows).numpy().astype(np.int64), logits, torch.cat(labels).long(),
                       torch.cat(conditions).long(), time.perf_counter() - start)


def evaluate(predictions: Predictions, loss_fn: SeverityLoss, study_of_row: torch.Tensor | None = None) -> float:
    """The training loss on held-out predictions (all at once, so the any_severe term sees whole studies)."""
    if len(predictions.rows) == 0:
        return float("nan")
    studies = study_of_row.cpu()[torch.from_numpy(predictions.rows)] if study_of_row is not None else None
    cpu_loss = copy.deepcopy(loss_fn).to("cpu")  # the training copy stays on its device
    with torch.inference_mode():
        return float(cpu_loss(predictions.logits, predictions.labels, predictions.conditions, studies))
