"""The competition metric, written from its specification (../shared/reference/competition.md).

score = mean(spinal, foraminal, subarticular, any_severe_spinal), each a sample-weighted log loss
with weights 1/2/4 by the true class; rows with no truth are not scored.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError

EPS = float(np.finfo(np.float64).eps)


class SubmissionError(UserError):
    """Predictions that cannot be scored; the message names the rows."""


@dataclass(frozen=True)
class Score:
    score: float
    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def weighted_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """Multi-class log loss, sklearn semantics: clip to [eps, 1-eps], weighted mean of -log p_true."""
    p_true = np.clip(probs[np.arange(len(labels)), labels], EPS, 1 - EPS)
    return float(np.sum(weights * -np.log(p_true)) / np.sum(weights))


def binary_log_loss(targets: np.ndarray, p_positive: np.ndarray, weights: np.ndarray) -> float:
    p = np.clip(p_positive, EPS, 1 - EPS)
    losses = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    return float(np.sum(weights * losses) / np.sum(weights))


def check_predictions(frame: pd.DataFrame, where: str = "submission") -> np.ndarray:
    """Probability columns as float64; non-numeric, non-finite or negative values are errors naming rows."""
    missing = [c for c in V.SUBMISSION_COLUMNS if c not in frame.columns]
    if missing:
        raise SubmissionError(f"{where}: missing column(s) {', '.join(missing)}; expected {','.join(V.SUBMISSION_COLUMNS)}")
    values = frame[list(V.PROBABILITY_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values).all(1) | (values < 0).any(1)
    if bad.any():
        rows = frame.row_id.to_numpy()[bad]
        raise SubmissionError(
            f"{where}: {bad.sum()} row(s) with non-finite, non-numeric or negative probabilities, e.g. "
            f"{', '.join(map(str, rows[:5]))}"
        )
    return values


def normalise_rows(values: np.ndarray, where: str = "submission") -> np.ndarray:
    sums = values.sum(1, keepdims=True)
    off = np.abs(sums[:, 0] - 1) > 1e-6
    if off.any():
        warnings.warn(f"{where}: {off.sum()} row(s) do not sum to 1; normalised before scoring", stacklevel=2)
        if (sums[:, 0] == 0).any():
            raise SubmissionError(f"{where}: rows whose probabilities are all zero cannot be normalised")
        values = values / sums
    return values


def score(truth: pd.DataFrame, submission: pd.DataFrame, where: str = "submission") -> Score:
    """truth: long form (row_id, label with -1 for missing, sample_weight); submission: submission layout."""
    scored = truth[truth.label >= 0]
    values = check_predictions(submission, where)  # first: it names missing columns (row_id among them)
    if submission.row_id.duplicated().any():
        raise SubmissionError(f"{where}: duplicate row_id(s) {list(submission.row_id[submission.row_id.duplicated()][:5])}")
    probs = normalise_rows(values, where)
    position = pd.Series(np.arange(len(submission)), index=submission.row_id.to_numpy())
    index = position.reindex(scored.row_id.to_numpy())
    if index.isna().any():
        absent = scored.row_id.to_numpy()[index.isna().to_numpy()]
        raise SubmissionError(
            f"{where}: {len(absent)} row(s) of the truth are missing, e.g. {', '.join(absent[:5])}"
        )
    p = probs[index.to_numpy(int)]
    labels = scored.label.to_numpy(int)
    weights = scored.sample_weight.to_numpy(np.float64)
    row_ids = scored.row_id.astype(str)

    parts: dict[str, float] = {}
    for group in V.GROUPS:
        mask = row_ids.str.contains(group).to_numpy()
        parts[group] = weighted_log_loss(labels[mask], p[mask], weights[mask]) if mask.any() else float("nan")

    spinal = pd.DataFrame({
        "study_id": scored.study_id.to_numpy()[row_ids.str.contains("spinal").to_numpy()],
        "target": (labels == 2)[row_ids.str.contains("spinal").to_numpy()],
        "severe": p[row_ids.str.contains("spinal").to_numpy(), 2],
        "weight": weights[row_ids.str.contains("spinal").to_numpy()],
    })
    if len(spinal):
        per_study = spinal.groupby("study_id").agg(target=("target", "max"), severe=("severe", "max"), weight=("weight", "max"))
        parts["any_severe_spinal"] = binary_log_loss(
            per_study.target.to_numpy(float), per_study.severe.to_numpy(), per_study.weight.to_numpy()
        )
    else:
        parts["any_severe_spinal"] = float("nan")
    values = [parts[k] for k in V.GROUPS] + [parts["any_severe_spinal"]]
    if any(np.isnan(values)):
        warnings.warn(f"{where}: some metric parts have no scored rows; the total averages the others", stacklevel=2)
    return Score(score=float(np.nanmean(values)), **parts)
