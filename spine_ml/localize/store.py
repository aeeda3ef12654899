"""Localizer runs in MLflow: log a trained localizer, find and load one for prediction.

A localizer run carries the tag ``spine_ml.run_kind=localizer``, params ``localizer.*``, the metrics of
`localize.metrics` (held-out studies) and the artifact folder ``localizer/`` (localizer.pt +
localizer.yaml), which `load_localizer` reads.

Which localizer predict/ensemble/demo use by default (`latest_localizer_run`): the most recent *choice*.
A `spine-ml train-localizer` run is a choice when it is logged; the trials of a localizer sweep
(`sweep.target: localizer`, runs with a parent) are not, except the one the sweep picks as its best,
which carries ``spine_ml.localizer_chosen`` = the time it was picked (ms). `--localizer RUN_ID` still
takes any localizer run, trial or not.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from spine_ml.errors import UserError
from spine_ml.tracking.store import RUN_KIND_TAG

log = logging.getLogger(__name__)
KIND = "localizer"
ARTIFACT_FOLDER = "localizer"
CHOSEN_TAG = "spine_ml.localizer_chosen"  # ms since epoch when a sweep chose this trial as its best
PARENT_TAG = "mlflow.parentRunId"


class LocalizerNotFound(UserError):
    """No localizer run or folder where one was named or expected."""


def log_localizer(config, result, run_name: str | None = None, parent_run_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
    """One MLflow run for a trained localizer; returns its run id. A sweep trial passes its sweep's
    parent run and trial tags (such a run is not picked by `latest_localizer_run` until chosen)."""
    from mlflow.entities import Metric, Param, RunStatus

    from spine_ml.tracking.store import client, ensure_experiment

    mlflow_client = client(config)
    experiment_id = ensure_experiment(config)
    run_tags = {**(tags or {}), RUN_KIND_TAG: KIND, "spine_ml.backbone": config.localizer.backbone}
    if parent_run_id:
        run_tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name or f"localizer-{config.localizer.backbone}",
                                   tags=run_tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = {f"localizer.{k}": str(v) for k, v in config.localizer.model_dump(mode="json").items()}
        params.update({"data.root": str(config.data.root), "prepare.percentiles": str(list(config.prepare.percentiles)),
                       "train_studies": str(len(result.train_studies)),
                       "holdout_studies": str(len(result.holdout_studies)), "samples": str(result.samples)})
        mlflow_client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics.items() if v == v]  # NaN: not logged
        metrics += [Metric("wall_seconds", result.wall_seconds, now, 0)]
        metrics += [Metric("train_loss_epoch", h["train_loss"], now, h["epoch"]) for h in result.history]
        mlflow_client.log_batch(run_id, metrics=metrics)
        mlflow_client.log_artifacts(run_id, str(result.folder), artifact_path=ARTIFACT_FOLDER)
    except BaseException:
        mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow_client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def chosen_at(run) -> int | None:
    """When a finished localizer run became the default (ms), or None for a sweep trial never chosen."""
    tags = run.data.tags
    if tags.get(CHOSEN_TAG, "").isdigit():
        return int(tags[CHOSEN_TAG])
    return None if tags.get(PARENT_TAG) else run.info.start_time  # train-localizer: logged once trained


def latest_localizer_run(config) -> str:
    """The most recently chosen localizer: a `train-localizer` run, or the best trial of a localizer sweep."""
    from spine_ml.tracking.store import client, ensure_experiment, tracking_uri

    experiment_id = ensure_experiment(config)
    runs = client(config).search_runs([experiment_id], filter_string=f"tags.`{RUN_KIND_TAG}` = '{KIND}' and "
                                      "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                      max_results=10000)
    chosen = [(when, run.info.run_id) for run in runs if (when := chosen_at(run)) is not None]
    if not chosen:
        unchosen = f" ({len(runs)} sweep trials, none chosen: finish the sweep with `spine-ml sweep CONFIG --resume`)" \
            if runs else ""
        raise LocalizerNotFound(
            f"no finished localizer run in experiment {config.tracking.experiment!r} of {tracking_uri(config)}"
            f"{unchosen}; train one with `spine-ml train-localizer CONFIG`, or pass --localizer RUN_ID")
    return max(chosen)[1]


def choose_localizer(config, run_id: str) -> None:
    """Make a sweep's best localizer trial the default of `latest_localizer_run` (from now on)."""
    from spine_ml.tracking.store import client

    client(config).set_tag(run_id, CHOSEN_TAG, str(int(time.time() * 1000)))


def download_localizer(config, run_id: str, folder: Path) -> Path:
    from spine_ml.tracking.store import download_artifact

    return download_artifact(config, run_id, ARTIFACT_FOLDER, folder, LocalizerNotFound,
                             "is it a localizer run of this store?")


def folder_key(folder: Path) -> str:
    """Identity of a saved localizer: the hash of its weights and settings files."""
    from spine_ml.localize.train import CHECKPOINT, SETTINGS

    digest = hashlib.sha256()
    for name in (CHECKPOINT, SETTINGS):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def resolve_localizer(config, localizer) -> tuple[object, str]:
    """(ready Localizer, identity key) from a Localizer, a folder, a run id, or None (the most recently chosen run)."""
    from spine_ml.localize.infer import Localizer
    from spine_ml.localize.train import load_localizer
    from spine_ml.training.device import resolve_device

    device = str(resolve_device(config.train.model_copy(update={"device": config.localizer.device})))
    if isinstance(localizer, Localizer):
        return localizer, getattr(localizer, "key", None) or model_key(localizer.model)
    if localizer is not None and Path(str(localizer)).is_dir():
        folder = Path(str(localizer))
        loaded = load_localizer(folder, device, config.localizer.batch_size)
        loaded.key = folder_key(folder)
        return loaded, loaded.key
    run_id = str(localizer) if localizer is not None else latest_localizer_run(config)
    with tempfile.TemporaryDirectory() as scratch:
        folder = download_localizer(config, run_id, Path(scratch))
        loaded = load_localizer(folder, device, config.localizer.batch_size)
        loaded.key = folder_key(folder)
    log.info("localizer: run %s", run_id)
    return loaded, loaded.key


def model_key(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
