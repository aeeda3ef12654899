"""Sweep faults and scale, for real (slow): kill -9 of the driver then --resume; a 2-node Ray
cluster on this machine with an MLflow server, checked through the server's REST API."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from spine_ml.config import load_config

from conftest import TINY_CONFIG

pytestmark = pytest.mark.slow
SPINE = [sys.executable, "-m", "spine_ml"]


def make_project(root: Path, data: Path, extra: str = "") -> Path:
    (root / "sweeps").mkdir(parents=True)
    path = root / "sweeps" / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(data=data) + extra)
    return path


def trial_runs(config):
    from spine_ml.sweep.records import trial_runs as runs
    from spine_ml.tracking.store import ensure_experiment

    return runs(config, ensure_experiment(config))


def stop_processes_using(marker: str) -> None:
    """Kill the Ray processes started for this test: those whose command line names its temp dir."""
    import psutil

    ours = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for process in ours:
        process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_kill_9_driver_then_resume_keeps_finished_trials(tmp_path, tiny_data):
    path = make_project(tmp_path, tiny_data)
    config = load_config(path, ["sweep.num_samples=4", "sweep.max_concurrent=1", "sweep.scheduler=none"])
    overrides = ["--set", "sweep.num_samples=4", "--set", "sweep.max_concurrent=1", "--set", "sweep.scheduler=none"]
    driver = subprocess.Popen(SPINE + ["sweep", str(path), *overrides], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    finished_before = []
    while time.time() < deadline and driver.poll() is None:
        time.sleep(2)
        if (tmp_path / "mlruns" / "mlflow.db").exists():
            finished_before = [r for r in trial_runs(config) if r.data.tags.get("spine_ml.trial_state") == "finished"]
            if len(finished_before) >= 1:
                break
    assert finished_before, "no trial finished before the deadline"
    os.kill(driver.pid, signal.SIGKILL)  # the driver only; Ray's own processes notice it died
    driver.wait()
    time.sleep(3)

    resumed = subprocess.run(SPINE + ["sweep", str(path), *overrides, "--resume"], capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = trial_runs(config)
    assert "RUNNING" not in {r.info.status for r in runs}
    kept = {r.info.run_id for r in runs}
    assert {r.info.run_id for r in finished_before} <= kept  # nothing finished was lost or redone
    done = {r.data.tags["spine_ml.trial_id"] for r in runs if r.info.status in ("FINISHED", "FAILED")}
    assert len(done) == 4  # the total equals sweep.num_samples
    assert len([r for r in runs if r.info.status == "FINISHED"]) == 4


def test_two_node_cluster_and_mlflow_server(tmp_path, tiny_data):
    port, mlflow_port = free_port(), free_port()
    store = tmp_path / "server"
    store.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # Ray 2.60 turns token authentication on for a head once ~/.ray/auth_token exists (any local
    # ray.init writes it), but `ray start --address` does not pick the token up by itself: as on a
    # real cluster, every process gets the cluster's token and RAY_AUTH_MODE=token explicitly.
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_AUTH_TOKEN", None)
    started: list[subprocess.Popen] = []
    ray = [str(Path(sys.executable).parent / "ray")]
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    try:
        subprocess.run(ray + ["start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run(ray + ["start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
                                   (store / "artifacts").as_uri(), "--host", "127.0.0.1", "--port",
                                   str(mlflow_port), "--workers", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        started.append(server)
        url = f"http://127.0.0.1:{mlflow_port}"
        for _ in range(60):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        path = make_project(tmp_path / "project", tiny_data,
                            f"ray:\n  address: 127.0.0.1:{port}\n")
        result = subprocess.run(SPINE + ["sweep", str(path), "--set", f"tracking.uri={url}",
                                         "--set", "sweep.num_samples=2", "--set", "sweep.max_concurrent=2",
                                         "--set", "sweep.scheduler=none"],
                                capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        request = urllib.request.Request(url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tests")
        experiment = json.load(urllib.request.urlopen(request))["experiment"]
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]], "max_results": 100}).encode()
        request = urllib.request.Request(url + "/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(request))["runs"]
        trials = [r for r in runs if {"key": "spine_ml.run_kind", "value": "trial"} in r["data"]["tags"]]
        assert len(trials) == 2 and all(r["info"]["status"] == "FINISHED" for r in runs)
        assert all(any(m["key"] == "score" for m in r["data"]["metrics"]) for r in trials)
        count = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:%d'); "
                                "print(sum(n['Alive'] for n in ray.nodes()))" % port],
                               capture_output=True, text=True, env=env, timeout=120).stdout.split()[-1]
        assert count == "2"
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        stop_processes_using(temp_dir)  # by PID: other Ray instances on this machine are left alone


def test_asha_prunes_and_pruned_trials_are_tagged_with_what_they_reached(tmp_path, tiny_data):
    path = make_project(tmp_path, tiny_data)
    overrides = ["sweep.num_samples=6", "sweep.max_concurrent=1", "sweep.scheduler=asha", "train.epochs=4",
                 "sweep.grace_period=1", "sweep.reduction_factor=2"]
    result = subprocess.run(SPINE + ["sweep", str(path)] + [a for o in overrides for a in ("--set", o)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = trial_runs(load_config(path, overrides))
    states = [r.data.tags["spine_ml.trial_state"] for r in runs]
    assert len(runs) == 6 and "pruned" in states and "finished" in states
    for run in runs:
        if run.data.tags["spine_ml.trial_state"] == "pruned":
            assert run.data.tags["spine_ml.reached"].startswith("fold 0, epoch ")
            assert "fold0_val_score" in run.data.metrics and "score" not in run.data.metrics
            assert run.info.status == "FINISHED"
    assert "pruned" in result.stdout  # the live table shows it
