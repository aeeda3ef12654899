"""Plots as MLflow artifacts: per trial (confusion per condition, reliability) through the real
`log_trial`, per sweep (optimisation history, Optuna importances) from a real Optuna study on the
project's storage; and quiet mode for progress bars (`spine-ml -q`)."""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame, write_predictions
from spine_ml.competition.tables import labels_to_wide
from spine_ml.config import load_config
from spine_ml.plots import sweep as S
from spine_ml.plots import trial as T

STUDIES = 6


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def make_truth(studies: int = STUDIES, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(truth in long form with two blank cells, OOF predictions that lean towards the truth)."""
    rng = np.random.default_rng(seed)
    rows = [(V.make_row_id(s, c, lv), s, c, lv) for s in range(1, studies + 1) for c in V.CONDITIONS for lv in V.LEVELS]
    truth = pd.DataFrame(rows, columns=["row_id", "study_id", "condition", "level"])
    truth["label"] = rng.choice(3, size=len(truth), p=[0.7, 0.2, 0.1])
    truth.loc[[3, 40], "label"] = -1  # blank cells: not scored, not drawn
    truth["sample_weight"] = np.where(truth.label >= 0, np.take(V.SAMPLE_WEIGHTS, truth.label.clip(0)), 0.0)
    probs = rng.dirichlet([2, 1, 1], len(truth))
    probs[np.arange(len(truth)), truth.label.clip(0)] += 1.0
    return truth, normalised_frame(truth.row_id.to_numpy(), probs / probs.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project with a train.csv under data/ and its own MLflow store (shared by this module)."""
    root = tmp_path_factory.mktemp("plots_project")
    (root / "sweeps").mkdir()
    (root / "data").mkdir()
    truth, _ = make_truth()
    labels_to_wide(truth).to_csv(root / "data" / "train.csv", index=False)
    (root / "sweeps" / "p.yaml").write_text("data: {root: data}\ncv: {folds: 2}\ntracking: {experiment: plots}\n"
                                            "search:\n  model.crop_px: {type: choice, values: [16, 24]}\n"
                                            "  train.lr: {type: loguniform, low: 0.0005, high: 0.005}\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


def config_of(project: Path, *overrides: str):
    return load_config(project / "sweeps" / "p.yaml", list(overrides))


# --- per-trial plots ---------------------------------------------------------------------------------

def test_confusion_counts_reliability_bins_and_ece_by_hand():
    counts = T.confusion_counts(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]))
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    table = T.reliability_bins(np.array([0.05, 0.15, 0.12, 0.95, 1.0]), np.array([0, 1, 0, 1, 1]), bins=10)
    assert table.bin.tolist() == [0, 1, 9]  # 1.0 falls in the last bin, empty bins are left out
    assert table.predicted.tolist() == pytest.approx([0.05, 0.135, 0.975])
    assert table.observed.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert table["count"].tolist() == [1, 2, 2]
    assert T.expected_calibration_error(table) == pytest.approx((0.05 + 2 * 0.365 + 2 * 0.025) / 5)


def test_plots_draw_the_labelled_rows_only(tmp_path):
    truth, oof = make_truth()
    rows = T.scored_rows(truth, oof)
    assert len(rows) == len(truth) - 2
    figure = T.confusion_figure(rows)
    for ax, condition in zip(figure.axes, V.CONDITIONS):  # the counts written in each panel add up to its rows
        shown = sum(int(text.get_text()) for text in ax.texts)
        assert shown == int((rows.condition == condition).sum())
    diagonal = sum(int(ax.texts[k * 3 + k].get_text()) for ax in figure.axes[:5] for k in range(3))
    assert diagonal == int((T.probabilities(rows).argmax(1) == rows.label.to_numpy()).sum())
    paths = T.write_trial_plots(truth, oof, tmp_path)
    assert [p.name for p in paths] == ["confusion.png", "reliability.png"]
    assert png_size(paths[0]) == (1600, 390) and png_size(paths[1]) == (1200, 520)
    with pytest.raises(ValueError, match="row ids"):
        T.scored_rows(truth, oof.assign(row_id="9" + oof.row_id))


def finished_trial(config, folder: Path, oof: pd.DataFrame):
    from spine_ml.training.result import TrialResult

    metrics = {"score": 0.6, "spinal": 0.5, "foraminal": 0.6, "subarticular": 0.7, "any_severe_spinal": 0.6}
    return TrialResult(metrics=metrics, oof=oof, oof_path=write_predictions(oof, folder / "oof.csv"),
                       checkpoints=[], config=config, wall_seconds=1.0)


def test_log_trial_logs_confusion_and_reliability_plots(project, tmp_path):
    from mlflow import MlflowClient

    from spine_ml.tracking.store import log_trial, tracking_uri

    config = config_of(project)
    _, oof = make_truth()
    run_id = log_trial(config, finished_trial(config, tmp_path, oof), run_name="plots")
    client = MlflowClient(tracking_uri(config))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/confusion.png", "plots/reliability.png"}
    local = client.download_artifacts(run_id, "plots/confusion.png", str(tmp_path))
    assert png_size(local) == (1600, 390)


def test_a_trial_without_train_labels_is_logged_without_plots(project, tmp_path, caplog):
    from mlflow import MlflowClient

    from spine_ml.tracking.store import log_trial, tracking_uri

    config = config_of(project, "data.root=elsewhere")
    _, oof = make_truth()
    with caplog.at_level(logging.WARNING, logger="spine_ml.plots.trial"):
        run_id = log_trial(config, finished_trial(config, tmp_path, oof))
    assert "trial plots not logged" in caplog.text and "train.csv" in caplog.text
    client = MlflowClient(tracking_uri(config))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "oof.csv" in {a.path for a in client.list_artifacts(run_id)}
    assert not client.list_artifacts(run_id, "plots")


# --- per-sweep plots ---------------------------------------------------------------------------------

def make_sweep(config, values: list[float], finished: list[int]) -> tuple[str, str]:
    """An Optuna study named like the sweep, on the sweep's storage, and a parent MLflow run whose
    finished trial runs carry the OOF score = the objective Optuna was told: (experiment id, parent id)."""
    import optuna
    from mlflow import MlflowClient

    from spine_ml.tracking.store import ensure_experiment, tracking_uri

    config.path("mlruns/optuna").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=config.sweep.name, storage=S.optuna_storage_url(config))
    for value in values:
        trial = study.ask()
        trial.suggest_categorical("model.crop_px", [16, 24])
        trial.suggest_float("train.lr", 5e-4, 5e-3, log=True)
        study.tell(trial, value)
    client = MlflowClient(tracking_uri(config))
    experiment_id = ensure_experiment(config)
    parent = client.create_run(experiment_id, tags={"spine_ml.run_kind": "sweep"}).info.run_id
    for number in finished:
        child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent,
                                                       "spine_ml.trial_state": "finished"}).info.run_id
        client.log_metric(child, "score", values[number])
    return experiment_id, parent


def test_sweep_plots_tell_finished_from_stopped_trials(project, tmp_path):
    import optuna
    from mlflow import MlflowClient

    from spine_ml.tracking.store import tracking_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = config_of(project, "sweep.name=history")
    values = [0.91, 0.85, 0.97, 0.80, 0.88]
    experiment_id, parent = make_sweep(config, values, finished=[1, 4])
    table = S.history_table(S.load_study(config), S.finished_scores(config, experiment_id, parent))
    assert table.finished.tolist() == [False, True, False, False, True]
    # the best-so-far line follows finished trials only (0.80 was a fold-0 score where ASHA stopped)
    assert table.best_finished.tolist()[1:] == [0.85, 0.85, 0.85, 0.85]
    logged = S.log_sweep_plots(config, experiment_id, parent)
    assert logged == ["plots/optimisation_history.png", "plots/param_importances.png"]
    client = MlflowClient(tracking_uri(config))
    assert {a.path for a in client.list_artifacts(parent, "plots")} == set(logged)
    assert png_size(client.download_artifacts(parent, "plots/optimisation_history.png", str(tmp_path))) == (800, 450)
    importances = S.param_importances(S.load_study(config))
    assert set(importances) == {"model.crop_px", "train.lr"} and sum(importances.values()) == pytest.approx(1)


def test_sweep_plots_skip_what_cannot_be_drawn(project, caplog):
    config = config_of(project, "sweep.name=single")
    experiment_id, parent = make_sweep(config, [0.9], finished=[0])
    with caplog.at_level(logging.INFO, logger="spine_ml.plots.sweep"):
        assert S.log_sweep_plots(config, experiment_id, parent) == ["plots/optimisation_history.png"]
        assert "need >= 2 completed trials" in caplog.text
        assert S.log_sweep_plots(config_of(project, "sweep.name=never-ran"), experiment_id, parent) == []
        assert "no Optuna study 'never-ran'" in caplog.text


# --- progress bars and quiet mode --------------------------------------------------------------------

def test_progress_bars_follow_quiet_mode(monkeypatch):
    from spine_ml.progress import progress

    monkeypatch.delenv("SPINE_ML_QUIET", raising=False)
    assert not progress(range(3)).disable
    assert progress(range(3), disable=True).disable
    monkeypatch.setenv("SPINE_ML_QUIET", "1")
    assert progress(range(3)).disable


def test_cli_shows_bars_and_q_silences_them(tmp_path, monkeypatch, capsys):
    """The real CLI end to end (synth, the cheapest verb with a bar): a bar on stderr, none with -q."""
    from spine_ml.cli import main

    monkeypatch.delenv("SPINE_ML_QUIET", raising=False)
    arguments = ["--studies", "2", "--test-studies", "1", "--image-size", "32", "--workers", "1"]
    assert main(["synth", str(tmp_path / "loud"), *arguments]) == 0
    assert "synth studies: 100%" in capsys.readouterr().err
    monkeypatch.setenv("SPINE_ML_QUIET", "0")  # restored after the test: -q sets it to 1
    assert main(["-q", "synth", str(tmp_path / "quiet"), *arguments]) == 0
    err = capsys.readouterr().err
    assert "synth studies" not in err and "%|" not in err
