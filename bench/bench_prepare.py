"""Prepare and data-loading speed, as ratios measured in one run (medians over interleaved repeats).

1. prepare wall ÷ pure pydicom decode (dcmread + pixel_array) of the same files: the overhead of
   grouping, geometry, cropping, resampling and writing on top of a plain decode (≤ 1.5). At 1 worker
   both run in this process; at all cores the decode runs in the same kind of process pool as
   prepare (same worker count, one study per task), so both pay the pool's start-up. Both sides
   are warmed once first (page cache, imports, the forkserver). Also the 1-worker ratio of CPU
   seconds, steadier than wall time on a loaded machine.
2. an epoch read from the cache vs the same epoch cut from DICOM (read_series + crop_sample per study,
   what skipping the cache would cost every epoch), both through the same crop/resize (≥ 20× faster);
   also reported with the training augmentation added to both sides.

    .venv/bin/python bench/bench_prepare.py                     # synthetic, 60 studies at 160 px
    .venv/bin/python bench/bench_prepare.py --image-size 384    # real Kaggle slices are 384-512 px
    .venv/bin/python bench/bench_prepare.py --data data --repeats 3   # any Kaggle-layout folder
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("SPINE_ML_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def timed_cpu(function) -> tuple[float, float]:
    """(wall, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_config(data: Path, workdir: Path, workers: int, sweep: str):
    """The sweep config's prepare/model/augment settings, over `data`, caching under `workdir`."""
    from spine_ml.config import load_config

    base = Path(__file__).resolve().parents[1] / "sweeps" / sweep
    return load_config(base, [f"data.root={data}", f"prepare.cache_dir={workdir / 'cache'}",
                              f"prepare.workers={workers}", "data.synthetic=null"])


def prepared_files(config) -> list[list[Path]]:
    """Per prepare task (study): every DICOM file of every series the cache reads (the series its
    samples come from), which is every file prepare opens and decodes."""
    from spine_ml.dicom.read import list_slice_files
    from spine_ml.prepare.plan import plan

    _, _, tasks = plan(config.path(config.data.root))
    return [[path for series in sorted({r.series_id for r in task.requests})
             for path in list_slice_files(task.folder / str(series))] for task in tasks]


def decode_files(files: list[Path]) -> int:
    import pydicom

    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the point
    return len(files)


def pure_decode(groups: list[list[Path]]) -> None:
    for files in groups:
        decode_files(files)


def pure_decode_parallel(groups: list[list[Path]], workers: int) -> None:
    """The decode in prepare's own process pool: same worker count, one study per task."""
    from spine_ml.prepare.build import process_pool, worker_count

    with process_pool(worker_count(workers, len(groups))) as pool:
        for _ in pool.map(decode_files, groups, chunksize=1):
            pass


def prepare_once(config) -> None:
    from spine_ml.prepare.cache import ensure_cache

    ensure_cache(config, force=True, progress=False)


def dicom_epoch(config, tasks, transform) -> int:
    """Cut every sample from DICOM (what an epoch costs without the cache), then the transform."""
    import torch

    from spine_ml.prepare.build import crop_study

    count = 0
    for task in tasks:
        result = crop_study(task, config.prepare)
        if result.patches is not None:
            for patch in result.patches:
                transform(torch.from_numpy(patch.astype("float32")), count)
                count += 1
    return count


def cache_epoch(dataset) -> int:
    from torch.utils.data import DataLoader

    count = 0
    for batch in DataLoader(dataset, batch_size=64, shuffle=True, num_workers=0):
        count += len(batch["image"])
    return count


def epoch_ratio(config, repeats: int) -> dict:
    """Epoch from the cache vs from DICOM: reading only (centre crop, resize), and with the
    training augmentation on both sides (the same per-sample work added to each)."""
    import numpy as np

    from spine_ml.prepare import augment as A
    from spine_ml.prepare.cache import ensure_cache
    from spine_ml.prepare.dataset import CropDataset
    from spine_ml.prepare.plan import plan

    cache = ensure_cache(config, progress=False)
    rows = np.flatnonzero(cache.index["sample"] >= 0)
    crop_px, input_px, augment = config.model.crop_px, config.model.input_px, config.train.augment
    reading = CropDataset(cache, rows, crop_px, input_px, None, seed=0)
    training = CropDataset(cache, rows, crop_px, input_px, augment, seed=0)
    _, _, tasks = plan(config.path(config.data.root))
    jitters = A.draw_jitters(np.random.default_rng([0, 0]), augment, len(rows))

    def read_transform(patch, item):
        return A.resize(A.centre_crop(patch, crop_px), input_px)

    def train_transform(patch, item):
        jitter = jitters[item]
        return A.resize(A.adjust_intensity(A.affine_crop(patch, crop_px, jitter), jitter), input_px)

    times = {key: [] for key in ("cache_read", "dicom_read", "cache_train", "dicom_train")}
    for _ in range(repeats):
        times["cache_read"].append(timed(lambda: cache_epoch(reading)))
        times["dicom_read"].append(timed(lambda: dicom_epoch(config, tasks, read_transform)))
        times["cache_train"].append(timed(lambda: cache_epoch(training)))
        times["dicom_train"].append(timed(lambda: dicom_epoch(config, tasks, train_transform)))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {"samples": len(rows), **{f"epoch_{key}_s": round(value, 3) for key, value in median.items()},
            "cache_speedup_reading": round(median["dicom_read"] / median["cache_read"], 1),
            "cache_speedup_with_augmentation": round(median["dicom_train"] / median["cache_train"], 1)}


def prepare_ratio(data: Path, workdir: Path, repeats: int, sweep: str) -> dict:
    serial = bench_config(data, workdir / "serial", 1, sweep)
    parallel = bench_config(data, workdir / "parallel", 0, sweep)
    groups = prepared_files(serial)
    pure_decode(groups)  # warm the page cache and pydicom's imports so neither side pays for them
    prepare_once(serial)  # and prepare's imports (pandas, scipy, the crop code)
    pure_decode_parallel(groups, 0)  # and the forkserver both pools fork their workers from
    times = {key: [] for key in ("decode", "decode_cpu", "serial", "serial_cpu", "decode_parallel", "parallel")}
    for _ in range(repeats):
        for key, function in (("decode", lambda: pure_decode(groups)), ("serial", lambda: prepare_once(serial))):
            wall, cpu = timed_cpu(function)
            times[key].append(wall)
            times[f"{key}_cpu"].append(cpu)
        times["decode_parallel"].append(timed(lambda: pure_decode_parallel(groups, 0)))
        times["parallel"].append(timed(lambda: prepare_once(parallel)))
    median = {key: statistics.median(values) for key, values in times.items()}
    from spine_ml.prepare.build import worker_count

    return {"files": sum(map(len, groups)), "decode_s": round(median["decode"], 3),
            "prepare_1_worker_s": round(median["serial"], 3),
            "decode_all_cores_s": round(median["decode_parallel"], 3),
            "prepare_all_cores_s": round(median["parallel"], 3), "cores": worker_count(0, len(groups)),
            "prepare_over_decode_1_worker": round(median["serial"] / median["decode"], 3),
            "prepare_over_decode_1_worker_cpu": round(median["serial_cpu"] / median["decode_cpu"], 3),
            "prepare_over_decode_all_cores": round(median["parallel"] / median["decode_parallel"], 3)}, serial


def synthetic_data(workdir: Path, studies: int, image_size: int) -> Path:
    from spine_ml.synth.generate import generate_dataset

    out = workdir / "data"
    generate_dataset(out, studies=studies, test_studies=0, seed=0, image_size=image_size, workers=0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a Kaggle-layout folder (default: generate a synthetic one)")
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", default="demo.yaml", help="sweeps/ file whose prepare/model settings to use")
    parser.add_argument("--prepare-only", action="store_true", help="skip the epoch figures (2.)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        data = args.data.resolve() if args.data else synthetic_data(workdir, args.studies, args.image_size)
        results, serial_config = prepare_ratio(data, workdir, args.repeats, args.sweep)
        if not args.prepare_only:
            results.update(epoch_ratio(serial_config, args.repeats))
    results["load_average_start_end"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    results["pass"] = bool(results["prepare_over_decode_1_worker"] <= 1.5
                           and (args.prepare_only or results["cache_speedup_reading"] >= 20))
    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:<32} {value}")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
