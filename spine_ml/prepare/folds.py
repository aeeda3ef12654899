"""Study-level cross-validation folds, stratified on each study's severity profile.

Severity is correlated within a study, so rows are never split across folds: a study is one item,
labelled by which of its 25 rows are Moderate / Severe (plus any-severe-spinal), and the studies are
split with iterative multilabel stratification (iterstrat), fixed by `cv.seed`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError


def severity_profile(labels: pd.DataFrame, studies: np.ndarray) -> np.ndarray:
    """(studies, k) 0/1 matrix: per row id Moderate, per row id Severe, any severe spinal, all-ones.

    `labels` is the long form of train.csv (study_id, condition, level, label with -1 = blank).
    """
    wide = labels.assign(column=labels.condition + "_" + labels.level).pivot(
        index="study_id", columns="column", values="label").reindex(index=studies, columns=V.LABEL_COLUMNS)
    values = wide.fillna(-1).to_numpy()
    spinal = [i for i, c in enumerate(V.LABEL_COLUMNS) if V.condition_group(c[:-6]) == "spinal"]
    columns = [values == 1, values == 2, (values[:, spinal] == 2).any(axis=1, keepdims=True),
               np.ones((len(studies), 1), dtype=bool)]
    profile = np.concatenate(columns, axis=1).astype(np.int8)
    return profile[:, profile.any(axis=0)]  # a label no study carries only confuses the splitter


def make_folds(labels: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """study_id -> fold (0..folds-1), sorted by study_id; the same inputs always give the same folds."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    studies = np.sort(labels.study_id.unique())
    if len(studies) < folds:
        raise UserError(f"cv.folds={folds} but the data has only {len(studies)} train studies; "
                        f"lower cv.folds (e.g. --set cv.folds={max(2, len(studies))})")
    profile = severity_profile(labels, studies)
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(studies), -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(studies)), profile)):
        assignment[held_out] = fold
    return pd.DataFrame({"study_id": studies, "fold": assignment})


def folds_file_name(folds: int, seed: int) -> str:
    return f"folds-k{folds}-seed{seed}.csv"


def read_folds(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"study_id": np.int64, "fold": np.int64})
    return frame[["study_id", "fold"]]
