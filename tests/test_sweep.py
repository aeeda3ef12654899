"""`spine-ml sweep` end to end on the tiny project: real Ray Tune, Optuna, ASHA and MLflow."""
from __future__ import annotations

import pytest

from spine_ml.cli import main
from spine_ml.config import load_config


def runs_of(config):
    from mlflow.tracking import MlflowClient

    from spine_ml.tracking.store import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_data):
    from conftest import TINY_CONFIG

    root = tmp_path_factory.mktemp("sweep_project")
    (root / "sweeps").mkdir()
    path = root / "sweeps" / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(data=tiny_data))
    code = main(["sweep", str(path), "--set", "sweep.num_samples=3", "--set", "sweep.max_concurrent=2",
                 "--set", "sweep.scheduler=none"])
    return path, code


def test_sweep_logs_one_finished_run_per_trial(finished_sweep, capsys):
    path, code = finished_sweep
    assert code == 0
    config = load_config(path)
    client, runs = runs_of(config)
    trials = [r for r in runs if r.data.tags.get("spine_ml.run_kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("spine_ml.run_kind") == "sweep"]
    assert len(trials) == 3 and len(parents) == 1
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing left RUNNING
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for metric in ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal"):
            assert 0 < run.data.metrics[metric] < 5
        assert run.data.params["model.crop_px"] in ("16", "24")
        assert 5e-4 <= float(run.data.params["train.lr"]) <= 5e-3
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"oof.csv", "config.yaml"} <= artifacts
        assert not any(k in run.data.metrics for k in ("pid", "timestamp", "time_this_iter_s"))


def test_second_sweep_with_same_name_is_refused_and_resume_is_a_no_op(finished_sweep, capsys):
    path, _ = finished_sweep
    assert main(["sweep", str(path), "--set", "sweep.num_samples=3"]) == 2
    assert "already exists" in capsys.readouterr().err
    config = load_config(path)
    _, before = runs_of(config)
    assert main(["sweep", str(path), "--resume"]) == 0
    _, after = runs_of(config)
    assert len([r for r in after if r.data.tags.get("spine_ml.run_kind") == "trial"]) == 3
    assert len(after) == len(before)
