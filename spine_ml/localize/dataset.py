"""Localizer training samples from `train_label_coordinates.csv` and the train DICOM series.

One sample = one slice of a labelled stack (with its neighbours as channels) and, per landmark
channel, up to two target peaks (u, v, amplitude, σu, σv on the heatmap grid). A peak's amplitude
falls off with the slice's distance from the labelled point (`localizer.depth_sigma_mm`), which
teaches the model to pick the slice. Sagittal stacks give every slice (the slice is to be found);
axial stacks give the labelled slices ± `localizer.axial_slices` (the slice comes from geometry).

Built once per (data, settings, studies) and kept under `prepare.cache_dir` as `.npz`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ml.competition import tables
from spine_ml.competition import vocabulary as V
from spine_ml.dicom.geometry import Stack
from spine_ml.localize import slices as S
from spine_ml.models import localizer as L

log = logging.getLogger(__name__)
SAMPLES_FORMAT = 1
PEAK = 5  # u, v, amplitude, sigma_u, sigma_v
MIN_AMPLITUDE = 0.01


@dataclass
class LocalizerSamples:
    slices: np.ndarray  # (M, H, W) float16: every resized slice of the stacks used
    context: np.ndarray  # (N, context_slices) int64 rows of `slices`: the sample's input channels
    peaks: np.ndarray  # (N, LANDMARKS, 2, PEAK) float32; amplitude 0 = no peak in that slot
    channel_mask: np.ndarray  # (N, LANDMARKS) bool: channels the sample's series type labels
    study_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.context)

    def select(self, studies) -> LocalizerSamples:
        keep = np.isin(self.study_ids, np.asarray(list(studies), dtype=np.int64))
        return LocalizerSamples(self.slices, self.context[keep], self.peaks[keep], self.channel_mask[keep],
                                self.study_ids[keep])


def landmark_channel(condition: str, level: str) -> tuple[int, int]:
    """(channel, slot) of a labelled point: foramina share a channel per level (left slot 0, right 1)."""
    info = V.CONDITION_INFO[condition]
    k = V.LEVELS.index(level)
    if info.group == "spinal":
        return L.SPINAL_CHANNELS[k], 0
    if info.group == "foraminal":
        return L.FORAMINAL_CHANNELS[k], 0 if info.side == "left" else 1
    return L.SUBARTICULAR_CHANNELS[0 if info.side == "left" else 1], -1  # slot: first free


def slice_peaks(stack: Stack, slice_index: int, points: list[tuple[int, int, np.ndarray]], grid_px: int,
                sigma_mm: float, depth_sigma_mm: float) -> np.ndarray:
    """(LANDMARKS, 2, PEAK) targets of one slice from patient-space points [(channel, slot, P)]."""
    peaks = np.zeros((L.LANDMARKS, 2, PEAK), dtype=np.float32)
    row_mm, column_mm = S.cell_mm(stack, grid_px)
    for channel, slot, point in points:
        x, y, depth = S.project_into_slice(stack, slice_index, point)
        amplitude = float(np.exp(-depth ** 2 / (2 * depth_sigma_mm ** 2)))
        if amplitude < MIN_AMPLITUDE:
            continue
        if slot < 0:  # first free slot, else replace the weaker peak
            slot = int(np.argmin(peaks[channel, :, 2]))
        if peaks[channel, slot, 2] >= amplitude:
            continue
        peaks[channel, slot] = (L.to_grid(x, stack.columns, grid_px), L.to_grid(y, stack.rows, grid_px),
                                amplitude, sigma_mm / column_mm, sigma_mm / row_mm)
    return peaks


def _series_points(series, points: pd.DataFrame, description: str, where: str):
    """Labelled points of one series that its type localises -> {stack position: [(channel, slot, P, slice)]}."""
    wanted = {c for c in V.CONDITIONS if V.CONDITION_INFO[c].series == description}
    by_stack: dict[int, list] = {}
    for point in points.itertuples(index=False):
        if point.condition not in wanted:
            continue
        try:
            stack, slice_index = series.find_instance(int(point.instance_number))
        except KeyError:
            log.warning("%s: labelled instance %d not among the readable slices; point skipped",
                        where, point.instance_number)
            continue
        channel, slot = landmark_channel(point.condition, point.level)
        patient = stack.pixel_to_patient(slice_index, float(point.x), float(point.y))
        by_stack.setdefault(series.stacks.index(stack), []).append((channel, slot, patient, slice_index))
    return by_stack


def _stack_samples(stack: Stack, points: list, description: str, cfg, percentiles) -> dict:
    grid = L.heatmap_size(cfg.input_px)
    if description == V.AXIAL_T2:
        labelled = {p[3] for p in points}
        chosen = sorted({s for i in labelled for s in range(i - cfg.axial_slices, i + cfg.axial_slices + 1)
                         if 0 <= s < stack.slices})
    else:
        chosen = list(range(stack.slices))
    resized = S.resize_stack(stack, cfg.input_px, percentiles)
    mask = np.zeros(L.LANDMARKS, dtype=bool)
    mask[list(L.CHANNELS_OF_SERIES[description])] = True
    targets = [(c, slot, p) for c, slot, p, _ in points]
    return {"slices": resized,
            "context": np.stack([S.context_indices(s, cfg.context_slices, stack.slices) for s in chosen]),
            "peaks": np.stack([slice_peaks(stack, s, targets, grid, cfg.sigma_mm, cfg.depth_sigma_mm) for s in chosen]),
            "mask": np.repeat(mask[None], len(chosen), 0)}


def study_samples(root: Path, study_id: int, coordinates: pd.DataFrame, descriptions: dict[int, str],
                  cfg, percentiles) -> list[dict]:
    """The samples of one train study: per labelled series, per stack holding labelled points."""
    from spine_ml.dicom.read import read_series

    parts = []
    for series_id, points in coordinates.groupby("series_id"):
        description = descriptions.get(int(series_id))
        where = f"study {study_id} series {series_id}"
        if description not in L.CHANNELS_OF_SERIES:
            log.warning("%s: series description %r is not one the localizer reads; skipped", where, description)
            continue
        series = read_series(root / "train_images" / str(study_id) / str(series_id))
        for position, stack_points in _series_points(series, points, description, where).items():
            parts.append(_stack_samples(series.stacks[position], stack_points, description, cfg, percentiles))
    return parts


def _concatenate(parts: list[tuple[int, dict]]) -> LocalizerSamples:
    slices, context, peaks, masks, studies, offset = [], [], [], [], [], 0
    for study_id, part in parts:
        slices.append(part["slices"])
        context.append(part["context"] + offset)
        peaks.append(part["peaks"])
        masks.append(part["mask"])
        studies.append(np.full(len(part["context"]), study_id, dtype=np.int64))
        offset += len(part["slices"])
    if not parts:
        raise ValueError("no localizer samples: no labelled series could be read")
    return LocalizerSamples(np.concatenate(slices), np.concatenate(context).astype(np.int64),
                            np.concatenate(peaks), np.concatenate(masks), np.concatenate(studies))


def build_samples(root: Path, studies, cfg, percentiles, progress: bool = False) -> LocalizerSamples:
    """Read every labelled series of `studies` and cut the localizer's samples."""
    from spine_ml.progress import progress as progress_bar

    coordinates = tables.read_coordinates(root / "train_label_coordinates.csv")
    descriptions = tables.read_series_descriptions(root / "train_series_descriptions.csv")
    description_of = dict(zip(descriptions.series_id.tolist(), descriptions.series_description.tolist()))
    by_study = dict(tuple(coordinates.groupby("study_id")))
    parts = []
    for study_id in progress_bar(list(studies), desc="localizer samples", disable=not progress, unit="study"):
        if int(study_id) not in by_study:
            continue
        for part in study_samples(root, int(study_id), by_study[int(study_id)], description_of, cfg, percentiles):
            parts.append((int(study_id), part))
    return _concatenate(parts)


def samples_key(fingerprint: dict, cfg, percentiles, studies) -> str:
    settings = {"format": SAMPLES_FORMAT, "data": fingerprint, "input_px": cfg.input_px,
                "context": cfg.context_slices, "sigma_mm": cfg.sigma_mm, "depth_sigma_mm": cfg.depth_sigma_mm,
                "axial_slices": cfg.axial_slices, "percentiles": list(percentiles),
                "studies": [int(s) for s in studies]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ensure_samples(config, studies, progress: bool = False) -> LocalizerSamples:
    """The samples of `studies`, from the cache folder when built before with the same settings."""
    from spine_ml.prepare.cache import data_fingerprint

    root = config.path(config.data.root)
    cfg, percentiles = config.localizer, tuple(config.prepare.percentiles)
    folder = config.path(config.prepare.cache_dir)
    path = folder / f"localizer-{cfg.input_px}px-{samples_key(data_fingerprint(root), cfg, percentiles, studies)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return LocalizerSamples(**{k: stored[k] for k in stored.files})
    samples = build_samples(root, studies, cfg, percentiles, progress)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(partial, slices=samples.slices, context=samples.context, peaks=samples.peaks,
             channel_mask=samples.channel_mask, study_ids=samples.study_ids)
    os.replace(partial, path)
    return samples
