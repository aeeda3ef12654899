"""The synthetic data set: layout, DICOM tags and geometry, labels, oracle, irregularities,
determinism, calibration against the real table, the CLI, ensure_synthetic and the preview."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spine_ml.competition import tables
from spine_ml.competition import vocabulary as V
from spine_ml.competition.tables import read_coordinates, read_series_descriptions, read_train_labels

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
REAL_TRAIN = SHARED / "data" / "rsna2024" / "train.csv"
LAYOUT_TOOL = SHARED / "tools" / "check_kaggle_layout.py"


def _headers(root: Path, split: str) -> pd.DataFrame:
    """One row per DICOM file of a split (each one read and decoded), with the tags the tests look at."""
    rows = []
    for path in sorted((root / f"{split}_images").glob("*/*/*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns), path  # every file decodes
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        rows.append({"study_id": int(path.parts[-3]), "series_id": int(path.parts[-2]), "file": int(path.stem),
                     "instance": int(ds.InstanceNumber), "rows": ds.Rows, "cols": ds.Columns,
                     "description": ds.SeriesDescription, "patient": ds.PatientID,
                     "syntax": ds.file_meta.TransferSyntaxUID, "iop": tuple(np.round(iop, 4)),
                     "position": float(np.array(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:])),
                     "thickness": "SliceThickness" in ds and "SpacingBetweenSlices" in ds})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def train_headers(tiny_data) -> pd.DataFrame:
    return _headers(tiny_data, "train")


@pytest.fixture(scope="module")
def test_headers(tiny_data) -> pd.DataFrame:
    return _headers(tiny_data, "test")


# --- layout ------------------------------------------------------------------------------------
def test_layout_columns_and_readers(tiny_data):
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv",
                 "test_series_descriptions.csv", "sample_submission.csv", "oracle_train.csv",
                 "oracle_test.csv", "test_labels.csv"):
        assert (tiny_data / name).is_file(), name
    assert list(pd.read_csv(tiny_data / "train.csv").columns) == ["study_id", *V.LABEL_COLUMNS]
    assert list(pd.read_csv(tiny_data / "test_labels.csv").columns) == ["study_id", *V.LABEL_COLUMNS]
    assert list(pd.read_csv(tiny_data / "train_label_coordinates.csv").columns) == [
        "study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    # the test split's hidden coordinates (they score the localizer): test studies and series only
    test_points = tables.read_coordinates(tiny_data / "test_label_coordinates.csv")
    test_series = pd.read_csv(tiny_data / "test_series_descriptions.csv")
    assert len(test_points) > 0
    assert set(test_points.study_id) <= set(test_series.study_id)
    assert set(test_points.series_id) <= set(test_series.series_id)
    for name in ("train_series_descriptions.csv", "test_series_descriptions.csv"):
        assert list(pd.read_csv(tiny_data / name).columns) == ["study_id", "series_id", "series_description"]
    labels = read_train_labels(tiny_data / "train.csv")
    assert labels.study_id.nunique() == 12 and len(labels) == 12 * 25
    coordinates = read_coordinates(tiny_data / "train_label_coordinates.csv")
    assert set(coordinates.study_id) <= set(labels.study_id)
    series = read_series_descriptions(tiny_data / "train_series_descriptions.csv")
    assert set(series.series_description) == set(V.SERIES_DESCRIPTIONS)
    test_series = read_series_descriptions(tiny_data / "test_series_descriptions.csv")
    assert test_series.study_id.nunique() == 4
    for name in ("sample_submission.csv", "oracle_test.csv"):
        frame = pd.read_csv(tiny_data / name)
        assert list(frame.columns) == list(V.SUBMISSION_COLUMNS)
        assert sorted(frame.row_id) == sorted(r for s in test_series.study_id.unique() for r in V.study_row_ids(s))
    ids = list(labels.study_id.unique()) + list(test_series.study_id.unique())
    assert len(set(ids)) == 16 and all(10**6 <= i < 2**32 for i in ids)  # random ids like the real ones


@pytest.mark.skipif(not LAYOUT_TOOL.exists(), reason="../shared/tools/check_kaggle_layout.py absent")
def test_shared_layout_checker_passes(tiny_data):
    done = subprocess.run([sys.executable, str(LAYOUT_TOOL), str(tiny_data)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layout ok" in done.stdout


def test_every_file_reads_and_carries_the_tags(tiny_data, train_headers, test_headers):
    descriptions = pd.concat([pd.read_csv(tiny_data / "train_series_descriptions.csv"),
                              pd.read_csv(tiny_data / "test_series_descriptions.csv")])
    expected = dict(zip(descriptions.series_id, descriptions.series_description))
    headers = pd.concat([train_headers, test_headers])
    assert len(headers) > 300
    assert (headers.file == headers.instance).all()
    assert (headers.patient.astype(int) == headers.study_id).all()
    assert (headers.description == headers.series_id.map(expected)).all()
    assert set(zip(headers.study_id, headers.series_id)) == set(zip(descriptions.study_id, descriptions.series_id))
    for path in sorted((tiny_data / "train_images").glob("*/*/*.dcm"))[::25]:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == ("MONOCHROME2", 16, 12, 0)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) and ds.pixel_array.max() < 4096
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6 and len(ds.PixelSpacing) == 2
        assert "RescaleSlope" not in ds  # like many real files; readers must not need it


def test_coordinates_lie_inside_their_image_on_the_right_series(tiny_data, train_headers):
    coordinates = read_coordinates(tiny_data / "train_label_coordinates.csv")
    assert len(coordinates) > 100
    files = train_headers.set_index(["study_id", "series_id", "file"])
    for row in coordinates.itertuples():
        header = files.loc[(row.study_id, row.series_id, row.instance_number)]
        assert 0 <= row.x < header.cols and 0 <= row.y < header.rows
        assert header.description == V.CONDITION_INFO[row.condition].series
    labels = read_train_labels(tiny_data / "train.csv")
    labelled = labels[labels.label >= 0]
    pairs = set(zip(coordinates.study_id, coordinates.condition, coordinates.level))
    assert pairs <= set(zip(labelled.study_id, labelled.condition, labelled.level))  # never a point for a blank


def test_oracle_rows_are_probability_vectors(tiny_data):
    labels = read_train_labels(tiny_data / "train.csv")
    oracle = pd.read_csv(tiny_data / "oracle_train.csv")
    assert sorted(oracle.row_id) == sorted(labels.row_id)  # blank-label rows too
    values = oracle[list(V.PROBABILITY_COLUMNS)].to_numpy()
    assert (values >= 0).all() and np.allclose(values.sum(1), 1.0, atol=1e-6)
    # the drawn labels follow the oracle: the true class gets more mass than under a uniform guess
    truth = labels[labels.label >= 0].set_index("row_id")
    p_true = values[oracle.row_id.map(lambda r: r in truth.index).to_numpy()]
    chosen = oracle.set_index("row_id").loc[truth.index].to_numpy()[np.arange(len(truth)), truth.label]
    assert p_true.shape[0] == len(truth) and chosen.mean() > 0.6


# --- irregularities, read back from the files ----------------------------------------------------
def _reversed_stacks(headers: pd.DataFrame) -> int:
    """Axial stacks whose instance numbers run with the slice normal (head-wards): the others run feet-wards."""
    count = 0
    axial = headers[headers.description == V.AXIAL_T2]
    for _, stack in axial.groupby(["series_id", "iop"]):
        if len(stack) > 1:
            ordered = stack.sort_values("instance")
            count += bool(np.all(np.diff(ordered.position.to_numpy()) > 0))
    return count


def test_every_irregularity_is_present(tiny_data, train_headers, test_headers):
    labels = read_train_labels(tiny_data / "train.csv")
    assert (labels.label < 0).any()
    blank = labels[labels.label < 0]
    assert ((blank.condition.str.contains("subarticular")) & (blank.level == "l1_l2")).any()
    train_series = pd.read_csv(tiny_data / "train_series_descriptions.csv")
    per_study = train_series.groupby("study_id").series_description.apply(list)
    assert any(s.count(V.AXIAL_T2) >= 2 for s in per_study), "a study with two axial series"
    assert any(V.SAGITTAL_T1 not in s for s in per_study), "a study without Sagittal T1"
    test_series = pd.read_csv(tiny_data / "test_series_descriptions.csv").groupby("study_id").series_description.apply(list)
    assert any(V.AXIAL_T2 not in s for s in test_series), "a test study without axial"
    numbering = train_headers.groupby("series_id").instance.apply(lambda s: sorted(s) != list(range(1, len(s) + 1)))
    assert numbering.any(), "instance numbers that start late or skip"
    assert _reversed_stacks(train_headers) + _reversed_stacks(test_headers) >= 1
    sizes = pd.concat([train_headers, test_headers]).groupby("series_id").apply(lambda s: len(set(zip(s.rows, s.cols))))
    assert (sizes > 1).any(), "mixed image sizes in a series"
    assert not test_headers.thickness.all(), "test files without SliceThickness / SpacingBetweenSlices"
    assert train_headers.thickness.all()
    coordinates = read_coordinates(tiny_data / "train_label_coordinates.csv")
    assert set(labels.study_id) - set(coordinates.study_id), "a train study with no coordinate rows"
    syntaxes = set(pd.concat([train_headers, test_headers]).syntax)
    assert {pydicom.uid.RLELossless, pydicom.uid.ExplicitVRLittleEndian} <= syntaxes


@pytest.mark.parametrize("seed", range(25))
def test_every_generation_of_12_studies_forces_every_irregularity(seed, tmp_path):
    from spine_ml.synth.generate import FORCED_TEST, plan_tasks
    from spine_ml.synth.study import TRAIN_IRREGULARITIES

    tasks = plan_tasks(tmp_path, 12, 2, seed, 64)
    train = [t for t in tasks if t.split == "train"]
    assert set().union(*(t.forced for t in train)) == set(TRAIN_IRREGULARITIES)
    assert max(len(t.forced) for t in train) == 1  # on distinct studies
    assert set().union(*(t.forced for t in tasks if t.split == "test")) == set(FORCED_TEST)


# --- determinism -------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    from spine_ml.synth.generate import generate_dataset

    generate_dataset(tmp_path / "a", studies=3, test_studies=2, seed=123, image_size=32, workers=1)
    generate_dataset(tmp_path / "b", studies=3, test_studies=2, seed=123, image_size=32, workers=2)
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(first) > 50 and first == second
    generate_dataset(tmp_path / "c", studies=3, test_studies=2, seed=124, image_size=32, workers=1)
    assert _digest(tmp_path / "c")["train.csv"] != first["train.csv"]


def test_refuses_to_overwrite_a_data_set_unless_forced(tmp_path):
    from spine_ml.synth.generate import SynthError, generate_dataset

    generate_dataset(tmp_path / "d", studies=1, test_studies=0, seed=1, image_size=32, workers=1)
    with pytest.raises(SynthError, match="already holds a data set.*--force"):
        generate_dataset(tmp_path / "d", studies=1, test_studies=0, seed=2, image_size=32, workers=1)
    (tmp_path / "d" / "notes.txt").write_text("mine")
    generate_dataset(tmp_path / "d", studies=2, test_studies=0, seed=2, image_size=32, workers=1, force=True)
    assert read_train_labels(tmp_path / "d" / "train.csv").study_id.nunique() == 2
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"  # only the data set's own entries go
    with pytest.raises(SynthError, match="--studies"):
        generate_dataset(tmp_path / "e", studies=0, test_studies=0, seed=1)


# --- calibration: frequencies and difficulty -----------------------------------------------------
def _label_only(studies: int, seed: int):
    """The generator's own label draws for ``studies`` studies, without rendering images."""
    from spine_ml.synth import labels
    from spine_ml.synth.generate import plan_tasks
    from spine_ml.synth.study import StudyResult, _streams

    results = []
    for task in plan_tasks(Path("unused"), studies, 0, seed, 64):
        truth_rng = _streams(task)[0]
        first = labels.draw_axial_first_level(truth_rng)
        truth = labels.draw_truth(truth_rng, max(first, 1) if "blank_labels" in task.forced else first)
        results.append(StudyResult("train", task.study_id, truth.labels, truth.probabilities))
    return results


def _frequencies(codes: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(c[c >= 0], minlength=3) / (c >= 0).sum() for c in codes.T])


def test_embedded_frequencies_are_the_real_tables(tmp_path):
    from spine_ml.synth.calibration import REAL_FREQUENCIES, REAL_STUDIES

    if not REAL_TRAIN.exists():
        pytest.skip("../shared/data/rsna2024/train.csv absent")
    real = read_train_labels(REAL_TRAIN).label.to_numpy().reshape(-1, 25)
    assert len(real) == REAL_STUDIES
    assert np.abs(_frequencies(real) - REAL_FREQUENCIES).max() < 1e-4


def test_generated_frequencies_follow_the_real_table():
    """~500 studies against the real per condition-level frequencies. Tolerance per cell: 4 standard
    errors of the difference of two independent proportions (500 synthetic, 1,975 real studies),
    plus 0.005 for the calibration's own approximation; four sigma over 75 cells keeps the test
    honest (a miscalibrated cell of a few points fails) without flaking on a seed."""
    from spine_ml.synth.calibration import REAL_FREQUENCIES, REAL_STUDIES

    real = REAL_FREQUENCIES
    if REAL_TRAIN.exists():
        real = _frequencies(read_train_labels(REAL_TRAIN).label.to_numpy().reshape(-1, 25))
    codes = np.stack([r.labels for r in _label_only(500, seed=0)])
    drawn = _frequencies(codes)
    counts = (codes >= 0).sum(0)[:, None]
    tolerance = 4 * np.sqrt(real * (1 - real) * (1 / counts + 1 / REAL_STUDIES)) + 0.005
    assert (np.abs(drawn - real) <= tolerance).all(), np.round(np.abs(drawn - real) - tolerance, 3)
    blank_rate = (codes < 0).mean()
    assert 0.005 < blank_rate < 0.03  # real: 1.16% of cells


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_default_difficulty_oracle_and_prior(tmp_path, seed):
    """400 studies: oracle ~0.30, prior ~0.79 (over 20 seeds: 0.292 +- 0.018 and 0.791 +- 0.012)."""
    from spine_ml.synth.scoring import score_pair
    from spine_ml.synth.writer import write_labels, write_oracle

    results = _label_only(400, seed=seed)
    write_labels(tmp_path / "train.csv", results)
    write_oracle(tmp_path / "oracle.csv", results)
    oracle, prior = score_pair(tmp_path / "train.csv", tmp_path / "oracle.csv")
    assert abs(oracle.score - 0.30) < 0.05, oracle
    assert abs(prior.score - 0.79) < 0.05, prior
    assert oracle.spinal < oracle.foraminal and oracle.spinal < oracle.subarticular
    severe_spinal = np.mean([(r.labels[:5] == 2).any() for r in results])
    assert 0.12 < severe_spinal < 0.25  # real: 18.5% of studies


# --- geometry: left is left ----------------------------------------------------------------------
def _lesion_patient(condition: str, level: str):
    from spine_ml.synth import anatomy, labels

    severity = np.full(25, -3.0)  # every row clearly normal but one, clearly severe
    severity[V.LABEL_COLUMNS.index(V.row_suffix(condition, level))] = 2.5
    truth = labels.StudyTruth(severity, labels.oracle_probabilities(severity), np.zeros(25, dtype=int))
    return anatomy.make_spine(truth, np.random.default_rng(0))


def _written_and_read(tmp_path: Path, spine, spec, sequence: str) -> pydicom.Dataset:
    """Render one slice, write it with the DICOM writer, read it back: the file's geometry is what counts."""
    from spine_ml.dicom.write import SeriesInfo, write_mr_slice
    from spine_ml.synth import render

    rng = np.random.default_rng(2)
    pixels = render.render_slice(spine, render.make_contrast(sequence, rng), render.make_acquisition(rng, spec.plane.centre),
                                 spec.plane, spec.thickness, rng)
    plane = spec.plane
    path = write_mr_slice(tmp_path / f"{sequence}.dcm", pixels, SeriesInfo(1, 2, 1, "x"), 1, position=plane.position,
                          orientation=plane.orientation, pixel_spacing=(plane.row_spacing, plane.col_spacing))
    return pydicom.dcmread(path)


def _signal_at(ds: pydicom.Dataset, point: np.ndarray, half: int = 1) -> tuple[float, float]:
    """(mean of the pixels within ``half`` of a patient point, its column), using only the file's tags."""
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    offset = point - np.array(ds.ImagePositionPatient, dtype=float)
    column = offset @ iop[:3] / float(ds.PixelSpacing[1])
    row = offset @ iop[3:] / float(ds.PixelSpacing[0])
    r, c = int(round(row)), int(round(column))
    return float(ds.pixel_array[r - half:r + half + 1, c - half:c + half + 1].mean()), column


def test_a_right_sided_subarticular_lesion_renders_on_the_patient_right(tmp_path):
    from spine_ml.synth import anatomy, series

    spine = _lesion_patient("right_subarticular_stenosis", "l4_l5")
    axial = series.plan_axial(spine, np.random.default_rng(1), [7], 160, 0, 1, False, False, False)[0]
    right, left = (spine.recess_point("l4_l5", side) for side in (anatomy.RIGHT, anatomy.LEFT))
    assert right[0] < spine.midline_x < left[0]  # LPS: patient left is +x
    ds = _written_and_read(tmp_path, spine, axial.nearest_slice(right, "l4_l5"), "T2")
    (right_signal, right_column), (left_signal, left_column) = _signal_at(ds, right), _signal_at(ds, left)
    assert right_column < left_column  # axial display: the patient's right is on the image's left
    assert right_signal < 0.6 * left_signal  # CSF (bright on T2) squeezed out of the right recess only


def test_a_left_foraminal_lesion_renders_on_the_left_parasagittal_slices(tmp_path):
    from spine_ml.competition.vocabulary import SAGITTAL_T1
    from spine_ml.synth import anatomy, series

    spine = _lesion_patient("left_neural_foraminal_narrowing", "l4_l5")
    sagittal = series.plan_sagittal(spine, np.random.default_rng(1), 7, SAGITTAL_T1, "T1", 160, False)
    signals = {}
    for side in (anatomy.LEFT, anatomy.RIGHT):
        point = spine.foramen_point("l4_l5", side)
        spec = sagittal.nearest_slice(point)
        assert np.sign(spec.plane.centre[0] - spine.midline_x) == (1 if side == anatomy.LEFT else -1)
        signals[side] = _signal_at(_written_and_read(tmp_path, spine, spec, "T1"), point, half=3)[0]
    assert signals[anatomy.LEFT] < 0.8 * signals[anatomy.RIGHT]  # the fat (bright on T1) is gone on the left


# --- the DICOM writer ------------------------------------------------------------------------------
@pytest.mark.parametrize("rle", [False, True])
def test_write_mr_slice_round_trip(tmp_path, rle):
    from spine_ml.dicom.write import SeriesInfo, write_mr_slice

    pixels = np.random.default_rng(0).integers(0, 4096, (24, 20)).astype(np.uint16)
    info = SeriesInfo(4003253, 702807833, 3, V.AXIAL_T2, {"EchoTime": 100.0})
    path = write_mr_slice(tmp_path / "5.dcm", pixels, info, 5, position=(-81.123456789, 12.5, 300.25),
                          orientation=(1, 0, 0, 0, 0.8, -0.6), pixel_spacing=(1.25, 0.75),
                          slice_thickness=4.0, spacing_between_slices=4.5, rle=rle)
    ds = pydicom.dcmread(path)
    assert np.array_equal(ds.pixel_array, pixels)
    assert ds.file_meta.TransferSyntaxUID == (pydicom.uid.RLELossless if rle else pydicom.uid.ExplicitVRLittleEndian)
    assert (ds.PatientID, ds.InstanceNumber, ds.SeriesNumber, ds.SeriesDescription) == ("4003253", 5, 3, V.AXIAL_T2)
    assert np.allclose([float(v) for v in ds.ImagePositionPatient], (-81.123456789, 12.5, 300.25), atol=1e-6)
    assert [float(v) for v in ds.PixelSpacing] == [1.25, 0.75] and float(ds.EchoTime) == 100.0
    assert float(ds.SliceThickness) == 4.0 and float(ds.SpacingBetweenSlices) == 4.5
    with pytest.raises(ValueError, match="12-bit"):
        write_mr_slice(tmp_path / "6.dcm", pixels.astype(np.int32), info, 6, position=(0, 0, 0),
                       orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1, 1))


# --- the command, ensure_synthetic, the preview ----------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    from spine_ml.cli import main

    out = tmp_path / "synthetic"
    assert main(["synth", str(out), "--studies", "2", "--test-studies", "1", "--image-size", "48",
                 "--workers", "1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 train + 1 test studies" in printed
    assert "oracle (true probabilities)" in printed and "best constant prior" in printed and "any_severe_spinal" in printed
    study = int(pd.read_csv(out / "train.csv").study_id[0])
    assert main(["synth", str(out), "--preview", str(study)]) == 0  # an existing set: preview only
    assert (out / f"preview_{study}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["synth", str(out)]) == 2
    assert "already holds a data set" in capsys.readouterr().err
    assert main(["synth", str(out), "--preview", "1"]) == 2
    assert "study 1 is not in" in capsys.readouterr().err


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, caplog):
    import logging
    import threading

    from spine_ml.config import validate
    from spine_ml.synth.generate import ensure_synthetic

    spec = {"studies": 2, "test_studies": 1, "seed": 5, "image_size": 32}
    config = validate({"data": {"root": "data/synthetic", "synthetic": spec}}, tmp_path)
    roots: list[Path] = []
    with caplog.at_level(logging.INFO, logger="spine_ml.synth.generate"):
        threads = [threading.Thread(target=lambda: roots.append(ensure_synthetic(config))) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert roots == [tmp_path / "data" / "synthetic"] * 2 and (roots[0] / "train.csv").is_file()
    assert sum("generating the synthetic data set" in r.message for r in caplog.records) == 1
    assert [p.name for p in (tmp_path / "data").iterdir() if "staging" in p.name] == []
    stamp = (roots[0] / "train.csv").stat().st_mtime_ns
    assert ensure_synthetic(config) == roots[0] and (roots[0] / "train.csv").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("kept")
    into_existing = validate({"data": {"root": "mine", "synthetic": spec}}, tmp_path)
    assert (ensure_synthetic(into_existing) / "train.csv").is_file()
    assert (tmp_path / "mine" / "README.md").read_text() == "kept"
    plain = validate({"data": {"root": "real"}}, tmp_path)
    assert ensure_synthetic(plain) == tmp_path / "real" and not (tmp_path / "real").exists()


def test_preview_of_a_train_and_a_test_study(tiny_data, tmp_path):
    from spine_ml.synth.preview import write_preview

    train_study = int(pd.read_csv(tiny_data / "train.csv").study_id[0])
    test_study = int(pd.read_csv(tiny_data / "test_series_descriptions.csv").study_id[0])
    for study in (train_study, test_study):
        path = write_preview(tiny_data, study, tmp_path / f"{study}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
