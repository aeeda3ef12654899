"""The competition's vocabulary: the one place that spells conditions, levels, severities and series.

Three spellings exist for the same (condition, level) pair and all of them are derived here:
- train.csv column / row-id suffix: ``spinal_canal_stenosis_l1_l2``
- coordinate CSV: condition ``Spinal Canal Stenosis``, level ``L1/L2``
- submission row id: ``{study_id}_spinal_canal_stenosis_l1_l2``
"""
from __future__ import annotations

from dataclasses import dataclass

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
PROBABILITY_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id",) + PROBABILITY_COLUMNS
SAMPLE_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

# Condition groups, as the metric scores them (a row belongs to the group whose key its id contains).
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
METRIC_PARTS: tuple[str, ...] = ("score",) + GROUPS + ("any_severe_spinal",)

SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

# train.csv columns: condition-major, level-minor (the competition's order).
LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)

# Coordinate-CSV spellings.
CONDITION_TITLES: dict[str, str] = {c: c.replace("_", " ").title() for c in CONDITIONS}
TITLE_TO_CONDITION: dict[str, str] = {t: c for c, t in CONDITION_TITLES.items()}
LEVEL_TITLES: dict[str, str] = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
TITLE_TO_LEVEL: dict[str, str] = {t: lv for lv, t in LEVEL_TITLES.items()}
SEVERITY_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class ConditionInfo:
    name: str
    group: str  # spinal | foraminal | subarticular
    side: str | None  # left | right | None
    series: str  # the series description that shows it


def _info(name: str) -> ConditionInfo:
    group = next(g for g in GROUPS if g in name)
    side = "left" if name.startswith("left_") else "right" if name.startswith("right_") else None
    series = {"spinal": SAGITTAL_T2, "foraminal": SAGITTAL_T1, "subarticular": AXIAL_T2}[group]
    return ConditionInfo(name, group, side, series)


CONDITION_INFO: dict[str, ConditionInfo] = {c: _info(c) for c in CONDITIONS}


def condition_group(condition: str) -> str:
    return CONDITION_INFO[condition].group


def mirror_condition(condition: str) -> str:
    """The same condition on the other side (a left/right flip swaps them); spinal is its own mirror."""
    if condition.startswith("left_"):
        return "right_" + condition[len("left_"):]
    if condition.startswith("right_"):
        return "left_" + condition[len("right_"):]
    return condition


def row_suffix(condition: str, level: str) -> str:
    return f"{condition}_{level}"


def make_row_id(study_id: int, condition: str, level: str) -> str:
    return f"{int(study_id)}_{condition}_{level}"


def parse_row_id(row_id: str) -> tuple[int, str, str]:
    """``'44036939_left_neural_foraminal_narrowing_l1_l2'`` -> ``(44036939, condition, level)``.

    Raises ValueError naming the row id when it is not one of the competition's.
    """
    study, _, rest = str(row_id).partition("_")
    if not study.isdigit():
        raise ValueError(f"row_id {row_id!r}: does not start with a numeric study id")
    level = rest[-5:]
    condition = rest[:-6]
    if level not in LEVELS or condition not in CONDITIONS or rest[-6:-5] != "_":
        raise ValueError(
            f"row_id {row_id!r}: expected '<study_id>_<condition>_<level>' with condition in "
            f"{', '.join(CONDITIONS)} and level in {', '.join(LEVELS)}"
        )
    return int(study), condition, level


def study_row_ids(study_id: int) -> list[str]:
    """The 25 row ids of one study, in the competition's order."""
    return [make_row_id(study_id, c, lv) for c in CONDITIONS for lv in LEVELS]


def condition_from_title(title: str) -> str:
    try:
        return TITLE_TO_CONDITION[title.strip()]
    except KeyError:
        raise ValueError(
            f"unknown condition {title!r}; expected one of {', '.join(TITLE_TO_CONDITION)}"
        ) from None


def level_from_title(title: str) -> str:
    try:
        return TITLE_TO_LEVEL[title.strip()]
    except KeyError:
        raise ValueError(f"unknown level {title!r}; expected one of {', '.join(TITLE_TO_LEVEL)}") from None
