"""The floor and the ceiling of a synthetic data set, scored with the project's metric and readers.

- oracle: the true class probabilities (oracle_*.csv) against the drawn labels: the best any model
  can expect (a model trained with 1/2/4 class weights may score a little below it, because the
  metric weights rows by their true class).
- best constant prior: per condition-level class frequencies of the labels, re-weighted by 1/2/4
  and normalised, scored in-sample: the figure to beat with no image at all.
A model's quality is the fraction of the gap between the two that it closes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import metric
from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame
from spine_ml.competition.tables import read_train_labels


def best_constant_prior(truth: pd.DataFrame) -> pd.DataFrame:
    """Submission-layout frame: every row gets its condition-level's weighted class frequencies."""
    known = truth[truth.label >= 0]
    counts = (known.groupby(["condition", "level"]).label.value_counts().unstack(fill_value=0)
              .reindex(columns=range(3), fill_value=0))
    weighted = counts.to_numpy(np.float64) * np.asarray(V.SAMPLE_WEIGHTS)
    table = pd.DataFrame(weighted, index=counts.index)
    keys = pd.MultiIndex.from_arrays([truth.condition, truth.level])
    values = table.reindex(keys).fillna(1.0).to_numpy()  # a condition-level never labelled: uniform
    return normalised_frame(truth.row_id.to_numpy(), values)


def gap_closed(model: float, oracle: float, prior: float) -> float:
    """1.0 = as good as the oracle, 0.0 = no better than the constant prior."""
    return (prior - model) / (prior - oracle)


def score_pair(labels_csv: Path, oracle_csv: Path) -> tuple[metric.Score, metric.Score]:
    truth = read_train_labels(labels_csv)
    oracle = pd.read_csv(oracle_csv)
    with warnings.catch_warnings():  # tiny sets may leave a metric part without rows: fine here
        warnings.simplefilter("ignore")
        return metric.score(truth, oracle, str(oracle_csv)), metric.score(truth, best_constant_prior(truth), "prior")


def floor_and_ceiling(out: Path) -> tuple[metric.Score, metric.Score]:
    """(oracle, best constant prior) scores against the drawn train labels of a data set."""
    return score_pair(Path(out) / "train.csv", Path(out) / "oracle_train.csv")
