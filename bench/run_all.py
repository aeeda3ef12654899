"""`make bench`: run the benchmark scripts, collect their figures, write a table of medians.

Every figure is a ratio (or a rate) measured within one run of its script, against a reference
measured in that same run on the same machine, so machine load shifts both sides alike. Each script
runs `--runs` times (default: per script, below); the table shows the median, the range and the
target. Results: bench/results/latest.md and latest.json (git-ignored), the markdown also printed.

    .venv/bin/python bench/run_all.py            # default settings, ~20 min on 2 idle cores
    .venv/bin/python bench/run_all.py --quick    # tiny settings, a few minutes: does everything run?
    .venv/bin/python bench/run_all.py --only training prepare --runs 5

--quick sweeps a tiny synthetic set (data/bench-quick, made once) instead of the demo's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parents[1]
BENCH = PROJECT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable

QUICK_CONFIG = """\
# bench/run_all.py --quick: a sweep small enough to finish in a minute or two on 2 cores
data:
  root: {data}
  synthetic: {{studies: 24, test_studies: 0, seed: 0, image_size: 96}}
prepare: {{slices: 3, patch_mm: 32.0, pixel_mm: 1.0}}
model: {{backbone: resnet10t, pretrained: false, crop_px: 24, input_px: 24}}
train: {{epochs: 4, batch_size: 64, lr: 0.002, num_workers: 0}}
cv: {{folds: 2, seed: 42}}
search:
  model.crop_px: {{type: choice, values: [16, 24]}}
  train.lr: {{type: loguniform, low: 0.0005, high: 0.005}}
sweep: {{name: quick, num_samples: 4, max_concurrent: 2, scheduler: asha, grace_period: 1,
        resources: {{cpu: 1, gpu: 0}}}}
tracking: {{experiment: bench-quick}}
"""


@dataclass(frozen=True)
class Bench:
    name: str
    command: Callable[[bool, Path], list[str]]  # (quick, json output path) -> argv
    runs: int  # default repeats of the whole script (quick: 1)
    timeout: int  # seconds per run


def quick_config() -> Path:
    folder = RESULTS / "quick" / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quick.yaml"
    path.write_text(QUICK_CONFIG.format(data=PROJECT / "data" / "bench-quick"))
    return path


def sweep_config(quick: bool) -> str:
    return str(quick_config()) if quick else str(PROJECT / "sweeps" / "demo.yaml")


BENCHES = (
    Bench("training", lambda quick, out: [PY, str(BENCH / "bench_training.py")]
          + (["--repeats", "3", "--batches", "6"] if quick else []), runs=3, timeout=900),
    Bench("prepare", lambda quick, out: [PY, str(BENCH / "bench_prepare.py"), "--json"]
          + (["--studies", "8", "--image-size", "128", "--repeats", "1"] if quick else ["--studies", "30"]),
          runs=2, timeout=1200),
    Bench("predict", lambda quick, out: [PY, str(BENCH / "bench_predict.py")]
          + (["--test-studies", "1", "--folds", "2", "--image-size", "128", "--real-image-size", "256"]
             if quick else []), runs=2, timeout=1200),
    Bench("sweep", lambda quick, out: [PY, str(BENCH / "bench_sweep.py"), "--config", sweep_config(quick),
                                       "--trials", "4", "--json", str(out)], runs=1, timeout=2400),
    Bench("memory", lambda quick, out: [PY, str(BENCH / "bench_sweep_memory.py"), "--config", sweep_config(quick),
                                        "--json", str(out)], runs=1, timeout=1800),
)

# (bench, figure key, what it is, target as (comparison, value) or None)
TABLE = (
    ("prepare", "prepare_over_decode_1_worker", "prepare wall ÷ pydicom decode floor (1 worker)", ("<=", 1.5)),
    ("prepare", "prepare_over_decode_all_cores", "prepare wall ÷ pydicom decode floor (all cores)", None),
    ("prepare", "cache_speedup_reading", "epoch from cache vs from DICOM (×, reading)", (">=", 20)),
    ("prepare", "cache_speedup_with_augmentation", "epoch from cache vs from DICOM (×, with augmentation)", None),
    ("training", "ratio", "our train_one_epoch ÷ bare timm loop (images/s)", (">=", 0.9)),
    ("training", "bare_images_per_s", "bare timm loop, images/s (context)", None),
    ("sweep", "sweep_overhead_ratio", "sweep wall ÷ (Σ trial wall ÷ concurrency)", ("<=", 1.15)),
    ("sweep", "machinery_overhead_ratio", "sweep wall ÷ zero-overhead schedule of the same trials", None),
    ("sweep", "packing_bound_ratio", "that schedule ÷ (Σ trial wall ÷ concurrency): idle slots", None),
    ("sweep", "slot_weighted_overhead_ratio", "sweep wall ÷ (trial slot-seconds ÷ concurrency), widening counted", None),
    ("sweep", "tune_wall_overhead_ratio", "sweep wall ÷ (Σ Tune time_total_s ÷ concurrency)", None),
    ("sweep", "epoch_compute_saved", "ASHA: share of epochs saved vs full budget", (">=", 0.40)),
    ("sweep", "best_score_ratio", "ASHA: best OOF score ÷ full-budget best (lower is better)", ("<=", 1.02)),
    ("predict", "demo.studies_per_s", "predict: studies/s (localise + crop + every fold model)", None),
    ("predict", "projection.hours", "predict: projected hours for 700 real-size studies (CPU basis)", None),
    ("memory", "peak_rss_total_mib", "sweep, 2 concurrent trials: peak Σ RSS of driver + Ray tree (MiB)", None),
    ("memory", "peak_pss_total_mib", "same, Σ PSS (shared pages split; MiB)", None),
    ("memory", "peak_trials_alive", "trial processes alive at once (peak; 2 expected)", None),
    ("memory", "rss_total_over_trials", "peak Σ RSS ÷ (2 × peak RSS of one trial process)", None),
)


def parse_figures(stdout: str, json_path: Path) -> dict:
    """A script's figures: its --json file, else JSON on stdout, else `name value` lines."""
    if json_path.is_file():
        return flatten(json.loads(json_path.read_text()))
    start = stdout.find("{")
    if start >= 0:
        try:
            return flatten(json.loads(stdout[start:]))
        except json.JSONDecodeError:
            pass
    figures = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s+(-?[\d.]+(?:e-?\d+)?)\s*", line)
        if match:
            figures[match.group(1)] = float(match.group(2))
    return figures


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def run_once(bench: Bench, quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{bench.name}-") as folder:
        out = Path(folder) / "figures.json"
        command = bench.command(quick, out)
        env = {**os.environ, "SPINE_ML_QUIET": "1", "PYTHONWARNINGS": "ignore"}
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=bench.timeout, cwd=PROJECT, env=env)
        except subprocess.TimeoutExpired:
            return {"command": command, "error": f"timed out after {bench.timeout} s", "wall_s": bench.timeout}
        wall = round(time.perf_counter() - started, 1)
        figures = parse_figures(result.stdout, out)
        record = {"command": command, "returncode": result.returncode, "wall_s": wall, "figures": figures}
        if not figures:
            record["error"] = (result.stderr or result.stdout)[-1500:]
        return record


def median_row(bench: str, key: str, label: str, target, records: list[dict]) -> dict:
    values = [r["figures"][key] for r in records if isinstance(r.get("figures", {}).get(key), (int, float))]
    row = {"bench": bench, "figure": key, "label": label, "n": len(values), "target": target}
    if values:
        median = statistics.median(values)
        row.update(median=median, min=min(values), max=max(values))
        if target:
            row["met"] = median <= target[1] if target[0] == "<=" else median >= target[1]
    return row


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=PROJECT)
    return {"cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": commit.stdout.strip()}


def number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def shown(argument: str) -> str:
    """A command-line argument as a reader would type it: project-relative, temp outputs elided."""
    if argument.endswith("figures.json"):
        return "out.json"
    return os.path.relpath(argument, PROJECT) if argument.startswith(str(PROJECT)) else argument


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [f"# Benchmarks ({report['mode']}, {report['created']})", "",
             f"commit {info['commit']}; {info['cores']} cores, load average {info['load_average']} at start, "
             f"{report['load_at_end']} at end; torch {info['torch']}, "
             f"{'GPU ' + info['cuda'] if info['cuda'] else 'CPU only'}. Each figure is measured within one "
             "run against a reference from the same run; median over the runs.", "",
             "| figure | median | runs | range | target |", "|---|---|---|---|---|"]
    for row in report["table"]:
        target = f"{row['target'][0]} {row['target'][1]:g}" if row["target"] else ""
        if "median" not in row:
            lines.append(f"| {row['label']} | failed | 0 | | {target} |")
            continue
        verdict = "" if "met" not in row else (" ok" if row["met"] else " **missed**")
        spread = f"{number(row['min'])}–{number(row['max'])}" if row["n"] > 1 else ""
        lines.append(f"| {row['label']} | {number(row['median'])} | {row['n']} | {spread} | {target}{verdict} |")
    lines += ["", "Reproduce a row: run its script as below (`.venv/bin/python bench/...`).", ""]
    for name, runs in report["benches"].items():
        command = " ".join(shown(a) for a in runs[0]["command"])
        walls = ", ".join(f"{r['wall_s']:.0f}s" for r in runs)
        errors = [r["error"].strip().splitlines()[-1] for r in runs if r.get("error")]
        lines.append(f"- {name}: `{command}` ({walls})" + (f" — error: {errors[0]}" if errors else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, one run each")
    parser.add_argument("--runs", type=int, help="runs of every script (default: per script; 1 with --quick)")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.md / latest.json")
    args = parser.parse_args(argv)
    report = {"mode": "quick" if args.quick else "default", "created": time.strftime("%Y-%m-%d %H:%M"),
              "machine": machine(), "benches": {}}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        runs = args.runs or (1 if args.quick else bench.runs)
        report["benches"][bench.name] = []
        for number_ in range(runs):
            print(f"[bench] {bench.name} run {number_ + 1}/{runs} ...", file=sys.stderr, flush=True)
            record = run_once(bench, args.quick)
            report["benches"][bench.name].append(record)
            print(f"[bench] {bench.name}: {record['wall_s']:.0f}s" + (f", error: {record['error'][-300:]}"
                  if record.get("error") else ""), file=sys.stderr, flush=True)
    report["load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["table"] = [median_row(b, key, label, target, report["benches"][b])
                       for b, key, label, target in TABLE if b in report["benches"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / "latest.md").write_text(text)
    print(text)
    failed = [r["bench"] + ":" + r["figure"] for r in report["table"] if "median" not in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
