"""`spine-ml predict --bundle DIR --data D --out F`: an exported bundle -> a validated submission.

Each member runs its fold models over crops cut by the bundle's localizer (spine_ml.predict, the
code `spine-ml ensemble` predicts with), and the members are blended by the ensemble's own blending
step with the weights and temperatures in manifest.json. Needs no MLflow store, config or network.
The run is timed: seconds per study here x the hidden test studies gives the projected runtime,
with a WARNING line when it exceeds the Kaggle limit.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spine_ml.errors import UserError

log = logging.getLogger(__name__)
KAGGLE_DATA = "/kaggle/input/rsna-2024-lumbar-spine-degenerative-classification/"
KAGGLE_OUT = "/kaggle/working/submission.csv"


@dataclass(frozen=True)
class BundleRun:
    out: Path
    studies: int
    seconds: float  # wall time from loading the bundle to the blended frame
    hidden_studies: int  # the ensemble's budget: studies in the hidden test set ...
    budget_hours: float  # ... and the hours they may take

    @property
    def seconds_per_study(self) -> float:
        return self.seconds / max(self.studies, 1)

    @property
    def projected_hours(self) -> float:
        return self.seconds_per_study * self.hidden_studies / 3600.0

    def as_dict(self) -> dict:
        return {"studies": self.studies, "seconds": self.seconds, "seconds_per_study": self.seconds_per_study,
                "hidden_studies": self.hidden_studies, "projected_hours": self.projected_hours,
                "budget_hours": self.budget_hours}


def projection_lines(run: BundleRun) -> list[str]:
    """What a run prints about its cost; the last line starts with WARNING when over budget."""
    lines = [f"runtime: {run.seconds:.1f} s for {run.studies} stud{'y' if run.studies == 1 else 'ies'} = "
             f"{run.seconds_per_study:.2f} s/study -> {run.projected_hours:.2f} h projected for "
             f"{run.hidden_studies} hidden test studies (limit {run.budget_hours:g} h; with few studies the "
             f"one-off model loading inflates this)"]
    if run.projected_hours > run.budget_hours:
        lines.append(f"WARNING: projected runtime {run.projected_hours:.1f} h for {run.hidden_studies} studies "
                     f"EXCEEDS the {run.budget_hours:g} h Kaggle limit: the submission would time out. Run it with "
                     f"a GPU, or export a smaller ensemble (`spine-ml ensemble CONFIG --budget-hours H`, then "
                     f"`spine-ml export`).")
    return lines


def check_versions(manifest: dict) -> None:
    """A warning when torch or timm here differ (major.minor) from the ones the bundle was made with."""
    import importlib

    for name in ("torch", "timm"):
        made = str(manifest.get("versions", {}).get(name, ""))
        here = getattr(importlib.import_module(name), "__version__", "")
        if made and made.split(".")[:2] != here.split(".")[:2]:
            log.warning("bundle made with %s %s, running %s %s: if a checkpoint fails to load, export with the "
                        "version this machine has", name, made, name, here)


def bundle_predictions(bundle, data_root: Path, studies: list[int]):
    """Submission frame of the bundle's blend over `studies` (25 rows each, normalised)."""
    import numpy as np

    from spine_ml.ensemble.objective import align_predictions
    from spine_ml.ensemble.testpred import blended_frame, submission_row_ids
    from spine_ml.localize.store import resolve_localizer
    from spine_ml.predict.pipeline import predict_studies

    localizer = resolve_localizer(bundle.localizer_config, bundle.localizer_folder)[0]
    row_ids = submission_row_ids(studies)
    arrays = []
    for member in bundle.members:
        log.info("member %s (weight %.3f): %d fold model(s)", member.run_id[:8], member.weight, len(member.checkpoints))
        frame = predict_studies(member.config, member.checkpoints, localizer, data_root, studies)
        arrays.append(align_predictions(frame, row_ids, f"member {member.run_id} predictions"))
    return blended_frame(row_ids, np.stack(arrays), bundle.blend)


def predict_bundle(folder: Path | str, data_root: Path | str, out: Path | str) -> BundleRun:
    """Predict every test study of `data_root` with the bundle in `folder`; write and validate `out`."""
    from spine_ml.competition.submission import validate_submission, write_predictions
    from spine_ml.export.load import load_bundle
    from spine_ml.predict.run import listed_studies

    data_root, out = Path(data_root).resolve(), Path(out)
    studies = listed_studies(data_root)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spine-ml-bundle-") as scratch:
        bundle = load_bundle(folder, Path(scratch))
        check_versions(bundle.manifest)
        frame = bundle_predictions(bundle, data_root, studies)
    seconds = time.perf_counter() - started
    write_predictions(frame, out)
    problems = validate_submission(out, studies)
    if problems:
        raise UserError(f"{out} failed validation: " + "; ".join(problems))
    return BundleRun(out, len(studies), seconds, bundle.hidden_studies, bundle.budget_hours)


def cli(args) -> int:
    """`spine-ml predict --bundle DIR` (called by spine_ml.predict.run.cli)."""
    if args.config or args.run or args.localizer or args.overrides:
        raise UserError("spine-ml predict --bundle runs from the bundle alone: drop CONFIG, --run, --localizer "
                        "and --set (its manifest.json names the members and the localizer)")
    data_root = Path(args.data or KAGGLE_DATA)
    run = predict_bundle(args.bundle, data_root, args.out)
    print(f"wrote {run.out}: {25 * run.studies} rows for {run.studies} studies (validated)")
    for line in projection_lines(run):
        print(line)
        if line.startswith("WARNING"):
            log.warning("%s", line.removeprefix("WARNING: "))
    from spine_ml.predict.run import print_test_report

    print_test_report(data_root, run.out)
    return 0
