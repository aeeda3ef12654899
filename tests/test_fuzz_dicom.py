"""Hostile files for the DICOM reader (hypothesis, bounded): every series read ends with each file
either used in a stack of finite, well-placed pixels or skipped with a warning that names it.
Never an exception out of `read_series`, never a hang, never a garbage stack passed on silently.

Each case starts from a valid series written by the package's own writer (pydicom underneath) and
mutates one file: truncation, overwritten bytes, wrong or missing tags, absurd Rows/Columns claims,
empty pixel data, or a file that is not DICOM at all but is named `.dcm`.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spine_ml.dicom.read import read_series
from spine_ml.dicom.write import SeriesInfo, write_mr_slice

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(120)]  # pydicom warns on bad VRs
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SLICES, SIZE = 4, 16
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A valid 4-slice sagittal series, 16x16 px, instance numbers 1..4."""
    folder = tmp_path_factory.mktemp("template") / "series"
    info = SeriesInfo(study_id=1, series_id=2, series_number=1, series_description="Sagittal T2/STIR")
    rng = np.random.default_rng(0)
    for k in range(SLICES):
        write_mr_slice(folder / f"{k + 1}.dcm", rng.integers(0, 4096, (SIZE, SIZE), dtype=np.uint16), info, k + 1,
                       position=(4.0 * k, -50.0, 30.0), orientation=SAGITTAL, pixel_spacing=(1.0, 1.0),
                       slice_thickness=4.0, spacing_between_slices=4.0)
    return folder


def fresh_copy(template: Path, tmp_path: Path, counter=iter(range(10 ** 9))) -> Path:
    target = tmp_path / f"case{next(counter)}"
    shutil.copytree(template, target)
    return target


def check_read(folder: Path, victim: Path, caplog) -> None:
    """The invariants every read of a series with one hostile file must keep."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spine_ml.dicom.read"):
        series = read_series(folder)  # must not raise
    used = [path for stack in series.stacks for path in stack.files]
    skipped = list(series.skipped_files)
    listed = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert sorted(p.name for p in used + skipped) == listed, "every file is used once or skipped"
    assert victim not in used or victim not in skipped
    for healthy in set(listed) - {victim.name}:
        assert healthy in {p.name for p in used}, f"the untouched file {healthy} must still be read"
    for path in skipped:
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert path.name in warned, f"{path.name} skipped without a warning naming it"
        assert any(path.name in problem for problem in series.problems)
    for stack in series.stacks:
        assert stack.pixels.ndim == 3 and stack.pixels.shape[0] == len(stack.files)
        assert np.isfinite(stack.pixels).all(), "non-finite pixels passed on"
        assert np.isfinite(stack.positions).all() and np.isfinite(stack.orientation).all()
        assert (stack.pixel_spacing > 0).all() and np.isfinite(stack.pixel_spacing).all()
        assert np.isfinite(stack.normal).all()


# --- byte-level mutations -----------------------------------------------------------------------------

@FUZZ
@given(victim=st.integers(1, SLICES), fraction=st.floats(0.0, 0.999))
def test_truncated_file(template, tmp_path, caplog, victim, fraction):
    folder = fresh_copy(template, tmp_path)
    path = folder / f"{victim}.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    check_read(folder, path, caplog)


@FUZZ
@given(victim=st.integers(1, SLICES), edits=st.lists(st.tuples(st.floats(0.0, 0.999), st.binary(min_size=1, max_size=8)),
                                                     min_size=1, max_size=6))
def test_overwritten_bytes(template, tmp_path, caplog, victim, edits):
    folder = fresh_copy(template, tmp_path)
    path = folder / f"{victim}.dcm"
    data = bytearray(path.read_bytes())
    header = len(data) - 2 * SIZE * SIZE  # most edits land in the tags, where the parser lives
    for where, chunk in edits:
        start = int(where * header)
        data[start:start + len(chunk)] = chunk
    path.write_bytes(bytes(data))
    check_read(folder, path, caplog)


NOT_DICOM = st.one_of(
    st.binary(max_size=600),
    st.just(b""),
    st.just(b"\x89PNG\r\n\x1a\n" + bytes(200)),
    st.just(b"DICM" * 50),
    st.just(bytes(128) + b"DICM" + bytes(64)),  # preamble and magic, then nothing sensible
    st.text(max_size=300).map(str.encode),
)


@FUZZ
@given(content=NOT_DICOM)
def test_non_dicom_file_named_dcm(template, tmp_path, caplog, content):
    folder = fresh_copy(template, tmp_path)
    path = folder / "5.dcm"
    path.write_bytes(content)
    check_read(folder, path, caplog)


# --- tag-level mutations (valid DICOM syntax, wrong content) ----------------------------------------

def _bad_number_lists(count: int):
    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.integers(-10 ** 6, 10 ** 6))
    return st.one_of(st.lists(number, min_size=0, max_size=count + 2), st.just(["abc"] * count),
                     st.just([0.0] * count))


TAG_EDITS = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(
        ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber", "Rows", "Columns",
         "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
         "PixelData", "RescaleSlope", "SliceThickness"])),
    st.tuples(st.just("Rows"), st.sampled_from([0, 1, 3, 17, 4096, 65535])),
    st.tuples(st.just("Columns"), st.sampled_from([0, 1, 3, 17, 4096, 65535])),
    st.tuples(st.just("BitsAllocated"), st.sampled_from([0, 1, 8, 12, 32, 64])),
    st.tuples(st.just("SamplesPerPixel"), st.sampled_from([0, 3, 4])),
    st.tuples(st.just("NumberOfFrames"), st.sampled_from([0, 2, 100000])),
    st.tuples(st.just("PhotometricInterpretation"), st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "??"])),
    st.tuples(st.just("PixelData"), st.sampled_from([b"", b"\x00\x01", bytes(2 * SIZE * SIZE - 2)])),
    st.tuples(st.just("ImagePositionPatient"), _bad_number_lists(3)),
    st.tuples(st.just("ImageOrientationPatient"), _bad_number_lists(6)),
    st.tuples(st.just("PixelSpacing"), _bad_number_lists(2)),
    st.tuples(st.just("RescaleSlope"), st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")])),
    st.tuples(st.just("InstanceNumber"), st.sampled_from([-1, 0, 2 ** 31 - 1, 3])),  # 3: a duplicate
    st.tuples(st.just("TransferSyntaxUID"), st.sampled_from(
        ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.2",
         "1.2.3.4.5.6.7.8.9.10"])),
)


def _set_raw(ds, keyword: str, values) -> None:
    """Store a multi-valued DS tag as raw text, so values pydicom would refuse ('abc', 'nan') reach the file."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    text = "\\".join(str(v) for v in values).encode()
    text += b" " * (len(text) % 2)
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)


def apply_edit(path: Path, edit) -> bool:
    """Rewrite one tag of a valid file; False when pydicom refuses to write such a file at all."""
    ds = pydicom.dcmread(path)
    keyword, value = edit
    try:
        if keyword == "delete":
            if value in ds:
                delattr(ds, value)
        elif keyword == "TransferSyntaxUID":
            from pydicom.encaps import encapsulate
            from pydicom.uid import UID

            if not (UID(value).is_transfer_syntax and UID(value).is_compressed):  # pydicom will not write these: patch bytes
                data = path.read_bytes()
                explicit = b"1.2.840.10008.1.2.1\x00"
                path.write_bytes(data.replace(explicit, value.encode().ljust(len(explicit), b"\x00")[:len(explicit)], 1))
                return True
            ds.file_meta.TransferSyntaxUID = value  # the claim changes, the pixel bytes do not
            if UID(value).is_compressed:
                ds.PixelData = encapsulate([ds.PixelData])
        elif keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            _set_raw(ds, keyword, value)
        elif keyword == "RescaleSlope":
            ds.RescaleSlope = str(value)
        else:
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - the writer's own refusals are not the reader's problem
        return False
    return True


@FUZZ
@given(victim=st.integers(1, SLICES), edits=st.lists(TAG_EDITS, min_size=1, max_size=3))
def test_wrong_or_missing_tags(template, tmp_path, caplog, victim, edits):
    folder = fresh_copy(template, tmp_path)
    path = folder / f"{victim}.dcm"
    written = [apply_edit(path, edit) for edit in edits]
    if not any(written):
        path.write_bytes((template / f"{victim}.dcm").read_bytes())
    check_read(folder, path, caplog)


@pytest.mark.timeout(60)
def test_absurd_size_claim_is_skipped_without_allocating(template, tmp_path, caplog):
    """Rows x Columns claiming 4 GiB over a 512-byte pixel element: skipped by name, no huge allocation."""
    folder = fresh_copy(template, tmp_path)
    path = folder / "2.dcm"
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 65535, 65535
    ds.NumberOfFrames = 1
    ds.save_as(path, enforce_file_format=False)
    check_read(folder, path, caplog)
    assert path in read_series(folder).skipped_files


def test_directory_and_dangling_link_named_like_slices_are_ignored(template, tmp_path, caplog):
    folder = fresh_copy(template, tmp_path)
    (folder / "7.dcm").mkdir()  # a folder is not a slice: ignored, not an error
    victim = folder / "6.dcm"
    victim.symlink_to(folder / "does-not-exist.dcm")  # a dangling link: not a file, ignored
    series = read_series(folder)
    assert sum(stack.slices for stack in series.stacks) == SLICES
    assert all(p.name != "7.dcm" for stack in series.stacks for p in stack.files)


SINGLE_EDITS = [
    ("delete", "ImagePositionPatient"), ("delete", "ImageOrientationPatient"), ("delete", "PixelSpacing"),
    ("delete", "InstanceNumber"), ("delete", "Rows"), ("delete", "PixelData"), ("delete", "BitsAllocated"),
    ("Rows", 0), ("Rows", 65535), ("Columns", 3), ("BitsAllocated", 8), ("BitsAllocated", 32),
    ("SamplesPerPixel", 3), ("NumberOfFrames", 2), ("PixelData", b""),
    ("ImagePositionPatient", [float("nan"), 0.0, 0.0]), ("ImagePositionPatient", [float("inf"), 0.0, 0.0]),
    ("ImagePositionPatient", [1.0, 2.0]), ("ImageOrientationPatient", [0.0] * 6),
    ("ImageOrientationPatient", [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]), ("ImageOrientationPatient", [float("nan")] * 6),
    ("PixelSpacing", [0.0, 0.0]), ("PixelSpacing", [-1.0, 1.0]), ("PixelSpacing", [float("inf"), 1.0]),
    ("PixelSpacing", ["abc", "abc"]), ("RescaleSlope", float("nan")), ("RescaleSlope", float("inf")),
    ("RescaleSlope", 1e30), ("PhotometricInterpretation", "MONOCHROME1"), ("PhotometricInterpretation", "RGB"),
    ("TransferSyntaxUID", "1.2.840.10008.1.2.4.70"), ("TransferSyntaxUID", "1.2.840.10008.1.2.5"),
    ("TransferSyntaxUID", "1.2.3.4.5.6.7.8.9.10"), ("TransferSyntaxUID", "1.2.840.10008.1.2.2"),
]


@pytest.mark.parametrize("edit", SINGLE_EDITS, ids=[f"{k}={v!r}"[:40] for k, v in SINGLE_EDITS])
def test_every_single_tag_edit(template, tmp_path, caplog, edit):
    """The whole list, deterministically (the hypothesis test above samples combinations of it)."""
    folder = fresh_copy(template, tmp_path)
    path = folder / "2.dcm"
    assert apply_edit(path, edit), f"pydicom refused to write {edit}"
    check_read(folder, path, caplog)
