"""Hostile CSVs for the competition readers and the `score` / `validate` CLIs (hypothesis, bounded).

Each case starts from a valid file and mutates it: columns dropped, renamed or added, cells replaced
by hostile values (unknown conditions/levels/labels, non-numeric or path-like ids, inf/nan), rows
duplicated or dropped, the file emptied, re-encoded (UTF-16, Latin-1, BOM) or replaced by bytes.
Every case must end in either output that keeps the reader's contract, or a UserError whose message
names the file; the CLIs answer with exit 0/1/2 and a message, never a traceback.
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ml.cli import main
from spine_ml.competition import tables
from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STUDIES = (4003253, 4646740, 7143189)
HOSTILE = ["", " ", "abc", "-1", "1e5", "12.5", "0x1F", "../../etc/passwd", "..", "/tmp", "nan", "inf", "-inf",
           "NaN", "None", "1,2", '"', "Severe!", "severe", "Normal", "L6/S2", "l1_l2", "Spinal Canal",
           "spinal_canal_stenosis", "Left Neural Foraminal", "Axial T3", "é", "\u00a0", "9" * 30, "007", " 12 "]


# --- valid tables --------------------------------------------------------------------------------------

def valid_tables() -> dict[str, list[list[str]]]:
    rng = np.random.default_rng(0)
    train = [["study_id", *V.LABEL_COLUMNS]]
    coords = [["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]]
    series = [["study_id", "series_id", "series_description"]]
    solution = [list(V.SUBMISSION_COLUMNS) + ["sample_weight"]]
    for number, study in enumerate(STUDIES):
        labels = rng.integers(0, 3, 25)
        train.append([str(study), *[V.SEVERITIES[k] for k in labels]])
        for position, description in enumerate(V.SERIES_DESCRIPTIONS):
            series.append([str(study), str(1000 * number + position), description])
        for condition in V.CONDITIONS:
            position = V.SERIES_DESCRIPTIONS.index(V.CONDITION_INFO[condition].series)
            for level in V.LEVELS:
                coords.append([str(study), str(1000 * number + position), str(rng.integers(1, 20)),
                               V.CONDITION_TITLES[condition], V.LEVEL_TITLES[level],
                               f"{rng.uniform(0, 160):.3f}", f"{rng.uniform(0, 160):.3f}"])
        for (condition, level), label in zip([(c, lv) for c in V.CONDITIONS for lv in V.LEVELS], labels):
            one_hot = ["1" if k == label else "0" for k in range(3)]
            solution.append([V.make_row_id(study, condition, level), *one_hot, str(V.SAMPLE_WEIGHTS[label])])
    return {"train": train, "coords": coords, "series": series, "solution": solution}


def submission_rows(solution: list[list[str]]) -> list[list[str]]:
    rng = np.random.default_rng(1)
    rows = [list(V.SUBMISSION_COLUMNS)]
    for row in solution[1:]:
        p = np.round(rng.dirichlet([3, 1, 1]), 6)
        p[0] = 1 - p[1:].sum()  # exactly normalised in text, as the writer's rows are
        rows.append([row[0], *(f"{v:.6f}" for v in p)])
    return rows


def to_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# --- mutations -----------------------------------------------------------------------------------------

HOSTILE_VALUE = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=10))
MUTATION = st.one_of(
    st.tuples(st.just("drop_column"), st.integers(0, 30)),
    st.tuples(st.just("rename_column"), st.integers(0, 30), HOSTILE_VALUE),
    st.tuples(st.just("add_column"), HOSTILE_VALUE),
    st.tuples(st.just("set_cell"), st.integers(1, 80), st.integers(0, 30), HOSTILE_VALUE),
    st.tuples(st.just("duplicate_row"), st.integers(1, 80)),
    st.tuples(st.just("drop_row"), st.integers(1, 80)),
    st.tuples(st.just("truncate"), st.integers(0, 2)),  # keep 0, 1 or 2 lines
)
ENCODING = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"])


def mutate(rows: list[list[str]], mutation) -> list[list[str]]:
    rows = [list(r) for r in rows]
    kind, *args = mutation
    if not rows:
        return rows
    width = len(rows[0])
    if kind == "drop_column":
        column = args[0] % width
        rows = [r[:column] + r[column + 1:] for r in rows]
    elif kind == "rename_column":
        rows[0][args[0] % width] = args[1]
    elif kind == "add_column":
        rows = [r + ([args[0]] if i == 0 else ["x"]) for i, r in enumerate(rows)]
    elif kind == "set_cell" and len(rows) > 1:
        row = 1 + (args[0] - 1) % (len(rows) - 1)
        rows[row][args[1] % len(rows[row])] = args[2]
    elif kind == "duplicate_row" and len(rows) > 1:
        rows.append(list(rows[1 + (args[0] - 1) % (len(rows) - 1)]))
    elif kind == "drop_row" and len(rows) > 1:
        del rows[1 + (args[0] - 1) % (len(rows) - 1)]
    elif kind == "truncate":
        rows = rows[: args[0]]
    return rows


def write_mutated(path: Path, rows, mutations, encoding: str) -> Path:
    for mutation in mutations:
        rows = mutate(rows, mutation)
    text = to_text(rows)
    try:
        path.write_bytes(text.encode(encoding))
    except UnicodeEncodeError:
        path.write_bytes(text.encode("utf-8", "replace"))
    return path


def read_or_error(reader, path: Path):
    """The reader's output, or None after checking that its error is a UserError naming the file."""
    try:
        return reader(path)
    except UserError as error:
        assert str(path) in str(error) or path.name in str(error), f"error does not name the file: {error}"
        return None


# --- contracts of each reader's output -----------------------------------------------------------------

def check_long_form(frame: pd.DataFrame) -> None:
    assert frame.study_id.dtype == np.int64 and (frame.study_id >= 0).all()
    assert frame.condition.isin(V.CONDITIONS).all() and frame.level.isin(V.LEVELS).all()
    assert frame.row_id.tolist() == [V.make_row_id(s, c, lv) for s, c, lv in
                                     zip(frame.study_id, frame.condition, frame.level)]
    assert not frame.row_id.duplicated().any(), "duplicate rows would be scored twice"
    weights = frame.sample_weight.to_numpy(np.float64)
    assert np.isfinite(weights).all() and (weights >= 0).all()


def check_train_labels(frame: pd.DataFrame) -> None:
    check_long_form(frame)
    assert frame.label.isin([-1, 0, 1, 2]).all()
    assert len(frame) == 25 * frame.study_id.nunique()
    expected = np.where(frame.label >= 0, np.take(V.SAMPLE_WEIGHTS, frame.label.clip(0)), 0)
    assert np.array_equal(frame.sample_weight.to_numpy(), expected)


def check_solution(frame: pd.DataFrame) -> None:
    check_long_form(frame)
    assert frame.label.isin([0, 1, 2]).all()


def check_coordinates(frame: pd.DataFrame) -> None:
    for column in ("study_id", "series_id", "instance_number"):
        assert frame[column].dtype == np.int64 and (frame[column] >= 0).all()
    assert frame.condition.isin(V.CONDITIONS).all() and frame.level.isin(V.LEVELS).all()
    assert np.isfinite(frame[["x", "y"]].to_numpy(np.float64)).all(), "non-finite coordinates passed on"


def check_series(frame: pd.DataFrame) -> None:
    assert frame.study_id.dtype == np.int64 and frame.series_id.dtype == np.int64
    assert (frame.study_id >= 0).all() and (frame.series_id >= 0).all()


READERS = {
    "train": (tables.read_train_labels, check_train_labels),
    "coords": (tables.read_coordinates, check_coordinates),
    "series": (tables.read_series_descriptions, check_series),
    "solution": (tables.read_solution, check_solution),
}


@pytest.mark.parametrize("name", list(READERS))
def test_valid_tables_read(tmp_path, name):
    reader, check = READERS[name]
    check(reader(write_mutated(tmp_path / f"{name}.csv", valid_tables()[name], [], "utf-8")))


@pytest.mark.parametrize("name", list(READERS))
@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), encoding=ENCODING)
def test_hostile_tables(tmp_path, name, mutations, encoding):
    reader, check = READERS[name]
    path = write_mutated(tmp_path / f"{name}.csv", valid_tables()[name], mutations, encoding)
    frame = read_or_error(reader, path)
    if frame is not None:
        check(frame)


@FUZZ
@given(content=st.one_of(st.binary(max_size=400), st.just(b""), st.just(b"\n\n\n"), st.just(b'"unclosed,\n1,2')))
def test_bytes_that_are_not_csv(tmp_path, content):
    for name, (reader, check) in READERS.items():
        path = tmp_path / f"{name}.csv"
        path.write_bytes(content)
        frame = read_or_error(reader, path)
        if frame is not None:
            check(frame)


@pytest.mark.parametrize("name, column, value", [
    ("train", 0, "../4003253"), ("coords", 0, "../../x"), ("coords", 1, "1/2"), ("coords", 2, "-3"),
    ("series", 0, "..%2f"), ("series", 1, " 1 2"), ("solution", 0, "../1_spinal_canal_stenosis_l1_l2"),
])
def test_path_like_ids_are_refused_by_name(tmp_path, name, column, value):
    reader, _ = READERS[name]
    path = write_mutated(tmp_path / f"{name}.csv", valid_tables()[name], [("set_cell", 1, column, value)], "utf-8")
    with pytest.raises(UserError, match=str(path)):
        reader(path)


# --- the CLIs --------------------------------------------------------------------------------------------

def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)  # a non-UserError exception propagates here and fails the test: a raw traceback
    out, err = capsys.readouterr()
    return code, out, err


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=0, max_size=3), which=st.sampled_from(["truth", "submission", "both"]),
       truth_layout=st.sampled_from(["train", "solution"]), encoding=ENCODING)
def test_score_cli_on_hostile_files(tmp_path, capsys, mutations, which, truth_layout, encoding):
    valid = valid_tables()
    truth = write_mutated(tmp_path / "truth.csv", valid[truth_layout], mutations if which != "submission" else [],
                          encoding if which != "submission" else "utf-8")
    submission = write_mutated(tmp_path / "sub.csv", submission_rows(valid["solution"]),
                               mutations if which != "truth" else [], encoding if which != "truth" else "utf-8")
    code, out, err = cli(["score", "--truth", str(truth), "--submission", str(submission), "--json"], capsys)
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("spine-ml score: error:") and ("truth.csv" in err or "sub.csv" in err), err
    else:
        import json

        result = json.loads(out)
        assert set(result) == set(V.METRIC_PARTS)
        assert np.isfinite(result["score"]) and result["score"] >= 0


def independent_validity(path: Path, studies: list[int]) -> bool:
    """The submission format, checked without the package's validator."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 - unreadable is invalid
        return False
    if list(frame.columns) != list(V.SUBMISSION_COLUMNS):
        return False
    expected = sorted(V.make_row_id(s, c, lv) for s in studies for c in V.CONDITIONS for lv in V.LEVELS)
    if sorted(frame.row_id) != expected:
        return False
    values = frame[list(V.PROBABILITY_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    return bool(np.isfinite(values).all() and (values >= 0).all() and np.allclose(values.sum(1), 1, atol=1e-6))


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=0, max_size=3), encoding=ENCODING,
       source=st.sampled_from(["data", "sample"]))
def test_validate_cli_agrees_with_an_independent_check(tmp_path, capsys, mutations, encoding, source):
    valid = valid_tables()
    submission = write_mutated(tmp_path / "sub.csv", submission_rows(valid["solution"]), mutations, encoding)
    if source == "data":
        (tmp_path / "test_series_descriptions.csv").write_text(to_text(valid["series"]))
        argv = ["validate", str(submission), "--data", str(tmp_path)]
    else:
        (tmp_path / "sample.csv").write_text(to_text(submission_rows(valid["solution"])))
        argv = ["validate", str(submission), "--sample", str(tmp_path / "sample.csv")]
    code, out, err = cli(argv, capsys)
    assert code == (0 if independent_validity(submission, list(STUDIES)) else 1), (out, err)
    assert ("valid" if code == 0 else "INVALID") in out


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), encoding=ENCODING,
       which=st.sampled_from(["series", "sample"]))
def test_validate_cli_with_a_hostile_reference(tmp_path, capsys, mutations, encoding, which):
    """The file naming the expected studies is hostile: a clear error (exit 2) or a verdict."""
    valid = valid_tables()
    submission = write_mutated(tmp_path / "sub.csv", submission_rows(valid["solution"]), [], "utf-8")
    if which == "series":
        write_mutated(tmp_path / "test_series_descriptions.csv", valid["series"], mutations, encoding)
        argv = ["validate", str(submission), "--data", str(tmp_path)]
    else:
        write_mutated(tmp_path / "sample.csv", submission_rows(valid["solution"]), mutations, encoding)
        argv = ["validate", str(submission), "--sample", str(tmp_path / "sample.csv")]
    code, out, err = cli(argv, capsys)
    assert code in (0, 1, 2)
    if code == 2:
        assert err.startswith("spine-ml validate: error:") and str(tmp_path) in err, err


def test_real_cli_prints_no_traceback_for_bad_files(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_bytes("study_id,spinal\n../1,Severe\n".encode("utf-16"))
    submission = tmp_path / "sub.csv"
    submission.write_text("row_id,normal_mild\nx,1\n")
    spine = Path(sys.executable).with_name("spine-ml")
    for argv in (["score", "--truth", str(truth), "--submission", str(submission)],
                 ["validate", str(submission), "--sample", str(truth)],
                 ["validate", str(tmp_path / "absent.csv"), "--sample", str(tmp_path / "absent-sample.csv")]):
        result = subprocess.run([str(spine), *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode in (1, 2), result
        assert "Traceback" not in result.stderr, result.stderr
        assert str(tmp_path) in result.stderr + result.stdout


@pytest.mark.parametrize("name", list(READERS))
def test_every_hostile_value_in_every_column(tmp_path, name):
    """Deterministic sweep: each hostile value in each column of the first data row."""
    reader, check = READERS[name]
    valid = valid_tables()[name]
    width = len(valid[0])  # train.csv's 25 label columns are read alike: the first, a middle, the last
    for column in range(width) if width < 10 else (0, 1, width // 2, width - 1):
        for value in HOSTILE:
            path = write_mutated(tmp_path / f"{name}.csv", valid, [("set_cell", 1, column, value)], "utf-8")
            frame = read_or_error(reader, path)
            if frame is not None:
                check(frame)
