"""Ensemble fitting at competition scale: how long the weight search, nested CV and budget frontier
take on 1,975 studies x 25 rows, and what they gain over the best member.

Truth: the real public train.csv labels (../shared/data/rsna2024/train.csv), else the synthetic
latent model of tests/test_ensemble.py. Members: log prior + signal towards the true label + noise,
part of it shared by all members (real models make correlated mistakes) and part their own, with
noise growing member by member; inference costs 0.5-2.5 s/study/fold, 5 folds.

    .venv/bin/python bench/bench_ensemble.py                       # 5 members, correlation 0.5
    .venv/bin/python bench/bench_ensemble.py --members 8 --correlation 0.8 --budget-hours 9

Prints one `name value` per line: member scores, the equal blend, the fitted blend in-sample and
cross-validated, `gain_over_best_member` (CV), the chosen set under the budget, and seconds per step.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna2024" / "train.csv"


def load_truth(path: Path) -> pd.DataFrame:
    from spine_ml.competition.tables import read_train_labels

    return read_train_labels(path)


def make_members(truth: pd.DataFrame, count: int, correlation: float, seed: int) -> np.ndarray:
    """(members, scored rows, 3) predictions of falling quality with partly shared errors."""
    from spine_ml.training.prior import prior_probabilities, prior_table

    scored = truth[truth.label >= 0]
    rng = np.random.default_rng(seed)
    base = np.log(prior_probabilities(scored, prior_table(scored)))
    signal = 1.2 * (np.eye(3)[scored.label.to_numpy()] - 1 / 3)
    shared = rng.normal(size=base.shape)
    members = []
    for m in range(count):
        own = rng.normal(size=base.shape)
        noise = (0.8 + 0.15 * m) * (np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * own)
        logits = base + signal + noise
        members.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    return np.stack(members)


def fake_members(count: int):
    from spine_ml.ensemble.select import Member

    return [Member(run_id=f"{i:08d}".ljust(32, "0"), name=f"m{i}", backbone="bench", logged_score=0.0, folds=5,
                   seconds_per_study=0.5 + 0.5 * i, oof=pd.DataFrame()) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truth", type=Path, default=REAL_LABELS)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--correlation", type=float, default=0.5)
    parser.add_argument("--budget-hours", type=float, default=9.0)
    parser.add_argument("--studies", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from spine_ml.ensemble.budget import choose, evaluate, frontier
    from spine_ml.ensemble.objective import MetricProblem
    from spine_ml.ensemble.validation import cross_validate, study_folds
    from spine_ml.ensemble.weights import equal_blend, fit_blend

    truth = load_truth(args.truth)
    problem = MetricProblem.from_truth(truth)
    predictions = make_members(truth, args.members, args.correlation, args.seed)
    print(f"studies {truth.study_id.nunique()}")
    print(f"scored_rows {len(problem)}")
    for index, member in enumerate(predictions):
        print(f"member{index}_score {problem.score(member):.4f}")
    best = min(problem.score(p) for p in predictions)
    print(f"equal_blend_score {problem.score(equal_blend(args.members).apply(predictions, problem.conditions)):.4f}")

    start = time.perf_counter()
    [problem.score(predictions[0]) for _ in range(50)]
    print(f"metric_eval_ms {(time.perf_counter() - start) / 50 * 1000:.2f}")
    start = time.perf_counter()
    blend = fit_blend(problem, predictions)
    print(f"fit_seconds {time.perf_counter() - start:.2f}")
    print(f"fitted_insample_score {problem.score(blend.apply(predictions, problem.conditions)):.4f}")
    print("weights " + ",".join(f"{w:.3f}" for w in blend.weights))
    print("temperatures " + ",".join(f"{t:.2f}" for t in blend.temperatures))
    folds = study_folds(problem.study_ids, 5, args.seed)
    start = time.perf_counter()
    cv = cross_validate(problem, predictions, folds)
    print(f"cv_seconds {time.perf_counter() - start:.2f}")
    print(f"fitted_cv_score {cv.score:.4f}")
    print(f"gain_over_best_member {best - cv.score:.4f}")

    members = fake_members(args.members)
    start = time.perf_counter()
    candidates = evaluate(problem, predictions, members, folds, args.studies)
    print(f"frontier_seconds {time.perf_counter() - start:.2f}")
    print(f"candidate_sets {len(candidates)}")
    for candidate in frontier(candidates):
        print(f"frontier {candidate.hours:.2f}h {candidate.cv_score:.4f} {candidate.label(members)}")
    chosen = choose(candidates, args.budget_hours, members, args.studies)
    print(f"chosen_cv_score {chosen.cv_score:.4f}")
    print(f"chosen_hours {chosen.hours:.2f}")


if __name__ == "__main__":
    main()
