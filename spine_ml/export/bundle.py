"""`spine-ml export CONFIG [--ensemble RUN_ID] [--localizer RUN_ID] --out DIR [--half]`: an ensemble
run -> a self-contained folder that predicts offline (a Kaggle dataset).

    DIR/manifest.json            members (run ids, weights, resolved configs, prepare settings), the
                                 blend's temperatures, the localizer run and settings, versions, sha256
                                 of every file, sizes, and the per-study cost measured by running the
                                 bundle once here
    DIR/predict.py               installs the wheel offline, then `spine-ml predict --bundle`
    DIR/submission.ipynb         the Kaggle notebook that runs predict.py
    DIR/spine_ml-*.whl           spine_ml built from this checkout
    DIR/member-<run>-<fold>.pt   fold checkpoints (float16 with --half, loaded back as float32)
    DIR/localizer.pt, .yaml      the localizer
    DIR/train.csv                the training prior for rows no crop covers, where the data has no train.csv

No subfolders: `kaggle datasets create -p DIR` skips them unless told otherwise, and a web upload
keeps the files either way. The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spine_ml.errors import UserError
from spine_ml.export.load import BUNDLE_FORMAT, BUNDLE_KIND, FULL, HALF, MANIFEST, file_entry

log = logging.getLogger(__name__)
FP16_MAX = 65504.0
EXACT = 1e-6  # a float32 bundle must reproduce the ensemble's submission.csv this closely


class ExportError(UserError):
    """An ensemble that cannot be exported; the message names the run, folder or file and what to do."""


@dataclass(frozen=True)
class ExportOutcome:
    folder: Path
    manifest: dict


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "exists and is not empty"
        raise ExportError(f"--out {out} {what}; pick another --out or remove it (export never overwrites)")


def ensemble_run(config, run_id: str | None):
    """The ensemble run to export: `run_id`, or the newest finished one of the config's experiment."""
    from mlflow.exceptions import MlflowException

    from spine_ml.tracking.store import RUN_KIND_TAG, client, tracking_uri

    mlflow_client = client(config)
    if run_id:
        try:
            run = mlflow_client.get_run(run_id)
        except MlflowException:
            raise ExportError(f"--ensemble {run_id}: no such run in {tracking_uri(config)}; list the ensemble runs "
                              f"with `spine-ml ui CONFIG` (tag {RUN_KIND_TAG}=ensemble)") from None
        kind = run.data.tags.get(RUN_KIND_TAG)
        if kind != "ensemble":
            raise ExportError(f"--ensemble {run_id}: a {kind or 'untagged'} run, not an ensemble run; pass the run "
                              f"id `spine-ml ensemble` printed")
        return run
    experiment = mlflow_client.get_experiment_by_name(config.tracking.experiment)
    runs = [] if experiment is None else mlflow_client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_KIND_TAG}` = 'ensemble' and attributes.status = "
        "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ExportError(f"no finished ensemble run in experiment {config.tracking.experiment!r} of "
                          f"{tracking_uri(config)}; run `spine-ml ensemble CONFIG` first, or pass --ensemble RUN_ID")
    return runs[0]


def copy_weights(source: Path, target: Path, half: bool) -> tuple[dict, int, int]:
    """Copy a state dict into the bundle (float16 where it fits with `half`); returns its manifest entry
    and the bytes its tensors take in float32 and in float16."""
    import torch

    state = torch.load(source, map_location="cpu", weights_only=True)
    fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values())
    fits = {k: bool(t.is_floating_point() and (t.numel() == 0 or (torch.isfinite(t).all() and t.abs().max() <= FP16_MAX)))
            for k, t in state.items()}  # a tensor float16 cannot hold stays float32
    fp16 = sum(t.numel() * (2 if fits[k] else 4 if t.is_floating_point() else t.element_size())
               for k, t in state.items())
    target.parent.mkdir(parents=True, exist_ok=True)
    if half:
        torch.save({k: t.half() if fits[k] else t for k, t in state.items()}, target)
    else:
        shutil.copyfile(source, target)
    return {"dtype": HALF if half else FULL, "source": source.name}, fp32, fp16


def export_members(config, described: dict, folder: Path, scratch: Path, half: bool) -> tuple[list[dict], int, int]:
    from spine_ml.ensemble.testpred import member_predict_config
    from spine_ml.predict.run import run_checkpoints
    from spine_ml.prepare.cache import prepare_settings

    members, fp32, fp16 = [], 0, 0
    for member in described["members"]:
        if member["weight"] <= 0:
            continue
        run_id = member["run_id"]
        download = scratch / run_id
        member_config = member_predict_config(config, run_id, download).with_updates({"tracking.uri": None})
        checkpoints = []
        for path in run_checkpoints(config, run_id, download):
            target = folder / f"member-{run_id}-{path.name}"
            entry, full, small = copy_weights(path, target, half)
            checkpoints.append({**file_entry(folder, target), **entry})
            fp32, fp16 = fp32 + full, fp16 + small
        members.append({**{k: member.get(k) for k in ("run_id", "name", "backbone", "weight", "folds", "oof_score",
                                                      "seconds_per_study")},
                        "prepare": prepare_settings(member_config.prepare), "config": member_config.to_dict(),
                        "checkpoints": checkpoints})
    if not members:
        raise ExportError("the ensemble's ensemble.json lists no member with a weight > 0; run `spine-ml ensemble` again")
    return members, fp32, fp16


def export_localizer(config, localizer, folder: Path, scratch: Path, half: bool) -> tuple[dict, int, int]:
    """The localizer (a run id, a folder, or None: the one `spine-ml ensemble` takes) copied into DIR."""
    import yaml

    from spine_ml.localize.store import download_localizer, folder_key, latest_localizer_run
    from spine_ml.localize.train import CHECKPOINT, SETTINGS

    run_id = None
    if localizer is not None and Path(str(localizer)).is_dir():
        source = Path(str(localizer))
    else:
        run_id = str(localizer) if localizer is not None else latest_localizer_run(config)
        source = download_localizer(config, run_id, scratch / "localizer-download")
    missing = [name for name in (CHECKPOINT, SETTINGS) if not (source / name).is_file()]
    if missing:
        raise ExportError(f"localizer {run_id or source}: no {' or '.join(missing)}; is it a localizer run "
                          f"(`spine-ml train-localizer CONFIG`)?")
    entry, fp32, fp16 = copy_weights(source / CHECKPOINT, folder / CHECKPOINT, half)
    shutil.copyfile(source / SETTINGS, folder / SETTINGS)
    files = [{**file_entry(folder, folder / CHECKPOINT), **entry}, file_entry(folder, folder / SETTINGS)]
    settings = yaml.safe_load((source / SETTINGS).read_text())
    return {"run_id": run_id, "source": None if run_id else str(source), "key": folder_key(source),
            "settings": settings, "batch_size": config.localizer.batch_size,
            "device": config.localizer.device, "files": files}, fp32, fp16


def check_same_localizer(config, members: list[dict], localizer_key: str) -> None:
    """Warn when the members hold no test predictions made with this localizer on the config's test data:
    then the ensemble's submission.csv came from another localizer (or other data) than the bundle's."""
    from spine_ml.competition.submission import expected_studies
    from spine_ml.ensemble.testpred import CACHE_FOLDER, prediction_key
    from spine_ml.tracking.store import client

    data_root = config.path(config.data.root)
    if not (data_root / "test_series_descriptions.csv").is_file():
        return
    name = f"{prediction_key(data_root, expected_studies(data_dir=data_root), localizer_key)}.csv"
    mlflow_client = client(config)
    for member in members:
        listed = {Path(a.path).name for a in mlflow_client.list_artifacts(member["run_id"], CACHE_FOLDER)}
        if name not in listed:
            log.warning("run %s holds no test predictions made with this localizer on %s: the ensemble's "
                        "submission.csv was made with another localizer (pass --localizer RUN_ID) or other test data",
                        member["run_id"], data_root)
            return


def verify(config, folder: Path, run, scratch: Path, half: bool) -> dict | None:
    """Run the bundle once on the config's test studies: the per-study cost, and the largest difference
    from the ensemble run's own submission.csv when it logged one."""
    import numpy as np
    import pandas as pd

    from spine_ml.competition import vocabulary as V
    from spine_ml.export.run import predict_bundle, projection_lines
    from spine_ml.tracking.store import client, download_artifact

    data_root = config.path(config.data.root)
    if not (data_root / "test_series_descriptions.csv").is_file():
        log.warning("%s has no test_series_descriptions.csv: the bundle was not run here, so its per-study cost "
                    "is unmeasured", data_root)
        return None
    bundle_run = predict_bundle(folder, data_root, scratch / "bundle-submission.csv")
    for line in projection_lines(bundle_run):
        print(line)
    import torch

    measured = {**bundle_run.as_dict(), "data": str(data_root), "cpus": os.cpu_count(),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if "submission.csv" not in {a.path for a in client(config).list_artifacts(run.info.run_id)}:
        return measured
    logged = pd.read_csv(download_artifact(config, run.info.run_id, "submission.csv", scratch / "logged", ExportError,
                                           "it should hold the submission the ensemble wrote"))
    ours = pd.read_csv(bundle_run.out)
    columns = list(V.PROBABILITY_COLUMNS)
    if list(logged.row_id) != list(ours.row_id):
        log.warning("the ensemble's submission.csv covers other rows than %s/test_series_descriptions.csv lists; "
                    "not compared", data_root)
        return measured
    difference = float(np.abs(logged[columns].to_numpy() - ours[columns].to_numpy()).max())
    measured["max_abs_difference_vs_ensemble_submission"] = difference
    if difference > EXACT and not half:
        log.warning("the bundle's predictions differ from the ensemble's submission.csv by up to %.3g (more than "
                    "%g): the ensemble used another localizer (pass --localizer RUN_ID), other test data, or other "
                    "spine-ml code than this checkout (run `spine-ml ensemble` again, then export)", difference, EXACT)
    print(f"bundle vs the ensemble's submission.csv: max |difference| {difference:.3g}")
    return measured


def megabytes(count: float) -> float:
    return round(count / 2 ** 20, 3)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_bundle(config, folder: Path, run, described: dict, localizer, half: bool, scratch: Path) -> dict:
    from datetime import datetime, timezone

    from spine_ml.export import artifacts as A

    members, fp32, fp16 = export_members(config, described, folder, scratch, half)
    localizer_entry, localizer_fp32, localizer_fp16 = export_localizer(config, localizer, folder, scratch, half)
    check_same_localizer(config, members, localizer_entry["key"])
    train_csv = config.path(config.data.root) / "train.csv"
    prior = None
    if train_csv.is_file():
        shutil.copyfile(train_csv, folder / "train.csv")
        prior = file_entry(folder, folder / "train.csv")
    wheel = A.build_wheel(folder)
    source = A.source_revision()
    if source["git_dirty"]:
        log.warning("the wheel holds uncommitted changes to spine_ml (the checkout differs from commit %s); "
                    "commit them if this bundle must be reproducible", source["git_commit"])
    fp32, fp16 = fp32 + localizer_fp32, fp16 + localizer_fp16
    manifest = {
        "kind": BUNDLE_KIND, "format": BUNDLE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ensemble": {"run_id": run.info.run_id, "experiment": config.tracking.experiment,
                     **{k: described.get(k) for k in ("method", "fitted", "inference_hours", "studies", "budget_hours")},
                     "cv_score": (described.get("cv_score") or {}).get("score")},
        "blend": {"temperatures": described["temperatures"]},
        "members": members, "localizer": localizer_entry, "prior": prior, "wheel": file_entry(folder, wheel),
        "half": half, "versions": A.versions(), "source": source, "requirements": A.REQUIREMENTS_NOTE,
        "sizes": {"checkpoints_mb": megabytes(fp16 if half else fp32), "checkpoints_mb_float32": megabytes(fp32),
                  "checkpoints_mb_float16": megabytes(fp16)},
        "measured": None,
    }
    (folder / "predict.py").write_text(A.entry_script())
    A.write_notebook(manifest, folder / "submission.ipynb")
    manifest["sizes"]["bundle_mb"] = megabytes(folder_bytes(folder))
    (folder / "README.md").write_text(A.bundle_readme(manifest))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def export_bundle(config, out: Path | str, ensemble: str | None = None, localizer=None, half: bool = False,
                  check: bool = True) -> ExportOutcome:
    """Write the bundle of an ensemble run into `out` (which must not exist or be empty)."""
    from spine_ml.tracking.store import download_artifact

    out = Path(out).resolve()
    refuse_non_empty(out)
    run = ensemble_run(config, ensemble)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="spine-ml-export-") as scratch:
            scratch = Path(scratch)
            described = json.loads(download_artifact(
                config, run.info.run_id, "ensemble.json", scratch, ExportError,
                "was it made by `spine-ml ensemble` (it logs ensemble.json)?").read_text())
            partial.mkdir()
            manifest = write_bundle(config, partial, run, described, localizer, half, scratch)
            if check:
                manifest["measured"] = verify(config, partial, run, scratch, half)
                (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        refuse_non_empty(out)  # made meanwhile by someone else?
        if out.is_dir():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ExportOutcome(out, manifest)


def cli(args) -> int:
    from spine_ml.config import load_config
    from spine_ml.progress import quiet_library_bars

    quiet_library_bars()
    config = load_config(args.config, args.overrides)
    started = time.perf_counter()
    outcome = export_bundle(config, args.out, args.ensemble, args.localizer, args.half, check=not args.no_verify)
    manifest, sizes = outcome.manifest, outcome.manifest["sizes"]
    members = ", ".join(f"{m['run_id'][:8]} {m['backbone']} x{len(m['checkpoints'])} folds (weight {m['weight']:.3f})"
                        for m in manifest["members"])
    print(f"exported ensemble run {manifest['ensemble']['run_id']} to {outcome.folder} in "
          f"{time.perf_counter() - started:.0f} s: {members}; localizer {manifest['localizer']['run_id'] or 'folder'}")
    print(f"size: bundle {megabytes(folder_bytes(outcome.folder)):.1f} MB; weights {sizes['checkpoints_mb_float32']:.1f} MB "
          f"as float32, {sizes['checkpoints_mb_float16']:.1f} MB as float16 (stored: {'float16' if args.half else 'float32'})")
    print(f"next: upload {outcome.folder} as a Kaggle dataset and run its submission.ipynb with the internet off "
          f"(README.md, \"Submitting on Kaggle\")")
    return 0
