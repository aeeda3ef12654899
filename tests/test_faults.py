"""Faults from outside the code: an unwritable or full disk, a trial's worker killed, the MLflow
server going away mid-sweep. Each must end in a clear error (or a retry), never a traceback, a
half-written file that looks complete, or a run left RUNNING.

(Killing the sweep driver and resuming is tests/test_sweep_faults.py.)

A full disk is real where we may mount a small tmpfs (root); elsewhere those tests skip and the
RLIMIT_FSIZE test (any user: writes past the limit fail with EFBIG) stands in for it.
"""
from __future__ import annotations

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
