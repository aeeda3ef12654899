"""`spine-ml predict CONFIG --run RUN_ID [--localizer RUN_ID] [--data DIR] [--out submission.csv]`, or
`spine-ml predict --bundle DIR [--data DIR] [--out submission.csv]` (spine_ml.export.run).

Loads the run's resolved config.yaml and fold checkpoints from MLflow, predicts every study of
DIR/test_series_descriptions.csv (predict_studies), writes the submission through the one writer
and validates it. Where DIR holds test_labels.csv (the synthetic set), it also prints the test
score, and with oracle_test.csv the share of the prior -> oracle gap the submission closes.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from spine_ml.errors import UserError
from spine_ml.predict.pipeline import predict_studies

__all__ = ["predict_studies", "cli", "run_config", "run_checkpoints"]
log = logging.getLogger(__name__)


class RunNotFound(UserError):
    """A --run that the tracking store cannot give (unknown id, no checkpoints)."""


def _download(config, run_id: str, artifact_path: str, folder: Path) -> Path:
    from spine_ml.tracking.store import download_artifact

    return download_artifact(config, run_id, artifact_path, folder, RunNotFound,
                             "is it a finished trial run of this tracking store?")


def run_config(config, run_id: str, folder: Path):
    """The run's resolved config, its relative paths read against this project."""
    import yaml

    from spine_ml.config import validate

    path = _download(config, run_id, "config.yaml", folder)
    return validate(yaml.safe_load(path.read_text()), config.project_root, source=f"run {run_id} config.yaml")


def run_checkpoints(config, run_id: str, folder: Path) -> list[Path]:
    checkpoints = sorted(p for p in _download(config, run_id, "checkpoints", folder).iterdir()
                         if p.is_file() and p.suffix == ".pt")
    if not checkpoints:
        raise RunNotFound(f"run {run_id} has no fold checkpoints under checkpoints/")
    return checkpoints


def test_report(data_root: Path, path: Path) -> dict[str, float] | None:
    """Score against test_labels.csv (synthetic data only), with the prior and oracle for the gap.

    The prior is what a submission without a model scores: the train labels' prior (as `make demo`
    reports it); only without a train.csv beside the test labels, the in-sample best constant."""
    from spine_ml.competition.metric import score
    from spine_ml.competition.tables import read_train_labels
    from spine_ml.training.prior import gap_closed, prior_submission, train_prior_submission

    labels = data_root / "test_labels.csv"
    if not labels.is_file():
        return None
    import pandas as pd

    truth = read_train_labels(labels)
    truth = truth[truth.label >= 0]
    report = {f"test_{k}": v for k, v in score(truth, pd.read_csv(path), "submission").as_dict().items()}
    oracle_path = data_root / "oracle_test.csv"
    if oracle_path.is_file():
        oracle = pd.read_csv(oracle_path)[["row_id", "normal_mild", "moderate", "severe"]]
        report["oracle_score"] = score(truth, oracle, "oracle").score
        train = data_root / "train.csv"
        prior = (train_prior_submission(truth, read_train_labels(train)) if train.is_file()
                 else prior_submission(truth))
        report["prior_score"] = score(truth, prior, "prior").score
        closed = gap_closed(report["test_score"], report["prior_score"], report["oracle_score"])
        report["gap_closed"] = float("nan") if closed is None else closed
    return report


def print_test_report(data_root: Path, path: Path) -> None:
    for key, value in (test_report(data_root, path) or {}).items():
        print(f"{key:<13} {value:.4f}")


def listed_studies(data_root: Path) -> list[int]:
    """The studies of DATA/test_series_descriptions.csv, or a UserError saying what --data must be."""
    from spine_ml.competition.submission import expected_studies

    if not (data_root / "test_series_descriptions.csv").is_file():
        raise UserError(f"{data_root}: no test_series_descriptions.csv; --data must name a folder in the Kaggle "
                        f"layout (test_series_descriptions.csv + test_images/)")
    return expected_studies(data_dir=data_root)


def cli(args) -> int:
    from spine_ml.competition.submission import validate_submission, write_predictions
    from spine_ml.config import load_config
    from spine_ml.prepare.cache import ensure_data
    from spine_ml.progress import quiet_library_bars

    quiet_library_bars()  # -q: MLflow's download bars too
    if args.bundle:  # an exported bundle: no config, no MLflow store
        from spine_ml.export.run import cli as bundle_cli

        return bundle_cli(args)
    if not args.config or not args.run:
        raise UserError("spine-ml predict needs a config and --run RUN_ID, e.g. "
                        "spine-ml predict sweeps/demo.yaml --run 3f2a... --out submission.csv")
    config = load_config(args.config, args.overrides)
    if not args.data:
        ensure_data(config)
    data_root = Path(args.data).resolve() if args.data else config.path(config.data.root)
    studies = listed_studies(data_root)
    with tempfile.TemporaryDirectory(prefix="predict-") as folder:
        member = run_config(config, args.run, Path(folder))
        checkpoints = run_checkpoints(config, args.run, Path(folder))
        # where to keep test crops and which store holds the localizer: this command's config
        member = member.with_updates({"predict": config.predict.model_dump(mode="json"),
                                      "tracking": config.tracking.model_dump(mode="json"),
                                      "localizer.device": config.localizer.device})
        frame = predict_studies(member, checkpoints, args.localizer, data_root, studies)
    out = Path(args.out)
    write_predictions(frame, out)
    problems = validate_submission(out, studies)
    if problems:
        raise UserError(f"{out} failed validation: " + "; ".join(problems))
    print(f"wrote {out}: {len(frame)} rows for {len(studies)} studies (validated)")
    print_test_report(data_root, out)
    return 0
