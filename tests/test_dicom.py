"""The dicom layer: series -> stacks, geometry both ways, bad files, and `spine-ml inspect`.

Files come from two sources no test can bend: pydicom's bundled real MR files, and series written
here with pydicom from an analytic intensity field f(patient point), so every pixel read back can be
checked against the value the geometry says it must have.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from spine_ml.dicom.geometry import Stack
from spine_ml.dicom.read import read_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def field_value(points: np.ndarray) -> np.ndarray:
    """Intensity at patient points (…, 3): linear with a different slope per axis, so any swap of
    x/y, rows/columns or spacing order changes the values."""
    return 2000.0 + 3.0 * points[..., 0] + 2.0 * points[..., 1] + 1.0 * points[..., 2]


def field_image(position, orientation, spacing, shape) -> np.ndarray:
    orientation = np.asarray(orientation, dtype=float)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    points = (np.asarray(position, dtype=float) + cols[..., None] * spacing[1] * orientation[:3]
              + rows[..., None] * spacing[0] * orientation[3:])
    return field_value(points)


def write_slice(path: Path, pixels: np.ndarray, position, orientation, spacing, instance: int,
                syntax=ExplicitVRLittleEndian, optional_tags: bool = True, slope: float | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    stored = pixels
    if optional_tags:
        ds.SliceThickness, ds.SpacingBetweenSlices = 4.0, 4.0
        ds.RescaleSlope, ds.RescaleIntercept = (slope or 1.0), 0.0
        stored = pixels / (slope or 1.0)
    ds.set_pixel_data(np.round(stored).clip(0, 4095).astype(np.uint16), photometric_interpretation="MONOCHROME2",
                      bits_stored=12, generate_instance_uid=False)
    if syntax == RLELossless:
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_stack(folder: Path, origin, orientation, spacing, shape, slices: int, step: float,
                instances: list[int], **kwargs) -> list[Path]:
    """Parallel slices at origin + k·step·N, k = 0..slices-1, saved as {instance}.dcm."""
    normal = np.cross(orientation[:3], orientation[3:])
    paths = []
    for k, instance in zip(range(slices), instances):
        position = np.asarray(origin, dtype=float) + k * step * normal
        pixels = field_image(position, orientation, spacing, shape)
        paths.append(write_slice(folder / f"{instance}.dcm", pixels, position, orientation, spacing, instance, **kwargs))
    return paths


def check_against_field(stack: Stack, tolerance: float = 1.01) -> None:
    """Every pixel of every slice equals the field at the patient point the geometry names."""
    rows, cols = np.meshgrid(np.arange(stack.rows), np.arange(stack.columns), indexing="ij")
    for s in range(stack.slices):
        points = (stack.positions[s] + cols[..., None] * stack.pixel_spacing[1] * stack.row_direction
                  + rows[..., None] * stack.pixel_spacing[0] * stack.column_direction)
        assert np.abs(stack.pixels[s] - field_value(points)).max() <= tolerance, f"slice {s}"


# --- the reader on series written here -------------------------------------------------------------

def test_sagittal_stack_ordered_by_position_not_file_name(tmp_path):
    # instances 10, 8, 6, 4, 2 from left to right: reversed numbering with gaps, non-square image and spacing
    write_stack(tmp_path, (30.0, -60.0, 40.0), SAGITTAL, (0.8, 0.6), (20, 28), slices=5, step=-4.5,
                instances=[10, 8, 6, 4, 2])
    series = read_series(tmp_path)
    assert len(series.stacks) == 1 and not series.skipped_files
    stack = series.stacks[0]
    assert stack.pixels.shape == (5, 20, 28) and stack.pixels.dtype == np.float32
    assert np.all(np.diff(stack.depths) > 0)
    assert stack.slice_spacing == pytest.approx(4.5)
    np.testing.assert_allclose(stack.pixel_spacing, [0.8, 0.6])
    np.testing.assert_allclose(np.abs(stack.normal), [1, 0, 0], atol=1e-9)
    assert list(stack.instance_numbers) == [2, 4, 6, 8, 10]  # N = X×Y = -x here: slices step towards patient right
    check_against_field(stack)
    assert any("skip" in p for p in series.problems)


def test_geometry_round_trip_and_projection_between_stacks(tmp_path):
    write_stack(tmp_path / "sag", (30.0, -60.0, 40.0), SAGITTAL, (0.8, 0.6), (60, 80), 9, -4.0, list(range(1, 10)))
    write_stack(tmp_path / "ax", (-25.0, -40.0, -12.0), AXIAL, (0.7, 0.7), (70, 70), 16, 3.5, list(range(16, 0, -1)))
    sagittal = read_series(tmp_path / "sag").stacks[0]
    axial = read_series(tmp_path / "ax").stacks[0]
    assert list(axial.instance_numbers) == list(range(16, 0, -1))  # reversed stack, ordered by position
    check_against_field(axial)
    rng = np.random.default_rng(0)
    for _ in range(20):
        s, x, y = int(rng.integers(9)), rng.uniform(0, 79), rng.uniform(0, 59)
        point = sagittal.pixel_to_patient(s, x, y)
        assert sagittal.patient_to_pixel(point) == pytest.approx((s, x, y, 0.0), abs=1e-9)
        # the same anatomy seen in the other stack: nearest axial slice, in-plane pixel, distance
        a, ax, ay, distance = axial.patient_to_pixel(point)
        assert distance <= axial.slice_spacing / 2 + 1e-9
        back = axial.pixel_to_patient(a, ax, ay)
        assert np.linalg.norm(back - point) == pytest.approx(distance, abs=1e-9)
        assert abs(axial.depths[a] - back @ axial.normal) < 1e-9
    assert axial.index_of_instance(16) == 0 and sagittal.index_of_instance(9) == 0  # both numbered against N
    with pytest.raises(KeyError, match="instance 99"):
        axial.index_of_instance(99)


def test_mixed_sizes_resampled_with_geometry_kept(tmp_path):
    write_stack(tmp_path, (0.0, -50.0, 30.0), SAGITTAL, (1.0, 1.0), (40, 40), 4, 4.0, [1, 2, 3, 4])
    # slice 5: same field of view, half the pixel size (80x80 at 0.5 mm), RLE-compressed
    write_stack(tmp_path / "odd", (-16.0, -50.0, 30.0), SAGITTAL, (0.5, 0.5), (80, 80), 1, 0.0, [5], syntax=RLELossless)
    shutil.move(tmp_path / "odd" / "5.dcm", tmp_path / "5.dcm")
    shutil.rmtree(tmp_path / "odd")
    stack = read_series(tmp_path).stacks[0]
    assert stack.pixels.shape == (5, 40, 40)
    assert stack.index_of_instance(5) == 4
    assert "RLE Lossless" in stack.transfer_syntax
    check_against_field(stack, tolerance=1.5)  # the resampled slice is bilinear on a linear field: exact


def test_split_into_stacks_by_orientation_and_gap(tmp_path):
    tilted = (1.0, 0.0, 0.0, 0.0, 0.9659258, -0.2588190)  # a 15° oblique block
    write_stack(tmp_path, (-30.0, -40.0, 0.0), AXIAL, (0.7, 0.7), (30, 30), 4, 4.0, [1, 2, 3, 4])
    write_stack(tmp_path, (-30.0, -40.0, 40.0), AXIAL, (0.7, 0.7), (30, 30), 3, 4.0, [7, 6, 5])  # 28 mm jump
    write_stack(tmp_path, (-30.0, -40.0, 80.0), tilted, (0.7, 0.7), (30, 30), 3, 4.0, [8, 9, 10])
    series = read_series(tmp_path)
    assert [list(s.instance_numbers) for s in series.stacks] == [[1, 2, 3, 4], [7, 6, 5], [8, 9, 10]]
    assert [p for p in series.problems if "reversed" in p] == [
        "stack 1: reversed (instance numbers run the other way along the normal than in the other stacks; "
        "ordered by position)"]
    assert [s.slice_spacing for s in series.stacks] == pytest.approx([4.0, 4.0, 4.0])
    stack, index = series.find_instance(9)
    assert index == 1 and stack.orientation[5] == pytest.approx(-0.258819)
    for stack in series.stacks:
        check_against_field(stack)


def test_missing_optional_tags_fall_back(tmp_path):
    write_stack(tmp_path, (0.0, -50.0, 30.0), SAGITTAL, (1.0, 1.0), (16, 16), 3, 3.0, [1, 2, 3], optional_tags=False)
    series = read_series(tmp_path)
    stack = series.stacks[0]
    assert stack.slice_spacing == pytest.approx(3.0)
    check_against_field(stack)
    joined = " ".join(series.problems)
    assert "RescaleSlope missing in 3 of 3" in joined and "SliceThickness missing" in joined


def test_rescale_slope_applied(tmp_path):
    write_stack(tmp_path, (0.0, -50.0, 30.0), SAGITTAL, (1.0, 1.0), (16, 16), 2, 3.0, [1, 2], slope=2.0)
    check_against_field(read_series(tmp_path).stacks[0], tolerance=2.01)


# --- bad input ---------------------------------------------------------------------------------------

def test_corrupt_and_non_dicom_files_skipped_with_warning(tmp_path, caplog):
    write_stack(tmp_path, (0.0, -50.0, 30.0), SAGITTAL, (1.0, 1.0), (16, 16), 4, 3.0, [1, 2, 3, 4])
    (tmp_path / "5.dcm").write_text("this is not DICOM")
    shutil.copy(TEST_FILES / "MR_truncated.dcm", tmp_path / "6.dcm")
    series = read_series(tmp_path)
    assert [p.name for p in series.skipped_files] == ["5.dcm", "6.dcm"]
    assert series.stacks[0].slices == 4  # the rest of the series is used
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "5.dcm" in warned and "6.dcm" in warned


def test_empty_and_missing_folders_give_no_stacks(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        series = read_series(folder)
        assert series.stacks == [] and series.problems
    with pytest.raises(KeyError):
        read_series(tmp_path / "empty").find_instance(1)


# --- pydicom's real MR files -------------------------------------------------------------------------

@pytest.fixture()
def mr700(tmp_path) -> Path:
    """The 7-slice real MR series, copied with instance-number file names, written in scrambled order."""
    folder = tmp_path / "mr700"
    folder.mkdir()
    files = sorted((TEST_FILES / "dicomdirtests" / "98892003" / "MR700").iterdir())
    random.Random(3).shuffle(files)
    for source in files:
        shutil.copy(source, folder / f"{pydicom.dcmread(source, stop_before_pixels=True).InstanceNumber}.dcm")
    return folder


def test_real_radial_series_splits_by_orientation(mr700):
    # MR700's 7 slices share a column direction but each row direction turns ~20° about it (a radial
    # set): no two are parallel, so each is its own stack, in acquisition (instance) order.
    series = read_series(mr700)
    assert [list(s.instance_numbers) for s in series.stacks] == [[n] for n in range(1, 8)]
    for stack in series.stacks:
        source = pydicom.dcmread(stack.files[0])
        np.testing.assert_array_equal(stack.pixels[0], source.pixel_array.astype(np.float32))
        np.testing.assert_allclose(stack.orientation, [float(v) for v in source.ImageOrientationPatient])
        assert stack.pixel_spacing == pytest.approx([0.390625, 0.390625])
        assert stack.slice_spacing == pytest.approx(1.2)  # one slice: falls back to SliceThickness


def test_real_files_in_several_transfer_syntaxes(tmp_path):
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
             "MR_small_bigendian.dcm", "MR_truncated.dcm"]
    for number, name in enumerate(names, start=1):
        shutil.copy(TEST_FILES / name, tmp_path / f"{number}.dcm")
    series = read_series(tmp_path)
    assert [p.name for p in series.skipped_files] == ["6.dcm"]
    reference = pydicom.dcmread(TEST_FILES / "MR_small.dcm").pixel_array.astype(np.float32)
    # five copies of one slice at one position: kept apart as five one-slice stacks, identical pixels
    assert len(series.stacks) == 5
    syntaxes = [s.transfer_syntax for s in series.stacks]
    assert {"RLE Lossless", "JPEG-LS Lossless Image Compression", "Explicit VR Big Endian"} <= set(syntaxes)
    for stack in series.stacks:
        np.testing.assert_array_equal(stack.pixels[0], reference)


# --- spine-ml inspect ---------------------------------------------------------------------------------

def run_inspect(capsys, *args: str) -> tuple[int, str, str]:
    from spine_ml.cli import main

    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_real_series_json(mr700, capsys):
    code, out, _ = run_inspect(capsys, mr700, "--json")
    report = json.loads(out)
    assert code == 0 and report["study_id"] is None and len(report["series"]) == 1
    series = report["series"][0]
    assert series["series_id"] == "mr700" and series["description"] is None and series["files"] == 7
    assert [s["slices"] for s in series["stacks"]] == [1] * 7
    first = series["stacks"][0]
    assert (first["rows"], first["columns"]) == (16, 16) and first["pixel_spacing"] == [0.390625, 0.390625]
    assert first["transfer_syntax"] == "Explicit VR Little Endian" and len(first["orientation"]) == 6
    assert any("7 stacks" in p for p in series["problems"])


def test_inspect_study_of_syntaxes_with_broken_file(tmp_path, capsys, caplog):
    study = tmp_path / "train_images" / "123"
    for series_id, names in ((11, ["MR_small_RLE.dcm", "MR_truncated.dcm"]), (12, ["MR_small_jpeg_ls_lossless.dcm"])):
        for number, name in enumerate(names, start=1):
            (study / str(series_id)).mkdir(parents=True, exist_ok=True)
            shutil.copy(TEST_FILES / name, study / str(series_id) / f"{number}.dcm")
    (tmp_path / "train_series_descriptions.csv").write_text("study_id,series_id,series_description\n"
                                                           "123,11,Axial T2\n123,12,Sagittal T1\n")
    code, out, err = run_inspect(capsys, study, "--json")
    report = json.loads(out)
    assert code == 0 and report["study_id"] == 123
    rle, jpeg = report["series"]
    assert (rle["series_id"], rle["description"], jpeg["description"]) == (11, "Axial T2", "Sagittal T1")
    assert rle["skipped_files"] == ["2.dcm"] and any("2.dcm" in p and "decoded" in p for p in rle["problems"])
    assert rle["stacks"][0]["transfer_syntax"] == "RLE Lossless"
    assert jpeg["stacks"][0]["transfer_syntax"] == "JPEG-LS Lossless Image Compression"
    assert any("2.dcm" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    code, text, _ = run_inspect(capsys, study)
    assert code == 0 and "series 11  Axial T2" in text and "64x64" in text and "! 2.dcm: skipped" in text


def test_inspect_bad_path_is_a_clean_error(tmp_path, capsys):
    code, out, err = run_inspect(capsys, tmp_path / "nope")
    assert code == 2 and "no such folder" in err and "Traceback" not in err


def test_stacks_of_a_series_share_one_intensity_window(tmp_path):
    write_stack(tmp_path, (-30.0, -40.0, 0.0), AXIAL, (0.7, 0.7), (30, 30), 4, 4.0, [1, 2, 3, 4])
    write_stack(tmp_path, (-30.0, -40.0, 80.0), AXIAL, (0.7, 0.7), (30, 30), 3, 4.0, [5, 6, 7])  # brighter (+z)
    first, second = read_series(tmp_path).stacks
    window = first.intensity_window((1.0, 99.0))
    assert second.intensity_window((1.0, 99.0)) == window
    both = np.concatenate([first.pixels.ravel(), second.pixels.ravel()])
    assert window == pytest.approx(tuple(np.percentile(both, (1.0, 99.0))), abs=2.0)
