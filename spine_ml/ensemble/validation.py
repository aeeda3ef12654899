"""Nested cross-validation of a blend: the reported ensemble score is never fitted in-sample.

The members' OOF predictions are split by study (a study's 25 rows, and its any_severe_spinal term,
stay together); weights and temperatures are fitted on the other studies and applied to the held-out
ones; the held-out predictions, put back together, are scored once, like an OOF file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ml.ensemble.objective import MetricProblem
from spine_ml.ensemble.weights import Blend, Method, fit_blend

DEFAULT_FOLDS = 5


def study_folds(study_ids: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of each row, by study: a seeded shuffle of the sorted unique studies."""
    studies = np.unique(study_ids)
    folds = max(2, min(folds, len(studies)))
    order = np.random.default_rng(seed).permutation(len(studies))
    fold_of_study = np.empty(len(studies), dtype=np.int64)
    fold_of_study[order] = np.arange(len(studies)) % folds
    return fold_of_study[np.searchsorted(studies, study_ids)]


@dataclass(frozen=True)
class CrossValidated:
    probabilities: np.ndarray  # (rows, 3) held-out predictions
    parts: dict[str, float]  # the metric on them
    blends: list[Blend]  # one per outer fold

    @property
    def score(self) -> float:
        return self.parts["score"]


def cross_validate(problem: MetricProblem, predictions: np.ndarray, folds: np.ndarray,
                   method: Method = "scipy", temperature: bool = True) -> CrossValidated:
    """Fit on all folds but one, predict that one, for every fold; score the assembled predictions."""
    held_out = np.empty((len(problem), 3))
    blends = []
    for fold in np.unique(folds):
        test = folds == fold
        blend = fit_blend(problem.restrict(~test), predictions[:, ~test], method, temperature)
        held_out[test] = blend.apply(predictions[:, test], problem.conditions[test])
        blends.append(blend)
    return CrossValidated(probabilities=held_out, parts=problem.parts(held_out), blends=blends)
