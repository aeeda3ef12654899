"""`spine-ml`: parses and dispatches. No logic here, and no heavy import at start-up.

Each verb names the function that runs it as "module:function"; the module is imported only when
the verb runs, so `spine-ml --help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    example: str
    handler: str  # "module:function", called with the parsed args; returns an exit code
    arguments: Callable[[argparse.ArgumentParser], None]


def _config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep/config YAML, e.g. sweeps/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.epochs=3")


def _synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write the Kaggle layout into")
    p.add_argument("--studies", type=int, default=60, help="train studies (default 60)")
    p.add_argument("--test-studies", type=int, default=12, help="test studies (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=160, help="typical Rows/Columns (default 160)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("--preview", type=int, metavar="STUDY_ID", help="also write a PNG contact sheet of this study")
    p.add_argument("--force", action="store_true", help="replace an existing data set in OUT")


def _inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a study folder or a series folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _prepare(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--force", action="store_true", help="rebuild even when a complete cache exists")


def _train(p: argparse.ArgumentParser) -> None:
    _config(p)


def _sweep(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")


def _ensemble(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--top-k", type=int, help="members to consider (default: ensemble.top_k)")
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="explicit member runs")
    p.add_argument("--out", default="submission.csv", help="submission path (default submission.csv)")
    p.add_argument("--budget-hours", type=float, help="inference budget (default: ensemble.budget_hours)")
    p.add_argument("--studies", type=int, help="hidden test studies for the budget")
    p.add_argument("--no-submission", action="store_true",
                   help="fit, score and log the ensemble only; no test predictions")
    p.add_argument("--localizer", help="localizer MLflow run id for the test studies (default: the most "
                   "recently chosen localizer run; a localizer sweep tags its best)")


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="config YAML (not needed with --bundle)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run", help="MLflow run id of a trained classifier")
    p.add_argument("--localizer", help="MLflow run id of a trained localizer (default: the most recently chosen)")
    p.add_argument("--bundle", help="an exported bundle folder")
    p.add_argument("--data", help="data folder with test_series_descriptions.csv (default data.root)")
    p.add_argument("--out", default="submission.csv")


def _export(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--out", required=True, help="bundle folder to write (must not exist or be empty)")
    p.add_argument("--ensemble", metavar="RUN_ID", help="ensemble run to export (default: the newest)")
    p.add_argument("--localizer", metavar="RUN_ID", help="localizer run (default: the one ensemble takes)")
    p.add_argument("--half", action="store_true", help="store checkpoints as float16 (about half the size)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the bundle on the config's test studies (its per-study cost stays unmeasured)")


def _score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, help="train.csv layout or solution layout")
    p.add_argument("--submission", required=True, help="row_id,normal_mild,moderate,severe")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("submission")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="data folder; expected studies from its test_series_descriptions.csv")
    source.add_argument("--sample", help="a sample_submission.csv naming the expected studies")


def _ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="config whose tracking store to open (optional)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)


VERBS: tuple[Verb, ...] = (
    Verb("synth", "write a competition-shaped synthetic data set (DICOM + CSVs + oracle)",
         "spine-ml synth data/synthetic --studies 60 --test-studies 12 --seed 0", "spine_ml.synth.generate:cli", _synth),
    Verb("inspect", "show the series, stacks, geometry and problems of a study or series folder",
         "spine-ml inspect data/train_images/4003253 --json", "spine_ml.dicom.inspect:cli", _inspect),
    Verb("prepare", "build the crop cache and folds.csv for a config (reused by every trial)",
         "spine-ml prepare sweeps/demo.yaml", "spine_ml.prepare.cache:cli", _prepare),
    Verb("train", "train one trial on all folds (no Ray), logged as one MLflow run",
         "spine-ml train sweeps/demo.yaml --set model.backbone=resnet18", "spine_ml.training.cli:cli", _train),
    Verb("sweep", "Ray Tune + Optuna + ASHA sweep, one MLflow run per trial",
         "spine-ml sweep sweeps/demo.yaml", "spine_ml.sweep.run:cli", _sweep),
    Verb("ensemble", "pick the best runs, fit blend weights on OOF, write submission.csv",
         "spine-ml ensemble sweeps/demo.yaml --top-k 5", "spine_ml.ensemble.run:cli", _ensemble),
    Verb("train-localizer", "train the level localizer (heatmaps from train_label_coordinates.csv), one MLflow run",
         "spine-ml train-localizer sweeps/demo.yaml", "spine_ml.localize.cli:cli", _train),
    Verb("predict", "test-time inference from raw test studies to submission rows",
         "spine-ml predict sweeps/demo.yaml --run RUN_ID --out submission.csv", "spine_ml.predict.run:cli", _predict),
    Verb("export", "bundle an ensemble for Kaggle: wheel, checkpoints, manifest, predict.py, submission.ipynb",
         "spine-ml export sweeps/demo.yaml --out bundle/ --half", "spine_ml.export.bundle:cli", _export),
    Verb("score", "the competition metric with its four parts",
         "spine-ml score --truth data/train.csv --submission oof.csv --json", "spine_ml.competition.commands:score_cli", _score),
    Verb("validate", "check a submission's format against the expected studies",
         "spine-ml validate submission.csv --data data/", "spine_ml.competition.commands:validate_cli", _validate),
    Verb("ui", "MLflow UI over the project's tracking store on 127.0.0.1",
         "spine-ml ui --port 5000", "spine_ml.tracking.ui:cli", _ui),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spine-ml",
        description="RSNA 2024 lumbar spine: DICOM -> crop cache -> timm classifiers swept with "
                    "Ray Tune + Optuna, tracked in MLflow -> ensemble -> submission.csv",
        epilog="Start with `make demo`, or: spine-ml sweep sweeps/demo.yaml && spine-ml ensemble sweeps/demo.yaml",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        child = sub.add_parser(verb.name, help=verb.summary, description=verb.summary,
                               epilog=f"example: {verb.example}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        verb.arguments(child)
        child.set_defaults(handler=verb.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import os
        os.environ["SPINE_ML_QUIET"] = "1"
    module_name, function_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    from spine_ml.errors import UserError
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not glued to them
            return int(handler(args) or 0)
    except UserError as error:
        print(f"spine-ml {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spine-ml {args.verb}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full or read-only disk is the user's to fix, not a bug: no traceback
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        print(f"spine-ml {args.verb}: error: {error}; free some disk space (or point data.root, "
              f"prepare.cache_dir or the tracking store elsewhere) and run it again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
