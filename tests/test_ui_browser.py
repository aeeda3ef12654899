"""`spine-ml ui` in a real browser: the MLflow 3 UI over a store made by a real `spine-ml sweep`, driven
in headless Chromium (Debian's /usr/bin/chromium, through Playwright): the trials are listed under
their sweep with their `score` and `any_severe_spinal`, and a trial's plots preview as images.

Slow (a sweep, an MLflow server, a browser). `make browser` installs Chromium and Playwright.
A screenshot of the runs table goes to the test's tmp folder, and also to the path in
SPINE_ML_UI_SCREENSHOT when set (`SPINE_ML_UI_SCREENSHOT=docs/mlflow_ui.png make test-slow`).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download is not used: it drives the system Chromium with these flags.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_ENV = "SPINE_ML_UI_SCREENSHOT"
METRIC_COLUMNS = ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal")
SHOWN_COLUMNS = METRIC_COLUMNS + ("spine_ml.trial_state", "model.crop_px", "train.lr")
HIDDEN_COLUMNS = ("Dataset", "Source", "Models")  # empty for our runs; room for the metrics
SERVER_START_SECONDS = 240  # the MLflow server takes ~25 s on a loaded 2-core machine
TRIALS = 3


@pytest.fixture(scope="module")
def swept_project(tmp_path_factory, tiny_data) -> Path:
    """A project whose store holds one sweep: a parent run and TRIALS finished trial runs."""
    from conftest import TINY_CONFIG

    from spine_ml.cli import main

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's `chromium` package); `make browser` installs it")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed; `make browser` installs it")
    root = tmp_path_factory.mktemp("ui_project")
    (root / "sweeps").mkdir()
    config_path = root / "sweeps" / "tiny.yaml"
    config_path.write_text(TINY_CONFIG.format(data=tiny_data))
    code = main(["sweep", str(config_path), "--set", f"sweep.num_samples={TRIALS}", "--set", "sweep.scheduler=none",
                 "--set", "sweep.max_concurrent=2"])
    assert code == 0
    return config_path


def store_runs(config_path: Path):
    """(experiment id, parent run, finished trial runs) as the MLflow client sees them."""
    from mlflow import MlflowClient

    from spine_ml.config import load_config
    from spine_ml.tracking.store import tracking_uri

    config = load_config(config_path)
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("spine_ml.run_kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("spine_ml.trial_state") == "finished"]
    assert len(parents) == 1 and len(trials) == TRIALS
    return experiment.experiment_id, parents[0], trials


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def ui_server(config_path: Path, port: int):
    """`spine-ml ui CONFIG --port PORT` until the MLflow server answers /health; yields its output lines."""
    spine_ml = Path(sys.executable).with_name("spine-ml")
    process = subprocess.Popen([str(spine_ml), "ui", str(config_path), "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               cwd=config_path.parent.parent)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not _healthy(port):
            assert process.poll() is None, "spine-ml ui exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, \
                f"no MLflow server on port {port} after {SERVER_START_SECONDS}s:\n" + "".join(lines)
            time.sleep(1)
        yield lines
        process.terminate()  # spine-ml ui passes SIGTERM on to the MLflow server
        process.wait(timeout=60)
        for _ in range(30):
            if not port_open(port):
                break
            time.sleep(1)
        assert not port_open(port), "the MLflow server outlived `spine-ml ui` after SIGTERM"
    finally:
        if process.poll() is None or port_open(port):
            os.killpg(process.pid, signal.SIGKILL)  # the session this test started, nothing else


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def ui(swept_project):
    port = free_port()
    with ui_server(swept_project, port) as lines:
        yield {"base": f"http://127.0.0.1:{port}", "lines": lines}


@pytest.fixture(scope="module")
def browser(swept_project):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    context.set_default_timeout(60_000)
    yield context.new_page()
    context.close()


# --- driving the MLflow 3.17 runs table ------------------------------------------------------------

def close_assistant(page) -> None:
    """The 'MLflow Assistant' side panel takes a third of the width; close it when it is open."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def toggle_columns(page, names) -> None:
    """Tick (or untick) columns by exact name in the 'Columns' selector."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        title = page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$"))
        page.locator(".du-bois-light-tree-treenode").filter(has=title).locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")


def expand_run(page, run_name: str) -> None:
    """Show a parent run's child runs (collapsed by default)."""
    page.get_by_role("gridcell").filter(has=page.get_by_role("link", name=run_name, exact=True)) \
        .get_by_role("button").click()


def cell(page, run_id: str, column: str):
    return page.locator(f'.ag-row[row-id="{run_id}"] .ag-cell[col-id="{column}"]')


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# --- tests -----------------------------------------------------------------------------------------

def test_trials_listed_with_score_and_any_severe_spinal(ui, swept_project, page, tmp_path):
    experiment_id, parent, trials = store_runs(swept_project)
    printed = [line for line in ui["lines"] if line.startswith("runs of experiment")]
    assert printed, "spine-ml ui did not print the runs page:\n" + "".join(ui["lines"])
    url = printed[0].split(": ", 1)[1].strip()
    assert url == f"{ui['base']}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"

    page.goto(url, wait_until="load")
    page.get_by_role("link", name=parent.info.run_name, exact=True).wait_for()
    close_assistant(page)
    toggle_columns(page, HIDDEN_COLUMNS + SHOWN_COLUMNS)
    expand_run(page, parent.info.run_name)
    for name in ("score", "any_severe_spinal"):
        assert page.get_by_role("columnheader", name=name, exact=True).first.is_visible()
    for trial in trials:
        assert page.get_by_role("link", name=trial.info.run_name, exact=True).is_visible()
        for metric in METRIC_COLUMNS:
            shown = cell(page, trial.info.run_id, f"metrics.`{metric}`").inner_text().strip()
            assert float(shown) == pytest.approx(trial.data.metrics[metric], rel=1e-9), (trial.info.run_name, metric)
        assert cell(page, trial.info.run_id, "tags.`spine_ml.trial_state`").inner_text().strip() == "finished"
        assert cell(page, trial.info.run_id, "params.`model.crop_px`").inner_text().strip() in ("16", "24")
    assert cell(page, parent.info.run_id, "metrics.`score`").inner_text().strip() == "-"  # a sweep has no score

    shot = tmp_path / "mlflow_ui.png"
    # down to just below the table's last row: no empty page in the README
    bottom = page.evaluate("() => Math.max(...[...document.querySelectorAll('.ag-row')]"
                           ".map(row => row.getBoundingClientRect().bottom))")
    height = int(min(900, bottom + 48))
    page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1600, "height": height})
    assert png_size(shot.read_bytes()) == (1600, height) and shot.stat().st_size < 1_000_000
    if os.environ.get(SCREENSHOT_ENV):
        target = Path(os.environ[SCREENSHOT_ENV])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_trial_and_sweep_plots_preview_as_images(ui, swept_project, page, tmp_path):
    from mlflow import MlflowClient

    from spine_ml.config import load_config
    from spine_ml.tracking.store import tracking_uri

    experiment_id, parent, trials = store_runs(swept_project)
    client = MlflowClient(tracking_uri(load_config(swept_project)))
    for run_id, name in ((trials[0].info.run_id, "confusion.png"), (trials[0].info.run_id, "reliability.png"),
                         (parent.info.run_id, "optimisation_history.png")):
        logged = Path(client.download_artifacts(run_id, f"plots/{name}", str(tmp_path / run_id)))
        page.goto(f"{ui['base']}/#/experiments/{experiment_id}/runs/{run_id}/artifacts?workflowType=machine_learning",
                  wait_until="load")
        page.get_by_text("plots", exact=True).first.click()
        page.get_by_text(name, exact=True).first.click()
        image = page.locator(f'img[alt="plots/{name}"]').first  # the preview (a blob: URL)
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        shown = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert tuple(shown) == png_size(logged.read_bytes()), name
