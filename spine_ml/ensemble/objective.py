"""The competition metric on a fixed set of scored rows, vectorised for the thousands of evaluations
a weight search makes.

`spine_ml.competition.metric.score` is the reference (pandas, one call per submission); this is the
same arithmetic on arrays aligned once: rows with truth only, sample weights 1/2/4, probabilities
clipped to [eps, 1-eps], any_severe_spinal as the per-study max of the spinal `severe` column.
A test checks the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.competition.metric import EPS
from spine_ml.errors import UserError

CONDITION_INDEX = {c: i for i, c in enumerate(V.CONDITIONS)}
GROUP_INDEX = {g: i for i, g in enumerate(V.GROUPS)}


class AlignmentError(UserError):
    """Predictions that do not cover the rows they must be scored on."""


@dataclass
class MetricProblem:
    """Scored rows in a fixed order: labels, weights, condition and study of each row."""
    row_ids: np.ndarray  # str
    study_ids: np.ndarray  # int64
    labels: np.ndarray  # 0/1/2
    weights: np.ndarray  # 1/2/4
    conditions: np.ndarray  # index into V.CONDITIONS
    # Derived once in __post_init__:
    groups: np.ndarray = field(init=False, repr=False)  # index into V.GROUPS
    group_weight: np.ndarray = field(init=False, repr=False)
    spinal_rows: np.ndarray = field(init=False, repr=False)  # spinal rows, grouped by study
    spinal_starts: np.ndarray = field(init=False, repr=False)  # first position of each study's block
    study_target: np.ndarray = field(init=False, repr=False)  # any severe spinal, per study
    study_weight: np.ndarray = field(init=False, repr=False)
    true_index: np.ndarray = field(init=False, repr=False)  # flat index of each row's true class

    @classmethod
    def from_truth(cls, truth: pd.DataFrame) -> MetricProblem:
        """From the long form of train.csv (`tables.read_train_labels`): rows with a label only."""
        scored = truth[truth.label >= 0]
        return cls(row_ids=scored.row_id.astype(str).to_numpy(),
                   study_ids=scored.study_id.to_numpy(np.int64),
                   labels=scored.label.to_numpy(np.int64),
                   weights=scored.sample_weight.to_numpy(np.float64),
                   conditions=scored.condition.map(CONDITION_INDEX).to_numpy(np.int64))

    def __post_init__(self) -> None:
        self.true_index = np.arange(len(self.labels)) * 3 + self.labels
        self.groups = np.array([GROUP_INDEX[V.condition_group(c)] for c in V.CONDITIONS])[self.conditions]
        self.group_weight = np.bincount(self.groups, weights=self.weights, minlength=len(V.GROUPS))
        # any_severe_spinal: spinal rows sorted by study, so a study's rows are one contiguous block.
        spinal = np.flatnonzero(self.groups == GROUP_INDEX["spinal"])
        self.spinal_rows = spinal[np.argsort(self.study_ids[spinal], kind="stable")]
        studies = self.study_ids[self.spinal_rows]
        self.spinal_starts = np.flatnonzero(np.r_[True, studies[1:] != studies[:-1]]) if len(spinal) else spinal
        severe = (self.labels[self.spinal_rows] == 2).astype(np.float64)
        weights = self.weights[self.spinal_rows]
        self.study_target = np.maximum.reduceat(severe, self.spinal_starts) if len(spinal) else severe
        self.study_weight = np.maximum.reduceat(weights, self.spinal_starts) if len(spinal) else weights

    def __len__(self) -> int:
        return len(self.row_ids)

    def restrict(self, rows: np.ndarray) -> MetricProblem:
        """The same problem on a subset of rows (a boolean mask or indices), e.g. some studies only."""
        return MetricProblem(self.row_ids[rows], self.study_ids[rows], self.labels[rows],
                             self.weights[rows], self.conditions[rows])

    def parts(self, probabilities: np.ndarray) -> dict[str, float]:
        """score, spinal, foraminal, subarticular, any_severe_spinal of (rows, 3) probabilities."""
        p_true = np.clip(probabilities.reshape(-1)[self.true_index], EPS, 1 - EPS)
        weighted = self.weights * -np.log(p_true)
        sums = np.bincount(self.groups, weights=weighted, minlength=len(V.GROUPS))
        with np.errstate(invalid="ignore", divide="ignore"):
            losses = sums / self.group_weight  # nan for a group with no rows, as the reference
        parts = dict(zip(V.GROUPS, losses.tolist()))
        parts["any_severe_spinal"] = self._any_severe(probabilities)
        values = np.array([parts[g] for g in V.GROUPS] + [parts["any_severe_spinal"]])
        total = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
        return {"score": total, **parts}

    def score(self, probabilities: np.ndarray) -> float:
        return self.parts(probabilities)["score"]

    def _any_severe(self, probabilities: np.ndarray) -> float:
        if not len(self.spinal_rows):
            return float("nan")
        severe = np.maximum.reduceat(probabilities[self.spinal_rows, 2], self.spinal_starts)
        p = np.clip(severe, EPS, 1 - EPS)
        target = self.study_target
        losses = -(target * np.log(p) + (1 - target) * np.log(1 - p))
        return float(np.sum(self.study_weight * losses) / np.sum(self.study_weight))


def align_predictions(frame: pd.DataFrame, row_ids: np.ndarray, where: str,
                      required: np.ndarray | None = None) -> np.ndarray:
    """(len(row_ids), 3) probabilities of `frame` (submission layout) in the order of `row_ids`.

    Rows in `required` (default: all) must be present; other absent rows get 1/3 each (they carry no
    truth, so they are never scored). Rows are normalised, as the metric does.
    """
    from spine_ml.competition.metric import check_predictions

    values = check_predictions(frame, where)
    position = pd.Series(np.arange(len(frame)), index=frame.row_id.astype(str).to_numpy())
    if position.index.duplicated().any():
        raise AlignmentError(f"{where}: duplicate row_id(s), e.g. {list(position.index[position.index.duplicated()][:3])}")
    index = position.reindex(row_ids).to_numpy()
    absent = np.isnan(index)
    must = absent if required is None else absent & required
    if must.any():
        raise AlignmentError(f"{where}: {int(must.sum())} row(s) with truth are missing, e.g. "
                             f"{', '.join(map(str, np.asarray(row_ids)[must][:3]))}")
    out = np.full((len(row_ids), 3), 1.0 / 3)
    out[~absent] = values[index[~absent].astype(np.int64)]
    sums = out.sum(1, keepdims=True)
    return np.where(sums > 0, out / np.where(sums > 0, sums, 1), 1.0 / 3)
