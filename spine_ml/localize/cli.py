"""`spine-ml train-localizer CONFIG`: train the level localizer, score it on held-out studies, log
it as an MLflow run (the run id is what `spine-ml predict --localizer` takes)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cli(args) -> int:
    from spine_ml.config import load_config
    from spine_ml.localize.store import log_localizer
    from spine_ml.localize.train import train_localizer
    from spine_ml.prepare.cache import ensure_data

    config = load_config(args.config, args.overrides)
    ensure_data(config)
    with tempfile.TemporaryDirectory(prefix="localizer-") as folder:
        result = train_localizer(config, Path(folder))
        run_id = log_localizer(config, result)
    print(f"localizer run {run_id}: {len(result.train_studies)} train / {len(result.holdout_studies)} held-out "
          f"studies, {result.samples} samples, {result.wall_seconds:.0f} s")
    for key in ("mean_error_mm", "p90_error_mm", "correct_level_rate", "correct_slice_rate", "found_rate"):
        if key in result.metrics:
            print(f"{key:<20} {result.metrics[key]:.4f}")
    print(f"use it: spine-ml predict {args.config} --run RUN_ID --localizer {run_id}")
    return 0
