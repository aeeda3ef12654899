"""The inference budget: which member sets fit Kaggle's time limit, and the best score among them.

A member's test-time cost is folds x seconds-per-study (one fold model, as its run measured it) x the
number of test studies. A set's cost counts only the members its fitted blend keeps (weight > 0).
Every set is scored by nested cross-validation (validation.cross_validate); each member alone, raw,
and the plain average of all are candidates too (nothing fitted, so no CV needed), so the chosen
ensemble is never worse than the best member that fits the budget.
Up to EXHAUSTIVE_MEMBERS members every subset is tried; beyond that, a backward-elimination path
(drop the member whose loss costs the least in-sample score per hour saved) keeps the number of
cross-validated sets linear in the members.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.ensemble.objective import MetricProblem
from spine_ml.ensemble.select import Member
from spine_ml.ensemble.validation import cross_validate
from spine_ml.ensemble.weights import Blend, Method, fit_blend
from spine_ml.errors import UserError

EXHAUSTIVE_MEMBERS = 4


class BudgetError(UserError):
    """No member fits the inference budget."""


@dataclass(frozen=True)
class Candidate:
    """One member set, fitted on all OOF rows and scored by nested CV."""
    members: tuple[int, ...]  # indices into the member list, kept by the blend (weight > 0)
    blend: Blend  # weights over ALL members (zeros outside the set)
    cv_parts: dict[str, float]
    insample_score: float
    hours: float
    cv_probabilities: np.ndarray
    fitted: bool  # False: one member as it is (no weights, no calibration)
    tried: tuple[int, ...] = ()  # the set the blend was fitted on (members drops zero weights)
    temperature: bool = False  # temperatures were fitted (they may still have come out as 1)

    @property
    def cv_score(self) -> float:
        return self.cv_parts["score"]

    def label(self, members: list[Member]) -> str:
        names = "+".join(members[i].short_id for i in self.members)
        if not self.fitted:
            return f"{names} ({'raw' if len(self.members) == 1 else 'equal weights'})"
        return f"{names} ({'weights + temperatures' if self.temperature else 'weights'})"


def set_hours(members: list[Member], indices, studies: int) -> float:
    return float(sum(members[i].hours(studies) or 0.0 for i in indices))


def unfitted_candidate(problem: MetricProblem, predictions: np.ndarray, members: list[Member], indices,
                       studies: int) -> Candidate:
    """Equal weights over `indices`, no calibration: nothing is fitted, so its score needs no CV
    (one member alone is that member as it is)."""
    indices = tuple(int(i) for i in indices)
    weights = np.zeros(len(members))
    weights[list(indices)] = 1.0 / len(indices)
    blend = Blend(weights, np.ones(len(V.CONDITIONS)))
    probabilities = blend.apply(predictions, problem.conditions)
    parts = problem.parts(probabilities)
    return Candidate(indices, blend, parts, parts["score"], set_hours(members, indices, studies), probabilities,
                     fitted=False, tried=indices)


def fitted_candidate(problem: MetricProblem, predictions: np.ndarray, members: list[Member], indices,
                     folds: np.ndarray, studies: int, method: Method, temperature: bool) -> Candidate:
    indices = list(indices)
    subset = predictions[indices]
    blend = fit_blend(problem, subset, method, temperature)
    cv = cross_validate(problem, subset, folds, method, temperature)
    weights = np.zeros(len(members))
    weights[indices] = blend.weights
    kept = tuple(int(i) for i in np.flatnonzero(weights > 0))
    full = Blend(weights, blend.temperatures)
    insample = problem.score(full.apply(predictions, problem.conditions))
    return Candidate(kept, full, cv.parts, insample, set_hours(members, kept, studies), cv.probabilities, True,
                     tuple(indices), temperature)


def elimination_path(problem: MetricProblem, predictions: np.ndarray, members: list[Member], studies: int,
                     method: Method) -> list[tuple[int, ...]]:
    """Sets from all members down to two, each dropping the member that costs least score per hour."""
    current = list(range(len(members)))
    path = [tuple(current)]

    def insample(indices: list[int]) -> float:
        blend = fit_blend(problem, predictions[indices], method, temperature=False)
        return problem.score(blend.apply(predictions[indices], problem.conditions))

    while len(current) > 2:
        now = insample(current)

        def damage_per_hour(drop: int) -> tuple[float, float]:
            # a member the blend does not need (no loss) goes first, the dearest of those first
            loss = max(insample([i for i in current if i != drop]) - now, 0.0)
            hours = members[drop].hours(studies) or 0.0
            return loss / max(hours, 1e-9), -hours

        current.remove(min(current, key=damage_per_hour))
        path.append(tuple(current))
    return path


def member_sets(problem: MetricProblem, predictions: np.ndarray, members: list[Member], studies: int,
                method: Method) -> list[tuple[int, ...]]:
    """The sets of two or more members to fit and cross-validate."""
    count = len(members)
    if count <= EXHAUSTIVE_MEMBERS:
        return [s for size in range(2, count + 1) for s in itertools.combinations(range(count), size)]
    return elimination_path(problem, predictions, members, studies, method)


def evaluate(problem: MetricProblem, predictions: np.ndarray, members: list[Member], folds: np.ndarray,
             studies: int, method: Method = "scipy", temperature: bool = True, progress=None,
             sets: list[tuple[int, ...]] | None = None) -> list[Candidate]:
    """Every candidate: each member raw, each member calibrated, and each member set fitted
    (`sets`, default member_sets(...))."""
    if sets is None:
        sets = member_sets(problem, predictions, members, studies, method)
    everyone = tuple(range(len(members)))
    candidates = [unfitted_candidate(problem, predictions, members, (i,), studies) for i in everyone]
    if len(members) > 1:
        # Fewer fitted parameters can win on small data: the plain average, and weights without temperatures.
        candidates.append(unfitted_candidate(problem, predictions, members, everyone, studies))
        if temperature:
            candidates.append(fitted_candidate(problem, predictions, members, everyone, folds, studies, method, False))
    for indices in ([(i,) for i in everyone] if temperature else []) + list(sets):
        candidates.append(fitted_candidate(problem, predictions, members, indices, folds, studies, method, temperature))
        if progress is not None:
            progress.update(1)
    return candidates


def frontier(candidates: list[Candidate]) -> list[Candidate]:
    """The Pareto front: sorted by cost, each one scoring better than every cheaper one."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.hours, c.cv_score)):
        if not front or candidate.cv_score < front[-1].cv_score - 1e-12:
            front.append(candidate)
    return front


def check_affordable(members: list[Member], budget_hours: float, studies: int) -> None:
    """Fail before any fitting when not even the cheapest member fits the budget."""
    cheapest = min(members, key=lambda m: m.hours(studies) or 0.0)
    hours = cheapest.hours(studies) or 0.0
    if hours > budget_hours:
        raise BudgetError(
            f"no member fits an inference budget of {budget_hours:g} h for {studies} studies: the cheapest, "
            f"run {cheapest.run_id} ({cheapest.backbone}, {cheapest.folds} folds x {cheapest.seconds_per_study:.3g} "
            f"s/study), needs {hours:.2f} h; raise --budget-hours, lower --studies, or train faster models")


def choose(candidates: list[Candidate], budget_hours: float, members: list[Member], studies: int) -> Candidate:
    """The best cross-validated score among the candidates that fit the budget."""
    fitting = [c for c in candidates if c.hours <= budget_hours + 1e-12]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.hours)
        raise BudgetError(
            f"no member fits an inference budget of {budget_hours:g} h for {studies} studies: the cheapest, "
            f"{cheapest.label(members)}, needs {cheapest.hours:.2f} h; raise --budget-hours, lower --studies, "
            f"or train faster models")
    return min(fitting, key=lambda c: (c.cv_score, c.hours))
