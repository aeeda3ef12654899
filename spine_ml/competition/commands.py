"""`spine-ml score` and `spine-ml validate`."""
from __future__ import annotations

import json
import sys
import warnings

import pandas as pd

from spine_ml.competition import metric
from spine_ml.competition.submission import expected_studies, validate_submission
from spine_ml.competition.tables import DataFormatError, read_truth


def read_submission(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"row_id": str})
    except FileNotFoundError:
        raise DataFormatError(f"{path}: submission file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: cannot be read as CSV ({error})") from None


def score_cli(args) -> int:
    truth = read_truth(args.truth)
    if not (truth.label >= 0).any():
        raise DataFormatError(f"{args.truth}: no labelled rows to score")
    submission = read_submission(args.submission)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metric.score(truth, submission, where=str(args.submission))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        for name, value in result.as_dict().items():
            print(f"{name} {value:.6f}")
    return 0


def validate_cli(args) -> int:
    studies = expected_studies(data_dir=args.data, sample=args.sample)
    problems = validate_submission(args.submission, studies)
    if problems:
        print(f"{args.submission}: INVALID ({len(problems)} problem(s))")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{args.submission}: valid ({len(studies)} studies, {25 * len(studies)} rows)")
    return 0
