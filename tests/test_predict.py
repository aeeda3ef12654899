"""`spine-ml predict` end to end on the tiny data set: a real trial, a real localizer, the real CLI,
and the fallbacks (a deleted series, a study whose files are all corrupt)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ml.competition import vocabulary as V

LOCALIZER_SETTINGS = """\
localizer:
  input_px: 64
  epochs: 1
  batch_size: 32
  holdout_fraction: 0.25
  max_studies: 8
predict:
  crops_dir: data/test-crops
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """(project, config path, trial run id, localizer run id): trained once for the module."""
    from conftest import TINY_CONFIG

    from spine_ml.cli import main
    from spine_ml.config import load_config
    from spine_ml.localize.store import latest_localizer_run
    from spine_ml.training.cli import train

    project = tmp_path_factory.mktemp("predict-project")
    (project / "sweeps").mkdir()
    config_path = project / "sweeps" / "tiny.yaml"
    config_path.write_text(TINY_CONFIG.format(data=tiny_data) + LOCALIZER_SETTINGS)
    config = load_config(config_path)
    _, run_id, _ = train(config, progress=False)
    assert main(["-q", "train-localizer", str(config_path)]) == 0
    return project, config_path, run_id, latest_localizer_run(config)


def _test_studies(data: Path) -> list[int]:
    return sorted(pd.read_csv(data / "test_series_descriptions.csv").study_id.unique().tolist())


def _prior_rows(config, data: Path) -> pd.DataFrame:
    from spine_ml.predict.pipeline import training_prior

    return training_prior(config, data)


def test_cli_writes_a_valid_submission_and_scores_it(trained, tiny_data, tmp_path, capsys):
    from spine_ml.cli import main
    from spine_ml.competition.submission import validate_submission

    project, config_path, run_id, localizer_id = trained
    out = tmp_path / "submission.csv"
    assert main(["-q", "predict", str(config_path), "--run", run_id, "--localizer", localizer_id,
                 "--out", str(out)]) == 0
    studies = _test_studies(tiny_data)
    assert validate_submission(out, studies) == []
    frame = pd.read_csv(out)
    assert len(frame) == 25 * len(studies)
    printed = capsys.readouterr().out
    assert "test_score" in printed and "gap_closed" in printed
    # localised rows differ from the prior: the models did run
    from spine_ml.config import load_config

    prior = _prior_rows(load_config(config_path), tiny_data)
    values = frame[list(V.PROBABILITY_COLUMNS)].to_numpy()
    keys = [V.parse_row_id(r)[1:] for r in frame.row_id]
    prior_values = prior.reindex(pd.MultiIndex.from_tuples(keys)).to_numpy()
    assert (np.abs(values - prior_values).max(1) > 1e-6).mean() > 0.5


def test_missing_series_falls_back_to_the_prior_for_its_condition(trained, tiny_data, copy_of, caplog):
    from spine_ml.config import load_config
    from spine_ml.predict.run import run_checkpoints
    from spine_ml.predict.pipeline import predict_studies

    project, config_path, run_id, localizer_id = trained
    data = copy_of(tiny_data)
    descriptions = pd.read_csv(data / "test_series_descriptions.csv")
    study = int(descriptions.study_id.iloc[0])
    t1 = descriptions[(descriptions.study_id == study) & (descriptions.series_description == V.SAGITTAL_T1)]
    assert len(t1), "the tiny test study should have a Sagittal T1 series"
    for series_id in t1.series_id:
        shutil.rmtree(data / "test_images" / str(study) / str(series_id), ignore_errors=True)
    config = load_config(config_path)
    checkpoints = run_checkpoints(config, run_id, project / "downloaded")
    with caplog.at_level("WARNING"):
        frame = predict_studies(config, checkpoints, localizer_id, data, [study]).set_index("row_id")
    intact = predict_studies(config, checkpoints, localizer_id, tiny_data, [study]).set_index("row_id")
    assert len(frame) == 25 and list(frame.index) == V.study_row_ids(study)
    prior = _prior_rows(config, data)
    columns = list(V.PROBABILITY_COLUMNS)
    for condition in V.CONDITIONS:
        for level in V.LEVELS:
            row_id = V.make_row_id(study, condition, level)
            if "foraminal" in condition:  # the deleted series' rows: the prior
                assert np.allclose(frame.loc[row_id, columns].to_numpy(float),
                                   prior.loc[(condition, level)].to_numpy(float), atol=1e-7), row_id
            else:  # every other row as with the series present
                assert np.allclose(frame.loc[row_id, columns].to_numpy(float),
                                   intact.loc[row_id, columns].to_numpy(float), atol=1e-6), row_id
    assert not np.allclose(intact.filter(like="foraminal", axis=0)[columns].to_numpy(),
                           frame.filter(like="foraminal", axis=0)[columns].to_numpy())
    assert any(str(study) in r.message and "prior" in r.message and "Sagittal T1" in r.message
               for r in caplog.records)


def test_study_with_only_corrupt_files_gets_the_prior_everywhere(trained, tiny_data, copy_of):
    from spine_ml.config import load_config
    from spine_ml.predict.run import run_checkpoints
    from spine_ml.predict.pipeline import predict_studies

    project, config_path, run_id, localizer_id = trained
    data = copy_of(tiny_data)
    studies = _test_studies(data)
    broken = studies[-1]
    for path in (data / "test_images" / str(broken)).rglob("*.dcm"):
        path.write_bytes(b"not a dicom file" * 8)
    config = load_config(config_path)
    checkpoints = run_checkpoints(config, run_id, project / "downloaded-2")
    frame = predict_studies(config, checkpoints, localizer_id, data, studies)
    assert len(frame) == 25 * len(studies) and frame.row_id.is_unique
    prior = _prior_rows(config, data)
    broken_rows = frame[frame.row_id.str.startswith(f"{broken}_")]
    keys = pd.MultiIndex.from_tuples([V.parse_row_id(r)[1:] for r in broken_rows.row_id])
    assert np.allclose(broken_rows[list(V.PROBABILITY_COLUMNS)].to_numpy(), prior.reindex(keys).to_numpy(), atol=1e-7)


def test_crops_are_reused_across_members(trained, tiny_data, monkeypatch):
    """A second member with the same prepare settings and localizer does not localise again."""
    from spine_ml.config import load_config
    from spine_ml.predict import crops as C
    from spine_ml.predict.run import run_checkpoints
    from spine_ml.predict.pipeline import predict_studies

    project, config_path, run_id, localizer_id = trained
    config = load_config(config_path)
    checkpoints = run_checkpoints(config, run_id, project / "downloaded-3")
    studies = _test_studies(tiny_data)
    first = predict_studies(config, checkpoints, localizer_id, tiny_data, studies)

    def fail(*args, **kwargs):
        raise AssertionError("localised again although the crops were cached")

    monkeypatch.setattr(C, "localise_and_cut", fail)
    second = predict_studies(config, checkpoints[:1], localizer_id, tiny_data, studies)
    assert list(second.row_id) == list(first.row_id)


def test_unknown_run_is_a_clear_error(trained, capsys):
    from spine_ml.cli import main

    _, config_path, _, _ = trained
    assert main(["predict", str(config_path), "--run", "0123456789abcdef0123456789abcdef"]) == 2
    assert "0123456789abcdef" in capsys.readouterr().err


def test_localizer_run_is_scored_on_the_synthetic_test_split(trained, tiny_data):
    """Synthetic data carries the test split's true points (test_label_coordinates.csv): the
    localizer run logs `test_*` metrics over every readable labelled test point."""
    from spine_ml.competition import tables
    from spine_ml.config import load_config
    from spine_ml.tracking.store import client

    project, config_path, run_id, localizer_id = trained
    metrics = client(load_config(config_path)).get_run(localizer_id).data.metrics
    points = tables.read_coordinates(tiny_data / "test_label_coordinates.csv")
    assert 0 < metrics["test_points"] <= len(points)
    assert metrics["test_points"] >= 0.8 * len(points)  # only unreadable series' points are left out
    for key in ("test_correct_level_rate", "test_correct_slice_rate", "test_found_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["test_mean_error_mm"] > 0


def test_code_fingerprint_follows_the_source_so_stale_crops_and_predictions_are_not_reused(tmp_path, monkeypatch):
    from spine_ml.predict.crops import CROP_CODE, PREDICTION_CODE, code_fingerprint

    module = tmp_path / "decoder_under_test.py"
    module.write_text("PEAK = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_fingerprint(("decoder_under_test",))
    assert code_fingerprint(("decoder_under_test",)) == before
    module.write_text("PEAK = 2\n")
    assert code_fingerprint(("decoder_under_test",)) != before
    assert set(CROP_CODE) < set(PREDICTION_CODE) and "spine_ml.localize.infer" in CROP_CODE
