"""Localise every test study once and cut its 25 crops with prepare's own `crop_sample`.

The result is kept as one `.npz` under `predict.crops_dir`, keyed by the test data (series list and
every image's path and size), the crop settings (prepare section), the localizer and the source of
the code that decides the crops (`code_fingerprint`). Ensemble
members with the same prepare settings reuse it: localisation and DICOM reading happen once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V

log = logging.getLogger(__name__)
CROPS_FORMAT = 1
ROW_COLUMNS = ["row_id", "study_id", "condition", "level", "crop", "series_id", "instance_number", "x", "y", "score"]


@dataclass
class TestCrops:
    crops: np.ndarray  # (N, slices, P, P) float16
    rows: pd.DataFrame  # ROW_COLUMNS, 25 per study in submission order; crop = -1 where none was cut
    problems: dict[int, list[str]]  # study -> sentences (missing series, unreadable files)


def test_data_fingerprint(data_root: Path, studies) -> str:
    """sha256 of test_series_descriptions.csv and (path, size) of each test image of `studies`."""
    digest = hashlib.sha256()
    descriptions = data_root / "test_series_descriptions.csv"
    digest.update(descriptions.read_bytes() if descriptions.is_file() else b"")
    images = data_root / "test_images"
    for study in sorted(int(s) for s in studies):
        folder = images / str(study)
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    digest.update(f"{path.relative_to(images).as_posix()}\0{path.stat().st_size}\n".encode())
        digest.update(f"study {study}\n".encode())
    return digest.hexdigest()[:16]


# The modules whose code decides where test crops are cut and what they hold: a change to any of
# them (a new decoder, a geometry fix) must not reuse crops or member predictions made before it.
CROP_CODE = ("spine_ml.dicom.read", "spine_ml.dicom.tags", "spine_ml.dicom.geometry", "spine_ml.localize.slices",
             "spine_ml.localize.infer", "spine_ml.models.localizer", "spine_ml.prepare.crops",
             "spine_ml.predict.crops")
PREDICTION_CODE = CROP_CODE + ("spine_ml.models.classifier", "spine_ml.predict.pipeline")


def code_fingerprint(modules=CROP_CODE) -> str:
    """sha256 of the source of `modules` (as installed: a Kaggle bundle's wheel hashes the same text)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        source = Path(spec.origin).read_bytes() if spec and spec.origin and Path(spec.origin).is_file() else b""
        digest.update(name.encode() + b"\0" + source + b"\0")
    return digest.hexdigest()[:16]


def crops_key(data_key: str, prepare_cfg, localizer_key: str) -> str:
    from spine_ml.prepare.cache import prepare_settings

    blob = json.dumps({"format": CROPS_FORMAT, "data": data_key, "prepare": prepare_settings(prepare_cfg),
                       "localizer": localizer_key, "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def study_series(data_root: Path) -> dict[int, list[tuple[int, str]]]:
    from spine_ml.competition.tables import read_series_descriptions

    frame = read_series_descriptions(data_root / "test_series_descriptions.csv")
    out: dict[int, list[tuple[int, str]]] = {}
    for study, series, description in frame.itertuples(index=False):
        out.setdefault(int(study), []).append((int(series), str(description)))
    return out


def cut_study(localizer, data_root: Path, study_id: int, series: list[tuple[int, str]], prepare_cfg):
    """(rows of this study, crops, problems). Any failure leaves rows without a crop, never raises."""
    from spine_ml.localize.infer import localize_study
    from spine_ml.prepare.crops import clip_point, crop_sample

    rows, crops, problems = [], [], []
    sites = {}
    try:
        localization = localize_study(localizer, data_root / "test_images" / str(study_id), series, study_id)
        sites, problems = localization.sites, localization.problems
    except Exception as error:  # noqa: BLE001 - one bad study must not stop a submission
        problems = [f"localisation failed ({type(error).__name__}: {error})"]
    if not series:
        problems.append("no series listed in test_series_descriptions.csv")
    for condition in V.CONDITIONS:
        for level in V.LEVELS:
            site = sites.get((condition, level))
            row = {"row_id": V.make_row_id(study_id, condition, level), "study_id": study_id, "condition": condition,
                   "level": level, "crop": -1, "series_id": -1, "instance_number": -1, "x": np.nan, "y": np.nan,
                   "score": np.nan}
            if site is not None:
                try:
                    x, y, _ = clip_point(site.stack, site.x, site.y)
                    crops.append(crop_sample(site.stack, site.slice_index, x, y, prepare_cfg))
                    row.update(crop=len(crops) - 1, series_id=site.series_id, instance_number=site.instance_number,
                               x=x, y=y, score=site.score)
                except Exception as error:  # noqa: BLE001
                    problems.append(f"{condition} {level}: crop failed ({type(error).__name__}: {error})")
            rows.append(row)
    return rows, crops, problems


def localise_and_cut(localizer, data_root: Path, studies, prepare_cfg, progress: bool = False) -> TestCrops:
    from spine_ml.progress import progress as progress_bar

    listed = study_series(data_root)
    all_rows, all_crops, problems = [], [], {}
    for study_id in progress_bar(list(studies), desc="localise + crop", unit="study", disable=not progress):
        rows, crops, study_problems = cut_study(localizer, data_root, int(study_id), listed.get(int(study_id), []),
                                                prepare_cfg)
        for row in rows:
            if row["crop"] >= 0:
                row["crop"] += len(all_crops)
        all_rows.extend(rows)
        all_crops.extend(crops)
        if study_problems:
            problems[int(study_id)] = study_problems
    shape = (0, prepare_cfg.slices, prepare_cfg.patch_px, prepare_cfg.patch_px)
    crops = np.stack(all_crops) if all_crops else np.zeros(shape, dtype=np.float16)
    return TestCrops(crops, pd.DataFrame(all_rows, columns=ROW_COLUMNS), problems)


def save_crops(crops: TestCrops, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(partial, crops=crops.crops, rows=crops.rows.to_json(orient="split").encode(),
             problems=json.dumps({str(k): v for k, v in crops.problems.items()}).encode())
    os.replace(partial, path)


def load_crops(path: Path) -> TestCrops:
    from io import StringIO

    with np.load(path) as stored:
        rows = pd.read_json(StringIO(stored["rows"].item().decode()), orient="split")
        problems = {int(k): v for k, v in json.loads(stored["problems"].item().decode()).items()}
        return TestCrops(stored["crops"], rows[ROW_COLUMNS], problems)


def ensure_test_crops(config, localizer, localizer_key: str, data_root: Path, studies,
                      progress: bool | None = None) -> TestCrops:
    """The localised crops of `studies`, from `predict.crops_dir` when made before with the same
    data, prepare settings and localizer."""
    if progress is None:
        progress = os.environ.get("SPINE_ML_QUIET") != "1"
    key = crops_key(test_data_fingerprint(data_root, studies), config.prepare, localizer_key)
    path = config.path(config.predict.crops_dir) / f"test-crops-{key}.npz"
    if path.is_file():
        log.info("test crops from %s", path)
        return load_crops(path)
    crops = localise_and_cut(localizer, data_root, studies, config.prepare, progress)
    save_crops(crops, path)
    return crops
