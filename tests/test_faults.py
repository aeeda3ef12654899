"""Faults from outside the code: an unwritable or full disk, a trial's worker killed, the MLflow
server going away mid-sweep. Each must end in a clear error (or a retry), never a traceback, a
half-written file that looks complete, or a run left RUNNING.

(Killing the sweep driver and resuming is tests/test_sweep_faults.py.)

A full disk is real where we may mount a small tmpfs (root); elsewhere those tests skip and the
RLIMIT_FSIZE test (any user: writes past the limit fail with EFBIG) stands in for it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spine_ml.cli import main
from spine_ml.competition import vocabulary as V

pytestmark = pytest.mark.timeout(600)
SPINE = [sys.executable, "-m", "spine_ml"]


@pytest.fixture()
def small_disk(tmp_path):
    """Factory: mount a tmpfs of `size` at a folder (root only), unmounted after the test."""
    mounted: list[Path] = []

    def make(path: Path, size: str = "64k") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("a small tmpfs needs root; test_prepare_past_a_file_size_limit covers full disks")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Write until the file system says it is full."""
    with open(folder / "filler", "wb", buffering=0) as handle:  # unbuffered: nothing left to flush at close
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def complete_caches(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if p.is_dir() and ((p / "meta.json").exists() or ".building-" in p.name)]


# --- an unwritable store -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["store_is_a_file", "read_only_folder"])
@pytest.mark.parametrize("verb", ["train", "sweep"])
def test_unwritable_store_stops_before_any_training(tiny_project, capsys, monkeypatch, how, verb):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tiny_project / "mlruns"
    if how == "store_is_a_file":
        store.write_text("not a folder")  # mkdir/open below it fail for every user, root included
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits; the store_is_a_file case covers this for root")
        store.mkdir()
        store.chmod(0o500)
    try:
        code = main([verb, str(tiny_project / "sweeps" / "tiny.yaml")])
    finally:
        if store.is_dir():
            store.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"spine-ml {verb}: error:") and str(store) in err and "not writable" in err
    assert not (tiny_project / "data" / "cache").exists(), "the crop cache was built before the store was checked"


def test_store_on_a_full_disk_stops_train_before_any_training(tiny_project, small_disk, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small_disk(tiny_project / "mlruns")
    code = main(["train", str(tiny_project / "sweeps" / "tiny.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "MB free" in err and str(tiny_project / "mlruns") in err
    assert not (tiny_project / "data" / "cache").exists()


# --- a full disk while writing ---------------------------------------------------------------------------

def test_prepare_on_a_full_disk_is_a_clear_error_and_leaves_no_cache(tiny_project, small_disk, capsys):
    cache_dir = small_disk(tiny_project / "small")
    config = str(tiny_project / "sweeps" / "tiny.yaml")
    code = main(["prepare", config, "--set", f"prepare.cache_dir={cache_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert complete_caches(cache_dir) == [], "a partial cache was left behind"


def test_predictions_on_a_full_disk_leave_the_old_file_intact(tmp_path, small_disk):
    from spine_ml.competition.submission import normalised_frame, write_predictions

    folder = small_disk(tmp_path / "small")
    rows = [r for s in (1, 2, 3) for r in V.study_row_ids(s)]
    old = write_predictions(normalised_frame(rows, np.full((75, 3), 1 / 3)), folder / "submission.csv")
    before = old.read_bytes()
    fill(folder)
    for name in ("submission.csv", "oof.csv"):  # replacing a file and writing a new one
        with pytest.raises(OSError) as caught:
            write_predictions(normalised_frame(rows, np.random.default_rng(0).random((75, 3))), folder / name)
        assert caught.value.errno == errno.ENOSPC
    assert old.read_bytes() == before, "the existing submission was damaged"
    assert not (folder / "oof.csv").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["filler", "submission.csv"], "temporary files left behind"


def test_checkpoint_on_a_full_disk_leaves_no_file(tmp_path, small_disk):
    import torch

    from spine_ml.training.trial import _save_weights

    folder = small_disk(tmp_path / "small", size="256k")
    (folder / "checkpoints").mkdir()
    fill(folder)
    with pytest.raises((OSError, RuntimeError)):  # torch reports a failed write as RuntimeError
        _save_weights({"weight": torch.zeros(64, 1024)}, folder / "checkpoints" / "fold0.pt")
    assert list((folder / "checkpoints").iterdir()) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed by the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@pytest.mark.slow
def test_prepare_past_a_file_size_limit_then_again_with_room(tiny_project):
    """Any user: RLIMIT_FSIZE makes the big cache file fail (EFBIG) like a full disk would."""
    config = str(tiny_project / "sweeps" / "tiny.yaml")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "SPINE_ML_QUIET": "1"}
    limited = subprocess.run(SPINE + ["prepare", config], capture_output=True, text=True, env=env, timeout=300,
                             preexec_fn=_limit_file_size(64 * 1024))
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "File too large" in limited.stderr and "Traceback" not in limited.stderr
    cache_dir = tiny_project / "data" / "cache"
    assert complete_caches(cache_dir) == []
    again = subprocess.run(SPINE + ["prepare", config], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len([p for p in cache_dir.iterdir() if (p / "meta.json").exists()]) == 1


# --- Ray and MLflow processes dying mid-sweep (slow: real sweeps) ----------------------------------------

def sweep_project(root: Path, data: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    from conftest import TINY_CONFIG

    (root / "sweeps").mkdir(parents=True)
    path = root / "sweeps" / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(data=data))
    return path, [a for o in overrides for a in ("--set", o)]


def trial_processes(driver) -> list:
    import psutil

    found = []
    for process in driver.children(recursive=True):
        try:
            if "ray::ImplicitFunc" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass
    return found


def stop_tree(started: dict[int, float]) -> None:
    """Processes of this test's sweep that are still alive, by pid and creation time (nobody else's)."""
    import psutil

    alive = []
    for pid, created in started.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:
                process.terminate()
                alive.append(process)
        except psutil.Error:
            pass
    for process in psutil.wait_procs(alive, timeout=15)[1]:
        process.kill()


def remember(driver, started: dict[int, float]) -> None:
    import psutil

    try:
        for process in driver.children(recursive=True):
            started.setdefault(process.pid, process.create_time())
    except psutil.Error:
        pass


@contextlib.contextmanager
def sweep_driver(command: list[str], log_path: Path, env: dict[str, str]):
    """(driver, pids seen under it) of a sweep writing to `log_path`; on exit every process of its
    tree still alive is stopped, by pid and creation time."""
    import psutil

    started: dict[int, float] = {}
    with open(log_path, "w") as log:
        driver = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            yield driver, started
        finally:
            remember(driver, started)
            if driver.poll() is None:
                driver.kill()
            stop_tree(started)


def runs_of(path: Path, overrides: list[str]):
    from spine_ml.config import load_config
    from spine_ml.sweep.records import trial_runs
    from spine_ml.tracking.store import ensure_experiment

    config = load_config(path, overrides)
    return trial_runs(config, ensure_experiment(config))


@pytest.mark.slow
@pytest.mark.parametrize("max_failures, outcome", [(1, "retried to FINISHED"), (0, "FAILED")])
def test_killed_trial_worker_is_retried_or_failed(tmp_path, tiny_data, monkeypatch, max_failures, outcome):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ["sweep.num_samples=2", "sweep.max_concurrent=1", "sweep.scheduler=none", "train.epochs=3",
                 f"sweep.max_failures={max_failures}", "sweep.name=kill"]
    path, settings = sweep_project(tmp_path, tiny_data, overrides)
    killed = None
    with sweep_driver(SPINE + ["sweep", str(path), *settings], tmp_path / "sweep.log",
                      {**os.environ, "SPINE_ML_QUIET": "0"}) as (driver, started):  # the live table
        deadline = time.time() + 600
        while killed is None and driver.poll() is None and time.time() < deadline:
            remember(driver, started)
            trials = [p for p in trial_processes(driver) if time.time() - p.create_time() > 5]
            if trials:  # mid-training: the actor has been up for a few seconds
                killed = trials[0].pid
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
        assert killed is not None, "no trial process appeared"
        code = driver.wait(timeout=900)
    output = (tmp_path / "sweep.log").read_text()
    assert code == 0, output[-3000:]
    runs = runs_of(path, overrides)
    statuses = sorted(r.info.status for r in runs)
    assert "RUNNING" not in statuses and len(runs) == 2, statuses  # the sweep finished every trial
    if max_failures:
        assert statuses == ["FINISHED", "FINISHED"] and "retrying" in output
        assert all(r.data.tags.get("spine_ml.trial_state") == "finished" for r in runs)
    else:
        failed = [r for r in runs if r.info.status == "FAILED"]
        assert len(failed) == 1 and failed[0].data.tags.get("spine_ml.trial_state") == "failed"
        assert "FAILED" in output and "retrying" not in output
        assert failed[0].data.tags.get("spine_ml.error"), "the failure carries no error text"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    import urllib.request

    store.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", (store / "artifacts").as_uri(),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGKILL)
    raise RuntimeError("the MLflow server did not come up")


def finished_trials_on(url: str) -> int:
    import json
    import urllib.request

    try:
        found = json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tests",
                                                 timeout=5))
        body = json.dumps({"experiment_ids": [found["experiment"]["experiment_id"]], "max_results": 100}).encode()
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(request, timeout=5)).get("runs", [])
    except OSError:
        return 0
    return sum(1 for r in runs if r["info"]["status"] == "FINISHED"
               and {"key": "spine_ml.run_kind", "value": "trial"} in r["data"]["tags"])


@pytest.mark.slow
def test_mlflow_server_down_mid_sweep_is_a_clear_failure(tmp_path, tiny_data):
    """Behaviour pinned: a clear failure, no buffering. The next trial fails at its start (its
    worker asks the server whether it already finished), the driver cannot record it either, and
    the sweep exits non-zero with a last line naming the server; what the server recorded before
    the outage stays there. (Ray prints the trial's traceback on the way: see the report of issue 10.)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path / "server", port)
    overrides = ["sweep.num_samples=3", "sweep.max_concurrent=1", "sweep.scheduler=none", "sweep.max_failures=0",
                 f"tracking.uri={url}", "sweep.name=server-down"]
    path, settings = sweep_project(tmp_path / "project", tiny_data, overrides)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # bound MLflow's own retries (minutes by default)
    try:
        with sweep_driver(SPINE + ["sweep", str(path), *settings], tmp_path / "sweep.log", env) as (driver, started):
            deadline = time.time() + 600
            while driver.poll() is None and time.time() < deadline and finished_trials_on(url) < 1:
                remember(driver, started)
                time.sleep(1)
            assert driver.poll() is None, "the sweep ended before the server could be stopped"
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
            code = driver.wait(timeout=900)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    output = (tmp_path / "sweep.log").read_text()
    assert code != 0, output[-3000:]
    assert url in output.strip().splitlines()[-1], output[-2000:]
    server = start_mlflow_server(tmp_path / "server", port)  # the record made before the outage is intact
    try:
        assert finished_trials_on(url) >= 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
