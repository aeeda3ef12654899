"""`spine-ml train-localizer CONFIG`: train the level localizer, score it on held-out studies, log
it as an MLflow run (the run id is what `spine-ml predict --localizer` takes)."""
from __future__ import annotations

import logging
import math
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
    keys = ("mean_error_mm", "p90_error_mm", "correct_level_rate", "correct_slice_rate", "found_rate")
    print(f"{'':<20} {'held-out':>9} {'test':>9}" if "test_points" in result.metrics else f"{'':<20} {'held-out':>9}")
    for key in keys:
        if key in result.metrics:
            test = result.metrics.get(f"test_{key}")
            print(f"{key:<20} {result.metrics[key]:>9.4f}" + (f" {test:>9.4f}" if test is not None else ""))
    p90 = result.metrics.get("p90_error_mm")
    if p90 is not None and math.isfinite(p90):  # NaN: nothing found on the held-out studies
        from spine_ml.localize.metrics import suggested_shift_px

        shift = suggested_shift_px(p90, config.prepare.pixel_mm)
        print(f"classifier coordinate jitter to match it: --set train.augment.shift_px={shift:.1f} "
              f"(now {config.train.augment.shift_px:g}; uniform +-s px has a p90 offset of 1.11 s)")
    print(f"use it: spine-ml predict {args.config} --run RUN_ID --localizer {run_id}")
    return 0
