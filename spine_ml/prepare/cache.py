"""The crop cache: every labelled (study, condition, level) as a 2.5D patch, built once per setting.

Layout under `prepare.cache_dir`:
```
<name>/                      one complete cache; <name> = settings + hash of data fingerprint and settings
  patches.f16                raw float16 (samples, slices, P, P), memory-mapped by readers
  index.csv                  one row per (train study, condition, level); `sample` = row in patches or -1
  studies.csv                study_id, missing_series, problems
  meta.json                  settings, fingerprint, counts, build time (written last: marks it complete)
  folds-k{K}-seed{S}.csv     study-level folds, one file per cv setting
<name>.lock                  serialises concurrent builders (filelock)
<name>.building-<pid>/       a build in progress; renamed to <name> when complete, removed if abandoned
```
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.prepare import plan as P
from spine_ml.prepare.folds import folds_file_name, make_folds, read_folds

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the crop function or layout changes: old caches then never match
INDEX_COLUMNS = ["sample", "study_id", "series_id", "series_description", "condition", "level", "row_id", "label",
                 "sample_weight", "instance_number", "x", "y", "status"]


def data_fingerprint(root: Path) -> dict:
    """Cheap summary of a data root: CSV sizes/mtimes + names, mtimes and file counts of series folders."""
    csvs = {}
    for name in (P.TRAIN_LABELS, P.COORDINATES, P.SERIES):
        stat = (root / name).stat() if (root / name).is_file() else None
        csvs[name] = [stat.st_size, stat.st_mtime_ns] if stat else None
    digest = hashlib.sha256()
    series_count = 0
    images = root / P.IMAGES
    studies = sorted(os.scandir(images), key=lambda e: e.name) if images.is_dir() else []
    for study in studies:
        if not study.is_dir():
            continue
        for series in sorted(os.scandir(study.path), key=lambda e: e.name):
            if series.is_dir():
                entries = sum(1 for _ in os.scandir(series.path))
                digest.update(f"{study.name}/{series.name}:{series.stat().st_mtime_ns}:{entries}\n".encode())
                series_count += 1
    return {"csvs": csvs, "series": series_count, "images": digest.hexdigest()}


def prepare_settings(prepare_cfg) -> dict:
    """The settings that change the crops (not where they live or how many processes cut them)."""
    return {"slices": prepare_cfg.slices, "patch_mm": prepare_cfg.patch_mm, "pixel_mm": prepare_cfg.pixel_mm,
            "percentiles": list(prepare_cfg.percentiles)}


def cache_name(fingerprint: dict, prepare_cfg) -> str:
    settings = prepare_settings(prepare_cfg)
    blob = json.dumps({"format": CACHE_FORMAT, "data": fingerprint, "prepare": settings}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"crops-s{settings['slices']}-{settings['patch_mm']:g}mm-{settings['pixel_mm']:g}mmpx-{key}"


@dataclass
class CropCache:
    path: Path
    patches: np.ndarray  # np.memmap (N, slices, P, P) float16, read-only
    index: pd.DataFrame  # INDEX_COLUMNS + fold
    folds: pd.DataFrame  # study_id, fold
    study_table: pd.DataFrame  # study_id, missing_series, problems
    meta: dict
    folds_path: Path
    built_now: bool = False
    build_seconds: float = field(default=0.0)

    @property
    def patch_px(self) -> int:
        return int(self.meta["patch_px"])

    @property
    def pixel_mm(self) -> float:
        return float(self.meta["prepare"]["pixel_mm"])

    @property
    def slices(self) -> int:
        return int(self.meta["prepare"]["slices"])

    @property
    def studies(self) -> np.ndarray:
        return self.study_table.study_id.to_numpy()

    def trainable_rows(self) -> np.ndarray:
        """Index rows with a sample and a label (what training and OOF scoring use)."""
        return np.flatnonzero((self.index["sample"].to_numpy() >= 0) & (self.index.label.to_numpy() >= 0))

    def summary(self) -> dict:
        index = self.index
        return {
            "cache": str(self.path),
            "samples": int((index["sample"] >= 0).sum()),
            "studies": int(len(self.study_table)),
            "studies_missing_series": int((self.study_table.missing_series != "").sum()),
            "labels_missing": int((index.label < 0).sum()),
            "samples_without_label": int(((index["sample"] >= 0) & (index.label < 0)).sum()),
            "rows_without_sample": int((index["sample"] < 0).sum()),
            "patch": f"{self.slices}x{self.patch_px}x{self.patch_px} at {self.pixel_mm:g} mm/px",
            "folds": str(self.folds_path),
            "built_now": self.built_now,
            "seconds": round(self.build_seconds, 2),
        }


def _is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def open_cache(path: Path, cv_cfg) -> CropCache:
    """Open a complete cache read-only and attach the folds of a cv setting (made once, under a lock)."""
    meta = json.loads((path / "meta.json").read_text())
    shape = tuple(meta["shape"])
    if shape[0]:
        patches = np.memmap(path / "patches.f16", dtype=np.float16, mode="r", shape=shape)
    else:
        patches = np.zeros(shape, dtype=np.float16)
    index = pd.read_csv(path / "index.csv", keep_default_na=False, na_values={"x": [""], "y": [""]},
                        dtype={"series_description": str, "status": str})
    study_table = pd.read_csv(path / "studies.csv", keep_default_na=False,
                              dtype={"missing_series": str, "problems": str})
    folds_path = path / folds_file_name(cv_cfg.folds, cv_cfg.seed)
    folds = _ensure_folds(path, folds_path, index, cv_cfg)
    index = index.merge(folds, on="study_id", how="left", validate="many_to_one")
    return CropCache(path=path, patches=patches, index=index, folds=folds, study_table=study_table,
                     meta=meta, folds_path=folds_path)


def _ensure_folds(path: Path, folds_path: Path, index: pd.DataFrame, cv_cfg) -> pd.DataFrame:
    if folds_path.is_file():
        return read_folds(folds_path)
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        if not folds_path.is_file():
            folds = make_folds(index[["study_id", "condition", "level", "label"]], cv_cfg.folds, cv_cfg.seed)
            partial = folds_path.with_suffix(f".tmp-{os.getpid()}")
            folds.to_csv(partial, index=False)
            os.replace(partial, folds_path)
    return read_folds(folds_path)


def _remove_abandoned(cache_dir: Path, name: str) -> None:
    """Partial builds left by an interrupted run (we hold the lock, so none is live)."""
    for partial in cache_dir.glob(f"{name}.building-*"):
        log.info("removing an interrupted build %s", partial)
        shutil.rmtree(partial, ignore_errors=True)


def build_cache(root: Path, target: Path, prepare_cfg, fingerprint: dict, progress: bool) -> float:
    """Build into `<target>.building-<pid>` and rename it to `target` when complete; returns seconds."""
    from spine_ml.prepare.build import apply_results, write_samples

    index, studies, tasks = P.plan(root)
    building = target.with_name(f"{target.name}.building-{os.getpid()}")
    building.mkdir(parents=True)
    try:
        results, samples, files, seconds = write_samples(tasks, prepare_cfg, building / "patches.f16", progress)
    except BaseException:  # a full disk or Ctrl-C: give the space back now, not at the next build
        shutil.rmtree(building, ignore_errors=True)
        raise
    apply_results(index, studies, results)
    index[INDEX_COLUMNS].to_csv(building / "index.csv", index=False)
    studies.to_csv(building / "studies.csv", index=False)
    rate = len(tasks) / seconds if seconds > 0 else float("inf")
    meta = {"format": CACHE_FORMAT, "prepare": prepare_settings(prepare_cfg), "patch_px": prepare_cfg.patch_px,
            "shape": [samples, prepare_cfg.slices, prepare_cfg.patch_px, prepare_cfg.patch_px],
            "data_root": str(root), "fingerprint": fingerprint, "studies": len(tasks), "dicom_files": files,
            "build_seconds": round(seconds, 3), "studies_per_second": round(rate, 3),
            "workers": prepare_cfg.workers}
    (building / "meta.json").write_text(json.dumps(meta, indent=1))
    if target.exists():
        _swap_in(building, target)
    else:
        os.replace(building, target)
    log.info("crop cache %s: %d samples from %d studies (%d DICOM files) in %.1f s, %.1f studies/s",
             target.name, samples, len(tasks), files, seconds, rate)
    return seconds


def _swap_in(building: Path, target: Path) -> None:
    """--force over an existing cache: move the old one aside first, so a reader never sees a mix."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(building, target)
    shutil.rmtree(old, ignore_errors=True)


def ensure_cache(config, force: bool = False, progress: bool | None = None) -> CropCache:
    """Open the cache of this config's data and prepare settings, building it first when absent
    (or when `force`). Does not generate data: callers run `ensure_synthetic` first."""
    from filelock import FileLock, Timeout

    root = config.path(config.data.root)
    P.require_data(root)
    cache_dir = config.path(config.prepare.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = data_fingerprint(root)
    target = cache_dir / cache_name(fingerprint, config.prepare)
    if progress is None:
        progress = os.environ.get("SPINE_ML_QUIET") != "1"
    seconds, built = 0.0, False
    if force or not _is_complete(target):
        lock = FileLock(str(target) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another process is building %s; waiting for it", target.name)
            lock.acquire()
        try:
            if force or not _is_complete(target):
                _remove_abandoned(cache_dir, target.name)
                seconds, built = build_cache(root, target, config.prepare, fingerprint, progress), True
        finally:
            lock.release()
    cache = open_cache(target, config.cv)
    cache.built_now, cache.build_seconds = built, seconds or float(cache.meta.get("build_seconds", 0.0))
    return cache


def ensure_data(config) -> None:
    """Generate the synthetic stand-in when the config asks for one and it is absent."""
    if config.data.synthetic is None:
        return
    from spine_ml.synth.generate import ensure_synthetic

    ensure_synthetic(config)


def cli(args) -> int:
    """`spine-ml prepare CONFIG [--set k=v] [--force]`: build (or reuse) the cache and print a summary."""
    from spine_ml.config import load_config

    config = load_config(args.config, args.overrides)
    ensure_data(config)
    started = time.perf_counter()
    cache = ensure_cache(config, force=args.force)
    summary = cache.summary()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if cache.built_now:
        summary["studies_per_second"] = cache.meta["studies_per_second"]
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0
