"""`spine-ml sweep` with `sweep.target: localizer`: real Ray Tune + Optuna + MLflow over real
train_localizer trials on the tiny synthetic project; the best trial becomes the default localizer."""
from __future__ import annotations

import contextlib
import io
import time

import pytest
import yaml

from spine_ml.cli import main
from spine_ml.config import ConfigError, load_config
from conftest import PROJECT, TINY_CONFIG

LOCALIZER = {"input_px": 64, "epochs": 1, "batch_size": 32, "holdout_fraction": 0.25, "max_studies": 8}
SEARCH = {"localizer.lr": {"type": "loguniform", "low": 0.001, "high": 0.004},
          "localizer.sigma_mm": {"type": "choice", "values": [3.0, 5.0]}}
SWEEP = {"name": "loc", "target": "localizer", "num_samples": 2, "max_concurrent": 2, "scheduler": "none"}


def write_config(root, tiny_data, search=None, sweep=None):
    raw = yaml.safe_load(TINY_CONFIG.format(data=tiny_data))
    raw.update(localizer=LOCALIZER, search=search or SEARCH, sweep=sweep or SWEEP)
    (root / "sweeps").mkdir(exist_ok=True)
    path = root / "sweeps" / "loc.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def runs_of(config):
    from spine_ml.tracking.store import client, ensure_experiment

    return client(config).search_runs([ensure_experiment(config)], max_results=1000)


@pytest.fixture(scope="module")
def localizer_sweep(tmp_path_factory, tiny_data):
    path = write_config(tmp_path_factory.mktemp("localizer_sweep"), tiny_data)
    out = io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", str(path)])
    return path, code, out.getvalue(), time.time() - started


def test_localizer_sweep_logs_finished_localizer_runs_and_chooses_the_best(localizer_sweep):
    from spine_ml.localize.store import CHOSEN_TAG, latest_localizer_run

    path, code, printed, seconds = localizer_sweep
    assert code == 0, printed
    config = load_config(path)
    runs = runs_of(config)
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing left RUNNING
    parents = [r for r in runs if r.data.tags.get("spine_ml.run_kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("spine_ml.run_kind") == "localizer"]
    assert len(parents) == 1 and len(trials) == 2 and len(runs) == 3
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["spine_ml.sweep"] == "loc" and run.data.tags["spine_ml.trial_state"] == "finished"
        assert 0 < run.data.metrics["mean_error_mm"] < 500
        assert 0 <= run.data.metrics["correct_level_rate"] <= 1
        assert run.data.params["localizer.input_px"] == "64" and run.data.params["localizer.sigma_mm"] in ("3.0", "5.0")
        assert 1e-3 <= float(run.data.params["localizer.lr"]) <= 4e-3
    assert len({r.data.params["localizer.lr"] for r in trials}) == 2  # two sampled trials, not one repeated
    best = min(trials, key=lambda r: r.data.metrics["mean_error_mm"])
    assert latest_localizer_run(config) == best.info.run_id  # what predict/ensemble/demo pick by default
    assert CHOSEN_TAG in best.data.tags and not any(CHOSEN_TAG in r.data.tags for r in trials if r is not best)
    assert parents[0].data.tags["spine_ml.best_localizer"] == best.info.run_id
    # the summary ranks the trials by held-out error and says how predict picks the winner
    assert "mean_mm" in printed and "p90_mm" in printed and "level" in printed
    assert f"Chosen localizer: {best.info.run_id}" in printed
    ranked = [line.split()[1] for line in printed.splitlines() if line.strip()[:2] in ("1 ", "2 ")]
    assert ranked[0] == best.info.run_id
    assert "spine-ml ensemble" not in printed  # the classifier's next step is not offered
    print(f"2-trial localizer sweep: {seconds:.1f} s")


def test_chosen_trial_loads_as_a_localizer(localizer_sweep, tmp_path):
    from spine_ml.localize.store import latest_localizer_run, resolve_localizer

    config = load_config(localizer_sweep[0])
    loaded, key = resolve_localizer(config, None)
    assert loaded.cfg.input_px == 64 and len(key) == 16
    assert resolve_localizer(config, latest_localizer_run(config))[1] == key  # --localizer RUN_ID: same weights


def test_resuming_a_finished_localizer_sweep_trains_nothing_and_keeps_the_choice(localizer_sweep):
    from spine_ml.localize.store import latest_localizer_run

    path = localizer_sweep[0]
    config = load_config(path)
    before, chosen = runs_of(config), latest_localizer_run(config)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sweep", str(path), "--resume"]) == 0
    after = runs_of(config)
    assert len(after) == len(before) and {r.info.status for r in after} == {"FINISHED"}
    assert latest_localizer_run(config) == chosen


def test_a_classifier_key_in_a_localizer_sweep_is_refused(tiny_project, tiny_data, capsys):
    search = {**SEARCH, "train.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}}
    path = write_config(tiny_project, tiny_data, search=search)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.train.lr" in err and "only localizer.* keys" in err
    assert not (tiny_project / "mlruns" / "ray").exists()  # refused before anything started


def test_space_checks_follow_the_target(tiny_config):
    from spine_ml.sweep.space import check_space

    localizer = tiny_config.with_updates({"sweep.target": "localizer", "search": SEARCH})
    check_space(localizer)
    with pytest.raises(ConfigError, match="search.localizer.holdout_fraction: cannot be searched"):
        check_space(localizer.with_updates({"search": {"localizer.holdout_fraction": {"type": "choice",
                                                                                     "values": [0.2, 0.3]}}}))
    with pytest.raises(ConfigError, match="localizer.holdout_fraction: 0 leaves no held-out"):
        check_space(localizer.with_updates({"localizer.holdout_fraction": 0.0}))
    with pytest.raises(ConfigError, match="search.localizer.lr: .*set sweep.target: localizer"):
        check_space(tiny_config.with_updates({"search": SEARCH}))  # a classifier sweep never trains it
    shipped = load_config(PROJECT / "sweeps" / "localizer.yaml")
    assert shipped.sweep.target == "localizer" and shipped.sweep.scheduler == "none"
    check_space(shipped)


def test_latest_localizer_run_prefers_the_newest_choice(tiny_config):
    """Order on a real MLflow store: train-localizer runs count when logged, sweep trials only once chosen."""
    from spine_ml.localize.store import KIND, LocalizerNotFound, PARENT_TAG, choose_localizer, latest_localizer_run
    from spine_ml.tracking.store import RUN_KIND_TAG, client, ensure_experiment

    mlflow, experiment = client(tiny_config), ensure_experiment(tiny_config)

    def finished_run(**tags):
        run = mlflow.create_run(experiment, tags={RUN_KIND_TAG: KIND, **tags})
        mlflow.set_terminated(run.info.run_id, "FINISHED")
        time.sleep(0.01)  # distinct millisecond times
        return run.info.run_id

    parent = mlflow.create_run(experiment, tags={RUN_KIND_TAG: "sweep"}).info.run_id
    trial_a = finished_run(**{PARENT_TAG: parent})
    with pytest.raises(LocalizerNotFound, match="1 sweep trials, none chosen.*--resume"):
        latest_localizer_run(tiny_config)
    standalone = finished_run()
    trial_b = finished_run(**{PARENT_TAG: parent})  # newer, but not chosen
    assert latest_localizer_run(tiny_config) == standalone
    choose_localizer(tiny_config, trial_a)  # an older trial, chosen now
    assert latest_localizer_run(tiny_config) == trial_a
    time.sleep(0.01)
    newer = finished_run()
    assert latest_localizer_run(tiny_config) == newer
    assert trial_b not in (latest_localizer_run(tiny_config), trial_a)
