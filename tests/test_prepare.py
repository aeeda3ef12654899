"""Crop cache, folds and the torch Dataset.

Two data sets: `mini_data`, written here (a bright dot at every labelled point on the labelled slice
only, so a crop's content can be checked pixel by pixel), and the shared synthetic `tiny_data`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ml.competition import vocabulary as V
from spine_ml.config import AugmentConfig, PrepareConfig, load_config
from spine_ml.errors import UserError
from test_dicom import AXIAL, SAGITTAL, write_slice

PROJECT = Path(__file__).resolve().parents[1]
MINI_STUDIES = (1001, 1002, 1003, 1004, 1005, 1006)
IMAGE = 48  # px, 1 mm pixels
SLICES = {"sag": 5, "ax": 10}
BACKGROUND, DOT = 200.0, 3000.0


def _point(condition: str, level_index: int) -> tuple[str, int, float, float]:
    """(series kind, slice index in position order, x, y) of a labelled point in the mini set."""
    group = V.condition_group(condition)
    if group == "spinal":
        return "t2", 2, 8.3 + 7 * level_index, 24.4
    if group == "foraminal":
        return "t1", 0 if condition.startswith("left") else 4, 8.3 + 7 * level_index, 20.6
    return "ax", 2 * level_index, 30.2 if condition.startswith("left") else 17.7, 24.4


def _dot(image: np.ndarray, x: float, y: float) -> None:
    rows, cols = np.ogrid[:image.shape[0], :image.shape[1]]
    image[(rows - y) ** 2 + (cols - x) ** 2 <= 2.3 ** 2] = DOT


def write_mini(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels, coordinates, series = [], [], []
    for study in MINI_STUDIES:
        codes = rng.choice(3, size=25, p=[0.6, 0.25, 0.15])
        codes[3 + 5 * 3] = -1  # one blank label per study (left subarticular L4/L5)
        labels.append([study] + [V.SEVERITIES[c] if c >= 0 else "" for c in codes])
        ids = {"t1": study * 10 + 1, "t2": study * 10 + 2, "ax": study * 10 + 3}
        dots = {kind: {} for kind in ids}
        for condition in V.CONDITIONS:
            for i, level in enumerate(V.LEVELS):
                kind, index, x, y = _point(condition, i)
                dots[kind].setdefault(index, []).append((x, y))
                coordinates.append([study, ids[kind], index + 1, V.CONDITION_TITLES[condition],
                                    V.LEVEL_TITLES[level], x, y])
        for kind, description in (("t1", V.SAGITTAL_T1), ("t2", V.SAGITTAL_T2), ("ax", V.AXIAL_T2)):
            series.append([study, ids[kind], description])
            orientation = AXIAL if kind == "ax" else SAGITTAL
            normal = np.cross(orientation[:3], orientation[3:])
            for index in range(SLICES["ax" if kind == "ax" else "sag"]):
                image = np.full((IMAGE, IMAGE), BACKGROUND) + np.arange(IMAGE)[None, :]  # a gentle ramp
                for x, y in dots[kind].get(index, []):
                    _dot(image, x, y)
                position = np.array([-24.0, -24.0, 24.0]) + 4.0 * index * normal
                write_slice(root / "train_images" / str(study) / str(ids[kind]) / f"{index + 1}.dcm", image,
                            position, orientation, (1.0, 1.0), index + 1)
    pd.DataFrame(labels, columns=["study_id", *V.LABEL_COLUMNS]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(coordinates, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
                 ).to_csv(root / "train_label_coordinates.csv", index=False)
    pd.DataFrame(series, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / "train_series_descriptions.csv", index=False)
    return root


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory) -> Path:
    return write_mini(tmp_path_factory.mktemp("mini") / "data")


MINI_CONFIG = """\
data: {{root: {data}}}
prepare: {{slices: 3, patch_mm: 16.0, pixel_mm: 1.0, workers: {workers}}}
model: {{crop_px: 12, input_px: 12}}
cv: {{folds: 2, seed: 0}}
"""


def mini_config(tmp_path: Path, data: Path, workers: int = 1, overrides: tuple[str, ...] = ()):
    (tmp_path / "sweeps").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sweeps" / "mini.yaml"
    path.write_text(MINI_CONFIG.format(data=data, workers=workers))
    return load_config(path, list(overrides))


@pytest.fixture()
def mini_cache(tmp_path, mini_data):
    from spine_ml.prepare.cache import ensure_cache

    return ensure_cache(mini_config(tmp_path, mini_data))


def mini_stack(mini_data: Path, study: int, kind: str):
    from spine_ml.dicom.read import read_series

    suffix = {"t1": 1, "t2": 2, "ax": 3}[kind]
    return read_series(mini_data / "train_images" / str(study) / str(study * 10 + suffix)).stacks[0]


# --- crop_sample ---------------------------------------------------------------------------------------

def test_crop_sample_centred_on_point_with_neighbour_slices(mini_data):
    from spine_ml.prepare.crops import crop_sample

    stack = mini_stack(mini_data, 1001, "ax")
    prepare = PrepareConfig(slices=3, patch_mm=16.0, pixel_mm=1.0)
    crop = crop_sample(stack, 2, 30.2, 24.4, prepare)  # the left subarticular dot of L2/L3
    assert crop.shape == (3, 16, 16) and crop.dtype == np.float16
    centre = crop[:, 7:9, 7:9].astype(np.float32)
    assert centre[1].min() > 0.95  # the dot, on the labelled slice only
    assert centre[0].max() < 0.1 and centre[2].max() < 0.1  # neighbours hold no dot there
    assert 0.0 <= crop.min() and crop.max() <= 1.0
    edge = crop_sample(stack, 0, 30.2, 24.4, prepare)  # slice 0: the slice before it repeats slice 0
    np.testing.assert_array_equal(edge[0], edge[1])
    assert edge[1, 7:9, 7:9].min() > 0.95


def test_crop_sample_resamples_to_physical_size(mini_data):
    from spine_ml.prepare.crops import crop_sample

    stack = mini_stack(mini_data, 1001, "t2")
    dot_width = {}
    for pixel_mm in (1.0, 0.5):
        crop = crop_sample(stack, 2, 22.3, 24.4, PrepareConfig(slices=1, patch_mm=8.0, pixel_mm=pixel_mm))
        assert crop.shape == (1, int(8 / pixel_mm), int(8 / pixel_mm))
        dot_width[pixel_mm] = float((crop[0].astype(np.float32) > 0.5).sum(axis=1).max())
    assert dot_width[0.5] == pytest.approx(2 * dot_width[1.0], abs=1.0)  # the same 4.6 mm dot, twice the pixels


def test_patch_resampling_equals_scipy_map_coordinates():
    """The separable gathers must give scipy's bilinear (after the anti-aliasing Gaussian) exactly,
    including points near the image edge and neighbours whose in-plane origins differ."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    from spine_ml.prepare.crops import _sample_patches

    image = np.random.default_rng(0).random((2, 90, 70)).astype(np.float32)
    offsets = np.arange(20) - 9.5
    for step in ([1.0, 1.0], [0.6, 0.8], [2.5, 1.7]):
        step = np.array(step)
        sigma = np.maximum(0.0, (step - 1.0) / 2.0)
        for points in ([[33.3, 41.7], [33.3, 41.7]], [[33.3, 41.7], [30.1, 44.2]], [[2.2, 85.0], [2.2, 85.0]]):
            points = np.array(points)
            ours = _sample_patches(image, points, step, 20, fill=0.0)
            for k, (x, y) in enumerate(points):
                source = gaussian_filter(image[k], sigma, mode="nearest", truncate=3.0) if sigma.max() > 0.3 else image[k]
                rows, cols = np.meshgrid(y + offsets * step[0], x + offsets * step[1], indexing="ij")
                expected = map_coordinates(source, [rows, cols], order=1, mode="grid-constant", cval=0.0)
                np.testing.assert_allclose(ours[k], expected, atol=1e-5)


def test_batched_patches_equal_scipy_per_sample():
    """One batch of samples whose regions differ in size (clipped at the image edges, one wholly
    outside) gives each sample scipy's bilinear of its own slices, as one sample alone would."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    from spine_ml.prepare.crops import _sample_patch_batch

    volume = np.random.default_rng(1).random((4, 90, 70)).astype(np.float32)
    offsets = np.arange(16) - 7.5
    slices = np.array([[0, 1, 2], [3, 3, 2], [1, 1, 1], [2, 3, 0]])  # repeats, as at a stack's edge
    points = np.array([[[33.3, 41.7]] * 3, [[1.2, 88.0], [1.4, 87.5], [0.9, 88.3]],
                       [[68.5, 3.1]] * 3, [[400.0, -300.0]] * 3])  # the last lies wholly outside
    for step in (np.array([1.0, 1.0]), np.array([2.5, 1.7])):
        sigma = np.maximum(0.0, (step - 1.0) / 2.0)
        ours = _sample_patch_batch(volume, slices, points, step, 16, fill=0.25)
        assert ours.shape == (4, 3, 16, 16)
        for i in range(4):
            for j in range(3):
                image = volume[slices[i, j]]
                source = gaussian_filter(image, sigma, mode="nearest", truncate=3.0) if sigma.max() > 0.3 else image
                x, y = points[i, j]
                rows, cols = np.meshgrid(y + offsets * step[0], x + offsets * step[1], indexing="ij")
                expected = map_coordinates(source - 0.25, [rows, cols], order=1, mode="grid-constant") + 0.25
                np.testing.assert_allclose(ours[i, j], expected, atol=1e-5, err_msg=f"sample {i} slice {j}")
        np.testing.assert_array_equal(ours[3], 0.25)


def test_crop_samples_equal_crop_sample_one_by_one(mini_data):
    """prepare cuts all sites of a stack in one call, predict one site at a time: the same bytes."""
    from spine_ml.prepare.crops import crop_sample, crop_samples

    stack = mini_stack(mini_data, 1001, "ax")
    sites = [(0, 30.2, 24.4), (9, 17.7, 24.4), (4, 0.0, 47.0), (5, 47.0, 0.0), (2, 23.5, 23.5)]
    for prepare in (PrepareConfig(slices=3, patch_mm=16.0, pixel_mm=1.0),
                    PrepareConfig(slices=5, patch_mm=20.0, pixel_mm=2.5)):  # 2.5 mm: anti-aliasing on
        batch = crop_samples(stack, sites, prepare)
        assert batch.shape == (len(sites), prepare.slices, prepare.patch_px, prepare.patch_px)
        assert batch.dtype == np.float16
        for site, crop in zip(sites, batch):
            assert crop.tobytes() == crop_sample(stack, *site, prepare).tobytes(), site
    assert batch[0, 0].tobytes() == batch[0, 1].tobytes() == batch[0, 2].tobytes()  # slice 0 repeats


# --- prepare's pixel decode ----------------------------------------------------------------------------

def test_pixel_values_equal_pixel_array_on_pydicom_test_files():
    """Every file of pydicom's own test set (many syntaxes, bit depths, signed, multi-frame, colour,
    broken): the same array and dtype as `pixel_array`, or an error where it raises one."""
    import warnings

    import pydicom

    from spine_ml.dicom.tags import pixel_values
    from test_dicom import TEST_FILES

    compared = refused = 0
    for path in sorted(TEST_FILES.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = pydicom.dcmread(path).pixel_array
            except Exception:  # noqa: BLE001 - not parseable, no pixels, or no decoder: ours must fail too
                try:
                    dataset = pydicom.dcmread(path)
                except Exception:  # noqa: BLE001
                    continue
                with pytest.raises(Exception):  # noqa: B017
                    pixel_values(dataset)
                refused += 1
                continue
            got = pixel_values(pydicom.dcmread(path))
        assert got.dtype == expected.dtype and got.shape == expected.shape, path.name
        np.testing.assert_array_equal(got, expected, err_msg=path.name)
        compared += 1
    assert compared >= 30 and refused >= 1


def test_pixel_values_decode_without_pixel_array(tmp_path, monkeypatch):
    """The files prepare meets (12-bit MR, uncompressed or RLE) never take pixel_array's slow path,
    and pydicom's unused-bit correction still applies (garbage above BitsStored is masked)."""
    import pydicom
    from pydicom.uid import RLELossless

    from spine_ml.dicom.tags import pixel_values

    image = np.arange(30 * 40, dtype=np.float64).reshape(30, 40) % 4096
    native = write_slice(tmp_path / "1.dcm", image, (0, 0, 0), AXIAL, (1.0, 1.0), 1)
    rle = write_slice(tmp_path / "2.dcm", image, (0, 0, 4), AXIAL, (1.0, 1.0), 2, syntax=RLELossless)
    dirty = tmp_path / "3.dcm"
    dataset = pydicom.dcmread(native)
    dataset.PixelData = (np.frombuffer(dataset.PixelData, dtype="<u2") | np.uint16(0xF000)).tobytes()
    dataset.save_as(dirty)
    expected = {path: pydicom.dcmread(path).pixel_array for path in (native, rle, dirty)}
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(expected[dirty], expected[native])  # pydicom masks the high bits

    def refuse(self):
        raise AssertionError("pixel_array was called")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))
    for path, array in expected.items():
        got = pixel_values(pydicom.dcmread(path))
        assert got.dtype == array.dtype == np.uint16
        np.testing.assert_array_equal(got, array)


# --- the cache ------------------------------------------------------------------------------------------

def test_cache_index_labels_and_patches(mini_cache, mini_data):
    from spine_ml.prepare.crops import crop_sample

    cache = mini_cache
    index = cache.index
    assert len(index) == 25 * len(MINI_STUDIES) and list(cache.studies) == list(MINI_STUDIES)
    assert cache.patches.shape == (150, 3, 16, 16) and cache.patches.dtype == np.float16
    assert (cache.patch_px, cache.slices, cache.pixel_mm) == (16, 3, 1.0)
    assert sorted(index["sample"]) == list(range(150)) and (index.status == "ok").all()
    truth = pd.read_csv(mini_data / "train.csv", keep_default_na=False).set_index("study_id")
    for _, row in index.sample(20, random_state=0).iterrows():
        text = truth.loc[row.study_id, f"{row.condition}_{row.level}"]
        assert row.label == (V.SEVERITIES.index(text) if text else -1)
        assert row.sample_weight == (V.SAMPLE_WEIGHTS[row.label] if row.label >= 0 else 0.0)
        assert row.row_id == V.make_row_id(row.study_id, row.condition, row.level)
    # blank labels keep their sample (flagged by label -1) but are not trainable
    blanks = index[index.label < 0]
    assert len(blanks) == len(MINI_STUDIES) and (blanks["sample"] >= 0).all()
    assert not set(cache.trainable_rows()) & set(blanks.index)
    # every cached patch shows its own dot, and equals crop_sample on the DICOM
    centres = np.asarray(cache.patches[:, 1, 7:9, 7:9], dtype=np.float32)
    assert centres.min() > 0.95
    row = index.iloc[37]
    kind = {"spinal": "t2", "foraminal": "t1", "subarticular": "ax"}[V.condition_group(row.condition)]
    stack = mini_stack(mini_data, int(row.study_id), kind)
    expected = crop_sample(stack, stack.index_of_instance(row.instance_number), row.x, row.y,
                           PrepareConfig(slices=3, patch_mm=16.0, pixel_mm=1.0))
    np.testing.assert_array_equal(cache.patches[row["sample"]], expected)


def test_cache_reused_and_keyed_by_settings(tmp_path, mini_data):
    from spine_ml.prepare.cache import ensure_cache

    first = ensure_cache(mini_config(tmp_path, mini_data))
    again = ensure_cache(mini_config(tmp_path, mini_data, overrides=("prepare.workers=2", "cv.seed=5")))
    assert first.built_now and not again.built_now and again.path == first.path  # workers/cv: same crops
    other = ensure_cache(mini_config(tmp_path, mini_data, overrides=("prepare.slices=1",)))
    assert other.built_now and other.path != first.path and other.patches.shape[1] == 1
    assert (first.path / "meta.json").is_file() and len([p for p in first.path.parent.glob("crops-*") if p.is_dir()]) == 2
    assert again.folds_path.name == "folds-k2-seed5.csv" and again.folds_path.is_file()
    forced = ensure_cache(mini_config(tmp_path, mini_data), force=True)
    assert forced.built_now and forced.path == first.path
    np.testing.assert_array_equal(forced.patches, first.patches)


def test_interrupted_build_is_never_used(tmp_path, mini_data, monkeypatch):
    from spine_ml.prepare import build, cache as cache_module

    config = mini_config(tmp_path, mini_data)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "apply_results", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_module.ensure_cache(config)
    cache_dir = config.path(config.prepare.cache_dir)
    assert [p.name.split(".")[-1].split("-")[0] for p in cache_dir.glob("crops-*") if p.is_dir()] == ["building"]
    monkeypatch.undo()
    cache = cache_module.ensure_cache(config)
    assert cache.built_now and cache.patches.shape[0] == 150
    assert not list(cache_dir.glob("*.building-*"))  # the abandoned build was cleaned up


def test_parallel_build_matches_serial(tmp_path, mini_data):
    from spine_ml.prepare.cache import ensure_cache

    serial = ensure_cache(mini_config(tmp_path / "a", mini_data, workers=1))
    parallel = ensure_cache(mini_config(tmp_path / "b", mini_data, workers=2))
    assert serial.path.name == parallel.path.name
    assert (serial.path / "patches.f16").read_bytes() == (parallel.path / "patches.f16").read_bytes()
    pd.testing.assert_frame_equal(serial.index, parallel.index)


# --- folds ----------------------------------------------------------------------------------------------

def test_folds_are_study_level_stratified_and_seeded():
    from spine_ml.prepare.folds import make_folds

    rng = np.random.default_rng(1)
    studies = np.arange(100, 160)
    severe = rng.random(60) < 0.3  # 30% of studies: severe spinal at L4/L5
    rows = []
    for study, is_severe in zip(studies, severe):
        for condition in V.CONDITIONS:
            for level in V.LEVELS:
                label = 2 if (is_severe and condition == V.CONDITIONS[0] and level == "l4_l5") else 0
                rows.append((study, condition, level, label))
    labels = pd.DataFrame(rows, columns=["study_id", "condition", "level", "label"])
    folds = make_folds(labels, folds=3, seed=0)
    assert list(folds.study_id) == list(studies) and set(folds.fold) == {0, 1, 2}
    per_fold = folds.assign(severe=severe).groupby("fold").severe.sum()
    assert per_fold.max() - per_fold.min() <= 1  # the severe studies spread evenly
    assert folds.fold.value_counts().max() - folds.fold.value_counts().min() <= 1
    pd.testing.assert_frame_equal(folds, make_folds(labels, folds=3, seed=0))
    assert not make_folds(labels, folds=3, seed=1).fold.equals(folds.fold)
    with pytest.raises(UserError, match="cv.folds=100"):
        make_folds(labels, folds=100, seed=0)


def test_cache_folds_file(mini_cache):
    folds = pd.read_csv(mini_cache.folds_path)
    assert list(folds.columns) == ["study_id", "fold"] and sorted(folds.study_id) == list(MINI_STUDIES)
    assert (mini_cache.index.groupby("study_id").fold.nunique() == 1).all()
    assert set(mini_cache.index.fold) == {0, 1}


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_input_is_flagged_not_fatal(tmp_path, mini_data, copy_of, caplog):
    from spine_ml.prepare.cache import ensure_cache

    data = copy_of(mini_data)
    images = data / "train_images"
    (images / "1002" / "10022" / "1.dcm").write_bytes(b"\x00" * 300)  # corrupt, not the labelled slice
    for path in (images / "1003" / "10033").iterdir():  # an empty axial series folder
        path.unlink()
    coordinates = pd.read_csv(data / "train_label_coordinates.csv")
    outside = (coordinates.study_id == 1001) & (coordinates.condition == "Spinal Canal Stenosis") & (
        coordinates.level == "L5/S1")
    coordinates.loc[outside, "x"] = 60.0  # the image is 48 px wide
    coordinates = coordinates[~((coordinates.study_id == 1005) & (coordinates.series_id == 10051))]
    coordinates.to_csv(data / "train_label_coordinates.csv", index=False)
    series = pd.read_csv(data / "train_series_descriptions.csv")
    series.loc[series.series_id == 10041, "series_description"] = "Sagittal T1 FLAIR"
    series = series[series.series_id != 10051]  # study 1005 has no Sagittal T1
    series.to_csv(data / "train_series_descriptions.csv", index=False)
    shutil.rmtree(images / "1005" / "10051")

    cache = ensure_cache(mini_config(tmp_path, data))
    index, studies = cache.index, cache.study_table.set_index("study_id")
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "1.dcm" in warnings and "10022" in warnings
    status = index.groupby(["study_id", "series_description"]).status.agg(lambda s: sorted(set(s)))
    assert status[(1002, V.SAGITTAL_T2)] == ["ok"]  # the series is used without the corrupt slice
    assert status[(1003, V.AXIAL_T2)] == ["missing_series"]
    assert "Axial T2" in studies.loc[1003, "missing_series"]
    assert status[(1004, "Sagittal T1 FLAIR")] == ["unknown_series"] and "Sagittal T1 FLAIR" in warnings
    assert studies.loc[1005, "missing_series"] == V.SAGITTAL_T1
    assert set(index[(index.study_id == 1005) & index.condition.str.contains("foraminal")].status) == {
        "no_coordinates"}
    clipped = index[(index.study_id == 1001) & (index.condition == V.CONDITIONS[0]) & (index.level == "l5_s1")]
    assert clipped.x.item() == 47.0 and "outside" in warnings and "clipped" in warnings
    absent = index[index.status != "ok"]
    assert (absent["sample"] == -1).all() and len(absent) == 10 + 10 + 10
    assert cache.patches.shape[0] == 150 - 30
    survivors = index[(index["sample"] >= 0) & (index.index != clipped.index[0])]["sample"].to_numpy()
    assert np.asarray(cache.patches[survivors, 1, 7:9, 7:9]).min() > 0.95  # still centred on their dots


def test_missing_data_and_bad_ids_are_user_errors(tmp_path, mini_data, copy_of):
    from spine_ml.prepare.cache import ensure_cache

    with pytest.raises(UserError, match=r"(?s)Kaggle.*make demo.*sweeps/demo.yaml"):
        ensure_cache(mini_config(tmp_path, tmp_path / "nowhere"))
    data = copy_of(mini_data)
    labels = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    labels.loc[0, "study_id"] = "../1001"
    labels.to_csv(data / "train.csv", index=False)
    with pytest.raises(UserError, match=r"study_id must be digits.*\.\./1001"):
        ensure_cache(mini_config(tmp_path, data))


# --- the Dataset ------------------------------------------------------------------------------------------

NO_JITTER_FLIP = AugmentConfig(shift_px=0, rotate_deg=0, scale=0, intensity=0, flip=True)


def test_dataset_items_and_crop_size(mini_cache):
    import torch

    from spine_ml.prepare.dataset import CropDataset

    rows = mini_cache.trainable_rows()
    plain = CropDataset(mini_cache, rows, crop_px=12, input_px=None, augment=None, seed=0)
    item = plain[5]
    assert set(item) >= {"image", "condition", "label", "weight", "row"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 12, 12)
    row = mini_cache.index.iloc[item["row"]]
    assert V.CONDITIONS[item["condition"]] == row.condition and item["label"] == row.label
    assert item["weight"] == row.sample_weight
    np.testing.assert_array_equal(item["image"].numpy(), mini_cache.patches[row["sample"], :, 2:14, 2:14])
    resized = CropDataset(mini_cache, rows, crop_px=12, input_px=24)[5]["image"]
    assert resized.shape == (3, 24, 24)
    assert float(resized[1, 10:14, 10:14].min()) > 0.9  # the dot is still in the middle
    with pytest.raises(UserError, match=r"model.crop_px=20.*16 px.*prepare.patch_mm"):
        CropDataset(mini_cache, rows, crop_px=20)
    with pytest.raises(ValueError, match="no cached sample"):
        CropDataset(mini_cache.__class__(**{**mini_cache.__dict__, "index": mini_cache.index.assign(sample=-1)}),
                    rows, crop_px=12)


def test_affine_crop_without_jitter_equals_centre_crop():
    import torch

    from spine_ml.prepare import augment as A

    patch = torch.rand(3, 17, 17)
    for crop_px in (8, 11, 17):
        np.testing.assert_allclose(A.affine_crop(patch, crop_px, A.Jitter()).numpy(),
                                   A.centre_crop(patch, crop_px).numpy(), atol=1e-5)
    shifted = A.affine_crop(patch, 8, A.Jitter(shift_x=2.0, shift_y=-1.0))
    np.testing.assert_allclose(shifted.numpy(), patch[:, 3:11, 6:14].numpy(), atol=1e-5)


def test_augmentation_is_seeded_and_varies_by_epoch(mini_cache):
    from spine_ml.prepare.dataset import CropDataset

    rows = mini_cache.trainable_rows()
    config = AugmentConfig()
    a = CropDataset(mini_cache, rows, 12, 12, config, seed=3)
    b = CropDataset(mini_cache, rows, 12, 12, config, seed=3)
    assert all(np.array_equal(a[i]["image"], b[i]["image"]) for i in range(10))
    b.set_epoch(1)
    assert not all(np.array_equal(a[i]["image"], b[i]["image"]) for i in range(10))
    plain = CropDataset(mini_cache, rows, 12, 12)
    assert not np.array_equal(a[0]["image"], plain[0]["image"])


def test_flip_swaps_left_right_labels_with_the_anatomy(mini_cache):
    """Axial: a horizontal flip, left<->right swapped. Sagittal: slice order reversed (the slice axis is
    left<->right); foraminal swaps side, spinal stays. No other change without jitter."""
    from spine_ml.prepare.dataset import CropDataset

    rows = mini_cache.trainable_rows()
    plain = CropDataset(mini_cache, rows, 12, None)
    flipping = CropDataset(mini_cache, rows, 12, None, NO_JITTER_FLIP, seed=0)
    seen = set()
    for i in range(len(rows)):
        original, augmented = plain[i], flipping[i]
        condition = V.CONDITIONS[original["condition"]]
        group = V.condition_group(condition)
        image, expected = augmented["image"], original["image"]
        if np.array_equal(image, expected) and augmented["condition"] == original["condition"]:
            flipped = False
        else:
            mirrored = expected.flip(-1) if group == "subarticular" else expected.flip(0)
            np.testing.assert_array_equal(image, mirrored)
            assert V.CONDITIONS[augmented["condition"]] == V.mirror_condition(condition)
            flipped = True
        assert augmented["label"] == original["label"] and augmented["row"] == original["row"]
        seen.add((group, flipped))
    # sagittal crops centred mid-stack can be mirror-symmetric; the swap is what must happen
    assert {("subarticular", True), ("foraminal", True), ("subarticular", False)} <= seen
    spinal = [i for i in range(len(rows)) if V.CONDITIONS[plain[i]["condition"]] == V.CONDITIONS[0]]
    assert all(flipping[i]["condition"] == 0 for i in spinal)  # spinal never changes side
    foraminal = [i for i in range(len(rows)) if "foraminal" in V.CONDITIONS[plain[i]["condition"]]]
    swapped = [i for i in foraminal if flipping[i]["condition"] != plain[i]["condition"]]
    assert swapped and all(np.array_equal(flipping[i]["image"], plain[i]["image"].flip(0)) for i in swapped)


def test_loader_workers_and_no_dicom_opened_during_training(mini_cache, tmp_path, mini_data, monkeypatch):
    import pickle

    import pydicom

    from spine_ml.prepare.cache import ensure_cache
    from spine_ml.prepare.dataset import CropDataset, make_loader

    def no_dicom(*args, **kwargs):
        raise AssertionError(f"a DICOM file was opened during training: {args[:1]}")

    monkeypatch.setattr(pydicom, "dcmread", no_dicom)
    monkeypatch.setattr(pydicom.filereader, "dcmread", no_dicom)
    config = mini_config(tmp_path, mini_data)  # the same project as mini_cache: the cache exists
    cache = ensure_cache(config)
    assert not cache.built_now
    dataset = CropDataset(cache, cache.trainable_rows(), 12, 16, config.train.augment, seed=1)
    assert len(pickle.dumps(dataset)) < cache.patches.nbytes / 4  # workers reopen the memmap
    serial = [batch["image"] for batch in make_loader(dataset, 32, shuffle=False)]
    parallel = [batch["image"] for batch in make_loader(dataset, 32, shuffle=False, num_workers=2)]
    assert sum(len(b) for b in serial) == len(dataset) == 144
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


# --- the CLI ----------------------------------------------------------------------------------------------

def test_prepare_cli_summary_and_concurrent_builders(tmp_path, mini_data):
    config = mini_config(tmp_path, mini_data)  # writes sweeps/mini.yaml
    command = [str(PROJECT / ".venv" / "bin" / "spine-ml"), "prepare", str(tmp_path / "sweeps" / "mini.yaml")]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "spine_ml.cli", *command[1:]]
    env = {**__import__("os").environ, "SPINE_ML_QUIET": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    summaries = [dict(line.split(None, 1) for line in out.strip().splitlines()) for out, _ in outputs]
    assert sorted(s["built_now"] for s in summaries) == ["False", "True"]  # the lock made one wait, then reuse
    assert {s["cache"] for s in summaries} == {str(config.path("data/cache") / Path(summaries[0]["cache"]).name)}
    assert summaries[0]["samples"] == "150" and summaries[0]["studies"] == "6"
    assert summaries[0]["labels_missing"] == "6" and summaries[0]["studies_missing_series"] == "0"
    assert [p.name for p in (tmp_path / "data" / "cache").iterdir() if p.is_dir()] == [Path(summaries[0]["cache"]).name]


def test_prepare_cli_in_process_and_bad_config(tmp_path, mini_data, capsys):
    from spine_ml.cli import main

    mini_config(tmp_path, mini_data)
    path = str(tmp_path / "sweeps" / "mini.yaml")
    assert main(["prepare", path, "--set", "prepare.slices=1"]) == 0
    assert "built_now" in capsys.readouterr().out
    assert main(["prepare", path, "--set", "prepare.slice=1"]) == 2
    assert "prepare.slice" in capsys.readouterr().err


# --- on the shared synthetic data set -------------------------------------------------------------------

def test_prepare_on_synthetic_data(tiny_project, tiny_config, capsys):
    from spine_ml.cli import main
    from spine_ml.prepare.cache import ensure_cache

    assert main(["prepare", str(tiny_project / "sweeps" / "tiny.yaml")]) == 0
    printed = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    cache = ensure_cache(tiny_config)
    assert not cache.built_now and printed["cache"] == str(cache.path)
    root = tiny_config.path(tiny_config.data.root)
    labels = pd.read_csv(root / "train.csv", keep_default_na=False)
    coordinates = pd.read_csv(root / "train_label_coordinates.csv")
    index = cache.index
    assert len(index) == 25 * len(labels) and sorted(cache.studies) == sorted(labels.study_id)
    assert cache.patches.shape[1:] == (3, 32, 32) and int(printed["samples"]) == cache.patches.shape[0]
    # every labelled point became a sample unless its series is missing; the samples are the coordinates
    ok = index[index["sample"] >= 0]
    assert set(index.status) <= {"ok", "no_coordinates", "missing_series", "instance_not_found"}
    assert len(ok) >= 0.8 * len(coordinates) and ok["sample"].is_unique
    merged = ok.merge(coordinates.assign(condition=coordinates.condition.map(V.TITLE_TO_CONDITION),
                                         level=coordinates.level.map(V.TITLE_TO_LEVEL)),
                      on=["study_id", "condition", "level"], suffixes=("", "_csv"))
    assert len(merged) == len(ok)
    assert (merged.series_id == merged.series_id_csv).all()
    assert (merged.instance_number == merged.instance_number_csv).all()
    moved = (merged.x != merged.x_csv) | (merged.y != merged.y_csv)  # only coordinates clipped into the image
    assert moved.sum() <= 0.05 * len(merged)
    # a study whose series is missing is recorded as such; its samples are absent, not invented
    missing = cache.study_table[cache.study_table.missing_series != ""]
    assert len(missing) >= 1 and int(printed["studies_missing_series"]) == len(missing)
    for study, names in zip(missing.study_id, missing.missing_series):
        for name in names.split(";"):
            assert not ((index.study_id == study) & (index.series_description == name) & (index["sample"] >= 0)).any()
    # patches are normalised crops with content, and folds split studies
    sample = np.asarray(cache.patches[: min(50, len(ok))], dtype=np.float32)
    assert 0.0 <= sample.min() and sample.max() <= 1.0 and sample.std() > 0.05
    assert set(cache.folds.fold) == {0, 1} and (index.groupby("study_id").fold.nunique() == 1).all()


def test_training_reads_no_dicom_on_synthetic_data(tiny_config, monkeypatch):
    import pydicom

    from spine_ml.prepare.cache import ensure_cache
    from spine_ml.prepare.dataset import CropDataset, make_loader

    ensure_cache(tiny_config)

    def no_dicom(*args, **kwargs):
        raise AssertionError(f"a DICOM file was opened during training: {args[:1]}")

    monkeypatch.setattr(pydicom, "dcmread", no_dicom)
    cache = ensure_cache(tiny_config)
    rows = cache.trainable_rows()
    dataset = CropDataset(cache, rows, tiny_config.model.crop_px, tiny_config.model.input_px,
                          tiny_config.train.augment, seed=0)
    seen = 0
    for batch in make_loader(dataset, 64, shuffle=True):
        assert batch["image"].shape[1:] == (3, 24, 24)
        seen += len(batch["image"])
    assert seen == len(rows) > 100


def test_inspect_synthetic_study(tiny_data, capsys):
    import json

    from spine_ml.cli import main

    series = pd.read_csv(tiny_data / "train_series_descriptions.csv")
    axial = series[series.series_description == V.AXIAL_T2].iloc[0]
    assert main(["inspect", str(tiny_data / "train_images" / str(axial.study_id)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    listed = series[series.study_id == axial.study_id]
    assert report["study_id"] == axial.study_id
    assert {s["series_id"]: s["description"] for s in report["series"]} == dict(
        zip(listed.series_id, listed.series_description))
    for entry in report["series"]:
        assert entry["stacks"] and all(s["slices"] >= 1 and len(s["orientation"]) == 6 for s in entry["stacks"])
        plane = entry["stacks"][0]["plane"]
        assert plane.startswith("axial" if entry["description"] == V.AXIAL_T2 else "sagittal")
