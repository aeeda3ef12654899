"""`spine-ml train CONFIG [--set k=v ...]`: one trial on all folds, no Ray, logged as one MLflow run."""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.training.result import EpochReport, TrialResult

log = logging.getLogger(__name__)


class EpochProgress:
    """One tqdm bar over every fold-epoch of the trial, advanced after each epoch."""

    def __init__(self, config: Config):
        from spine_ml.progress import progress

        self.bar = progress(total=config.cv.folds * config.train.epochs, unit="epoch", desc="train")

    def __call__(self, report: EpochReport) -> None:
        self.bar.set_description(f"fold {report.fold + 1}/{report.folds_total} epoch {report.epoch}/{report.epochs_total}")
        self.bar.set_postfix(train_loss=f"{report.train_loss:.3f}", val_loss=f"{report.val_loss:.3f}",
                             val_score=f"{report.val_score:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def trial_dir(config: Config) -> Path:
    """A fresh folder for this run's files: mlruns/trials/train/<time>-<random>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return config.path("mlruns") / "trials" / "train" / f"{stamp}-{uuid.uuid4().hex[:6]}"


def train(config: Config, progress: bool = True) -> tuple[TrialResult, str, dict]:
    """ensure data -> cache -> run_trial -> MLflow; returns the result, the MLflow run id and the
    reference scores (prior, oracle) on the same labels."""
    from spine_ml.prepare.cache import ensure_cache
    from spine_ml.tracking.logging import RUN_KIND_TAG
    from spine_ml.tracking.store import ensure_experiment, log_trial
    from spine_ml.training.prior import reference_scores
    from spine_ml.training.trial import TRUTH_COLUMNS, run_trial

    ensure_experiment(config)  # an unusable store fails here, before any training
    if config.data.synthetic is not None:
        from spine_ml.synth.generate import ensure_synthetic

        ensure_synthetic(config)
    cache = ensure_cache(config)
    bar = EpochProgress(config) if progress else None
    try:
        result = run_trial(config, trial_dir(config), on_epoch=bar, cache=cache)
    finally:
        if bar is not None:
            bar.close()
    run_id = log_trial(config, result, run_name=f"train-{config.model.backbone}", tags={RUN_KIND_TAG: "train"})
    reference = reference_scores(cache.index[TRUTH_COLUMNS], config.path(config.data.root))
    return result, run_id, reference


def summary_lines(config: Config, result: TrialResult, run_id: str, reference: dict) -> list[str]:
    """The one-screen summary: OOF score and parts, prior and oracle, time, where to look next."""
    from spine_ml.tracking.store import tracking_uri
    from spine_ml.training.prior import gap_closed

    m = result.metrics
    folds, epochs = config.cv.folds, config.train.epochs
    lines = [
        f"trained {config.model.backbone}: {folds} folds x {epochs} epochs on {result.device} in "
        f"{_duration(result.wall_seconds)} (best epochs {', '.join(map(str, result.best_epochs))})",
        f"OOF score {m['score']:.4f}   spinal {m['spinal']:.4f}  foraminal {m['foraminal']:.4f}  "
        f"subarticular {m['subarticular']:.4f}  any_severe_spinal {m['any_severe_spinal']:.4f}",
    ]
    if reference["oracle"] is not None:
        closed = gap_closed(m["score"], reference["prior"], reference["oracle"])
        share = f"{closed:.0%}" if closed is not None else "n/a"
        lines.append(f"prior {reference['prior']:.4f}   oracle {reference['oracle']:.4f}   "
                     f"-> closes {share} of the prior->oracle gap")
    else:
        lines.append(f"prior (best constant) {reference['prior']:.4f}")
    lines += [
        f"inference {result.inference_seconds_per_study * 1000:.1f} ms/study per fold model on {result.device}",
        f"files: {result.oof_path.parent} (oof.csv, checkpoints/)",
        f"MLflow run {run_id} in experiment '{config.tracking.experiment}' ({tracking_uri(config)})",
        "open the MLflow UI: spine-ml ui   (then http://127.0.0.1:5000)",
    ]
    return lines


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def cli(args) -> int:
    from spine_ml.config import load_config

    config = load_config(args.config, args.overrides)
    result, run_id, reference = train(config)
    print("\n".join(summary_lines(config, result, run_id, reference)))
    return 0
