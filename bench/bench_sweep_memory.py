"""Peak memory of a sweep with 2 concurrent trials: the driver and every process Ray starts under it.

`spine-ml sweep` runs as a child of this script; psutil samples its whole process tree (driver, GCS,
raylet, idle workers, the trial actors) every --interval seconds. Reported:

- peak_rss_total_mib: the largest sum of RSS over the tree (shared pages count once per process,
  so this overstates the machine's use; it is what `ps` users add up),
- peak_pss_total_mib: the largest sum of PSS (shared pages split between their users; the honest
  total), sampled every fourth sample because reading smaps is slower,
- peak_rss_driver_mib, peak_rss_per_trial_mib (the largest single trial process), peak_trials_alive,
- rss_total_over_trials: peak total ÷ (concurrent trials × peak per-trial RSS), the overhead of the
  driver and Ray around the trials, as a ratio within this one run.

    .venv/bin/python bench/bench_sweep_memory.py [--config sweeps/demo.yaml] [--json out.json]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import project_copy, report  # noqa: E402 - bench/ is the script's folder

PROJECT = Path(__file__).resolve().parents[1]
TRIAL_MARKERS = ("ray::ImplicitFunc", "run_sweep_trial")


def is_trial(process) -> bool:
    try:
        title = " ".join(process.cmdline()) or process.name()
    except Exception:  # noqa: BLE001 - a process that just exited
        return False
    return any(marker in title for marker in TRIAL_MARKERS)


def sample_tree(root, with_pss: bool) -> dict | None:
    """RSS (and PSS) of the driver and all its descendants, in MiB; None once the driver is gone."""
    import psutil

    try:
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    total = driver = pss = 0.0
    trials = []
    for process in processes:
        try:
            rss = process.memory_info().rss / 2 ** 20
            if with_pss:
                pss += process.memory_full_info().pss / 2 ** 20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += rss
        if process.pid == root.pid:
            driver = rss
        elif is_trial(process):
            trials.append(rss)
    return {"total": total, "driver": driver, "pss": pss if with_pss else None, "trials": trials,
            "processes": len(processes), "started": started_at(processes[1:])}


def started_at(processes) -> dict[int, float]:
    """pid -> creation time: a pid alone may be reused by someone else's process later."""
    import psutil

    out = {}
    for process in processes:
        try:
            out[process.pid] = process.create_time()
        except psutil.Error:
            pass
    return out


def measure(command: list[str], interval: float, timeout: float) -> dict:
    import psutil

    started = time.perf_counter()
    driver = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    peaks = {"total": 0.0, "driver": 0.0, "pss": 0.0, "trial": 0.0, "trials_alive": 0, "processes": 0}
    seen: dict[int, float] = {}
    count = 0
    try:
        while driver.poll() is None:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"sweep still running after {timeout:.0f} s")
            sample = sample_tree(driver, with_pss=count % 4 == 0)
            count += 1
            if sample is not None:
                seen.update(sample["started"])
                peaks["total"] = max(peaks["total"], sample["total"])
                peaks["driver"] = max(peaks["driver"], sample["driver"])
                peaks["pss"] = max(peaks["pss"], sample["pss"] or 0.0)
                peaks["trial"] = max([peaks["trial"], *sample["trials"]])
                peaks["trials_alive"] = max(peaks["trials_alive"], len(sample["trials"]))
                peaks["processes"] = max(peaks["processes"], sample["processes"])
            time.sleep(interval)
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_leftovers(seen)
    stderr = driver.stderr.read().decode(errors="replace") if driver.stderr else ""
    if driver.returncode != 0:
        raise RuntimeError(f"sweep exited with {driver.returncode}: {stderr[-2000:]}")
    return {**peaks, "wall": time.perf_counter() - started, "samples": count}


def stop_leftovers(started: dict[int, float]) -> None:
    """Ray processes of this sweep that outlived its driver, by pid and creation time (nobody else's)."""
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
    _, remaining = psutil.wait_procs(alive, timeout=10)
    for process in remaining:
        process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "sweeps" / "demo.yaml"))
    parser.add_argument("--trials", type=int, default=2, help="trials in the sweep (2 run at once)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    spine = [sys.executable, "-m", "spine_ml", "-q"]
    overrides = ["sweep.max_concurrent=2", f"sweep.num_samples={args.trials}", "sweep.scheduler=none",
                 "sweep.name=bench-memory", "tracking.experiment=bench-memory"]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        config = project_copy(Path(args.config).resolve(), Path(folder))
        settings = [a for o in overrides for a in ("--set", o)]
        # data and crop cache first, outside the measurement: the sweep itself is what is measured
        subprocess.run(spine + ["prepare", str(config), *settings], check=True, stdout=subprocess.DEVNULL)
        peaks = measure(spine + ["sweep", str(config), *settings], args.interval, args.timeout)
        shutil.rmtree(Path(folder) / "mlruns", ignore_errors=True)
    figures = {
        "peak_rss_total_mib": round(peaks["total"]),
        "peak_pss_total_mib": round(peaks["pss"]),
        "peak_rss_driver_mib": round(peaks["driver"]),
        "peak_rss_per_trial_mib": round(peaks["trial"]),
        "peak_trials_alive": peaks["trials_alive"],
        "peak_processes": peaks["processes"],
        "rss_total_over_trials": round(peaks["total"] / max(1.0, 2 * peaks["trial"]), 2),
        "sweep_wall_s": round(peaks["wall"], 1),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
