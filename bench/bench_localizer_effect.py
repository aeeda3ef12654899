"""What the localizer costs at test time: one trial's fold models scored on the synthetic test split
twice in one run, on crops cut where the localizer put the levels and on crops cut at the true test
coordinates (`test_label_coordinates.csv`, which only the synthetic set has), next to that trial's
OOF score (cut at the labelled training coordinates).

    .venv/bin/python bench/bench_localizer_effect.py [--config sweeps/demo.yaml] [--run RUN_ID]
                                                     [--localizer RUN_ID] [--json out.json]

Default run: the best finished trial of the config's experiment; default localizer: the one
`predict` takes (the most recently chosen). Both crop sets go through the same code after the
sites are known (prepare's clip_point + crop_sample, then predict_from_crops); a row whose site is
unknown takes the training prior in both. Prints the scores and the ratios
localised ÷ true coordinates (the localizer's cost alone) and localised ÷ OOF.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from common import report  # noqa: E402 - bench/ is the script's folder

PROJECT = Path(__file__).resolve().parents[1]


def true_coordinate_crops(data_root: Path, studies, prepare_cfg):
    """TestCrops cut at test_label_coordinates.csv, in the row layout `localise_and_cut` writes."""
    from spine_ml.competition import vocabulary as V
    from spine_ml.competition.tables import read_coordinates
    from spine_ml.dicom.read import read_series
    from spine_ml.predict.crops import ROW_COLUMNS, TestCrops
    from spine_ml.prepare.crops import clip_point, crop_sample

    path = data_root / "test_label_coordinates.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this benchmark needs the synthetic set's test coordinates "
                         f"(made by `spine-ml synth`; the real competition has none)")
    points = read_coordinates(path).set_index(["study_id", "condition", "level"]).sort_index()
    rows, crops, series_cache = [], [], {}
    for study_id in studies:
        for condition in V.CONDITIONS:
            for level in V.LEVELS:
                row = {"row_id": V.make_row_id(study_id, condition, level), "study_id": study_id,
                       "condition": condition, "level": level, "crop": -1, "series_id": -1,
                       "instance_number": -1, "x": np.nan, "y": np.nan, "score": np.nan}
                key = (study_id, condition, level)
                if key in points.index:
                    point = points.loc[key]
                    point = point.iloc[0] if isinstance(point, pd.DataFrame) else point
                    folder = data_root / "test_images" / str(study_id) / str(int(point.series_id))
                    if folder not in series_cache:
                        series_cache[folder] = read_series(folder)
                    try:
                        stack, slice_index = series_cache[folder].find_instance(int(point.instance_number))
                    except KeyError:
                        rows.append(row)
                        continue
                    x, y, _ = clip_point(stack, float(point.x), float(point.y))
                    crops.append(crop_sample(stack, slice_index, x, y, prepare_cfg))
                    row.update(crop=len(crops) - 1, series_id=int(point.series_id),
                               instance_number=int(point.instance_number), x=x, y=y, score=1.0)
                rows.append(row)
    shape = (0, prepare_cfg.slices, prepare_cfg.patch_px, prepare_cfg.patch_px)
    stacked = np.stack(crops) if crops else np.zeros(shape, dtype=np.float16)
    return TestCrops(stacked, pd.DataFrame(rows, columns=ROW_COLUMNS), {})


def test_score(frame: pd.DataFrame, data_root: Path) -> float:
    from spine_ml.competition.metric import score
    from spine_ml.competition.tables import read_train_labels

    truth = read_train_labels(data_root / "test_labels.csv")
    return score(truth[truth.label >= 0], frame, "submission").score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PROJECT / "sweeps" / "demo.yaml"))
    parser.add_argument("--run", help="trial run id (default: the best finished trial of the experiment)")
    parser.add_argument("--localizer", help="localizer run id (default: the most recently chosen)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from spine_ml.competition.submission import expected_studies
    from spine_ml.config import load_config
    from spine_ml.ensemble.select import candidate_runs
    from spine_ml.localize.store import resolve_localizer
    from spine_ml.predict.crops import ensure_test_crops
    from spine_ml.predict.pipeline import predict_from_crops
    from spine_ml.predict.run import run_checkpoints, run_config, test_report
    from spine_ml.tracking.store import client, ensure_experiment

    config = load_config(args.config)
    data_root = config.path(config.data.root)
    run_id = args.run
    if run_id is None:
        runs = candidate_runs(client(config), ensure_experiment(config))
        if not runs:
            raise SystemExit(f"no finished trial in experiment {config.tracking.experiment!r}: run a sweep first")
        run_id = runs[0].info.run_id
    oof = client(config).get_run(run_id).data.metrics["score"]
    studies = expected_studies(data_dir=data_root)
    with tempfile.TemporaryDirectory(prefix="bench-localizer-") as folder:
        member = run_config(config, run_id, Path(folder))
        member = member.with_updates({"predict": config.predict.model_dump(mode="json"),
                                      "tracking": config.tracking.model_dump(mode="json")})
        checkpoints = run_checkpoints(config, run_id, Path(folder))
        localizer, key = resolve_localizer(member, args.localizer)
        localised = ensure_test_crops(member, localizer, key, data_root, studies, progress=False)
        true_crops = true_coordinate_crops(data_root, studies, member.prepare)
        scores = {}
        for name, crops in (("localised", localised), ("true_coordinates", true_crops)):
            frame = predict_from_crops(member, checkpoints, crops, data_root)
            scores[name] = test_score(frame, data_root)
            if name == "localised":
                out = Path(folder) / "submission.csv"
                frame.to_csv(out, index=False)
                gap = test_report(data_root, out) or {}
    figures = {
        "run": run_id, "oof_score": round(oof, 4),
        "test_localised": round(scores["localised"], 4),
        "test_true_coordinates": round(scores["true_coordinates"], 4),
        "localised_over_true": round(scores["localised"] / scores["true_coordinates"], 4),
        "localised_over_oof": round(scores["localised"] / oof, 4),
        "true_over_oof": round(scores["true_coordinates"] / oof, 4),
        "prior_score": round(gap.get("prior_score", float("nan")), 4),
        "oracle_score": round(gap.get("oracle_score", float("nan")), 4),
        "gap_closed_localised": round(gap.get("gap_closed", float("nan")), 4),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
