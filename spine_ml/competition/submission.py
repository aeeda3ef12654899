"""One submission writer for every stage, and the format validator behind `spine-ml validate`."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.competition.tables import DataFormatError, _read_csv, read_series_descriptions

log = logging.getLogger(__name__)


def normalised_frame(row_ids, probabilities: np.ndarray) -> pd.DataFrame:
    """Submission-layout frame with each row clipped at 0 and normalised to sum to 1."""
    values = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, None)
    sums = values.sum(1, keepdims=True)
    values = np.where(sums > 0, values / np.where(sums > 0, sums, 1), 1.0 / 3)
    frame = pd.DataFrame(values, columns=list(V.PROBABILITY_COLUMNS))
    frame.insert(0, "row_id", list(row_ids))
    return frame


def write_predictions(frame: pd.DataFrame, path: Path | str, overwrite: bool = True) -> Path:
    """Write a submission-layout CSV atomically (temp file + rename): never a half-written file.

    Replacing an existing file is logged; with ``overwrite=False`` it is an error instead.
    """
    path = Path(path)
    missing = [c for c in V.SUBMISSION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"cannot write {path}: frame lacks column(s) {', '.join(missing)}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --force (or choose another --out) to replace it")
        log.warning("replacing existing %s", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            frame[list(V.SUBMISSION_COLUMNS)].to_csv(stream, index=False, float_format="%.8g")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def expected_studies(data_dir: Path | str | None = None, sample: Path | str | None = None) -> list[int]:
    """The test studies a submission must cover: from DIR/test_series_descriptions.csv or a sample file."""
    if sample is not None:
        frame = _read_csv(sample, "sample submission")
        if "row_id" not in frame.columns:
            raise DataFormatError(f"{sample}: no row_id column; is it a sample_submission.csv?")
        try:
            return sorted({V.parse_row_id(r)[0] for r in frame.row_id})
        except ValueError as error:
            raise DataFormatError(f"{sample}: {error}") from None
    if data_dir is None:
        raise ValueError("give the data folder (--data) or a sample submission (--sample)")
    descriptions = read_series_descriptions(Path(data_dir) / "test_series_descriptions.csv")
    return sorted(set(descriptions.study_id.tolist()))


def validate_submission(path: Path | str, studies: list[int]) -> list[str]:
    """Every problem found in a submission file, as sentences; an empty list means valid."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: file not found"]
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        return [f"{path}: not a readable CSV ({error})"]
    problems: list[str] = []
    if list(frame.columns) != list(V.SUBMISSION_COLUMNS):
        problems.append(f"header is {','.join(map(str, frame.columns))}; expected {','.join(V.SUBMISSION_COLUMNS)}")
        if "row_id" not in frame.columns:
            return problems
    expected = {r for s in studies for r in V.study_row_ids(s)}
    ids = frame.row_id.astype(str)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicate row_id(s), e.g. {', '.join(duplicated.head(5))}")
    unknown = sorted(set(ids) - expected)
    if unknown:
        problems.append(f"{len(unknown)} row_id(s) not expected, e.g. {', '.join(unknown[:5])}")
    absent = sorted(expected - set(ids))
    if absent:
        problems.append(f"{len(absent)} expected row_id(s) missing, e.g. {', '.join(absent[:5])}")
    columns = [c for c in V.PROBABILITY_COLUMNS if c in frame.columns]
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    non_finite = ~np.isfinite(values).all(1)
    if non_finite.any():
        problems.append(f"{non_finite.sum()} row(s) with empty, non-numeric or non-finite values, e.g. {', '.join(ids[non_finite].head(5))}")
    negative = (values < 0).any(1)
    if negative.any():
        problems.append(f"{negative.sum()} row(s) with negative values, e.g. {', '.join(ids[negative].head(5))}")
    off = np.isfinite(values).all(1) & (np.abs(values.sum(1) - 1) > 1e-6)
    if off.any() and len(columns) == 3:
        problems.append(f"{off.sum()} row(s) do not sum to 1 (±1e-6), e.g. {', '.join(ids[off].head(5))}")
    return problems
