"""Readers for the competition's CSV files, with errors that name the file, row and value.

Long form used everywhere inside the project: one row per (study_id, condition, level) with
``row_id``, ``label`` (0/1/2, or -1 when the cell is blank) and ``sample_weight`` (1/2/4, 0 when blank).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError


class DataFormatError(UserError):
    """A competition file does not have the layout or values it should; the message says where."""


def _read_csv(path: Path | str, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise DataFormatError(f"{path}: cannot be read as CSV ({error})") from None


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...] | list[str], path: Path | str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}"
        )


def parse_ids(values: pd.Series, column: str, path: Path | str) -> np.ndarray:
    """Digits-only ids -> int64. Ids become folder names, so anything else is refused here."""
    text = values.astype(str).str.strip()
    bad = ~text.str.fullmatch(r"\d{1,18}")
    if bad.any():
        rows = (np.flatnonzero(bad.to_numpy())[:5] + 2).tolist()  # +2: header line, 1-based
        examples = ", ".join(repr(v) for v in text[bad].head(5))
        raise DataFormatError(f"{path}: {column} must be digits; bad value(s) {examples} on line(s) {rows}")
    return text.astype(np.int64).to_numpy()


def read_train_labels(path: Path | str) -> pd.DataFrame:
    """train.csv (wide, string labels, blanks allowed) -> long form, 25 rows per study."""
    frame = _read_csv(path, "train labels (train.csv)")
    _require_columns(frame, ("study_id",) + V.LABEL_COLUMNS, path)
    study_ids = parse_ids(frame["study_id"], "study_id", path)
    duplicated = pd.Series(study_ids).duplicated()
    if duplicated.any():
        raise DataFormatError(f"{path}: duplicate study_id {sorted(set(study_ids[duplicated.to_numpy()]))[:5]}")
    values = frame[list(V.LABEL_COLUMNS)].apply(lambda s: s.str.strip())
    known = values.isin(V.SEVERITIES) | (values == "")
    if not known.to_numpy().all():
        r, c = np.argwhere(~known.to_numpy())[0]
        raise DataFormatError(
            f"{path}: line {r + 2}, column {V.LABEL_COLUMNS[c]}: unknown label {values.iat[r, c]!r}; "
            f"expected one of {', '.join(V.SEVERITIES)} or blank"
        )
    codes = values.replace({s: str(i) for i, s in enumerate(V.SEVERITIES)}).replace("", "-1").astype(int)
    n = len(frame)
    long = pd.DataFrame({
        "study_id": np.repeat(study_ids, len(V.LABEL_COLUMNS)),
        "condition": np.tile([c for c in V.CONDITIONS for _ in V.LEVELS], n),
        "level": np.tile([lv for _ in V.CONDITIONS for lv in V.LEVELS], n),
        "label": codes.to_numpy().reshape(-1),
    })
    long.insert(0, "row_id", [f"{s}_{c}_{lv}" for s, c, lv in zip(long.study_id, long.condition, long.level)])
    long["sample_weight"] = np.where(long.label >= 0, np.take(V.SAMPLE_WEIGHTS, long.label.clip(0)), 0.0)
    return long


def labels_to_wide(long: pd.DataFrame) -> pd.DataFrame:
    """Inverse of read_train_labels: long form -> train.csv layout (blank for missing labels)."""
    names = np.array(V.SEVERITIES + ("",), dtype=object)
    frame = long.assign(column=long.condition + "_" + long.level, text=names[long.label.to_numpy()])
    wide = frame.pivot(index="study_id", columns="column", values="text").reindex(columns=V.LABEL_COLUMNS)
    return wide.fillna("").reset_index()


def read_solution(path: Path | str) -> pd.DataFrame:
    """Solution layout (row_id,normal_mild,moderate,severe[,sample_weight]) -> long form."""
    frame = _read_csv(path, "solution file")
    _require_columns(frame, V.SUBMISSION_COLUMNS, path)
    probs = frame[list(V.PROBABILITY_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1)
    if bad.any():
        raise DataFormatError(f"{path}: non-numeric, non-finite or negative truth values in rows {list(frame.row_id[bad][:5])}")
    duplicated = frame.row_id.duplicated()
    if duplicated.any():  # a repeated row would be scored twice
        raise DataFormatError(f"{path}: duplicate row_id(s) {list(frame.row_id[duplicated][:5])}")
    label = probs.argmax(1)
    try:
        parsed = [V.parse_row_id(r) for r in frame.row_id]
    except ValueError as error:
        raise DataFormatError(f"{path}: {error}") from None
    long = pd.DataFrame({
        "row_id": frame.row_id.to_numpy(),
        "study_id": [p[0] for p in parsed],
        "condition": [p[1] for p in parsed],
        "level": [p[2] for p in parsed],
        "label": label,
    })
    if "sample_weight" in frame.columns:
        weights = pd.to_numeric(frame.sample_weight, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(weights) | (weights < 0)
        if bad.any():
            raise DataFormatError(f"{path}: sample_weight must be a non-negative number; bad in rows "
                                  f"{list(frame.row_id[bad][:5])}")
        long["sample_weight"] = weights
    else:
        long["sample_weight"] = np.take(V.SAMPLE_WEIGHTS, label)
    return long


def read_truth(path: Path | str) -> pd.DataFrame:
    """Truth in either train.csv layout or solution layout, detected from the header."""
    header = _read_csv(path, "truth file").columns
    return read_solution(path) if "row_id" in header else read_train_labels(path)


def read_series_descriptions(path: Path | str) -> pd.DataFrame:
    frame = _read_csv(path, "series descriptions")
    _require_columns(frame, ("study_id", "series_id", "series_description"), path)
    out = pd.DataFrame({
        "study_id": parse_ids(frame.study_id, "study_id", path),
        "series_id": parse_ids(frame.series_id, "series_id", path),
        "series_description": frame.series_description.str.strip().to_numpy(),
    })
    return out


def read_coordinates(path: Path | str) -> pd.DataFrame:
    """train_label_coordinates.csv -> condition/level in our spelling, numeric x/y."""
    frame = _read_csv(path, "label coordinates")
    columns = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
    _require_columns(frame, columns, path)
    out = pd.DataFrame({
        "study_id": parse_ids(frame.study_id, "study_id", path),
        "series_id": parse_ids(frame.series_id, "series_id", path),
        "instance_number": parse_ids(frame.instance_number, "instance_number", path),
    })
    for column, convert in (("condition", V.condition_from_title), ("level", V.level_from_title)):
        try:
            out[column] = [convert(v) for v in frame[column]]
        except ValueError as error:
            raise DataFormatError(f"{path}: column {column}: {error}") from None
    for column in ("x", "y"):
        out[column] = pd.to_numeric(frame[column], errors="coerce")
        if not np.isfinite(out[column].to_numpy(np.float64)).all():  # 'inf' parses, but is no pixel position
            line = int(np.flatnonzero(~np.isfinite(out[column].to_numpy(np.float64)))[0]) + 2
            raise DataFormatError(f"{path}: line {line}: {column} is not a number ({frame[column].iat[line - 2]!r})")
    return out
