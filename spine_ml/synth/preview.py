"""A PNG contact sheet of one study, so a person can see that it reads like a lumbar MRI.

Top row: sagittal T2 (right parasagittal, mid, left parasagittal) and sagittal T1 through the
right and left foramina. Bottom row: one axial T2 slice per level. Labelled points are drawn where
the study has them (train studies); axial slices are marked R / L (patient right on image left).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import vocabulary as V
from spine_ml.synth.generate import SynthError

GROUP_COLOURS = {"spinal": "#ff4040", "foraminal": "#40c0ff", "subarticular": "#ffd040"}


def _read_series(folder: Path) -> list[dict]:
    """Slices of a series with geometry, sorted along the slice normal."""
    import pydicom

    slices = []
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        slices.append({"instance": int(ds.InstanceNumber), "pixels": ds.pixel_array,
                       "ipp": np.array(ds.ImagePositionPatient, dtype=np.float64), "iop": iop,
                       "normal": np.cross(iop[:3], iop[3:])})
    return sorted(slices, key=lambda s: (tuple(np.round(s["iop"], 3)), s["ipp"] @ s["normal"]))


def _study_folder(root: Path, study_id: int) -> tuple[Path, pd.DataFrame]:
    known: list[int] = []
    for split in ("train", "test"):
        descriptions = root / f"{split}_series_descriptions.csv"
        if descriptions.exists():
            frame = pd.read_csv(descriptions)
            if study_id in set(frame.study_id):
                return root / f"{split}_images" / str(study_id), frame[frame.study_id == study_id]
            known += frame.study_id.drop_duplicates().head(5).tolist()
    raise SynthError(f"study {study_id} is not in {root}; studies there include {known}")


def _pick(slices: list[dict], instance: int | None, fraction: float) -> dict:
    by_instance = {s["instance"]: s for s in slices}
    if instance in by_instance:
        return by_instance[instance]
    return slices[int(round(fraction * (len(slices) - 1)))]


def _sagittal_panels(folder: Path, series: pd.DataFrame, points: pd.DataFrame) -> list[tuple[str, dict | None]]:
    panels: list[tuple[str, dict | None]] = []
    for description, picks in ((V.SAGITTAL_T2, ((None, "right", 0.2), ("spinal_canal_stenosis", "mid", 0.5), (None, "left", 0.8))),
                               (V.SAGITTAL_T1, (("right_neural_foraminal_narrowing", "right", 0.2),
                                                ("left_neural_foraminal_narrowing", "left", 0.8)))):
        ids = series.series_id[series.series_description == description].tolist()
        if not ids:
            panels += [(f"{description}: missing", None)] * len(picks)
            continue
        slices = _read_series(folder / str(ids[0]))
        # patient left is +x: order the slices so that fraction 0 is the patient's right
        slices = sorted(slices, key=lambda s: s["ipp"][0])
        for condition, side, fraction in picks:
            labelled = points[(points.series_id == ids[0]) & (points.condition == condition)]
            chosen = _pick(slices, int(labelled.instance_number.mode()[0]) if len(labelled) else None, fraction)
            panels.append((f"{description} #{chosen['instance']} ({side})", chosen | {"series_id": ids[0]}))
    return panels


def _axial_panels(folder: Path, series: pd.DataFrame, points: pd.DataFrame) -> list[tuple[str, dict | None]]:
    stacks: list[tuple[int, list[dict]]] = []
    for series_id in series.series_id[series.series_description == V.AXIAL_T2]:
        slices = _read_series(folder / str(series_id))
        keys = [tuple(np.round(s["iop"], 3)) for s in slices]
        for key in dict.fromkeys(keys):
            stacks.append((series_id, [s for s, k in zip(slices, keys) if k == key]))
    stacks.sort(key=lambda item: -np.mean([s["ipp"][2] for s in item[1]]))  # head first
    panels = []
    for series_id, stack in stacks[:len(V.LEVELS)]:
        instances = {s["instance"] for s in stack}
        labelled = points[(points.series_id == series_id) & points.instance_number.isin(instances)]
        chosen = _pick(stack, int(labelled.instance_number.mode()[0]) if len(labelled) else None, 0.5)
        level = f" {V.LEVEL_TITLES[labelled.level.iloc[0]]}" if len(labelled) else ""
        panels.append((f"{V.AXIAL_T2} #{chosen['instance']}{level}", chosen | {"series_id": series_id, "axial": True}))
    return panels or [(f"{V.AXIAL_T2}: missing", None)]


def write_preview(root: Path | str, study_id: int, path: Path | str | None = None) -> Path:
    """Draw the contact sheet of ``study_id`` from the data set in ``root``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spine_ml.competition.tables import read_coordinates

    root = Path(root)
    folder, series = _study_folder(root, int(study_id))
    coordinates_csv = root / "train_label_coordinates.csv"
    points = read_coordinates(coordinates_csv) if coordinates_csv.exists() else pd.DataFrame(
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
    points = points[points.study_id == int(study_id)]
    rows = [_sagittal_panels(folder, series, points), _axial_panels(folder, series, points)]
    columns = max(len(r) for r in rows)
    figure, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.8), facecolor="black")
    for axis_row, panels in zip(np.atleast_2d(axes), rows):
        for axis, panel in zip(axis_row, panels + [("", None)] * (columns - len(panels))):
            _draw(axis, panel, points)
    figure.suptitle(f"study {study_id}: labelled points (red spinal, blue foraminal, yellow subarticular)",
                    color="white", fontsize=10)
    figure.tight_layout()
    path = Path(path) if path else root / f"preview_{study_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90, facecolor="black")
    plt.close(figure)
    return path


def _draw(axis, panel: tuple[str, dict | None], points: pd.DataFrame) -> None:
    title, chosen = panel
    axis.set_axis_off()
    axis.set_title(title, color="white", fontsize=8)
    if chosen is None:
        return
    pixels = chosen["pixels"].astype(np.float32)
    low, high = np.percentile(pixels, [1, 99.5])
    axis.imshow(pixels, cmap="gray", vmin=low, vmax=high)
    here = points[(points.series_id == chosen["series_id"]) & (points.instance_number == chosen["instance"])]
    for p in here.itertuples():
        group = V.CONDITION_INFO[p.condition].group
        axis.plot(p.x, p.y, "+", color=GROUP_COLOURS[group], markersize=9, markeredgewidth=1.5)
        axis.text(p.x + 3, p.y - 3, V.LEVEL_TITLES[p.level], color=GROUP_COLOURS[group], fontsize=6)
    if chosen.get("axial"):  # which patient side lies on the image's left: from the row direction
        rows, cols = pixels.shape
        image_left, image_right = ("R", "L") if chosen["iop"][0] > 0 else ("L", "R")
        axis.text(2, rows / 2, image_left, color="white", fontsize=9, va="center")
        axis.text(cols - 3, rows / 2, image_right, color="white", fontsize=9, va="center", ha="right")
