"""MLflow tracking: explicit store resolution, experiments, and a trial logged as one run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame, write_predictions
from spine_ml.config import load_config
from spine_ml.tracking.logging import trial_params
from spine_ml.tracking.store import TrackingError, ensure_experiment, log_trial, tracking_uri
from spine_ml.training.result import TrialResult


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "t.yaml").write_text("train: {epochs: 2}\ncv: {folds: 2}\ntracking: {experiment: tests}\n")
    return tmp_path


def config_of(project: Path, *overrides: str):
    return load_config(project / "sweeps" / "t.yaml", list(overrides))


def test_uri_order_config_then_environment_then_project_sqlite(project, monkeypatch):
    config = config_of(project)
    assert tracking_uri(config) == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(config) == "http://127.0.0.1:5999"
    assert tracking_uri(config_of(project, "tracking.uri=http://mlflow.cluster:5000")) == "http://mlflow.cluster:5000"


def test_experiment_created_under_project_mlruns_and_reused(project, monkeypatch):
    monkeypatch.chdir(project.parent)  # never the working directory's implicit store
    config = config_of(project)
    experiment_id = ensure_experiment(config)
    assert ensure_experiment(config) == experiment_id
    assert (project / "mlruns" / "mlflow.db").is_file()
    assert not (project.parent / "mlflow.db").exists() and not (project.parent / "mlruns").exists()
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri(config)).get_experiment(experiment_id)
    assert experiment.name == "tests"
    assert experiment.artifact_location == (project / "mlruns" / "artifacts" / "tests").as_uri()


def test_processes_opening_a_fresh_store_at_once_all_succeed(project):
    """Three processes create the project's SQLite store at the same instant (a sweep starting while
    `spine-ml ui` opens, trial workers): unserialised, MLflow's schema migration fails in all but one."""
    import subprocess
    import sys
    import time

    script = ("import sys, time\n"
              "from spine_ml.config import load_config\n"
              "from spine_ml.tracking.store import client\n"
              "config = load_config(sys.argv[1])\n"
              "while time.time() < float(sys.argv[2]): pass\n"
              "client(config).search_experiments()\n"
              "print('opened')\n")
    start = str(time.time() + 8)  # after every interpreter has imported MLflow
    processes = [subprocess.Popen([sys.executable, "-c", script, str(project / "sweeps" / "t.yaml"), start],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [process.communicate(timeout=120) for process in processes]
    for (out, err), process in zip(results, processes):
        assert process.returncode == 0 and "opened" in out, err[-2000:]


def test_unwritable_store_is_a_user_error_naming_it(project):
    (project / "mlruns").write_text("not a folder")
    with pytest.raises(TrackingError, match="mlruns"):
        ensure_experiment(config_of(project))


def fake_finished_trial(config, folder: Path) -> TrialResult:
    """A TrialResult as run_trial leaves it: real files on disk (oof.csv, weights-only checkpoints)."""
    rows = [r for s in (1, 2) for r in V.study_row_ids(s)]
    oof = normalised_frame(rows, np.tile([0.7, 0.2, 0.1], (len(rows), 1)))
    oof_path = write_predictions(oof, folder / "oof.csv")
    checkpoints = []
    for fold in range(2):
        path = folder / "checkpoints" / f"fold{fold}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": torch.full((2,), float(fold))}, path)
        checkpoints.append(path)
    history = [{"fold": f, "epoch": e, "train_loss": 1.0 / e, "val_loss": 0.9, "val_score": 0.8 - 0.1 * e - f / 100,
                "val_spinal": 0.5, "val_foraminal": 0.6, "val_subarticular": 0.7, "val_any_severe_spinal": 0.4,
                "seconds": 1.0} for f in range(2) for e in (1, 2)]
    metrics = {"score": 0.61, "spinal": 0.5, "foraminal": 0.6, "subarticular": 0.7, "any_severe_spinal": 0.64}
    return TrialResult(metrics=metrics, oof=oof, oof_path=oof_path, checkpoints=checkpoints, config=config,
                       history=history, wall_seconds=12.5, inference_seconds_per_study=0.02, device="cpu",
                       best_epochs=[2, 2])


def test_log_trial_records_params_metrics_and_artifacts(project, tmp_path):
    from mlflow import MlflowClient

    config = config_of(project)
    result = fake_finished_trial(config, tmp_path / "trial")
    run_id = log_trial(config, result, run_name="unit", tags={"spine_ml.sweep": "none"})
    mlflow = MlflowClient(tracking_uri(config))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.tags["spine_ml.sweep"] == "none" and run.data.tags["spine_ml.run_kind"] == "trial"
    assert run.data.params["model.backbone"] == config.model.backbone
    assert run.data.params["loss.class_weights"] == "[1.0, 2.0, 4.0]"
    assert not any(k.split(".")[0] in ("tracking", "ray", "sweep", "ensemble", "search") for k in run.data.params)
    for name, value in result.metrics.items():
        assert run.data.metrics[name] == pytest.approx(value)
    assert run.data.metrics["wall_seconds"] == pytest.approx(12.5)
    assert run.data.metrics["inference_seconds_per_study"] == pytest.approx(0.02)
    history = mlflow.get_metric_history(run_id, "val_score")
    assert [m.step for m in history] == [0, 1, 2, 3]  # global epoch index over folds
    assert [round(m.value, 3) for m in history] == [0.7, 0.6, 0.69, 0.59]
    assert [m.step for m in mlflow.get_metric_history(run_id, "fold1_val_score")] == [1, 2]
    artifacts = {a.path for a in mlflow.list_artifacts(run_id)}
    assert {"oof.csv", "config.yaml", "checkpoints", "history.csv"} <= artifacts
    assert {a.path for a in mlflow.list_artifacts(run_id, "checkpoints")} == {"checkpoints/fold0.pt", "checkpoints/fold1.pt"}
    local = Path(mlflow.download_artifacts(run_id, "checkpoints/fold1.pt", str(tmp_path / "down")))
    assert torch.load(local, weights_only=True)["weight"].tolist() == [1.0, 1.0]
    assert str(project / "mlruns" / "artifacts") in run.info.artifact_uri
    logged_config = load_config(Path(mlflow.download_artifacts(run_id, "config.yaml", str(tmp_path / "down"))))
    assert logged_config.to_dict() == config.to_dict()


def test_log_trial_nests_under_a_parent_run(project, tmp_path):
    from mlflow import MlflowClient

    config = config_of(project)
    mlflow = MlflowClient(tracking_uri(config))
    parent = mlflow.create_run(ensure_experiment(config)).info.run_id
    run_id = log_trial(config, fake_finished_trial(config, tmp_path / "t"), parent_run_id=parent)
    assert mlflow.get_run(run_id).data.tags["mlflow.parentRunId"] == parent


def test_params_are_the_keys_that_decide_a_result(project):
    params = trial_params(config_of(project))
    assert {"model.backbone", "loss.any_severe_weight", "train.lr", "cv.folds", "prepare.slices"} <= set(params)
    assert "train.num_workers" not in params and "tracking.experiment" not in params
    assert all(isinstance(v, str) for v in params.values())
    assert pd.Series(list(params)).is_unique
