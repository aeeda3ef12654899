"""Signal of the patient at any patient point, and MR-like slices of it.

The tissue model paints soft-edged shapes in the spine frame (anatomy.py) in a fixed order, later
shapes over earlier ones; edges ramp over about one pixel (anti-aliasing). A slice averages two
samples across its thickness (partial volume), is blurred a little, multiplied by a smooth bias
field and a faint texture, and gets Rician noise. The evidence of each label is local and
monotone in its latent severity: the dural sac's depth at a disc (spinal), the fat around the
exiting root in a foramen (foraminal), the sac's lateral recess against the facet (subarticular).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ml.synth.anatomy import LEFT, RIGHT, Spine
from spine_ml.synth.planes import Plane

TISSUES = ("air", "fat", "muscle", "viscera", "vessel", "cortex", "marrow", "annulus", "nucleus",
           "csf", "nerve", "ligament")
_BASE = {  # relative signal per sequence; "nucleus" is the healthy disc, degeneration darkens it
    "T1":   (0.0, 0.92, 0.33, 0.42, 0.05, 0.06, 0.62, 0.30, 0.36, 0.17, 0.34, 0.22),
    "T2":   (0.0, 0.70, 0.20, 0.40, 0.05, 0.05, 0.45, 0.20, 0.88, 1.00, 0.30, 0.12),
    "STIR": (0.0, 0.08, 0.24, 0.45, 0.05, 0.05, 0.20, 0.22, 0.85, 1.00, 0.32, 0.12),
}


@dataclass(frozen=True)
class Contrast:
    """Tissue signals of one series (per-patient jitter included)."""
    values: dict[str, float]
    marrow_per_vertebra: np.ndarray  # (8,) multiplier: marrow is not equally bright in every body

    def __getitem__(self, tissue: str) -> float:
        return self.values[tissue]


def make_contrast(sequence: str, rng: np.random.Generator) -> Contrast:
    jitter = rng.normal(1.0, 0.06, len(TISSUES))
    values = {t: float(v * j) for t, v, j in zip(TISSUES, _BASE[sequence], jitter)}
    return Contrast(values, rng.normal(1.0, 0.05, 8).astype(np.float32))


def _ramp(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask of a signed distance (mm, positive inside)."""
    return np.minimum(np.maximum(0.5 + distance / edge, 0.0), 1.0)


def _paint(image: np.ndarray, mask: np.ndarray, value) -> None:
    image += mask * (value - image)


def _ellipse(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
    """Approximate signed distance to an ellipse with half-axes a, b (positive inside)."""
    return (1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * np.minimum(a, b)


def _band(x: np.ndarray, low, high) -> np.ndarray:
    return np.minimum(x - low, high - x)


class _Points:
    """Points in the spine frame with their image values and per-point level parameters; shapes
    are evaluated on the subset near them only (``take``), then written back (``put``)."""
    FIELDS = ("t", "n", "side", "image", "body", "disc")

    def __init__(self, **arrays: np.ndarray) -> None:
        self.__dict__.update(arrays)

    def take(self, index: np.ndarray) -> "_Points":
        return _Points(**{k: v[index] for k, v in self.__dict__.items()})

    def put(self, index: np.ndarray, part: "_Points") -> None:
        self.image[index] = part.image


def _frame_points(spine: Spine, points: np.ndarray) -> _Points:
    t, n, side = spine.to_frame(points)
    return _Points(t=t, n=n, side=side, image=np.zeros(len(points), dtype=np.float32),
                   body=np.clip(np.searchsorted(spine.disc_centre, t), 0, len(spine.body_top) - 1),
                   disc=np.clip(np.searchsorted((spine.disc_centre[:-1] + spine.disc_centre[1:]) / 2, t),
                                0, len(spine.disc_centre) - 1))


def tissue_signal(spine: Spine, contrast: Contrast, points: np.ndarray, edge: float,
                  extra_samples: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """Noise-free signal (0..~1) at (N, 3) patient points.

    ``extra_samples``: shifts (3-vectors) at which the spine itself is sampled again and averaged
    in (partial volume across a slice); the soft tissues around it change too slowly to need it."""
    every = _frame_points(spine, points)
    _soft_tissues(spine, contrast, every, points, edge)
    posterior_sac = spine.canal_centre_n + spine.canal_half_depth
    background = every.image
    samples = [every] + [_frame_points(spine, points + shift) for shift in extra_samples]
    total = np.zeros_like(background)
    for sample in samples:
        sample.image = background.copy()
        zone = np.flatnonzero((np.abs(sample.side) < 42) & (sample.n > -30) & (sample.n < posterior_sac + 30))
        if len(zone):
            part = sample.take(zone)
            _spine(spine, contrast, part, edge)
            sample.put(zone, part)
        total += sample.image
    return total / len(samples)


def _soft_tissues(spine: Spine, c: Contrast, p: _Points, points: np.ndarray, edge: float) -> None:
    """The torso (in patient coordinates: the back is flatter than the spine), subcutaneous fat,
    muscle, belly, retroperitoneal fat, the great vessels and the psoas."""
    image, n, side = p.image, p.n, p.side
    back = spine.back_skin_y(points[:, 2])
    depth = (spine.skin_n + 150.0) / 2
    outline = _ellipse(points[:, 0] - spine.midline_x, points[:, 1] - (back - depth), 165.0, depth).astype(np.float32)
    _paint(image, _ramp(outline, edge), c["fat"])
    _paint(image, _ramp(outline - spine.fat_thickness, edge), c["muscle"])
    mean_depth, mean_width = float(spine.body_half_depth[2:7].mean()), float(spine.body_half_width[2:7].mean())
    inside = _ramp(outline - 5.0, edge)
    belly = _ramp(_ellipse(side, n + mean_depth + 95.0, 140.0, 85.0), 6.0) * inside
    _paint(image, belly, c["viscera"])
    in_belly = np.flatnonzero(belly > 0)
    image[in_belly] *= _bowel_loops(spine, points[in_belly])
    _paint(image, _ramp(_ellipse(side, n + 0.5 * mean_depth, mean_width + 32.0, mean_depth + 8.0), 3.0) * inside, c["fat"])
    # paraspinal muscles: a fat plane between multifidus and erector spinae on each side
    plane = np.abs(_ellipse(np.abs(side) - spine.canal_half_width - 6.0,
                            n - spine.canal_centre_n - spine.canal_half_depth - 20.0, 13.0, 20.0))
    _paint(image, 0.8 * _ramp(0.7 - plane, edge) * inside, c["fat"])
    front_zone = np.flatnonzero((np.abs(side) < 75) & (n > -60) & (n < 20))
    if len(front_zone):
        part = p.take(front_zone)
        _vessels_and_psoas(spine, c, part, edge)
        p.put(front_zone, part)


def _bowel_loops(spine: Spine, points: np.ndarray) -> np.ndarray:
    """A patient's own irregular ripple (a few plane waves of random direction and phase)."""
    waves = spine.bowel_waves
    phase = points.astype(np.float32) @ waves[:, :3].T.astype(np.float32) + waves[:, 3].astype(np.float32)
    return 1.0 + 0.35 * np.sin(phase).mean(1) * np.sqrt(len(waves)) / 2


def _vessels_and_psoas(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    """The great vessels (they divide at L4/L5) in front of the spine, the psoas beside it."""
    depth = spine.body_half_depth[p.body]
    above_bifurcation = _ramp(spine.disc_centre[5] - p.t, 4.0)
    aorta = _ellipse(p.side - 14.0, p.n + depth + 11.0, 9.5, 9.5)
    cava = _ellipse(p.side + 16.0, p.n + depth + 9.0, 12.0, 8.0)
    _paint(p.image, _ramp(np.maximum(aorta, cava), edge) * above_bifurcation, c["vessel"])
    lumbar = np.clip((p.t - spine.body_top[2]) / (spine.body_bottom[6] - spine.body_top[2]), 0.0, 1.0)
    radius = 3.0 + 17.0 * lumbar
    psoas = _ellipse(np.abs(p.side) - (spine.body_half_width[p.body] + 6.0 + 0.6 * radius), p.n + 2.0, radius, 0.8 * radius)
    _paint(p.image, _ramp(psoas, edge), c["muscle"])


def _spine(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    canal_n, canal_a, canal_b = spine.canal_centre_n, spine.canal_half_width, spine.canal_half_depth
    _posterior_elements(spine, c, p, edge)
    canal_zone = np.flatnonzero((np.abs(p.side) < canal_a + 19) & (p.n > canal_n - canal_b - 6) & (p.n < canal_n + canal_b + 6))
    if len(canal_zone):
        part = p.take(canal_zone)
        _canal(spine, c, part, edge)
        _foramina(spine, c, part, edge)
        p.put(canal_zone, part)
    body_zone = np.flatnonzero((np.abs(p.side) < 30) & (np.abs(p.n) < canal_n))
    if len(body_zone):
        part = p.take(body_zone)
        _bodies_and_discs(spine, c, part, edge)
        p.put(body_zone, part)


def _bone(c: Contrast, image: np.ndarray, distance: np.ndarray, edge: float, marrow=1.0) -> None:
    _paint(image, _ramp(distance, edge), c["cortex"])
    _paint(image, _ramp(distance - 1.2, edge), c["marrow"] * marrow)


def _posterior_elements(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    """Laminae (a roof behind the canal) and spinous processes; the articular pillars beside it."""
    posterior_sac = spine.canal_centre_n + spine.canal_half_depth
    top, bottom = spine.body_top[p.body], spine.body_bottom[p.body]
    height = bottom - top
    below = spine.disc_height[np.minimum(p.body, len(spine.disc_height) - 1)]
    abs_side = np.abs(p.side)
    pillar_side = spine.canal_half_width + 7.5
    behind = p.n - posterior_sac - 0.35 * np.clip(pillar_side - abs_side, 0.0, None)
    lamina = np.minimum.reduce([_band(p.t, top + 0.4 * height, bottom + 0.4 * below),
                                pillar_side - abs_side, _band(behind, 0.5, 7.0)])
    slope = 0.35 * np.clip(p.n - posterior_sac, 0.0, None)  # spinous processes point down and back
    spinous = np.minimum.reduce([_band(p.t - slope, top + 0.4 * height, bottom + 0.05 * below),
                                 3.5 - abs_side, _band(p.n - posterior_sac, 1.5, 28.0)])
    pillar = _ellipse(abs_side - pillar_side, p.n - (spine.canal_centre_n + 3.0), 7.0, spine.canal_half_depth + 6.0)
    _bone(c, p.image, np.maximum.reduce([lamina, spinous, pillar]), edge)


def _canal(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    """Epidural fat, ligamentum flavum, the dural sac with its roots, and the facets.

    The evidence: at each disc the disc pushes the sac's front back and the flavum its back
    forward (spinal); each side's facet grows into that side's lateral recess (subarticular)."""
    canal_n, canal_a, canal_b = spine.canal_centre_n, spine.canal_half_width, spine.canal_half_depth
    disc_t, disc_height = spine.disc_centre[p.disc], spine.disc_height[p.disc]
    canal = _ramp(_ellipse(p.side, p.n - canal_n, canal_a + 2.0, canal_b + 1.5), edge)
    _paint(p.image, canal, c["fat"])
    from_disc = np.abs(p.t - disc_t)
    _paint(p.image, canal * _ramp(0.5 * disc_height + 4.0 - from_disc, 2.0) * _ramp(p.n - canal_n, 2.0), c["ligament"])
    profile = np.exp(-((p.t - disc_t) / (0.5 * disc_height + 3.0)) ** 2)
    spinal = spine.spinal[p.disc] * profile
    is_left = p.side > 0
    recess = np.where(is_left, spine.subarticular[p.disc, LEFT], spine.subarticular[p.disc, RIGHT])
    front = canal_n - canal_b + 0.9 * canal_b * spinal
    back = canal_n + canal_b - 0.7 * canal_b * spinal
    sac_n, sac_b = (front + back) / 2, (back - front) / 2
    sac_a = canal_a * (1 - 0.12 * spinal) * (1 - 0.7 * recess * profile)
    _paint(p.image, _ramp(_ellipse(p.side, p.n - sac_n, sac_a, sac_b), edge), c["csf"])
    for rel_side, rel_n in ((-0.35, 0.45), (0.35, 0.45), (-0.65, 0.05), (0.65, 0.05)):  # cauda equina
        root = 0.9 - np.hypot(p.side - rel_side * sac_a, p.n - sac_n - rel_n * sac_b)
        _paint(p.image, 0.8 * _ramp(root, edge), c["nerve"])
    facet_side = np.where(is_left, 1.0, -1.0) * (canal_a + 6.0 - 7.0 * recess)
    facet = 5.0 + 2.0 * recess - np.hypot(p.side - facet_side, p.n - (canal_n + 0.6 * canal_b))
    near_disc = 0.5 * disc_height + 6.0 - from_disc
    _bone(c, p.image, np.minimum(facet, near_disc), edge)


def _foramina(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    """Fat around the exiting root between two pedicles; narrowing shrinks it around the root."""
    abs_side = np.abs(p.side)
    narrowing = np.where(p.side > 0, spine.foraminal[p.disc, LEFT], spine.foraminal[p.disc, RIGHT])
    centre_t = spine.disc_centre[p.disc] - 0.25 * spine.disc_height[p.disc] - 3.5
    centre_n = (spine.body_half_depth[p.disc] + spine.body_half_depth[p.disc + 1]) / 2 + 4.5
    height, depth = 9.0 * (1 - 0.7 * narrowing), 5.0 * (1 - 0.7 * narrowing)
    lateral = _band(abs_side, spine.canal_half_width - 1.0, spine.canal_half_width + 14.0)
    foramen = _ellipse(p.t - centre_t, p.n - centre_n, height, depth)
    _paint(p.image, _ramp(np.minimum(foramen + 1.3, lateral), edge), c["cortex"])  # the pedicles' rim
    _paint(p.image, _ramp(np.minimum(foramen, lateral), edge), c["fat"])
    root_t = centre_t - 0.45 * 9.0 * (1 - 0.3 * narrowing)
    root = 2.3 * (1 - 0.25 * narrowing) - np.hypot(p.t - root_t, p.n - centre_n + 0.3)
    _paint(p.image, _ramp(np.minimum(root, lateral), edge), c["nerve"])


def _bodies_and_discs(spine: Spine, c: Contrast, p: _Points, edge: float) -> None:
    sacrum = p.body == len(spine.body_top) - 1
    taper = np.where(sacrum, 1.0 - 0.45 * np.clip((p.t - spine.body_top[-1]) / 70.0, 0.0, 1.0), 1.0)
    body_shape = np.minimum(_band(p.t, spine.body_top[p.body], spine.body_bottom[p.body]),
                            _ellipse(p.side, p.n, spine.body_half_width[p.body], spine.body_half_depth[p.body] * taper))
    _bone(c, p.image, body_shape, edge, c.marrow_per_vertebra[p.body])
    # discs: between the endplates, bulging a little all round and, with spinal stenosis, into
    # the canal until they meet the (narrowed) front of the dural sac
    a = (spine.body_half_width[p.disc] + spine.body_half_width[p.disc + 1]) / 2
    b = (spine.body_half_depth[p.disc] + spine.body_half_depth[p.disc + 1]) / 2
    outside = np.maximum(-_ellipse(p.side, p.n, a, b), 0.0)
    central = np.clip(p.n / b, 0.0, 1.0) ** 2 * np.exp(-(p.side / spine.canal_half_width) ** 2)
    bulge = 1.2 + (spine.canal_gap + 0.9 * spine.canal_half_depth * spine.spinal[p.disc]) * central
    half_thickness = 0.5 * spine.disc_height[p.disc] * np.sqrt(np.clip(1.0 - outside / bulge, 0.0, 1.0))
    from_disc = np.abs(p.t - spine.disc_centre[p.disc])
    _paint(p.image, _ramp(np.minimum(half_thickness - from_disc, bulge - outside), edge), c["annulus"])
    nucleus = np.minimum(0.3 * spine.disc_height[p.disc] - from_disc, _ellipse(p.side, p.n + 1.0, 0.6 * a, 0.55 * b))
    hydration = 1.0 - 0.65 * spine.degeneration[p.disc]
    _paint(p.image, _ramp(nucleus, 2.0 * edge), c["annulus"] + (c["nucleus"] - c["annulus"]) * hydration)


@dataclass(frozen=True)
class Acquisition:
    """What makes one series look like a scan: gain, noise, bias field and texture."""
    gain: float           # counts for signal 1.0 (12-bit: keep under ~3500)
    noise: float          # Rician sigma, relative to signal 1.0
    bias_centre: np.ndarray
    bias_gradient: np.ndarray  # (3,) per mm, multiplicative field exp(g . (p - centre))
    bias_curvature: float


def make_acquisition(rng: np.random.Generator, centre: np.ndarray) -> Acquisition:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return Acquisition(
        gain=float(rng.uniform(1800, 3300)),
        noise=float(rng.uniform(0.02, 0.045)),
        bias_centre=np.asarray(centre, dtype=np.float64) + rng.normal(0, 30, 3),
        bias_gradient=direction * rng.uniform(0.0, 0.0025),
        bias_curvature=float(rng.uniform(0.0, 1.2e-5)),
    )


def _bias(acquisition: Acquisition, plane: Plane) -> np.ndarray:
    """exp(g.(p - c) - k |p - c|^2) over the plane's pixels. Row and column directions are
    orthogonal, so the exponent splits into a row term plus a column term: two 1-D exps."""
    corner = plane.position - acquisition.bias_centre
    along_col = np.arange(plane.cols) * plane.col_spacing
    along_row = np.arange(plane.rows) * plane.row_spacing
    g, k = acquisition.bias_gradient, acquisition.bias_curvature
    column_term = along_col * (g @ plane.row_direction) - k * (along_col ** 2 + 2 * along_col * (corner @ plane.row_direction))
    row_term = (g @ corner - k * (corner @ corner) + along_row * (g @ plane.column_direction)
                - k * (along_row ** 2 + 2 * along_row * (corner @ plane.column_direction)))
    return (np.exp(row_term)[:, None] * np.exp(column_term)[None, :]).astype(np.float32)


def render_slice(spine: Spine, contrast: Contrast, acquisition: Acquisition, plane: Plane,
                 thickness: float, rng: np.random.Generator) -> np.ndarray:
    """One slice as uint16 counts (12-bit), rows x cols."""
    from scipy.ndimage import gaussian_filter

    points = plane.pixel_points()
    edge = float(max(plane.row_spacing, plane.col_spacing))
    # partial volume across the slice: the spine sampled twice where it changes fast across the
    # slice (sagittal slices cut the canal and foramina side to side), once on axial slices
    if abs(plane.normal[0]) > 0.7:
        first, extra = (points - 0.25 * thickness * plane.normal).reshape(-1, 3), (0.5 * thickness * plane.normal,)
    else:
        first, extra = points.reshape(-1, 3), ()
    signal = tissue_signal(spine, contrast, first, edge, extra).reshape(points.shape[:2])
    signal = gaussian_filter(signal, 0.5)
    texture = 1.0 + 0.35 * gaussian_filter(rng.standard_normal(signal.shape, dtype=np.float32), 1.5)
    signal = signal * _bias(acquisition, plane) * texture
    real = signal + acquisition.noise * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = acquisition.noise * rng.standard_normal(signal.shape, dtype=np.float32)
    counts = np.sqrt(real ** 2 + imaginary ** 2) * acquisition.gain
    return np.clip(np.rint(counts), 0, 4095).astype(np.uint16)
