"""The best constant prediction: per (condition, level) class frequencies re-weighted by the metric's
sample weights 1/2/4 and normalised (under a weighted log loss the optimal constant is p_c ∝ w_c n_c).

Used for OOF rows that have no sample (missing series) and as the "prior" end of the prior→oracle gap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V

# For filling rows out of fold a small pseudo-count keeps an unseen class from getting probability 0
# (a log loss of 36 per such row); the reported best constant uses none.
FILL_PSEUDO_COUNT = 0.5
ORACLE_FILE = "oracle_train.csv"  # written by `spine-ml synth`: true class probabilities


def prior_table(labels: pd.DataFrame, pseudo_count: float = 0.0) -> pd.DataFrame:
    """(condition, level) MultiIndex -> columns normal_mild, moderate, severe, from rows with label >= 0."""
    known = labels[labels.label >= 0]
    pairs = pd.MultiIndex.from_product([V.CONDITIONS, V.LEVELS], names=["condition", "level"])
    counts = (known.groupby(["condition", "level"]).label.value_counts().unstack(fill_value=0)
              .reindex(index=pairs, columns=range(len(V.SEVERITIES)), fill_value=0).to_numpy(np.float64))
    weighted = (counts + pseudo_count) * np.asarray(V.SAMPLE_WEIGHTS)
    sums = weighted.sum(1, keepdims=True)
    probabilities = np.where(sums > 0, weighted / np.where(sums > 0, sums, 1), 1.0 / len(V.SEVERITIES))
    return pd.DataFrame(probabilities, index=pairs, columns=list(V.PROBABILITY_COLUMNS))


def prior_probabilities(rows: pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """(N, 3) prior for rows with `condition` and `level` columns."""
    keys = pd.MultiIndex.from_arrays([rows.condition.to_numpy(), rows.level.to_numpy()])
    return table.reindex(keys).to_numpy(np.float64)


def train_prior_submission(truth: pd.DataFrame, train_labels: pd.DataFrame) -> pd.DataFrame:
    """What a submission without a model scores on `truth` (long form): the train labels' prior (with
    the fill pseudo-count, as predict's fallback rows use), in submission layout. The "prior" end of
    the test split's prior -> oracle gap."""
    from spine_ml.competition.submission import normalised_frame

    table = prior_table(train_labels, pseudo_count=FILL_PSEUDO_COUNT)
    return normalised_frame(truth.row_id, prior_probabilities(truth, table))


def prior_submission(truth: pd.DataFrame) -> pd.DataFrame:
    """The in-sample best constant for every row of `truth` (long form), in submission layout."""
    from spine_ml.competition.submission import normalised_frame

    return normalised_frame(truth.row_id, prior_probabilities(truth, prior_table(truth)))


def reference_scores(truth: pd.DataFrame, data_root: Path | None = None) -> dict[str, float | None]:
    """The two ends a model is measured between, on `truth` (long form, labelled rows):
    ``prior`` (the in-sample best constant) and ``oracle`` (the synthetic generator's true class
    probabilities from ``oracle_train.csv``; None for real data, where it does not exist)."""
    import warnings

    from spine_ml.competition import metric

    truth = truth[truth.label >= 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores: dict[str, float | None] = {"prior": metric.score(truth, prior_submission(truth)).score, "oracle": None}
        oracle_path = Path(data_root) / ORACLE_FILE if data_root is not None else None
        if oracle_path is not None and oracle_path.is_file():
            oracle = pd.read_csv(oracle_path, dtype={"row_id": str})
            scores["oracle"] = metric.score(truth, oracle, where=str(oracle_path)).score
    return scores


def gap_closed(model: float, prior: float, oracle: float | None) -> float | None:
    """Share of the prior→oracle gap a model score closes (1 = oracle, 0 = no better than the prior)."""
    if oracle is None or not prior > oracle:
        return None
    return (prior - model) / (prior - oracle)
