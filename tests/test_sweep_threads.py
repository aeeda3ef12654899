"""Tail widening: the board's arithmetic, and a real sweep whose long trial takes the idle CPU."""
from __future__ import annotations

from spine_ml.sweep.threads import ThreadBoard, tail_shares


def test_tail_shares_split_each_nodes_peak_over_its_running_trials():
    trials = {"a": ("n1", 1.0), "b": ("n2", 2.0), "c": ("n2", 1.0)}
    assert tail_shares(trials, {"n1": 4.0, "n2": 4.0}) == {"a": 4, "b": 2, "c": 2}
    assert tail_shares({"a": ("n1", 1.0)}, {"n1": 3.0}) == {"a": 3}
    assert tail_shares({"a": ("n1", 3.0), "b": ("n1", 1.0)}, {"n1": 4.0}) == {"a": 3, "b": 2}  # never below its own
    assert tail_shares({"a": ("n1", 0.5)}, {"n1": 0.5}) == {"a": 1}  # a fractional trial still has a thread


def test_board_widens_only_in_the_tail_and_only_once_every_running_trial_registered():
    board = ThreadBoard()
    for trial in ("a", "b"):
        board.register(trial, "node", 1.0)
    assert board.threads("a") == 1  # the searcher may still start trials: keep the reservation
    board.unregister("b")
    board.set_tail(True, ["a", "c"])  # c is running in Tune but has not registered yet
    assert board.threads("a") == 1
    board.register("c", "node", 1.0)
    assert board.threads("a") == 1 and board.threads("c") == 1  # two trials share the 2 CPUs the sweep held
    board.unregister("c")
    board.set_tail(True, ["a"])
    assert board.threads("a") == 2  # alone in the tail: the CPU that c and b held
    board.set_tail(False, ["a"])  # a failed trial is retried: the tail is over
    assert board.threads("a") == 1
    assert board.threads("unknown") == 0  # not registered: keep what you have


def test_a_long_trial_takes_the_idle_cpu_once_the_short_one_ends(tmp_path, tiny_data):
    from conftest import TINY_CONFIG

    from spine_ml.cli import main
    from spine_ml.config import load_config
    from spine_ml.sweep.records import EXTRA_THREAD_SECONDS_TAG, THREADS_TAG, trial_runs
    from spine_ml.tracking.store import ensure_experiment

    text = TINY_CONFIG.format(data=tiny_data).replace(
        "  model.crop_px: {type: choice, values: [16, 24]}\n  train.lr: {type: loguniform, low: 0.0005, high: 0.005}",
        "  train.epochs: {type: choice, values: [1, 12]}")
    assert "train.epochs: {type: choice" in text
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "tiny.yaml"
    path.write_text(text)
    overrides = ["sweep.num_samples=2", "sweep.max_concurrent=2", "sweep.scheduler=none", "sweep.seed=0",
                 "ray.num_cpus=2"]
    assert main(["sweep", str(path), *[a for o in overrides for a in ("--set", o)]]) == 0
    config = load_config(path, overrides)
    runs = {r.data.params["train.epochs"]: r for r in trial_runs(config, ensure_experiment(config))}
    assert set(runs) == {"1", "12"}, "the seed must sample one short and one long trial"
    assert runs["1"].data.tags[THREADS_TAG] == "1"
    assert runs["12"].data.tags[THREADS_TAG] == "2"
    assert float(runs["1"].data.tags[EXTRA_THREAD_SECONDS_TAG]) == 0.0
    assert float(runs["12"].data.tags[EXTRA_THREAD_SECONDS_TAG]) > 0.0  # the borrowed CPU time is accounted
