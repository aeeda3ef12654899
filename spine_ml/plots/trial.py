"""Per-trial plots of the out-of-fold predictions against the train labels.

- confusion.png: one 3x3 confusion matrix per condition (rows: true severity, columns: the
  argmax prediction; colour: the share of the true class, text: counts), with each condition's
  sample-weighted log loss in its title.
- reliability.png: per severity class, the observed frequency of that class against the mean
  predicted probability in equal-width bins (a calibrated model lies on the diagonal), with the
  expected calibration error (ECE) and a histogram of the predicted probabilities underneath.

Only rows with a truth label are drawn (blank cells in train.csv are not scored either).
"""
from __future__ import annotations

import logging
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from spine_ml.config import Config

log = logging.getLogger(__name__)
ARTIFACT_FOLDER = "plots"
CONFUSION_FILE = "confusion.png"
RELIABILITY_FILE = "reliability.png"
RELIABILITY_BINS = 10
DPI = 100


def scored_rows(truth: pd.DataFrame, oof: pd.DataFrame) -> pd.DataFrame:
    """The labelled truth rows (long form) joined to their OOF predictions by row_id."""
    labelled = truth.loc[truth.label >= 0, ["row_id", "condition", "label", "sample_weight"]]
    rows = labelled.merge(oof[list(V.SUBMISSION_COLUMNS)], on="row_id", how="inner", validate="one_to_one")
    if rows.empty:
        raise ValueError("no out-of-fold prediction has a truth label (do the row ids match train.csv?)")
    return rows


def probabilities(rows: pd.DataFrame) -> np.ndarray:
    values = rows[list(V.PROBABILITY_COLUMNS)].to_numpy(np.float64)
    return values / values.sum(axis=1, keepdims=True)


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(3, 3) counts: [true class, predicted class]."""
    classes = len(V.SEVERITIES)
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def reliability_bins(predicted: np.ndarray, hit: np.ndarray, bins: int = RELIABILITY_BINS) -> pd.DataFrame:
    """Per non-empty equal-width bin of `predicted`: mean predicted, observed frequency of `hit`, count."""
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": which, "predicted": predicted, "hit": hit.astype(float)})
    grouped = frame.groupby("bin").agg(predicted=("predicted", "mean"), observed=("hit", "mean"),
                                       count=("hit", "size"))
    return grouped.reset_index()


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Count-weighted mean |observed - predicted| over the bins of `reliability_bins`."""
    return float((table["count"] * (table.observed - table.predicted).abs()).sum() / table["count"].sum())


def confusion_figure(rows: pd.DataFrame) -> Figure:
    from matplotlib.figure import Figure

    from spine_ml.competition.metric import weighted_log_loss

    short = ["normal/\nmild", "moderate", "severe"]
    probs = probabilities(rows)
    figure = Figure(figsize=(3.2 * len(V.CONDITIONS), 3.9), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, len(V.CONDITIONS))
    for ax, condition in zip(axes, V.CONDITIONS):
        mask = (rows.condition == condition).to_numpy()
        labels = rows.label.to_numpy(int)[mask]
        counts = confusion_counts(labels, probs[mask].argmax(axis=1))
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (true, pred), count in np.ndenumerate(counts):
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=10,
                    color="white" if share[true, pred] > 0.6 else "black")
        weights = rows.sample_weight.to_numpy(float)[mask]
        loss = weighted_log_loss(labels, probs[mask], weights) if mask.any() else np.nan
        ax.set_title(f"{textwrap.fill(V.CONDITION_TITLES[condition], 22)}\nn={mask.sum()}  log loss {loss:.3f}",
                     fontsize=9)
        ax.set_xticks(range(3), short, fontsize=8)
        ax.set_yticks(range(3), short, fontsize=8)
        ax.set_xlabel("predicted (argmax)", fontsize=8)
    axes[0].set_ylabel("true severity", fontsize=8)
    figure.suptitle("Out-of-fold confusion per condition (colour: share of the true class)", fontsize=10)
    return figure


def reliability_figure(rows: pd.DataFrame, bins: int = RELIABILITY_BINS) -> Figure:
    from matplotlib.figure import Figure

    probs = probabilities(rows)
    labels = rows.label.to_numpy(int)
    figure = Figure(figsize=(4 * len(V.SEVERITIES), 5.2), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(2, len(V.SEVERITIES), height_ratios=(3, 1))
    edges = np.linspace(0, 1, bins + 1)
    for k, severity in enumerate(V.SEVERITIES):
        table = reliability_bins(probs[:, k], labels == k, bins)
        curve = figure.add_subplot(grid[0, k])
        curve.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        curve.plot(table.predicted, table.observed, color="C0", linewidth=1)
        curve.scatter(table.predicted, table.observed, s=12 + 60 * table["count"] / table["count"].max(),
                      color="C0", zorder=3, label="bins (size: rows)")
        curve.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency" if k == 0 else None)
        curve.tick_params(labelbottom=False)
        curve.set_title(f"{severity}: ECE {expected_calibration_error(table):.3f}, "
                        f"{int((labels == k).sum())}/{len(labels)} rows", fontsize=9)
        if k == 0:
            curve.legend(loc="upper left", fontsize=8)
        histogram = figure.add_subplot(grid[1, k], sharex=curve)
        histogram.hist(probs[:, k], bins=edges, color="C0", alpha=0.7)
        histogram.set_xlabel(f"predicted P({severity})", fontsize=8)
        if k == 0:
            histogram.set_ylabel("rows", fontsize=8)
    figure.suptitle(f"Out-of-fold reliability per severity class ({bins} bins, unweighted)", fontsize=10)
    return figure


def write_trial_plots(truth: pd.DataFrame, oof: pd.DataFrame, folder: Path) -> list[Path]:
    """confusion.png and reliability.png of `oof` (submission layout) against `truth` (long form)."""
    rows = scored_rows(truth, oof)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in ((CONFUSION_FILE, confusion_figure(rows)), (RELIABILITY_FILE, reliability_figure(rows))):
        figure.savefig(folder / name, dpi=DPI)
        paths.append(folder / name)
    return paths


def train_truth(config: Config) -> pd.DataFrame:
    """The long-form train labels of the config's data root."""
    from spine_ml.competition.tables import read_train_labels

    return read_train_labels(config.path(config.data.root) / "train.csv")


def log_trial_plots(mlflow_client, run_id: str, config: Config, oof: pd.DataFrame,
                    truth: pd.DataFrame | None = None) -> list[str]:
    """Log plots/confusion.png and plots/reliability.png to the run; returns the artifact paths.

    Never raises: a trial's record matters more than its pictures, so a failure is a warning.
    """
    try:
        truth = train_truth(config) if truth is None else truth
        with tempfile.TemporaryDirectory(prefix="spine-ml-plots-") as folder:
            paths = write_trial_plots(truth, oof, Path(folder))
            for path in paths:
                mlflow_client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_FOLDER)
        return [f"{ARTIFACT_FOLDER}/{path.name}" for path in paths]
    except Exception as error:  # noqa: BLE001 - plots are optional extras of a run
        log.warning("run %s: trial plots not logged (%s: %s)", run_id, type(error).__name__, error)
        return []
