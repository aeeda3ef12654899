"""The writer side of spine_ml.dicom: one MR slice as a real DICOM file (MR Image Storage).

Used by the synthetic data set; the geometry tags follow ../shared/reference/dicom-geometry.md.
Every UID is derived from the study/series ids and the instance number, and no date or time is
taken from the clock, so the same inputs give byte-identical files.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs


@dataclass(frozen=True)
class SeriesInfo:
    """What every slice of one series shares."""
    study_id: int
    series_id: int
    series_number: int
    series_description: str
    sequence: Mapping[str, float | str] = ()  # extra acquisition tags, e.g. {"EchoTime": 90.0}


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


def _rle_plugin() -> str:
    """pylibjpeg-rle when installed (same bytes as pydicom's own encoder, ~8x faster)."""
    from pydicom.pixels.encoders import RLELosslessEncoder  # pydicom.encoders: deprecated, warns per call

    return "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else "pydicom"


def _ds(value: float):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)  # DS holds at most 16 characters


def write_mr_slice(path: Path | str, pixels: np.ndarray, series: SeriesInfo, instance_number: int, *,
                   position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float],
                   slice_thickness: float | None = None, spacing_between_slices: float | None = None,
                   slice_location: float | None = None, rle: bool = False) -> Path:
    """Write one 12-bit MONOCHROME2 MR slice to ``path``.

    position: ImagePositionPatient (centre of the first pixel, LPS mm); orientation:
    ImageOrientationPatient (row direction, then column direction); pixel_spacing: (between rows,
    between columns). SliceThickness / SpacingBetweenSlices / SliceLocation are left out when
    None (real files sometimes lack them). ``rle`` writes RLE Lossless instead of Explicit VR LE.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint16 or int(pixels.max(initial=0)) > 4095:
        raise ValueError(f"{path}: pixels must be a 2-D uint16 array with 12-bit values")
    study_uid = _uid("study", series.study_id)
    sop_uid = _uid("instance", series.study_id, series.series_id, instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Modality = "MR"
    ds.Manufacturer = "spine-ml synthetic"
    ds.PatientID = str(series.study_id)
    ds.PatientName = f"synthetic^{series.study_id}"
    ds.BodyPartExamined = "LSPINE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid("series", series.study_id, series.series_id)
    ds.FrameOfReferenceUID = _uid("frame", series.study_id)
    ds.StudyID = str(series.study_id)[-8:]
    ds.SeriesNumber = int(series.series_number)
    ds.InstanceNumber = int(instance_number)
    ds.SeriesDescription = series.series_description
    ds.PatientPosition = "HFS"
    for keyword, value in dict(series.sequence).items():
        setattr(ds, keyword, _ds(value) if isinstance(value, float) else value)
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    if slice_thickness is not None:
        ds.SliceThickness = _ds(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds(spacing_between_slices)
    if slice_location is not None:
        ds.SliceLocation = _ds(slice_location)
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=12,
                      generate_instance_uid=False)
    if rle:
        ds.compress(RLELossless, encoding_plugin=_rle_plugin(), generate_instance_uid=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
