"""One patient's lumbar spine in patient coordinates (LPS, mm), and the spine's own frame.

The spine frame: the centre line of the vertebral bodies is a circular arc in the mid-sagittal
plane (lordosis: concave towards posterior). Every point gets
- ``t``: arc length along the centre line, increasing towards the feet (0 = top of T11),
- ``n``: distance from the centre line towards posterior (the canal sits at n ~ 20-30 mm),
- ``side``: distance from the mid-sagittal plane towards the patient's left (+x in LPS).
Shapes are simple in this frame (a vertebral body is a t-interval times an ellipse in (side, n)),
and the arc makes them follow the lordosis in patient space, so sagittal and axial series cut
the same 3D patient.

Each level's latent severities become narrowing fractions in [0, 1] (``narrowing``): how much of
the canal, foramen or lateral recess is lost there. That is the evidence a model must read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from spine_ml.competition import vocabulary as V
from spine_ml.synth.labels import StudyTruth

VERTEBRAE = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S")
FIRST_LUMBAR_DISC = 2  # disc index of L1/L2 (discs: T11/T12, T12/L1, L1/L2, ..., L5/S1)
RIGHT, LEFT = 0, 1     # index of a side in the (level, side) arrays; left is +x

_BODY_HEIGHT = np.array([22.0, 23.5, 25.0, 26.5, 27.5, 27.5, 26.5, 70.0])  # mm, S = whole sacrum
_DISC_HEIGHT = np.array([6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 10.0])
_BODY_HALF_WIDTH = np.array([19.0, 20.5, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0])
_BODY_HALF_DEPTH = np.array([13.5, 14.0, 14.5, 15.0, 15.5, 16.0, 16.5, 16.0])


def narrowing(severity: np.ndarray | float) -> np.ndarray:
    """Latent severity -> fraction lost; steepest across 0..1 where the labels are uncertain."""
    return expit((np.asarray(severity, dtype=np.float64) - 0.5) / 0.45)


@dataclass(frozen=True)
class Spine:
    midline_x: float
    arc_centre: tuple[float, float]   # (y, z) of the circle the centre line lies on
    arc_radius: float
    apex_t: float                      # t where the arc is most anterior (tangent vertical)
    body_top: np.ndarray               # (8,) t of each body's upper endplate
    body_bottom: np.ndarray            # (8,)
    body_half_width: np.ndarray        # (8,)
    body_half_depth: np.ndarray        # (8,)
    disc_centre: np.ndarray            # (7,) t
    disc_height: np.ndarray            # (7,)
    canal_half_width: float
    canal_half_depth: float
    canal_gap: float                   # posterior body border -> front of the dural sac
    skin_n: float                      # posterior skin
    fat_thickness: float
    spinal: np.ndarray                 # (7,) narrowing of the canal at each disc
    foraminal: np.ndarray              # (7, 2) narrowing of each foramen [disc, side]
    subarticular: np.ndarray           # (7, 2) narrowing of each lateral recess
    degeneration: np.ndarray           # (7,) disc dehydration (darker nucleus, thinner disc)
    bowel_waves: np.ndarray            # (k, 4) wave vectors (1/mm) and phases of the belly's texture

    @property
    def canal_centre_n(self) -> float:
        return float(self.body_half_depth[FIRST_LUMBAR_DISC:].mean() + self.canal_gap + self.canal_half_depth)

    @property
    def foramen_side(self) -> float:
        """|side| of a foramen's centre: lateral to the dural sac, between the pedicles."""
        return self.canal_half_width + 6.5

    # --- frame conversions -------------------------------------------------------------------
    def to_frame(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(..., 3) patient points -> (t, n, side), float32."""
        points = np.asarray(points)
        dy = (points[..., 1] - self.arc_centre[0]).astype(np.float32)
        dz = (points[..., 2] - self.arc_centre[1]).astype(np.float32)
        t = self.apex_t - self.arc_radius * np.arctan2(dz, -dy)
        n = self.arc_radius - np.sqrt(dy * dy + dz * dz)
        return t, n, (points[..., 0] - self.midline_x).astype(np.float32)

    def to_patient(self, t: float, n: float, side: float) -> np.ndarray:
        angle = (self.apex_t - t) / self.arc_radius
        on_line = np.array([self.arc_centre[0] - self.arc_radius * np.cos(angle),
                            self.arc_centre[1] + self.arc_radius * np.sin(angle)])
        towards_posterior = np.array([np.cos(angle), -np.sin(angle)])
        y, z = on_line + n * towards_posterior
        return np.array([self.midline_x + side, y, z])

    def back_skin_y(self, z: np.ndarray) -> np.ndarray:
        """y of the posterior skin at height z: straighter than the spine (follows 40% of its curve)."""
        apex_y = self.arc_centre[0] - self.arc_radius
        height = np.clip((np.asarray(z) - self.arc_centre[1]) / self.arc_radius, -0.95, 0.95)
        centre_line_y = self.arc_centre[0] - self.arc_radius * np.sqrt(1 - height ** 2)
        return apex_y + self.skin_n + 0.4 * (centre_line_y - apex_y)

    def superior_direction(self, t: float) -> np.ndarray:
        """Unit vector along the spine towards the head at t (the normal of an oblique axial)."""
        angle = (self.apex_t - t) / self.arc_radius
        return np.array([0.0, np.sin(angle), np.cos(angle)])

    # --- landmarks a radiologist would click --------------------------------------------------
    def level_disc(self, level: str) -> int:
        return FIRST_LUMBAR_DISC + V.LEVELS.index(level)

    def canal_point(self, level: str) -> np.ndarray:
        """Centre of the (narrowed) dural sac at the disc: the spinal canal stenosis label."""
        disc = self.level_disc(level)
        front, back = self.sac_front_back(disc)
        return self.to_patient(float(self.disc_centre[disc]), (front + back) / 2, 0.0)

    def sac_front_back(self, disc: int) -> tuple[float, float]:
        depth = 2 * self.canal_half_depth
        front = self.canal_centre_n - self.canal_half_depth + 0.45 * depth * self.spinal[disc]
        back = self.canal_centre_n + self.canal_half_depth - 0.35 * depth * self.spinal[disc]
        return float(front), float(back)

    def foramen_centre_tn(self, disc: int) -> tuple[float, float]:
        return (float(self.disc_centre[disc] - 0.25 * self.disc_height[disc] - 3.5),
                float(self.body_half_depth[disc:disc + 2].mean() + 4.5))

    def foramen_point(self, level: str, side: int) -> np.ndarray:
        t, n = self.foramen_centre_tn(self.level_disc(level))
        return self.to_patient(t, n, (1 if side == LEFT else -1) * self.foramen_side)

    def recess_point(self, level: str, side: int) -> np.ndarray:
        """The lateral recess at the disc: the subarticular stenosis label."""
        disc = self.level_disc(level)
        n = self.canal_centre_n + 0.1 * self.canal_half_depth
        return self.to_patient(float(self.disc_centre[disc]), n, (1 if side == LEFT else -1) * (self.canal_half_width - 3.5))


def _narrowings(truth: StudyTruth, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-disc narrowing arrays; the two thoracolumbar discs above L1/L2 are healthy."""
    healthy = lambda *shape: narrowing(rng.normal(-2.0, 0.5, shape))  # noqa: E731
    spinal = healthy(len(_DISC_HEIGHT))
    foraminal = healthy(len(_DISC_HEIGHT), 2)
    subarticular = healthy(len(_DISC_HEIGHT), 2)
    for li, level in enumerate(V.LEVELS):
        disc = FIRST_LUMBAR_DISC + li
        spinal[disc] = narrowing(truth.severity_of("spinal_canal_stenosis", level))
        for side, name in ((LEFT, "left"), (RIGHT, "right")):
            foraminal[disc, side] = narrowing(truth.severity_of(f"{name}_neural_foraminal_narrowing", level))
            subarticular[disc, side] = narrowing(truth.severity_of(f"{name}_subarticular_stenosis", level))
    degeneration = np.clip((spinal + foraminal.mean(1) + subarticular.mean(1)) / 3 + rng.normal(0, 0.1, len(spinal)), 0, 1)
    return {"spinal": spinal, "foraminal": foraminal, "subarticular": subarticular, "degeneration": degeneration}


def _bowel_waves(rng: np.random.Generator, count: int = 5) -> np.ndarray:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(25.0, 60.0, (count, 1))
    return np.hstack([2 * np.pi * directions / wavelengths, rng.uniform(0, 2 * np.pi, (count, 1))])


def make_spine(truth: StudyTruth, rng: np.random.Generator) -> Spine:
    """A patient: sizes, lordosis and position vary; the narrowings come from the truth."""
    scale = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    states = _narrowings(truth, rng)
    body_heights = _BODY_HEIGHT * scale * rng.normal(1.0, 0.03, len(_BODY_HEIGHT))
    disc_heights = _DISC_HEIGHT * scale * rng.normal(1.0, 0.06, len(_DISC_HEIGHT)) * (1 - 0.3 * states["degeneration"])
    tops, bottoms, centres = [], [], []
    t = 0.0
    for i, height in enumerate(body_heights):
        tops.append(t)
        t += height
        bottoms.append(t)
        if i < len(disc_heights):
            centres.append(t + disc_heights[i] / 2)
            t += disc_heights[i]
    tops, bottoms, centres = np.array(tops), np.array(bottoms), np.array(centres)
    lumbar_length = tops[-1] - tops[2]                         # top of L1 to top of the sacrum
    lordosis = np.deg2rad(rng.uniform(24.0, 44.0))             # a circle: spread over every level
    radius = lumbar_length / lordosis
    apex_t = float(rng.uniform(bottoms[4], centres[5]))        # most anterior near L3-L4
    centre_y = rng.normal(10.0, 12.0) + radius                 # body centre line at the apex: y ~ 10
    centre_z = rng.normal(-40.0, 25.0)                         # table position of the apex
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731 (the renderer works in float32)
    states = {k: f32(v) for k, v in states.items()}
    return Spine(
        midline_x=float(rng.normal(0.0, 6.0)),
        arc_centre=(float(centre_y), float(centre_z)),
        arc_radius=float(radius),
        apex_t=apex_t,
        body_top=f32(tops), body_bottom=f32(bottoms),
        body_half_width=f32(_BODY_HALF_WIDTH * scale * rng.normal(1.0, 0.03)),
        body_half_depth=f32(_BODY_HALF_DEPTH * scale * rng.normal(1.0, 0.03)),
        disc_centre=f32(centres), disc_height=f32(disc_heights),
        canal_half_width=float(11.0 * scale * rng.normal(1.0, 0.04)),
        canal_half_depth=float(7.0 * scale * rng.normal(1.0, 0.05)),
        canal_gap=1.5,
        skin_n=float(rng.uniform(75.0, 105.0)),
        fat_thickness=float(rng.uniform(8.0, 28.0)),
        bowel_waves=_bowel_waves(rng),
        **states,
    )
