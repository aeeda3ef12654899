"""What a trial reports while it runs (EpochReport) and returns at the end (TrialResult)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spine_ml.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from spine_ml.config import Config


class TrialFailed(UserError):
    """A trial that cannot go on (a NaN loss, ...); the message names the fold and epoch.

    A UserError so that `spine-ml train` prints it without a traceback; the sweep marks the trial
    failed and carries on.
    """

    def __init__(self, message: str, fold: int | None = None, epoch: int | None = None):
        super().__init__(message)
        self.fold = fold
        self.epoch = epoch


@dataclass(frozen=True)
class EpochReport:
    """One epoch of one fold, as passed to run_trial's `on_epoch` callback."""
    fold: int  # 0-based fold index
    epoch: int  # 1-based epoch within the fold
    folds_total: int
    epochs_total: int
    train_loss: float
    val_loss: float
    val_score: float  # competition metric total on this fold's held-out samples
    val_parts: dict[str, float]  # score, spinal, foraminal, subarticular, any_severe_spinal
    seconds: float  # wall time of this epoch (train + evaluate)

    @property
    def global_epoch(self) -> int:
        """0-based index over all folds' epochs: the step MLflow and progress bars use."""
        return self.fold * self.epochs_total + self.epoch - 1

    def as_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "epoch": self.epoch, "train_loss": self.train_loss,
                "val_loss": self.val_loss, "val_score": self.val_score,
                **{f"val_{k}": v for k, v in self.val_parts.items() if k != "score"},
                "seconds": self.seconds}


@dataclass
class TrialResult:
    """A finished trial: OOF metrics over all folds and where its files lie."""
    metrics: dict[str, float]  # exactly score, spinal, foraminal, subarticular, any_severe_spinal (OOF)
    oof: pd.DataFrame  # submission layout, every row of every train study, never NaN
    oof_path: Path  # output_dir/oof.csv
    checkpoints: list[Path]  # per-fold best-epoch state_dicts (torch.load(weights_only=True))
    config: Config
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochReport.as_dict() per fold-epoch
    wall_seconds: float = 0.0
    inference_seconds_per_study: float = 0.0  # ONE fold model, on `device`, crops to probabilities
    device: str = "cpu"
    best_epochs: list[int] = field(default_factory=list)  # the epoch each fold's checkpoint comes from
