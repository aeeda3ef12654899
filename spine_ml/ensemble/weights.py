"""Blend weights and calibration fitted on OOF predictions under the competition metric.

A blend is a convex combination of the members' probabilities (weights >= 0, summing to 1) followed
by a per-condition temperature on the log-probabilities. Weights come from Caruana's greedy
ensemble selection with replacement, refined by SLSQP on the simplex; the better of the two (on the
rows being fitted) is kept. Weights below MIN_WEIGHT are dropped and the rest renormalised: a member
with a tiny weight still costs its full inference time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.competition.metric import EPS
from spine_ml.ensemble.objective import MetricProblem

Method = Literal["scipy", "caruana"]
MIN_WEIGHT = 0.01
CARUANA_ROUNDS = 40
CARUANA_PATIENCE = 6
TEMPERATURE_BOUNDS = (0.25, 4.0)


@dataclass(frozen=True)
class Blend:
    """Member weights (summing to 1) and one temperature per condition (1.0 = unchanged)."""
    weights: np.ndarray  # (members,)
    temperatures: np.ndarray  # (len(V.CONDITIONS),)

    def apply(self, predictions: np.ndarray, conditions: np.ndarray) -> np.ndarray:
        """(members, rows, 3) member probabilities -> (rows, 3) blended, calibrated, normalised."""
        return calibrate(mix(predictions, self.weights), conditions, self.temperatures)

    @property
    def calibrated(self) -> bool:
        return bool(np.any(np.abs(self.temperatures - 1.0) > 1e-9))


def mix(predictions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(members, rows, 3) x (members,) -> (rows, 3)."""
    members, rows, classes = predictions.shape
    return (weights @ predictions.reshape(members, rows * classes)).reshape(rows, classes)


def calibrate(probabilities: np.ndarray, conditions: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """softmax(log p / T[condition]) row by row; T > 1 softens, T < 1 sharpens."""
    # No max-subtraction needed: log p >= log(eps) and T >= 0.25 keep exp() far from underflow,
    # and every row has a probability >= 1/3. (A row-wise max over 3 columns costs more than all else.)
    exp = np.exp(np.log(np.clip(probabilities, EPS, None)) / temperatures[conditions][:, None])
    return exp / (exp[:, 0] + exp[:, 1] + exp[:, 2])[:, None]


def caruana_weights(score, predictions: np.ndarray, rounds: int = CARUANA_ROUNDS) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al. 2004), starting from the best member;
    weights are the selection counts of the best-scoring round. `score`: mix -> metric."""
    members = len(predictions)
    scores = [score(p) for p in predictions]
    counts = np.zeros(members)
    counts[int(np.argmin(scores))] = 1
    total = predictions[int(np.argmin(scores))].copy()
    best_counts, best_score = counts.copy(), min(scores)
    stale = 0
    for _ in range(rounds):
        n = counts.sum()
        trials = [score((total + predictions[m]) / (n + 1)) for m in range(members)]
        pick = int(np.argmin(trials))
        counts[pick] += 1
        total += predictions[pick]
        if trials[pick] < best_score - 1e-12:
            best_counts, best_score, stale = counts.copy(), trials[pick], 0
        else:
            stale += 1
            if stale >= CARUANA_PATIENCE:  # later rounds only re-weight by small steps; SLSQP does that
                break
    return best_counts / best_counts.sum()


def simplex_weights(score, predictions: np.ndarray, start: np.ndarray) -> np.ndarray:
    """SLSQP from `start`: minimise score(mix) subject to w >= 0, sum(w) = 1."""
    from scipy.optimize import minimize

    members = len(predictions)
    if members == 1:
        return np.ones(1)

    def objective(w: np.ndarray) -> float:
        w = np.clip(w, 0, None)
        return score(mix(predictions, w / max(w.sum(), EPS)))

    result = minimize(objective, start, method="SLSQP", bounds=[(0.0, 1.0)] * members,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                      options={"maxiter": 200, "ftol": 1e-9})
    weights = np.clip(result.x, 0, None)
    return weights / weights.sum() if weights.sum() > 0 else start


def prune(weights: np.ndarray, minimum: float = MIN_WEIGHT) -> np.ndarray:
    """Zero weights under `minimum` (keeping the largest), renormalise."""
    kept = np.where(weights >= minimum, weights, 0.0)
    if kept.sum() <= 0:
        kept = np.zeros_like(weights)
        kept[int(np.argmax(weights))] = 1.0
    return kept / kept.sum()


def fit_weights(problem: MetricProblem, predictions: np.ndarray, method: Method = "scipy",
                temperatures: np.ndarray | None = None, start: np.ndarray | None = None) -> np.ndarray:
    """Weights minimising the metric of the mix (calibrated by `temperatures` when given).
    Caruana's greedy search, then SLSQP from its result; with `start`, SLSQP from there instead."""
    if temperatures is None:
        score = problem.score
    else:
        def score(probabilities: np.ndarray) -> float:
            return problem.score(calibrate(probabilities, problem.conditions, temperatures))
    greedy = start if start is not None and method == "scipy" else caruana_weights(score, predictions)
    candidates = [prune(greedy)]
    if method == "scipy":
        candidates.append(prune(simplex_weights(score, predictions, greedy)))
    scores = [score(mix(predictions, w)) for w in candidates]
    return candidates[int(np.argmin(scores))]


def fit_temperatures(problem: MetricProblem, probabilities: np.ndarray) -> np.ndarray:
    """One temperature per condition, jointly (the spinal one moves two metric parts), in log space."""
    from scipy.optimize import minimize

    low, high = np.log(TEMPERATURE_BOUNDS)
    present = np.isin(np.arange(len(V.CONDITIONS)), problem.conditions)

    def objective(log_t: np.ndarray) -> float:
        return problem.score(calibrate(probabilities, problem.conditions, np.exp(log_t)))

    start = np.zeros(len(V.CONDITIONS))
    bounds = [(low, high) if here else (0.0, 0.0) for here in present]
    result = minimize(objective, start, method="L-BFGS-B", bounds=bounds, options={"maxiter": 100})
    fitted = np.exp(result.x) if result.fun < objective(start) else np.ones(len(V.CONDITIONS))
    return fitted


def fit_blend(problem: MetricProblem, predictions: np.ndarray, method: Method = "scipy",
              temperature: bool = True) -> Blend:
    """Weights, then temperatures on their mix, then (with temperatures) the weights again under
    those temperatures and the temperatures once more: averaging also softens, so weights fitted
    without calibration favour blending for its softening alone."""
    predictions = np.ascontiguousarray(predictions)  # fitted hundreds of times: one copy, not one per mix
    weights = fit_weights(problem, predictions, method)
    if not temperature:
        return Blend(weights=weights, temperatures=np.ones(len(V.CONDITIONS)))
    temperatures = fit_temperatures(problem, mix(predictions, weights))
    if len(predictions) > 1:
        weights = fit_weights(problem, predictions, method, temperatures, start=weights)
        temperatures = fit_temperatures(problem, mix(predictions, weights))
    return Blend(weights=weights, temperatures=temperatures)


def equal_blend(members: int) -> Blend:
    return Blend(weights=np.full(members, 1.0 / members), temperatures=np.ones(len(V.CONDITIONS)))
