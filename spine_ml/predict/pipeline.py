"""Test-time inference: localised crops -> a run's fold models (averaged) -> 25 rows per study.

Rows without a crop (missing or unreadable series, a level no axial stack covers) take the
training prior: per (condition, level) class frequencies of the data root's train.csv, weighted
1/2/4 and normalised (spine_ml.training.prior). Every study gets all its rows, always.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError

log = logging.getLogger(__name__)
CONDITION_INDEX = {c: i for i, c in enumerate(V.CONDITIONS)}


def training_prior(config, data_root: Path) -> pd.DataFrame:
    """The prior table from train.csv of the data root, else of config's data.root, else uniform."""
    from spine_ml.competition.tables import read_train_labels
    from spine_ml.training.prior import FILL_PSEUDO_COUNT, prior_table

    for root in (data_root, config.path(config.data.root)):
        if (root / "train.csv").is_file():
            return prior_table(read_train_labels(root / "train.csv"), pseudo_count=FILL_PSEUDO_COUNT)
    log.warning("no train.csv in %s or %s: rows without a crop get 1/3 each (put the competition's train.csv "
                "next to the test data for a better fallback)", data_root, config.path(config.data.root))
    pairs = pd.MultiIndex.from_product([V.CONDITIONS, V.LEVELS], names=["condition", "level"])
    return pd.DataFrame(1.0 / 3, index=pairs, columns=list(V.PROBABILITY_COLUMNS))


def crop_batches(crops: np.ndarray, conditions: np.ndarray, crop_px: int, input_px: int | None,
                 batch_size: int) -> Iterator[dict]:
    """Batches as CropDataset yields them without augmentation: prepare's centre crop + resize."""
    import torch

    from spine_ml.prepare import augment as A

    for start in range(0, len(crops), batch_size):
        images = [A.resize(A.centre_crop(torch.from_numpy(crops[i].astype(np.float32)), crop_px), input_px)
                  for i in range(start, min(start + batch_size, len(crops)))]
        count = len(images)
        yield {"image": torch.stack(images).contiguous(),
               "condition": torch.as_tensor(conditions[start:start + count], dtype=torch.long),
               "label": torch.full((count,), -1, dtype=torch.long),
               "row": torch.arange(start, start + count, dtype=torch.long)}


def fold_probabilities(config, checkpoints: Sequence[Path], crops: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """(N, 3) mean over the fold models of their softmax on each crop (bf16 autocast on CUDA)."""
    from spine_ml.models.classifier import load_fold_models
    from spine_ml.progress import progress
    from spine_ml.training.device import cap_threads, resolve_device, use_bf16
    from spine_ml.training.loop import predict

    if len(crops) == 0:
        return np.zeros((0, len(V.SEVERITIES)))
    if crops.shape[1] != config.prepare.slices:
        raise UserError(f"test crops hold {crops.shape[1]} slices but the run's prepare.slices is "
                        f"{config.prepare.slices}")
    device = resolve_device(config.train)
    bf16 = use_bf16(config.train, device)
    cap_threads()
    total = np.zeros((len(crops), len(V.SEVERITIES)))
    for model in progress(load_fold_models(checkpoints, config, device), total=len(checkpoints), desc="predict",
                          unit="fold model", leave=False):
        batches = crop_batches(crops, conditions, config.model.crop_px, config.model.input_px,
                               config.predict.batch_size)
        total += predict(model, batches, device=device, bf16=bf16).probabilities
        del model
    return total / len(checkpoints)


def assemble(rows: pd.DataFrame, probabilities: np.ndarray, prior: pd.DataFrame) -> pd.DataFrame:
    """Submission layout: crop rows take the models' probabilities, the others the prior."""
    from spine_ml.competition.submission import normalised_frame
    from spine_ml.training.prior import prior_probabilities

    values = np.array(prior_probabilities(rows, prior), dtype=np.float64)  # a writable copy
    has_crop = rows.crop.to_numpy() >= 0
    values[has_crop] = probabilities[rows.crop.to_numpy()[has_crop]]
    return normalised_frame(rows.row_id.to_numpy(), values)


def log_fallbacks(rows: pd.DataFrame, problems: dict[int, list[str]]) -> None:
    """One line per study that has rows on the prior, naming them and why."""
    missing = rows[rows.crop < 0]
    for study_id, group in missing.groupby("study_id"):
        conditions = sorted(set(group.condition), key=V.CONDITIONS.index)
        why = "; ".join(problems.get(int(study_id), [])) or "not localised"
        log.warning("study %d: %d of 25 rows on the training prior (%s): %s", study_id, len(group),
                    ", ".join(conditions), why)


def predict_from_crops(config, checkpoints: Sequence[Path], crops, data_root: Path) -> pd.DataFrame:
    conditions = np.zeros(len(crops.crops), dtype=np.int64)
    with_crop = crops.rows[crops.rows.crop >= 0]
    conditions[with_crop.crop.to_numpy()] = [CONDITION_INDEX[c] for c in with_crop.condition]
    probabilities = fold_probabilities(config, checkpoints, crops.crops, conditions)
    log_fallbacks(crops.rows, crops.problems)
    return assemble(crops.rows, probabilities, training_prior(config, data_root))


def predict_studies(config, checkpoints: Sequence[Path | str], localizer, data_root: Path | str,
                    studies: Sequence[int]) -> pd.DataFrame:
    """Submission-layout predictions (25 rows per study, normalised) of one run's fold models.

    `localizer`: a loaded `Localizer`, a localizer folder, an MLflow run id, or None for the most
    recently chosen finished localizer run in the config's experiment. Localised crops are cached
    per (test data, prepare settings, localizer), so each further ensemble member only runs its
    models.
    """
    from spine_ml.localize.store import resolve_localizer
    from spine_ml.predict.crops import ensure_test_crops

    checkpoints = [Path(p) for p in checkpoints]
    if not checkpoints:
        raise UserError("no fold checkpoints to predict with")
    data_root = Path(data_root)
    loaded, key = resolve_localizer(config, localizer)
    crops = ensure_test_crops(config, loaded, key, data_root, [int(s) for s in studies])
    return predict_from_crops(config, checkpoints, crops, data_root)
