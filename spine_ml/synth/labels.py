"""Latent severities, the labels drawn from them, and the oracle's class probabilities.

Each of a study's 25 rows (vocabulary.LABEL_COLUMNS order) has a latent severity ``u`` on one scale
for every level: 0 is the moderate threshold, 1 the severe one. The image shows ``u`` (render.py);
the label is drawn from the ordinal model given ``u``, so the oracle knows each row's true class
probabilities exactly. Blank labels follow the real pattern (axial coverage that starts below L1/L2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.synth import calibration as C

N_ROWS = len(V.LABEL_COLUMNS)


@dataclass(frozen=True)
class StudyTruth:
    severity: np.ndarray       # (25,) latent u
    probabilities: np.ndarray  # (25, 3) oracle: P(normal_mild, moderate, severe | u)
    labels: np.ndarray         # (25,) 0/1/2, -1 where the label is blank

    def row(self, condition: str, level: str) -> int:
        return V.LABEL_COLUMNS.index(V.row_suffix(condition, level))

    def severity_of(self, condition: str, level: str) -> float:
        return float(self.severity[self.row(condition, level)])


def draw_severity(rng: np.random.Generator) -> np.ndarray:
    """Correlated latents whose marginals reproduce the real per condition-level frequencies."""
    location, spread, _ = C.latent_scale()
    standard = C.latent_factor() @ rng.standard_normal(N_ROWS)
    return location + spread * standard


def oracle_probabilities(severity: np.ndarray) -> np.ndarray:
    _, _, noise = C.latent_scale()
    return C.ordinal_probabilities(severity, noise)


def draw_labels(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """One label per row from its class probabilities (inverse CDF of one uniform per row)."""
    uniform = rng.random(len(probabilities))
    cumulative = np.cumsum(probabilities, axis=1)
    return (uniform[:, None] >= cumulative[:, :2]).sum(1).astype(np.int64)


def draw_axial_first_level(rng: np.random.Generator) -> int:
    """Index of the first level the axial stacks cover (0 = L1/L2); higher starts blank labels."""
    draw = rng.random()
    if draw < C.AXIAL_STARTS_AT_L3_L4:
        return 2
    if draw < C.AXIAL_STARTS_AT_L3_L4 + C.AXIAL_STARTS_AT_L2_L3:
        return 1
    return 0


def blank_mask(rng: np.random.Generator, axial_first_level: int) -> np.ndarray:
    """Which of the 25 labels are blank: subarticular rows above the axial coverage, plus the real
    file's rarer patterns (one condition blank at every level; an isolated cell)."""
    blank = np.zeros(N_ROWS, dtype=bool)
    for condition in V.CONDITIONS:
        if V.CONDITION_INFO[condition].group == "subarticular":
            for level in V.LEVELS[:axial_first_level]:
                blank[V.LABEL_COLUMNS.index(V.row_suffix(condition, level))] = True
    whole = rng.random(len(V.CONDITIONS)) < C.WHOLE_CONDITION_BLANK
    blank |= np.repeat(whole, len(V.LEVELS))
    blank |= rng.random(N_ROWS) < C.ISOLATED_BLANK
    return blank


def draw_truth(rng: np.random.Generator, axial_first_level: int = 0) -> StudyTruth:
    severity = draw_severity(rng)
    probabilities = oracle_probabilities(severity)
    labels = draw_labels(rng, probabilities)
    labels[blank_mask(rng, axial_first_level)] = -1
    return StudyTruth(severity=severity, probabilities=probabilities, labels=labels)
