"""`spine-ml synth`: plan the studies, make them in parallel, write the tables, report the floor and
ceiling (oracle and best constant prior) against the drawn labels.

Determinism: each study's random streams come from (seed, split, index) only, ids from the seed
only, and the tables are written in study-id order, so the worker count never changes a byte.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spine_ml.errors import UserError
from spine_ml.synth.study import TRAIN_IRREGULARITIES, StudyResult, StudyTask, make_study

log = logging.getLogger(__name__)

DATASET_ENTRIES = ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv", "train_images",
                   "test_series_descriptions.csv", "test_images", "sample_submission.csv",
                   "oracle_train.csv", "oracle_test.csv", "test_labels.csv", "test_label_coordinates.csv")
SERIES_IDS_PER_STUDY = 5
# Forced at least once per generation, so every small data set meets every code path.
FORCED_TEST = ("no_axial", "no_spacing_tags")


class SynthError(UserError):
    """Bad arguments for the synthetic data set, or a target folder that cannot be used."""


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    train_studies: int
    test_studies: int
    files: int
    seconds: float
    oracle: dict[str, float]
    prior: dict[str, float]
    irregularities: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        def parts(values: dict[str, float]) -> str:
            return "  ".join(f"{k} {v:.4f}" for k, v in values.items())
        return [
            f"wrote {self.train_studies} train + {self.test_studies} test studies, {self.files} DICOM files "
            f"in {self.seconds:.1f} s -> {self.out}",
            "irregularities (studies): " + ", ".join(f"{k} {v}" for k, v in sorted(self.irregularities.items())),
            f"oracle (true probabilities) vs train labels:  {parts(self.oracle)}",
            f"best constant prior vs train labels:          {parts(self.prior)}",
        ]


def _unique_ids(rng: np.random.Generator, count: int) -> list[int]:
    """Random integers like the real ids (7-10 digits), all different, in draw order."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < count:
        for value in rng.integers(1_000_000, 4_294_967_295, count - len(ids)).tolist():
            if value not in seen:
                seen.add(value)
                ids.append(value)
    return ids


def _forced(names, count: int, rng: np.random.Generator) -> list[frozenset[str]]:
    """Spread the must-appear irregularities over distinct studies (round-robin past count)."""
    assigned: list[set[str]] = [set() for _ in range(count)]
    if count:
        order = rng.permutation(count)
        for k, name in enumerate(names):
            assigned[order[k % count]].add(name)
    return [frozenset(a) for a in assigned]


def plan_tasks(out: Path, studies: int, test_studies: int, seed: int, image_size: int) -> list[StudyTask]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    study_ids = _unique_ids(rng, studies + test_studies)
    series_ids = _unique_ids(rng, (studies + test_studies) * SERIES_IDS_PER_STUDY)
    forced = _forced(TRAIN_IRREGULARITIES, studies, rng) + _forced(FORCED_TEST, test_studies, rng)
    tasks = []
    for k, study_id in enumerate(study_ids):
        split, index = ("train", k) if k < studies else ("test", k - studies)
        tasks.append(StudyTask(split, index, study_id,
                               tuple(series_ids[k * SERIES_IDS_PER_STUDY:(k + 1) * SERIES_IDS_PER_STUDY]),
                               seed, image_size, forced[k], str(out / f"{split}_images")))
    return tasks


def _check_arguments(studies: int, test_studies: int, image_size: int) -> None:
    if studies < 1:
        raise SynthError(f"--studies must be at least 1 (got {studies})")
    if test_studies < 0:
        raise SynthError(f"--test-studies must be 0 or more (got {test_studies})")
    if not 32 <= image_size <= 1024:
        raise SynthError(f"--image-size must be between 32 and 1024 pixels (got {image_size})")


def existing_entries(out: Path) -> list[str]:
    return [e for e in DATASET_ENTRIES if (out / e).exists()]


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} is a file; give a folder for the data set")
    existing = existing_entries(out)
    if existing and not force:
        raise SynthError(f"{out} already holds a data set ({', '.join(existing[:4])}); pass --force to "
                         "replace it, or choose another folder")
    if existing:
        log.warning("--force: replacing the data set in %s (%s)", out, ", ".join(existing))
    for entry in existing:
        target = out / entry
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _run(tasks: list[StudyTask], workers: int) -> list[StudyResult]:
    from spine_ml.cpus import available_cpus
    from spine_ml.progress import progress as progress_bar

    if not workers:  # all cores, but a spawned process only pays for itself over a few studies
        workers = min(available_cpus(), -(-len(tasks) // 4))
    workers = min(workers, len(tasks))
    progress = progress_bar(total=len(tasks), desc="synth studies", unit="study")
    results = []
    if workers <= 1:
        for task in tasks:
            results.append(make_study(task))
            progress.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold threads (torch, Ray) that fork would copy mid-lock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(make_study, tasks, chunksize=1):
                results.append(result)
                progress.update()
    progress.close()
    return results


def generate_dataset(out: Path, studies: int, test_studies: int, seed: int, image_size: int = 160,
                     workers: int = 0, force: bool = False) -> SynthSummary:
    """Write the Kaggle layout (+ oracle files) for ``studies`` train and ``test_studies`` test studies."""
    from spine_ml.synth.scoring import floor_and_ceiling
    from spine_ml.synth.writer import write_tables

    _check_arguments(studies, test_studies, image_size)
    out = Path(out)
    _prepare_out(out, force)
    start = time.perf_counter()
    results = _run(plan_tasks(out, studies, test_studies, seed, image_size), workers)
    write_tables(out, results)
    seconds = time.perf_counter() - start
    oracle, prior = floor_and_ceiling(out)
    counts: dict[str, int] = {}
    for result in results:
        for name in result.irregularities:
            counts[name] = counts.get(name, 0) + 1
    return SynthSummary(out, studies, test_studies, sum(r.files for r in results), seconds,
                        oracle.as_dict(), prior.as_dict(), counts)


def ensure_synthetic(config) -> Path:
    """Generate the config's synthetic data set where ``data.root`` has none yet; return the root.

    Two processes may ask at once (a sweep's workers): a file lock lets one generate, the others
    wait and then find train.csv. The set is made in a temporary sibling folder and moved in, so
    a crash never leaves a half data set that looks complete.
    """
    root = config.path(config.data.root)
    spec = config.data.synthetic
    if spec is None or (root / "train.csv").exists():
        return root
    from filelock import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if (root / "train.csv").exists():
            return root
        log.info("generating the synthetic data set in %s (%d + %d studies, seed %d)", root,
                 spec.studies, spec.test_studies, spec.seed)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging.", dir=root.parent))
        try:
            generate_dataset(staging, spec.studies, spec.test_studies, spec.seed, spec.image_size, force=True)
            _move_into(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _move_into(staging: Path, root: Path) -> None:
    if not root.exists():
        os.rename(staging, root)
        return
    clashes = existing_entries(root)
    if clashes:
        raise SynthError(f"{root} holds part of a data set ({', '.join(clashes)}) but no train.csv; "
                         "remove those entries (or point data.root elsewhere) and run again")
    names = sorted(p.name for p in staging.iterdir())
    for name in sorted(names, key=lambda n: n == "train.csv"):  # train.csv last: it marks completion
        os.rename(staging / name, root / name)


def cli(args) -> int:
    """`spine-ml synth OUT [--studies N] [--test-studies M] [--seed S] [--image-size PX] [--preview ID]`."""
    out = Path(args.out)
    if args.preview is not None and existing_entries(out) and not args.force:
        from spine_ml.synth.preview import write_preview

        print(f"{out} already holds a data set; kept it (use --force to regenerate)")
        print(f"preview: {write_preview(out, args.preview)}")
        return 0
    summary = generate_dataset(out, args.studies, args.test_studies, args.seed, args.image_size,
                               args.workers, args.force)
    print("\n".join(summary.lines()))
    if args.preview is not None:
        from spine_ml.synth.preview import write_preview

        print(f"preview: {write_preview(out, args.preview)}")
    return 0
