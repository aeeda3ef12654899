"""`spine-ml export` and `spine-ml predict --bundle` on the tiny data set: two real `spine-ml train` runs,
a real localizer and a real `spine-ml ensemble`, exported; the bundle's entry script then runs in a
clean folder with no MLflow store and no hub, and must write the ensemble's own submission.csv."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ml.competition import vocabulary as V

LOCALIZER_SETTINGS = """\
localizer:
  input_px: 48
  epochs: 1
  batch_size: 32
  holdout_fraction: 0.25
  max_studies: 4
predict:
  crops_dir: data/test-crops
"""
COLUMNS = list(V.PROBABILITY_COLUMNS)
HALF_TOLERANCE = 2e-3  # float16 weights move a probability by well under this on the tiny models


MEMBER_SETTINGS = ["train.max_batches_per_epoch=2"]
# The ensemble of tiny runs keeps one member as it is; `blended` (slow) trains a second member and sets
# a two-member blend with temperatures, so that weights and calibration are exercised too.
BLEND_WEIGHTS = (0.65, 0.35)
BLEND_TEMPERATURES = (1.4, 0.7, 1.0, 1.25, 0.85)  # per V.CONDITIONS


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_data):
    """(project, config path): a `spine-ml train` run and a localizer in the project's own store."""
    with pytest.MonkeyPatch.context() as patch:  # the project's own store, whatever the shell says
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield train_runs(tmp_path_factory.mktemp("export-project"), tiny_data)


def train_runs(project: Path, tiny_data: Path) -> tuple[Path, Path]:
    from conftest import TINY_CONFIG

    from spine_ml.cli import main
    from spine_ml.config import load_config
    from spine_ml.training.cli import train

    (project / "sweeps").mkdir()
    config_path = project / "sweeps" / "tiny.yaml"
    config_path.write_text(TINY_CONFIG.format(data=tiny_data) + LOCALIZER_SETTINGS)
    train(load_config(config_path, MEMBER_SETTINGS), progress=False)
    assert main(["-q", "train-localizer", str(config_path)]) == 0
    return project, config_path


@pytest.fixture(scope="module")
def exported(store):
    """(config path, ensemble submission, ensemble run id, bundle): `spine-ml ensemble`, then `spine-ml
    export`, which runs the bundle once on the test studies and compares it with the ensemble's file."""
    from spine_ml.cli import main

    project, config_path = store
    submission = project / "submission.csv"
    assert main(["-q", "ensemble", str(config_path), "--out", str(submission)]) == 0
    bundle = project / "bundle"
    assert main(["-q", "export", str(config_path), "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    return config_path, submission, manifest["ensemble"]["run_id"], bundle


@pytest.fixture(scope="module")
def blended(store, exported):
    """(submission, ensemble run id, bundle) of an ensemble run whose chosen blend is set to BLEND_*: the
    ensemble's own fitting, test predictions, submission writer and run logger, only the choice differs."""
    from dataclasses import replace

    from spine_ml.cli import main
    from spine_ml.competition.submission import normalised_frame
    from spine_ml.config import load_config
    from spine_ml.ensemble.report import log_ensemble_run
    from spine_ml.ensemble.run import EnsembleOptions, fit_ensemble, full_oof_probabilities, read_truth
    from spine_ml.ensemble.select import select_members
    from spine_ml.ensemble.testpred import (chosen_test_predictions, prepare_test_set, submission_row_ids,
                                            write_submission)
    from spine_ml.ensemble.weights import Blend
    from spine_ml.training.cli import train

    project, config_path = store
    config = load_config(config_path)
    train(load_config(config_path, [*MEMBER_SETTINGS, "model.crop_px=16", "train.seed=1"]), progress=False)
    test = prepare_test_set(config)
    members = select_members(config, top_k=2, prediction_key=test.key)
    truth = read_truth(config)
    summary = fit_ensemble(config, members, truth, EnsembleOptions.from_config(config))
    assert len(summary.members) == 2
    blend = Blend(weights=np.array(BLEND_WEIGHTS), temperatures=np.array(BLEND_TEMPERATURES))
    summary = replace(summary, chosen=replace(summary.chosen, members=(0, 1), blend=blend, fitted=True,
                                              temperature=True))
    arrays, failed = chosen_test_predictions(config, summary, test, submission_row_ids(test.studies))
    assert not failed
    submission = write_submission(config, summary, project / "blended.csv", test, arrays)
    oof = normalised_frame(truth.row_id.astype(str).to_numpy(), full_oof_probabilities(summary, truth))
    run_id = log_ensemble_run(config, summary, oof, submission)
    bundle = project / "blended-bundle"
    assert main(["-q", "export", str(config_path), "--ensemble", run_id, "--out", str(bundle), "--no-verify"]) == 0
    return submission, run_id, bundle


def read_probabilities(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).set_index("row_id")[COLUMNS]


def test_bundle_entry_script_in_a_clean_folder_writes_the_ensemble_submission(exported, tiny_data, tmp_path):
    from spine_ml.competition.submission import expected_studies, validate_submission

    _, submission, _, bundle = exported
    clean = tmp_path / "kaggle"
    clean.mkdir()
    shutil.copytree(bundle, clean / "bundle")  # as a dataset would be mounted: the bundle alone
    before = {p: p.stat().st_mtime_ns for p in (clean / "bundle").rglob("*")}
    # Neither MLflow, Ray nor Optuna may be needed: they are made unimportable for the run.
    blockers = tmp_path / "blockers"
    blockers.mkdir()
    for name in ("mlflow", "ray", "optuna"):
        (blockers / f"{name}.py").write_text(f"raise ImportError('{name} is not available in the bundle run')\n")
    nowhere = clean / "no-store"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPINE_ML_ROOT"))}
    env.update(HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=nowhere.as_uri(), PYTHONPATH=str(blockers),
               SPINE_ML_QUIET="1")
    out = clean / "working" / "submission.csv"
    done = subprocess.run([sys.executable, str(clean / "bundle" / "predict.py"), "--no-install",
                           "--data", str(tiny_data), "--out", str(out)],
                          cwd=clean, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    studies = expected_studies(data_dir=tiny_data)
    assert validate_submission(out, studies) == []
    ours, theirs = read_probabilities(out), read_probabilities(submission)
    assert list(ours.index) == list(theirs.index) and len(ours) == 25 * len(studies)
    assert np.abs(ours.to_numpy() - theirs.to_numpy()).max() <= 1e-6
    assert "projected for 700 hidden test studies" in done.stdout
    assert not nowhere.exists() and not (clean / "mlruns").exists()
    assert sorted(p.name for p in clean.iterdir()) == ["bundle", "working"]
    assert {p: p.stat().st_mtime_ns for p in (clean / "bundle").rglob("*")} == before  # read-only use


@pytest.mark.slow
def test_bundle_blends_with_the_ensemble_weights_and_temperatures(blended, exported, tiny_data, tmp_path):
    from spine_ml.export.run import predict_bundle

    submission, run_id, bundle = blended
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [m["weight"] for m in manifest["members"]] == pytest.approx(BLEND_WEIGHTS)
    assert [manifest["blend"]["temperatures"][c] for c in V.CONDITIONS] == pytest.approx(BLEND_TEMPERATURES)
    run = predict_bundle(bundle, tiny_data, tmp_path / "submission.csv")
    ours, theirs = read_probabilities(run.out), read_probabilities(submission)
    assert list(ours.index) == list(theirs.index)
    assert np.abs(ours.to_numpy() - theirs.to_numpy()).max() <= 1e-6
    # and the blend matters: it is not the one-member submission of the plain ensemble
    single = read_probabilities(exported[1])
    assert np.abs(ours.to_numpy() - single.to_numpy()).max() > 1e-3


def test_manifest_records_the_ensemble_members_localizer_and_versions(exported):
    from mlflow import MlflowClient

    from spine_ml.config import load_config
    from spine_ml.tracking.store import tracking_uri

    config_path, _, run_id, bundle = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    config = load_config(config_path)
    client = MlflowClient(tracking_uri(config))
    described = json.loads(Path(client.download_artifacts(run_id, "ensemble.json", str(bundle.parent))).read_text())
    kept = {m["run_id"]: m["weight"] for m in described["members"] if m["weight"] > 0}
    assert {m["run_id"]: m["weight"] for m in manifest["members"]} == kept
    assert manifest["blend"]["temperatures"] == described["temperatures"]
    assert set(manifest["blend"]["temperatures"]) == set(V.CONDITIONS)
    [localizer] = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                     "tags.`spine_ml.run_kind` = 'localizer'")
    assert manifest["localizer"]["run_id"] == localizer.info.run_id
    assert manifest["localizer"]["settings"]["localizer"]["input_px"] == 48
    for member in manifest["members"]:
        assert member["prepare"] == {"slices": 3, "patch_mm": 32.0, "pixel_mm": 1.0, "percentiles": [1.0, 99.5]}
        assert member["config"]["tracking"]["uri"] is None
        assert len(member["checkpoints"]) == 2 and all((bundle / c["path"]).is_file() for c in member["checkpoints"])
    assert {"torch", "timm", "pydicom"} <= set(manifest["versions"])
    assert set(manifest["source"]) == {"git_commit", "git_dirty"}
    measured = manifest["measured"]
    assert measured["studies"] == 4 and measured["seconds_per_study"] > 0
    assert measured["seconds_per_study"] == pytest.approx(measured["seconds"] / 4, rel=1e-9)
    assert measured["projected_hours"] == pytest.approx(measured["seconds_per_study"] * 700 / 3600, rel=1e-9)
    assert measured["max_abs_difference_vs_ensemble_submission"] <= 1e-6
    assert manifest["created"] and (bundle / manifest["wheel"]["path"]).is_file()
    assert "--no-deps" in manifest["requirements"]


def test_notebook_is_valid_nbformat_4_and_runs_the_entry_script(exported):
    _, _, _, bundle = exported
    notebook = json.loads((bundle / "submission.ipynb").read_text())
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    for cell in code:
        compile("".join(cell["source"]), "submission.ipynb", "exec")
    source = "".join(code[0]["source"])
    assert "predict.py" in source and "/kaggle/input/rsna-2024-lumbar-spine-degenerative-classification/" in source
    assert "/kaggle/working/submission.csv" in source
    script = (bundle / "predict.py").read_text()
    compile(script, "predict.py", "exec")
    assert '"--no-index", "--no-deps"' in script


def test_wheel_installs_offline_and_imports(exported, tmp_path):
    _, _, _, bundle = exported
    [wheel] = bundle.glob("spine_ml-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", "import spine_ml, spine_ml.export.run, spine_ml.export.load; "
                           "print(spine_ml.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(target)
    done = subprocess.run([sys.executable, "-m", "spine_ml", "predict", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--bundle" in done.stdout


def test_half_bundle_is_smaller_and_predicts_within_tolerance(exported, tiny_data, tmp_path, capsys):
    import torch

    from spine_ml.cli import main
    from spine_ml.export.run import predict_bundle

    config_path, submission, run_id, bundle = exported
    half = tmp_path / "half"
    assert main(["-q", "export", str(config_path), "--ensemble", run_id, "--out", str(half), "--half",
                 "--no-verify"]) == 0
    assert "as float16 (stored: float16)" in capsys.readouterr().out
    manifest = json.loads((half / "manifest.json").read_text())
    assert manifest["half"] and manifest["measured"] is None
    stored = torch.load(half / manifest["members"][0]["checkpoints"][0]["path"], weights_only=True)
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}

    def weights_bytes(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*.pt"))

    assert weights_bytes(half) < 0.6 * weights_bytes(bundle)
    assert manifest["sizes"]["checkpoints_mb_float16"] < 0.55 * manifest["sizes"]["checkpoints_mb_float32"]
    run = predict_bundle(half, tiny_data, tmp_path / "half.csv")
    difference = np.abs(read_probabilities(run.out).to_numpy() - read_probabilities(submission).to_numpy()).max()
    assert 0 < difference <= HALF_TOLERANCE


def test_non_empty_out_is_refused_and_left_alone(exported, tmp_path, capsys):
    from spine_ml.cli import main

    config_path, _, _, _ = exported
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["-q", "export", str(config_path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(out) in error and "pick another --out or remove it" in error
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".taken.partial-*"))


def test_unknown_ensemble_run_is_a_clear_error(exported, capsys):
    from spine_ml.cli import main

    config_path, _, _, bundle = exported
    member = json.loads((bundle / "manifest.json").read_text())["members"][0]["run_id"]
    assert main(["-q", "export", str(config_path), "--ensemble", member, "--out", str(bundle.parent / "x")]) == 2
    assert f"--ensemble {member}: a train run, not an ensemble run" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["manifest", "checkpoint", "truncated"])
def test_damaged_bundle_is_a_clear_error_naming_the_file(exported, tiny_data, copy_of, tmp_path, capsys, damage):
    from spine_ml.cli import main

    _, _, _, bundle = exported
    broken = copy_of(bundle)
    manifest = json.loads((broken / "manifest.json").read_text())
    checkpoint = broken / manifest["members"][-1]["checkpoints"][-1]["path"]
    if damage == "manifest":
        (broken / "manifest.json").unlink()
        named = broken / "manifest.json"
    elif damage == "checkpoint":
        checkpoint.unlink()
        named = checkpoint
    else:
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
        named = checkpoint
    out = tmp_path / "submission.csv"
    assert main(["-q", "predict", "--bundle", str(broken), "--data", str(tiny_data), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert str(named) in error and "traceback" not in error.lower()
    assert not out.exists()


def test_entry_script_without_its_manifest_says_so(exported, tmp_path):
    _, _, _, bundle = exported
    shutil.copy(bundle / "predict.py", tmp_path / "predict.py")
    done = subprocess.run([sys.executable, str(tmp_path / "predict.py"), "--out", str(tmp_path / "s.csv")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path / 'manifest.json'} not found; upload the whole bundle folder" in done.stderr


def test_bundle_refuses_a_config_or_run(exported, tiny_data, capsys):
    from spine_ml.cli import main

    config_path, _, _, bundle = exported
    assert main(["predict", str(config_path), "--bundle", str(bundle), "--data", str(tiny_data)]) == 2
    assert "runs from the bundle alone" in capsys.readouterr().err


def test_projection_warns_loudly_over_the_budget():
    from spine_ml.export.run import BundleRun, projection_lines

    within = BundleRun(Path("s.csv"), studies=4, seconds=100.0, hidden_studies=700, budget_hours=9.0)
    assert within.projected_hours == pytest.approx(100 / 4 * 700 / 3600)
    assert len(projection_lines(within)) == 1 and "4.86 h projected for 700" in projection_lines(within)[0]
    over = BundleRun(Path("s.csv"), studies=4, seconds=200.0, hidden_studies=700, budget_hours=9.0)
    [_, warning] = projection_lines(over)
    assert warning.startswith("WARNING: projected runtime 9.7 h") and "EXCEEDS the 9 h Kaggle limit" in warning
