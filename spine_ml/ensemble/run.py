"""`spine-ml ensemble`: members from MLflow -> blend fitted on OOF (scored by nested CV) under the
inference budget -> test predictions -> submission.csv, all recorded as one MLflow run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spine_ml.ensemble.objective import AlignmentError, MetricProblem, align_predictions
from spine_ml.ensemble.select import Member, SelectionError, select_members
from spine_ml.ensemble.weights import Method, equal_blend

if TYPE_CHECKING:
    import pandas as pd

    from spine_ml.config import Config
    from spine_ml.ensemble.report import EnsembleSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleOptions:
    top_k: int = 5
    per_backbone: int | None = None
    run_ids: tuple[str, ...] = ()
    budget_hours: float = 9.0
    studies: int = 700
    out: Path | None = Path("submission.csv")  # None: fit and log only, no test predictions
    method: Method = "scipy"
    temperature: bool = True
    cv_folds: int = 5
    localizer: object = None  # localizer run id or folder; None: the most recently chosen localizer run

    @classmethod
    def from_config(cls, config: Config, **changes) -> EnsembleOptions:
        section = config.ensemble
        base = cls(top_k=section.top_k, per_backbone=section.per_backbone, budget_hours=section.budget_hours,
                   studies=section.studies)
        return replace(base, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class EnsembleOutcome:
    summary: EnsembleSummary
    run_id: str
    submission: Path | None


def read_truth(config: Config) -> pd.DataFrame:
    from spine_ml.competition.tables import read_train_labels

    return read_train_labels(config.path(config.data.root) / "train.csv")


def aligned_members(members: list[Member], truth: pd.DataFrame) -> tuple[list[Member], np.ndarray]:
    """Members whose OOF covers every labelled row, and their (members, rows, 3) predictions over
    all truth rows; a member that does not cover them is skipped with a warning."""
    row_ids = truth.row_id.astype(str).to_numpy()
    required = truth.label.to_numpy() >= 0
    kept, arrays = [], []
    for member in members:
        try:
            arrays.append(align_predictions(member.oof, row_ids, f"run {member.run_id} oof.csv", required))
            kept.append(member)
        except AlignmentError as error:
            log.warning("%s (was it trained on another data set?); skipped", error)
    if not kept:
        raise SelectionError("no member's oof.csv covers the labelled rows of "
                             "train.csv; check data.root against the data the runs were trained on")
    return kept, np.stack(arrays)


def fit_ensemble(config: Config, members: list[Member], truth: pd.DataFrame,
                 options: EnsembleOptions) -> EnsembleSummary:
    """Score members, the equal blend and every member set; choose the best under the budget."""
    from spine_ml.ensemble.budget import check_affordable, choose, evaluate, frontier, member_sets
    from spine_ml.ensemble.report import EnsembleSummary
    from spine_ml.ensemble.validation import study_folds
    from spine_ml.progress import progress as progress_bar

    members, all_rows = aligned_members(members, truth)
    check_affordable(members, options.budget_hours, options.studies)
    scored = truth.label.to_numpy() >= 0
    problem = MetricProblem.from_truth(truth)
    predictions = all_rows[:, scored]
    folds = study_folds(problem.study_ids, options.cv_folds, config.cv.seed)
    sets = member_sets(problem, predictions, members, options.studies, options.method)
    with progress_bar(total=len(members) * options.temperature + len(sets), desc="ensemble: fitting member sets",
                      unit="set") as progress:
        candidates = evaluate(problem, predictions, members, folds, options.studies, options.method,
                              options.temperature, progress, sets)
    everyone = tuple(range(len(members)))
    all_fitted = next((c for c in candidates if c.fitted and c.tried == everyone and len(members) > 1
                       and c.temperature == options.temperature), None)
    return EnsembleSummary(
        members=members, member_parts=[problem.parts(p) for p in predictions],
        equal_parts=problem.parts(equal_blend(len(members)).apply(predictions, problem.conditions)),
        chosen=choose(candidates, options.budget_hours, members, options.studies), all_fitted=all_fitted,
        front=frontier(candidates), budget_hours=options.budget_hours, studies=options.studies,
        cv_folds=int(folds.max()) + 1, method=options.method)


def full_oof_probabilities(summary: EnsembleSummary, truth: pd.DataFrame) -> np.ndarray:
    """The ensemble's OOF over every truth row: cross-validated where labelled, the final blend elsewhere."""
    from spine_ml.ensemble.objective import CONDITION_INDEX

    members, all_rows = aligned_members(summary.members, truth)
    conditions = truth.condition.map(CONDITION_INDEX).to_numpy()
    probabilities = summary.chosen.blend.apply(all_rows, conditions)
    probabilities[truth.label.to_numpy() >= 0] = summary.chosen.cv_probabilities
    return probabilities


def fit_with_test_predictions(config: Config, members: list[Member], truth: pd.DataFrame,
                              options: EnsembleOptions, test) -> tuple[EnsembleSummary, dict[int, np.ndarray]]:
    """Fit, then fetch the chosen members' test predictions; refit without any member that cannot
    give them, until every chosen member can."""
    from spine_ml.ensemble.testpred import chosen_test_predictions, submission_row_ids

    while True:
        summary = fit_ensemble(config, members, truth, options)
        if test is None:
            return summary, {}
        arrays, failed = chosen_test_predictions(config, summary, test, submission_row_ids(test.studies))
        if not failed:
            return summary, arrays
        members = [m for m in summary.members if m.run_id not in failed]
        if not members:
            raise SelectionError("no member could predict the test set; see the warnings above")


def run_ensemble(config: Config, options: EnsembleOptions) -> EnsembleOutcome:
    from spine_ml.competition.submission import normalised_frame
    from spine_ml.ensemble.report import format_summary, log_ensemble_run

    test = None
    if options.out is not None:  # before selection: a missing localizer or test list fails in seconds
        from spine_ml.ensemble.testpred import prepare_test_set

        test = prepare_test_set(config, options.localizer)
    members = select_members(config, options.top_k, options.per_backbone, list(options.run_ids),
                             prediction_key=test.key if test else None)
    truth = read_truth(config)
    summary, test_arrays = fit_with_test_predictions(config, members, truth, options, test)
    submission = None
    if test is not None:
        from spine_ml.ensemble.testpred import write_submission

        submission = write_submission(config, summary, Path(options.out), test, test_arrays)
    oof = normalised_frame(truth.row_id.astype(str).to_numpy(), full_oof_probabilities(summary, truth))
    run_id = log_ensemble_run(config, summary, oof, submission)
    print(format_summary(summary))
    print(f"ensemble run {run_id} (experiment {config.tracking.experiment!r})")
    if submission is not None:
        print(f"wrote {submission} ({len(summary.chosen.members)} member(s), validated)")
    return EnsembleOutcome(summary=summary, run_id=run_id, submission=submission)


def cli(args) -> int:
    from spine_ml.config import load_config

    config = load_config(args.config, args.overrides)
    options = EnsembleOptions.from_config(
        config, top_k=args.top_k, run_ids=tuple(args.runs or ()), budget_hours=args.budget_hours,
        studies=args.studies)
    options = replace(options, out=None if args.no_submission else Path(args.out), localizer=args.localizer)
    run_ensemble(config, options)
    return 0
