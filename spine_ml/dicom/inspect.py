"""`spine-ml inspect PATH [--json]`: what a study or series folder holds, as the pipeline reads it.

For each series: its description (from `{train,test}_series_descriptions.csv` when PATH lies inside a
data root), its stacks (slices, Rows×Columns, spacing, orientation, transfer syntax) and the
problems found (skipped files, reversed stacks, gaps, mixed sizes, missing tags).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spine_ml.errors import UserError

log = logging.getLogger(__name__)

DESCRIPTION_FILES = {"train_images": "train_series_descriptions.csv", "test_images": "test_series_descriptions.csv"}


class InspectError(UserError):
    """PATH is not a study or series folder."""


def series_folders(path: Path) -> tuple[int | None, list[Path]]:
    """(study id or None, series folders): PATH holding files is a series, PATH holding folders a study."""
    if not path.is_dir():
        raise InspectError(f"{path}: no such folder; give a study folder (train_images/<study_id>) "
                           "or a series folder (train_images/<study_id>/<series_id>)")
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() for p in children):
        return (int(path.parent.name) if path.parent.name.isdigit() else None), [path]
    folders = sorted((p for p in children if p.is_dir()), key=lambda p: (not p.name.isdigit(), len(p.name), p.name))
    if not folders:
        raise InspectError(f"{path}: empty folder; expected DICOM files (a series) or series folders (a study)")
    return (int(path.name) if path.name.isdigit() else None), folders


def find_descriptions(series_folder: Path) -> dict[int, str]:
    """series_id -> description from the data root's CSV, when the folder sits under train/test_images."""
    from spine_ml.competition.tables import DataFormatError, read_series_descriptions

    for parent in series_folder.resolve().parents:
        if parent.name in DESCRIPTION_FILES:
            csv = parent.parent / DESCRIPTION_FILES[parent.name]
            if not csv.is_file():
                return {}
            try:
                table = read_series_descriptions(csv)
            except DataFormatError as error:
                log.warning("series descriptions unavailable: %s", error)
                return {}
            return dict(zip(table.series_id.tolist(), table.series_description.tolist()))
    return {}


def plane_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[axis]))))))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if tilt < 1.0 else f"{name}, {tilt:.0f}° oblique"


def inspect_path(path: Path | str) -> dict:
    """The JSON-ready report of a study or series folder."""
    from spine_ml.dicom.read import read_series

    path = Path(path)
    study_id, folders = series_folders(path)
    descriptions = find_descriptions(folders[0])
    report = {"path": str(path), "study_id": study_id, "series": []}
    for folder in folders:
        series = read_series(folder)
        series_id = int(folder.name) if folder.name.isdigit() else folder.name
        stacks = []
        for stack in series.stacks:
            described = stack.describe()
            described["plane"] = plane_name(stack.normal)
            stacks.append(described)
        report["series"].append({
            "series_id": series_id,
            "description": descriptions.get(series_id) if isinstance(series_id, int) else None,
            "files": series.file_count,
            "skipped_files": [p.name for p in series.skipped_files],
            "stacks": stacks,
            "problems": series.problems,
        })
    return report


def _instances(numbers: list[int]) -> str:
    if len(numbers) <= 6:
        return ", ".join(map(str, numbers))
    return f"{numbers[0]}, {numbers[1]}, ..., {numbers[-1]}"


def format_report(report: dict) -> str:
    lines = []
    head = f"study {report['study_id']}: " if report["study_id"] is not None else ""
    lines.append(f"{head}{report['path']} ({len(report['series'])} series)")
    for series in report["series"]:
        description = series["description"] or "(no description)"
        lines.append(f"series {series['series_id']}  {description}  {series['files']} file(s), "
                     f"{len(series['stacks'])} stack(s)")
        for number, stack in enumerate(series["stacks"]):
            spacing = "x".join(f"{v:.3g}" for v in stack["pixel_spacing"])
            orientation = " ".join(f"{v:.3g}" for v in stack["orientation"])
            lines.append(f"  stack {number}: {stack['slices']} slice(s) {stack['rows']}x{stack['columns']}, "
                         f"pixel {spacing} mm, slice step {stack['slice_spacing']:.3g} mm, {stack['plane']} "
                         f"[{orientation}], {stack['transfer_syntax']}, instances {_instances(stack['instance_numbers'])}")
        for problem in series["problems"]:
            lines.append(f"  ! {problem}")
    return "\n".join(lines)


def cli(args) -> int:
    report = inspect_path(Path(args.path))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0
