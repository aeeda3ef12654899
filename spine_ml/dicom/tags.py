"""Tag values and pixels of a parsed DICOM file, read from the raw elements.

pydicom converts an element on first access (VR lookup, value parsing, a DataElement object); for
the dozen tags a slice needs, and for the image-pixel tags `pixel_array` reads, that conversion cost
more than decoding a small slice. Reading the raw bytes keeps `read_slice`, and so `spine-ml
prepare`, close to the bare decode time. pydicom still parses the file and decodes the pixels.
"""
from __future__ import annotations

import numpy as np

TAGS = {  # keyword -> (group, element), looked up once instead of per file
    "ImagePositionPatient": 0x00200032, "ImageOrientationPatient": 0x00200037, "PixelSpacing": 0x00280030,
    "RescaleSlope": 0x00281053, "RescaleIntercept": 0x00281052, "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088, "InstanceNumber": 0x00200013, "PhotometricInterpretation": 0x00280004,
    "NumberOfFrames": 0x00280008,
}
_PIXEL_US_TAGS = {  # the unsigned-short image pixel tags pydicom's decoder needs, as its option names
    "rows": 0x00280010, "columns": 0x00280011, "samples_per_pixel": 0x00280002, "bits_allocated": 0x00280100,
    "bits_stored": 0x00280101, "pixel_representation": 0x00280103,
}
_PIXEL_DATA = 0x7FE00010


def tag_values(dataset, keyword: str) -> list[str] | None:
    """The text values of a DS/IS/CS tag, or None when absent or empty.

    Reads the raw element (`get_item`) instead of pydicom's converted attribute: conversion costs
    more than the pixel decode of a small slice, and prepare's speed is bounded by this function.
    """
    element = dataset.get_item(TAGS[keyword])
    if element is None or element.value is None:
        return None
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        text = value.decode("ascii", "replace").strip(" \x00")
        return [v.strip() for v in text.split("\\")] if text else None
    items = [value] if isinstance(value, (str, int, float)) else list(value)  # converted: one value or MultiValue
    values = [str(v).strip() for v in items if str(v).strip()]
    return values or None


def tag_floats(dataset, keyword: str, count: int) -> np.ndarray | None:
    values = tag_values(dataset, keyword)
    if values is None or len(values) != count:
        return None
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def tag_float(dataset, keyword: str) -> float | None:
    values = tag_values(dataset, keyword)
    if values is None or len(values) != 1:
        return None
    try:
        return float(values[0])  # not through tag_floats: a 1-element array per tag costs more than the parse
    except ValueError:
        return None


def _unsigned_short(dataset, tag: int) -> int | None:
    element = dataset.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, (bytes, bytearray)):  # raw, and only little-endian syntaxes come here
        return int.from_bytes(value, "little") if len(value) == 2 else None
    return value if isinstance(value, int) else None


def _pixel_options(dataset, syntax) -> dict | None:
    """pydicom's decode options of a single-frame, single-sample image, read from the raw tags;
    None when the file is anything else (pixel_array then handles it)."""
    if not syntax.is_little_endian:
        return None
    options = {name: _unsigned_short(dataset, tag) for name, tag in _PIXEL_US_TAGS.items()}
    photometric = tag_values(dataset, "PhotometricInterpretation")
    frames = tag_values(dataset, "NumberOfFrames")
    if None in options.values() or options["samples_per_pixel"] != 1 or photometric is None or \
            frames not in (None, ["1"]) or "ExtendedOffsetTable" in dataset:
        return None
    element = dataset.get_item(_PIXEL_DATA)
    if element is None or not isinstance(element.value, (bytes, bytearray)):
        return None
    options.update(photometric_interpretation=photometric[0], number_of_frames=1, pixel_keyword="PixelData",
                   pixel_vr=element.VR or "OW")
    return options


def pixel_values(dataset) -> np.ndarray:
    """The same array as `dataset.pixel_array`, at a fraction of its cost on small images.

    `pixel_array` converts every image-pixel tag through pydicom's element machinery (twice, to
    check its cache) before it decodes: that cost more than the decode itself. Here pydicom's own
    decoder for the transfer syntax gets the pixel bytes and the tags read raw, so decoding,
    plugins, validation and the unused-bits correction are pydicom's. Anything unusual (big-endian,
    several frames or samples, a missing tag) and any failure go through `pixel_array` as before.
    """
    try:
        syntax = dataset.file_meta.TransferSyntaxUID
        options = _pixel_options(dataset, syntax)
        if options is not None:
            from pydicom.pixels import get_decoder

            return get_decoder(syntax).as_array(dataset.get_item(_PIXEL_DATA).value, **options)[0]
    except Exception:  # noqa: BLE001 - pixel_array below raises the error a user should see, or succeeds
        pass
    return dataset.pixel_array
