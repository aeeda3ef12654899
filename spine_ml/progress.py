"""Progress bars: tqdm on stderr, silenced in quiet mode (SPINE_ML_QUIET=1, which `spine-ml -q` sets,
CI and log files want it; Ray trial workers always run quiet).

    from spine_ml.progress import progress
    for study in progress(studies, desc="prepare", unit="study"):
        ...
"""
from __future__ import annotations

import os

QUIET_ENV = "SPINE_ML_QUIET"
MLFLOW_BARS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def quiet() -> bool:
    """Quiet mode: no progress bars (SPINE_ML_QUIET=1)."""
    return os.environ.get(QUIET_ENV) == "1"


def progress(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, disabled in quiet mode as well as by `disable=True`.

    tqdm.auto: a widget in a notebook (Kaggle inference), a text bar in a terminal.
    """
    from tqdm.auto import tqdm

    kwargs["disable"] = bool(kwargs.get("disable")) or quiet()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def quiet_library_bars() -> None:
    """In quiet mode, MLflow's artifact-download bars are silenced too (it reads this on each download)."""
    if quiet():
        os.environ.setdefault(MLFLOW_BARS_ENV, "false")
