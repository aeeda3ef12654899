"""Vocabulary, CSV readers, the submission writer and `spine-ml validate`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spine_ml.cli import main
from spine_ml.competition import vocabulary as V
from spine_ml.competition.submission import normalised_frame, validate_submission, write_predictions
from spine_ml.competition.tables import (
    DataFormatError, labels_to_wide, read_coordinates, read_series_descriptions, read_train_labels,
)

from conftest import REAL_LABELS


def test_row_ids_round_trip_and_spellings():
    rows = V.study_row_ids(44036939)
    assert len(rows) == 25 and rows[5] == "44036939_left_neural_foraminal_narrowing_l1_l2"
    assert [V.parse_row_id(r) for r in rows][5] == (44036939, "left_neural_foraminal_narrowing", "l1_l2")
    assert V.CONDITION_TITLES["left_neural_foraminal_narrowing"] == "Left Neural Foraminal Narrowing"
    assert V.LEVEL_TITLES["l5_s1"] == "L5/S1"
    assert V.mirror_condition("left_subarticular_stenosis") == "right_subarticular_stenosis"
    assert V.mirror_condition("spinal_canal_stenosis") == "spinal_canal_stenosis"
    with pytest.raises(ValueError, match="abc_spinal"):
        V.parse_row_id("abc_spinal_canal_stenosis_l1_l2")
    with pytest.raises(ValueError, match="expected"):
        V.parse_row_id("1_spinal_canal_stenosis_l6_l7")


def write_train(tmp_path, rows: list[list[str]], header=None):
    header = header or ["study_id", *V.LABEL_COLUMNS]
    pd.DataFrame(rows, columns=header).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv"


def test_train_labels_blank_cells_are_missing_not_errors(tmp_path):
    values = ["Normal/Mild"] * 25
    values[15] = ""
    values[3] = "Severe"
    long = read_train_labels(write_train(tmp_path, [["4003253", *values]]))
    assert len(long) == 25 and long.study_id.dtype == np.int64
    assert long.label.tolist()[15] == -1 and long.sample_weight.tolist()[15] == 0
    assert long.set_index("row_id").loc["4003253_spinal_canal_stenosis_l4_l5", "sample_weight"] == 4
    assert labels_to_wide(long).iloc[0].tolist() == [4003253, *values]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.__setitem__(3, "Severe!"), "unknown label 'Severe!'"),
    (lambda r: r.__setitem__(0, "12a"), "study_id must be digits.*'12a'"),
    (lambda r: r.__setitem__(0, "../etc"), "study_id must be digits"),
])
def test_train_labels_bad_values_are_named(tmp_path, mutate, message):
    row = ["1", *["Normal/Mild"] * 25]
    mutate(row)
    with pytest.raises(DataFormatError, match=message):
        read_train_labels(write_train(tmp_path, [row]))


def test_train_labels_wrong_columns_and_duplicates(tmp_path):
    header = ["study_id", *V.LABEL_COLUMNS[:-1], "right_subarticular_stenosis_l6_s2"]
    with pytest.raises(DataFormatError, match="missing column.*right_subarticular_stenosis_l5_s1"):
        read_train_labels(write_train(tmp_path, [["1", *["Normal/Mild"] * 25]], header))
    with pytest.raises(DataFormatError, match="duplicate study_id"):
        read_train_labels(write_train(tmp_path, [["1", *["Normal/Mild"] * 25]] * 2))


def test_coordinates_reader_and_errors(tmp_path):
    path = tmp_path / "coords.csv"
    path.write_text("study_id,series_id,instance_number,condition,level,x,y\n"
                    "4003253,702807833,8,Spinal Canal Stenosis,L1/L2,322.831858,227.964602\n")
    coords = read_coordinates(path)
    assert coords.iloc[0].tolist() == [4003253, 702807833, 8, "spinal_canal_stenosis", "l1_l2", 322.831858, 227.964602]
    path.write_text("study_id,series_id,instance_number,condition,level,x,y\n1,2,3,Spinal Stenosis,L1/L2,1,2\n")
    with pytest.raises(DataFormatError, match="unknown condition 'Spinal Stenosis'"):
        read_coordinates(path)
    path.write_text("study_id,series_id,instance_number,condition,level,x,y\n1,2,3,Spinal Canal Stenosis,L9/L2,1,2\n")
    with pytest.raises(DataFormatError, match="unknown level 'L9/L2'"):
        read_coordinates(path)
    path.write_text("study_id,series_id,instance_number,condition,level,x,y\n1,2,3,Spinal Canal Stenosis,L1/L2,abc,2\n")
    with pytest.raises(DataFormatError, match="line 2: x is not a number"):
        read_coordinates(path)


def test_real_label_files_read(tmp_path):
    if not (REAL_LABELS / "train.csv").is_file():
        pytest.skip("../shared/data/rsna2024 not present")
    long = read_train_labels(REAL_LABELS / "train.csv")
    assert long.study_id.nunique() == 1975 and (long.label < 0).sum() == 572
    series = read_series_descriptions(REAL_LABELS / "train_series_descriptions.csv")
    assert len(series) == 6294 and set(series.series_description) == set(V.SERIES_DESCRIPTIONS)


def test_writer_is_atomic_and_refuses_silent_overwrite(tmp_path, caplog):
    frame = normalised_frame(V.study_row_ids(1), np.tile([2.0, 1.0, 1.0], (25, 1)))
    assert np.allclose(frame[list(V.PROBABILITY_COLUMNS)].sum(1), 1) and frame.normal_mild.iloc[0] == 0.5
    path = write_predictions(frame, tmp_path / "sub.csv")
    assert pd.read_csv(path).shape == (25, 4)
    with pytest.raises(FileExistsError, match="sub.csv exists"):
        write_predictions(frame, path, overwrite=False)
    write_predictions(frame, path)
    assert "replacing existing" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temp file left behind


def test_validate_lists_every_problem(tmp_path, capsys):
    (tmp_path / "test_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n11,1,Sagittal T1\n12,2,Axial T2\n")
    frame = normalised_frame(V.study_row_ids(11) + V.study_row_ids(12), np.full((50, 3), 1 / 3))
    write_predictions(frame, tmp_path / "good.csv")
    assert main(["validate", str(tmp_path / "good.csv"), "--data", str(tmp_path)]) == 0
    assert "valid (2 studies, 50 rows)" in capsys.readouterr().out

    bad = frame.copy()
    bad.loc[0, "severe"] = -0.2
    bad.loc[1, "moderate"] = np.nan
    bad.loc[2, "normal_mild"] = 0.9
    bad = pd.concat([bad.iloc[:-1], bad.iloc[[0]].assign(row_id="99_spinal_canal_stenosis_l1_l2")])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    problems = validate_submission(tmp_path / "bad.csv", [11, 12])
    text = "\n".join(problems)
    assert "not expected, e.g. 99_spinal_canal_stenosis_l1_l2" in text
    assert "missing, e.g. 12_right_subarticular_stenosis_l5_s1" in text
    assert "negative values, e.g. 11_spinal_canal_stenosis_l1_l2" in text
    assert "non-finite values, e.g. 11_spinal_canal_stenosis_l2_l3" in text
    assert "do not sum to 1" in text and "11_spinal_canal_stenosis_l3_l4" in text
    assert main(["validate", str(tmp_path / "bad.csv"), "--data", str(tmp_path)]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_validate_against_a_sample_submission(tmp_path, capsys):
    normalised_frame(V.study_row_ids(5), np.full((25, 3), 1 / 3)).to_csv(tmp_path / "sample.csv", index=False)
    (tmp_path / "wrong_header.csv").write_text("row_id,a,b,c\n")
    assert main(["validate", str(tmp_path / "wrong_header.csv"), "--sample", str(tmp_path / "sample.csv")]) == 1
    out = capsys.readouterr().out
    assert "header is row_id,a,b,c" in out and "25 expected row_id(s) missing" in out
