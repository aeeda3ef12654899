"""The numbers the label model is calibrated to, and the label model's parameters solved from them.

Every target below was computed from the public copy of the competition's train.csv
(``../shared/data/rsna2024/train.csv``: 1,975 studies; blanks excluded from frequencies). They are
embedded so that generation works where ``../shared`` is absent; tests/test_synth.py re-derives the
frequency table from that file when it is present and compares a generation with it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from spine_ml.competition import vocabulary as V

# (normal_mild, moderate, severe) per row of vocabulary.LABEL_COLUMNS (condition-major, level-minor).
REAL_FREQUENCIES = np.array([
    [0.9554, 0.0339, 0.0106], [0.8967, 0.0765, 0.0268], [0.8217, 0.1165, 0.0618],  # spinal
    [0.7508, 0.1201, 0.1292], [0.9645, 0.0258, 0.0096],
    [0.9671, 0.0319, 0.0010], [0.9078, 0.0867, 0.0056], [0.7714, 0.2083, 0.0203],  # left foraminal
    [0.6102, 0.3188, 0.0710], [0.6320, 0.2636, 0.1044],
    [0.9614, 0.0320, 0.0066], [0.9115, 0.0854, 0.0031], [0.7687, 0.2105, 0.0208],  # right foraminal
    [0.6141, 0.3198, 0.0661], [0.6512, 0.2522, 0.0966],
    [0.9332, 0.0514, 0.0155], [0.8214, 0.1347, 0.0438], [0.6714, 0.2302, 0.0984],  # left subarticular
    [0.4498, 0.3164, 0.2338], [0.7169, 0.2082, 0.0748],
    [0.9261, 0.0606, 0.0132], [0.8331, 0.1284, 0.0386], [0.6700, 0.2301, 0.0998],  # right subarticular
    [0.4516, 0.3153, 0.2331], [0.7109, 0.2012, 0.0879],
])
REAL_STUDIES = 1975  # the sample size behind REAL_FREQUENCIES (for test tolerances)

# Blank labels in the real file: 8.3% of studies lack both subarticular L1/L2 labels and 4.2% also
# L2/L3 (their axial stacks start lower); a few studies miss one whole condition; a few isolated cells.
AXIAL_STARTS_AT_L2_L3 = 0.042
AXIAL_STARTS_AT_L3_L4 = 0.041
WHOLE_CONDITION_BLANK = 0.002
ISOLATED_BLANK = 0.0008

# Ordinal label model: label >= moderate with probability expit(u / s), >= severe with
# expit((u - 1) / s): u is a row's latent severity on one scale for every level (0 = the
# moderate threshold, 1 = the severe one), s the label noise of its condition group. The
# group scales set the oracle's score (~0.30 over the four metric parts on 400 studies);
# the severe/moderate ratio of L1/L2 foraminal (0.03) needs s <= ~0.27.
SEVERE_THRESHOLD = 1.0
LABEL_NOISE = {"spinal": 0.20, "foraminal": 0.22, "subarticular": 0.25}

# Latent correlation within a study: loadings on shared standard-normal factors (sum <= 1 per
# row, the rest idiosyncratic). Fitted by simulation so that the Pearson correlation of the drawn
# label codes matches the real table's (RMSE 0.076 over the 300 pairs) and 18.5% of studies have
# a severe spinal level, as in the real file.
LOADINGS = {
    "patient": 0.215,              # every row of the study
    "level": 0.38,                 # every row of one level; AR(1) across levels:
    "level_autocorrelation": 0.727,
    "central": 0.215,              # spinal + both subarticular rows of one level
    "foraminal_pair": 0.183,       # left + right foraminal of one level
    "subarticular_pair": 0.09,     # left + right subarticular of one level
    "same_side": 0.013,            # foraminal + subarticular of one side and level
}

_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


def ordinal_probabilities(severity: np.ndarray, noise: np.ndarray | float) -> np.ndarray:
    """P(normal_mild, moderate, severe | latent severity): (..., 3), rows sum to 1."""
    from scipy.special import expit

    at_least_moderate = expit(severity / noise)
    at_least_severe = expit((severity - SEVERE_THRESHOLD) / noise)
    return np.stack([1 - at_least_moderate, at_least_moderate - at_least_severe, at_least_severe], -1)


def row_groups() -> np.ndarray:
    """Condition group of each of the 25 rows (vocabulary.LABEL_COLUMNS order)."""
    return np.array([V.CONDITION_INFO[c].group for c in V.CONDITIONS for _ in V.LEVELS])


@lru_cache(maxsize=1)
def latent_scale() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(location, spread, noise) per row such that u = location + spread * N(0, 1) reproduces
    REAL_FREQUENCIES exactly (in expectation) under the ordinal model."""
    from scipy.optimize import least_squares

    noise = np.array([LABEL_NOISE[g] for g in row_groups()])
    location, spread = np.empty(25), np.empty(25)
    for row, (frequencies, s) in enumerate(zip(REAL_FREQUENCIES, noise)):
        targets = np.log([frequencies[1] + frequencies[2], frequencies[2]])

        def residual(p: np.ndarray, s: float = s, targets: np.ndarray = targets) -> np.ndarray:
            severity = p[0] + np.exp(p[1]) * _GH_NODES
            expected = _GH_WEIGHTS @ ordinal_probabilities(severity, s)
            return np.log([expected[1] + expected[2], expected[2]]) - targets

        solution = least_squares(residual, [-1.0, 0.0], xtol=1e-12, ftol=1e-12)
        location[row], spread[row] = solution.x[0], np.exp(solution.x[1])
    return location, spread, noise


@lru_cache(maxsize=1)
def latent_correlation() -> np.ndarray:
    """25x25 correlation of the standardised latents (positive semi-definite by construction)."""
    w = LOADINGS
    condition = np.repeat(np.arange(len(V.CONDITIONS)), len(V.LEVELS))
    level = np.tile(np.arange(len(V.LEVELS)), len(V.CONDITIONS))
    group = row_groups()
    side = np.array([V.CONDITION_INFO[V.CONDITIONS[c]].side or "" for c in condition])
    same_level = level[:, None] == level[None, :]

    def both(mask: np.ndarray) -> np.ndarray:
        return mask[:, None] & mask[None, :]

    correlation = w["patient"] + w["level"] * w["level_autocorrelation"] ** np.abs(level[:, None] - level[None, :])
    correlation = correlation + same_level * (
        w["central"] * both(group != "foraminal")
        + w["foraminal_pair"] * both(group == "foraminal")
        + w["subarticular_pair"] * both(group == "subarticular")
        + w["same_side"] * ((side[:, None] == side[None, :]) & both(side != ""))
    )
    np.fill_diagonal(correlation, 1.0)
    return correlation


@lru_cache(maxsize=1)
def latent_factor() -> np.ndarray:
    """Lower-triangular L with L @ L.T == latent_correlation(). Cholesky, not eigh: its result has
    no sign ambiguity, so the same seed draws the same latents on every LAPACK build."""
    return np.linalg.cholesky(latent_correlation())
