"""Cut every planned sample, one study per task, in worker processes; write them in study order.

Workers import only numpy/scipy/pydicom (never pandas), and start from a forkserver that has them
loaded already, so a pool of N workers costs about one import, not N.
Results come back in task order, which keeps the cache byte-identical for any worker count.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# status of an index row; only "ok" rows have a sample
OK = "ok"
NO_COORDINATES = "no_coordinates"
UNKNOWN_SERIES = "unknown_series"  # series id absent from the descriptions CSV, or an unknown description
MISSING_SERIES = "missing_series"  # folder missing, empty, or nothing readable in it
INSTANCE_NOT_FOUND = "instance_not_found"


@dataclass
class Request:
    """One sample to cut: index row `row`, from a series, at a labelled instance and point."""
    row: int
    series_id: int
    instance_number: int
    x: float
    y: float


@dataclass
class StudyTask:
    study_id: int
    folder: Path  # train_images/{study_id}
    requests: list[Request] = field(default_factory=list)


@dataclass
class StudyResult:
    study_id: int
    rows: list[int] = field(default_factory=list)  # index rows that got a sample, in patch order
    patches: np.ndarray | None = None  # (len(rows), slices, P, P) float16
    status: dict[int, str] = field(default_factory=dict)  # index row -> status, for rows without a sample
    clipped: dict[int, tuple[float, float]] = field(default_factory=dict)  # row -> coordinate after clipping
    problems: list[str] = field(default_factory=list)
    files: int = 0  # DICOM files read


def crop_study(task: StudyTask, prepare_cfg) -> StudyResult:
    """Read each series a study's samples need (once) and cut the samples, all sites of a stack in
    one `crop_samples` call."""
    from spine_ml.dicom.read import read_series
    from spine_ml.prepare.crops import clip_point, crop_samples

    result = StudyResult(task.study_id)
    by_series: dict[int, list] = {}
    for request in task.requests:
        by_series.setdefault(request.series_id, []).append(request)
    patches = []  # (sample numbers, float16 patches) per stack
    for series_id, requests in by_series.items():
        series = read_series(task.folder / str(series_id))
        result.files += series.file_count
        if not series.stacks:
            reason = series.problems[-1] if series.problems else "no slices"
            log.warning("study %d series %d: %s; its %d sample(s) are absent", task.study_id, series_id,
                        reason, len(requests))
            result.problems.append(f"series {series_id}: {reason}")
            result.status.update({r.row: MISSING_SERIES for r in requests})
            continue
        if series.skipped_files:
            result.problems.append(f"series {series_id}: {len(series.skipped_files)} file(s) skipped")
        sites: dict[int, tuple] = {}  # id(stack) -> (stack, sample numbers, (slice, x, y) sites)
        for request in requests:
            try:
                stack, slice_index = series.find_instance(request.instance_number)
            except KeyError:
                log.warning("study %d series %d: labelled instance %d not found among the readable slices; "
                            "sample absent", task.study_id, series_id, request.instance_number)
                result.status[request.row] = INSTANCE_NOT_FOUND
                continue
            x, y, moved = clip_point(stack, request.x, request.y)
            if moved:
                log.warning("study %d series %d instance %d: coordinate (%.1f, %.1f) lies outside the %dx%d image;"
                            " clipped to (%.1f, %.1f)", task.study_id, series_id, request.instance_number,
                            request.x, request.y, stack.columns, stack.rows, x, y)
                result.clipped[request.row] = (x, y)
            _, numbers, wanted = sites.setdefault(id(stack), (stack, [], []))
            numbers.append(len(result.rows))
            wanted.append((slice_index, x, y))
            result.rows.append(request.row)
        patches.extend((numbers, crop_samples(stack, wanted, prepare_cfg)) for stack, numbers, wanted in sites.values())
    if result.rows:
        size = prepare_cfg.patch_px
        result.patches = np.empty((len(result.rows), prepare_cfg.slices, size, size), dtype=np.float16)
        for numbers, cut in patches:
            result.patches[numbers] = cut
    return result


def _worker_start() -> None:
    """Pool workers: warnings to stderr in the CLI's format; one BLAS thread each (see run_tasks)."""
    from threadpoolctl import threadpool_limits

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threadpool_limits(limits=1)


def worker_count(requested: int, tasks: int) -> int:
    from spine_ml.cpus import available_cpus

    return max(1, min(requested or available_cpus(), tasks))


def run_tasks(tasks: list[StudyTask], prepare_cfg, workers: int):
    """Yield StudyResults in task order; in-process for one worker (no start-up cost)."""
    from functools import partial

    from spine_ml.prepare.crops import CropSettings

    prepare_cfg = CropSettings.of(prepare_cfg)
    workers = worker_count(workers, len(tasks))
    if workers == 1:
        # one BLAS thread: the crop matmuls are small, and a multi-threaded BLAS spinning on cores that
        # other processes use made them 50x slower (measured on a busy 2-core machine)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            for task in tasks:
                yield crop_study(task, prepare_cfg)
        return
    with process_pool(workers) as pool:
        yield from pool.map(partial(crop_study, prepare_cfg=prepare_cfg), tasks, chunksize=1)


def process_pool(workers: int):
    """The pool prepare cuts studies in (bench/bench_prepare.py decodes in the same kind of pool)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # forkserver, not fork: callers (training) may hold torch/OpenMP threads that a fork would copy
    # half-locked; the server is a fresh process that preloads the worker's imports once
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["spine_ml.prepare.build", "spine_ml.prepare.crops", "spine_ml.dicom.read",
                                    "pydicom", "scipy.ndimage"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start)


def write_samples(tasks: list[StudyTask], prepare_cfg, patches_path: Path, progress: bool):
    """Run every task, appending patches to a raw float16 file; returns (results, samples, files, seconds)."""
    from spine_ml.progress import progress as progress_bar

    started = time.perf_counter()
    results, samples, files = [], 0, 0
    with open(patches_path, "wb") as sink, progress_bar(total=len(tasks), unit="study", desc="prepare",
                                                          disable=not progress) as bar:
        for result in run_tasks(tasks, prepare_cfg, prepare_cfg.workers):
            if result.patches is not None:
                sink.write(np.ascontiguousarray(result.patches, dtype=np.float16).tobytes())
                samples += len(result.rows)
            result.patches = None  # written; keep only the bookkeeping in memory
            files += result.files
            results.append(result)
            bar.update(1)
    return results, samples, files, time.perf_counter() - started


def apply_results(index, studies, results: list[StudyResult]) -> None:
    """Fill `sample`, `status`, clipped coordinates and study problems in place."""
    sample = np.full(len(index), -1, dtype=np.int64)
    status = index.status.to_numpy(dtype=object).copy()
    problems = {}
    counter = 0
    for result in results:
        for row in result.rows:
            sample[row] = counter
            counter += 1
        for row, value in result.status.items():
            status[row] = value
        for row, (x, y) in result.clipped.items():
            index.loc[row, ["x", "y"]] = (x, y)
        problems[result.study_id] = "; ".join(result.problems)
    index["sample"] = sample
    index["status"] = status
    _flag_unreadable_series(index, studies)
    studies["problems"] = studies.study_id.map(problems).fillna("")
    assert (status[sample >= 0] == OK).all()


def _flag_unreadable_series(index, studies) -> None:
    """A series whose folder is missing or unreadable counts as a missing series of its study."""
    lost = index[index.status == MISSING_SERIES].groupby("study_id").series_description.agg(set)
    merged = []
    for study, listed in zip(studies.study_id, studies.missing_series):
        names = set(filter(None, listed.split(";"))) | lost.get(study, set())
        merged.append(";".join(sorted(names)))
    studies["missing_series"] = merged
