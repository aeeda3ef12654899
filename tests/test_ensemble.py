"""spine-ml ensemble: the vectorised metric, weight and temperature fitting, nested CV, the inference
budget, member selection from a real (temporary, SQLite) MLflow store, and the CLI end to end.

Members here are real MLflow runs whose oof.csv holds predictions of deliberately different quality:
the true class probabilities of a known latent model, disturbed by independent noise per member.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ml.competition import vocabulary as V
from spine_ml.competition.metric import score as reference_score
from spine_ml.competition.submission import normalised_frame
from spine_ml.competition.tables import labels_to_wide
from spine_ml.ensemble.budget import BudgetError, choose, evaluate, frontier
from spine_ml.ensemble.objective import MetricProblem
from spine_ml.ensemble.select import Member, SelectionError
from spine_ml.ensemble.validation import cross_validate, study_folds
from spine_ml.ensemble.weights import equal_blend, fit_blend

# ---------------------------------------------------------------- synthetic truth and members


def make_truth(studies: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Long-form labels drawn from known probabilities (a per-study latent severity), 1% blank."""
    rng = np.random.default_rng(seed)
    study_ids = np.repeat(np.arange(studies) + 1000, 25)
    latent = np.repeat(rng.normal(size=studies), 25) + rng.normal(0, 0.8, len(study_ids))
    logits = np.stack([np.zeros_like(latent), 2 * latent - 1.5, 3 * latent - 3.5], 1)
    truth_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (rng.random(len(latent))[:, None] > np.cumsum(truth_p, 1)).sum(1)
    labels[rng.random(len(labels)) < 0.01] = -1
    frame = pd.DataFrame({
        "study_id": study_ids, "condition": np.tile(np.repeat(V.CONDITIONS, 5), studies),
        "level": np.tile(V.LEVELS * 5, studies), "label": labels})
    frame.insert(0, "row_id", [V.make_row_id(s, c, lv) for s, c, lv in zip(frame.study_id, frame.condition, frame.level)])
    frame["sample_weight"] = np.where(labels >= 0, np.take(V.SAMPLE_WEIGHTS, labels.clip(0)), 0.0)
    return frame, logits


MEMBER_NOISE = (1.0, 1.2, 1.4, 1.6)  # logit noise per member: four members of falling quality


def member_predictions(logits: np.ndarray, noise: float, seed: int) -> np.ndarray:
    noisy = logits + np.random.default_rng(seed).normal(0, noise, logits.shape)
    return np.exp(noisy) / np.exp(noisy).sum(1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic():
    truth, logits = make_truth(240)
    problem = MetricProblem.from_truth(truth)
    scored = truth.label.to_numpy() >= 0
    predictions = np.stack([member_predictions(logits, noise, seed)[scored]
                            for seed, noise in enumerate(MEMBER_NOISE)])
    return truth, problem, predictions


def fake_member(index: int, seconds: float | None = 1.0, folds: int = 5) -> Member:
    return Member(run_id=f"{index:032x}", name=f"m{index}", backbone="resnet10t", logged_score=0.0, folds=folds,
                  seconds_per_study=seconds, oof=pd.DataFrame())


# ---------------------------------------------------------------- metric, weights, CV


def test_vectorised_metric_matches_reference(synthetic):
    truth, problem, predictions = synthetic
    frame = normalised_frame(problem.row_ids, predictions[0])
    reference = reference_score(truth, frame).as_dict()
    fast = problem.parts(predictions[0])
    assert fast.keys() == reference.keys()
    for key in reference:
        assert fast[key] == pytest.approx(reference[key], abs=1e-10)
    # and on a subset of studies (the CV path), against the reference on the same studies
    rows = np.isin(problem.study_ids, problem.study_ids[:500])
    subset_truth = truth[truth.study_id.isin(problem.study_ids[:500])]
    assert problem.restrict(rows).score(predictions[1][rows]) == pytest.approx(
        reference_score(subset_truth, normalised_frame(problem.row_ids[rows], predictions[1][rows])).score, abs=1e-10)


@pytest.mark.parametrize("method", ["scipy", "caruana"])
def test_fitted_weights_are_a_convex_combination_that_beats_members(synthetic, method):
    _, problem, predictions = synthetic
    blend = fit_blend(problem, predictions, method=method)
    assert (blend.weights >= 0).all() and blend.weights.sum() == pytest.approx(1.0)
    fitted = problem.score(blend.apply(predictions, problem.conditions))
    best_member = min(problem.score(p) for p in predictions)
    equal = problem.score(equal_blend(len(predictions)).apply(predictions, problem.conditions))
    assert fitted < best_member - 0.02
    assert fitted <= equal + 1e-9
    assert blend.weights[0] > 0  # the best member is used


def test_temperature_undoes_a_known_distortion():
    # Temperatures compose (T applied after a distortion D acts as D*T), so whatever temperature
    # the undistorted predictions want, the distorted ones must get it divided by D.
    from spine_ml.ensemble.weights import calibrate

    truth, logits = make_truth(400, seed=1)
    problem = MetricProblem.from_truth(truth)
    oracle = member_predictions(logits, 0.0, seed=0)[truth.label.to_numpy() >= 0]
    wanted = fit_blend(problem, oracle[None], temperature=True).temperatures
    distortion = np.where(np.arange(5) == 0, 1.5, 0.7)
    distorted = calibrate(oracle, problem.conditions, distortion)
    blend = fit_blend(problem, distorted[None], temperature=True)
    assert blend.temperatures * distortion == pytest.approx(wanted, rel=0.05)
    assert problem.score(blend.apply(distorted[None], problem.conditions)) < problem.score(distorted) - 0.01


def test_study_folds_keep_each_study_in_one_fold():
    study_ids = np.repeat(np.arange(37), 25)
    folds = study_folds(study_ids, 5, seed=3)
    per_study = pd.Series(folds).groupby(study_ids).nunique()
    assert (per_study == 1).all() and set(folds) == set(range(5))
    assert (folds == study_folds(study_ids, 5, seed=3)).all()


def test_cross_validated_ensemble_beats_best_member_by_005(synthetic):
    _, problem, predictions = synthetic
    folds = study_folds(problem.study_ids, 5, seed=0)
    cv = cross_validate(problem, predictions, folds)
    best_member = min(problem.score(p) for p in predictions)
    insample = problem.score(fit_blend(problem, predictions).apply(predictions, problem.conditions))
    assert cv.score <= best_member - 0.005
    assert cv.score >= insample - 1e-9  # held-out is never better than fitted in-sample here
    assert len(cv.blends) == 5


def test_chosen_ensemble_never_worse_than_best_member_even_with_identical_members(synthetic):
    _, problem, predictions = synthetic
    same = np.stack([predictions[2]] * 3)
    members = [fake_member(i) for i in range(3)]
    folds = study_folds(problem.study_ids, 5, seed=0)
    chosen = choose(evaluate(problem, same, members, folds, studies=700), 100.0, members, 700)
    assert chosen.cv_score <= problem.score(predictions[2]) + 1e-12


# ---------------------------------------------------------------- budget


def test_budget_keeps_sets_that_fit_and_frontier_is_monotone(synthetic):
    _, problem, predictions = synthetic
    # 1 s/study/fold, 5 folds, 720 studies -> 1 h per member
    members = [fake_member(i, seconds=1.0) for i in range(4)]
    folds = study_folds(problem.study_ids, 3, seed=0)
    candidates = evaluate(problem, predictions, members, folds, studies=720, method="caruana")
    front = frontier(candidates)
    assert [c.hours for c in front] == sorted(c.hours for c in front)
    assert all(a.cv_score > b.cv_score for a, b in zip(front, front[1:]))
    for budget in (1.0, 2.0, 4.0):
        chosen = choose(candidates, budget, members, 720)
        assert chosen.hours <= budget + 1e-9 and len(chosen.members) <= budget
        fitting = [c.cv_score for c in candidates if c.hours <= budget]
        assert chosen.cv_score == min(fitting)
    assert choose(candidates, 4.0, members, 720).cv_score < choose(candidates, 1.0, members, 720).cv_score - 0.005
    with pytest.raises(BudgetError, match="raise --budget-hours"):
        choose(candidates, 0.5, members, 720)


def test_beyond_four_members_a_backward_elimination_path_drops_the_least_value_per_hour_first():
    from spine_ml.ensemble.budget import member_sets

    truth, logits = make_truth(80, seed=2)
    problem = MetricProblem.from_truth(truth)
    scored = truth.label.to_numpy() >= 0
    noise = (1.0, 1.05, 1.1, 1.15, 1.2, 1.0)  # alike, so each adds about as much to the blend ...
    predictions = np.stack([member_predictions(logits, n, seed=i)[scored] for i, n in enumerate(noise)])
    members = [fake_member(i, seconds=10.0 if i == 5 else 1.0) for i in range(6)]  # ... but one costs 10x
    path = member_sets(problem, predictions, members, 720, "caruana")
    assert [len(s) for s in path] == [6, 5, 4, 3, 2]
    assert all(set(b) < set(a) for a, b in zip(path, path[1:]))
    # member 4 gets no weight at all (free to drop); next goes the 10x member, not a cheap one
    assert path[1] == (0, 1, 2, 3, 5) and 5 not in path[2]


# ---------------------------------------------------------------- MLflow selection and the CLI


CONFIG = """\
data:
  root: data
cv:
  folds: 3
  seed: 0
tracking:
  experiment: ens
ensemble:
  top_k: 3
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, synthetic):
    """A project with data/train.csv and an MLflow store holding member runs of different quality,
    plus runs that must never be picked (pruned, failed, a sweep parent, one without oof.csv)."""
    from mlflow import MlflowClient

    from spine_ml.config import load_config
    from spine_ml.tracking.store import ensure_experiment, tracking_uri

    root = tmp_path_factory.mktemp("ensemble_project")
    truth, logits = make_truth(240)
    (root / "data").mkdir()
    labels_to_wide(truth).to_csv(root / "data" / "train.csv", index=False)
    (root / "sweeps").mkdir()
    (root / "sweeps" / "ens.yaml").write_text(CONFIG)
    config = load_config(root / "sweeps" / "ens.yaml")
    client = MlflowClient(tracking_uri(config))
    experiment = ensure_experiment(config)
    runs = {}

    def add(name, noise, backbone="resnet10t", kind="trial", state="finished", status="FINISHED",
            oof=True, seconds=0.02):
        run = client.create_run(experiment, run_name=name, tags={"spine_ml.run_kind": kind, "spine_ml.trial_state": state})
        run_id = run.info.run_id
        client.log_param(run_id, "model.backbone", backbone)
        client.log_param(run_id, "cv.folds", "3")
        frame = normalised_frame(truth.row_id, member_predictions(logits, noise, seed=len(runs)))
        if state == "finished" and kind in ("trial", "train"):
            client.log_metric(run_id, "score", reference_score(truth, frame).score)
            client.log_metric(run_id, "inference_seconds_per_study", seconds)
        if oof:
            path = root / f"{name}-oof" / "oof.csv"
            path.parent.mkdir()
            frame.to_csv(path, index=False)
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status)
        runs[name] = run_id

    add("good", 1.0)
    add("fair", 1.2, backbone="mobilenetv3_small_050")
    add("weak", 1.4, kind="train")
    add("worst", 1.8)
    add("no-oof", 0.3, oof=False)  # the best score, but its artifact is missing: skipped with a warning
    add("pruned", 0.1, state="pruned")
    add("failed", 0.1, state="failed", status="FAILED")
    add("parent", 0.1, kind="sweep")
    return root, config, runs


def test_selection_ranks_finished_runs_and_skips_broken_ones(project, caplog):
    from spine_ml.ensemble.select import select_members

    _, config, runs = project
    with caplog.at_level(logging.WARNING):
        members = select_members(config, top_k=3)
    names = {v: k for k, v in runs.items()}
    assert [names[m.run_id] for m in members] == ["good", "fair", "weak"]
    assert runs["no-oof"] in caplog.text and "oof.csv" in caplog.text
    assert members[0].folds == 3 and members[0].hours(720) == pytest.approx(3 * 0.02 * 720 / 3600)
    per_backbone = select_members(config, top_k=3, per_backbone=1)
    assert [m.run_id for m in per_backbone] == [runs["good"], runs["fair"]]  # only two backbones exist
    explicit = select_members(config, top_k=1, run_ids=[runs["worst"], runs["pruned"], runs["good"]])
    assert [m.run_id for m in explicit] == [runs["worst"], runs["good"]]


def test_selection_errors_name_what_to_do(project, tmp_path):
    from spine_ml.ensemble.select import select_members

    _, config, _ = project
    with pytest.raises(SelectionError, match="no MLflow run 'nope'"):
        select_members(config, top_k=3, run_ids=["nope"])
    empty = config.with_updates({"tracking.experiment": "empty"})
    from spine_ml.tracking.store import ensure_experiment

    ensure_experiment(empty)
    with pytest.raises(SelectionError, match="no finished runs.*spine-ml sweep"):
        select_members(empty, top_k=3)
    with pytest.raises(SelectionError, match="no MLflow experiment 'absent'"):
        select_members(config.with_updates({"tracking.experiment": "absent"}), top_k=3)


def test_cli_fits_logs_and_reports_the_ensemble(project, capsys):
    from mlflow import MlflowClient

    from spine_ml.cli import main
    from spine_ml.tracking.store import tracking_uri

    root, config, runs = project
    code = main(["ensemble", str(root / "sweeps" / "ens.yaml"), "--no-submission", "--budget-hours", "1",
                 "--studies", "700"])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("good", "fair", "weak"):
        assert runs[name][:8] in printed
    assert "equal-weight blend" in printed and "nested CV" in printed and "score vs inference cost" in printed
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("ens")
    [run] = client.search_runs([experiment.experiment_id], "tags.`spine_ml.run_kind` = 'ensemble'")
    weights = {k.removeprefix("weight."): float(v) for k, v in run.data.params.items() if k.startswith("weight.")}
    assert set(weights) == {runs["good"], runs["fair"], runs["weak"]}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5) and min(weights.values()) >= 0
    assert run.data.metrics["score"] <= run.data.metrics["best_member_score"] - 0.005
    assert run.data.metrics["insample_score"] <= run.data.metrics["score"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ensemble.json", "oof.csv", "frontier.csv", "weights.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "ensemble.json", str(root)))
    described = json.loads(local.read_text())
    assert {m["run_id"] for m in described["members"]} <= set(weights)
    assert described["cv_score"]["score"] == pytest.approx(run.data.metrics["score"])
    # the ensemble run itself is never a member of a later ensemble
    from spine_ml.ensemble.select import select_members

    assert run.info.run_id not in {m.run_id for m in select_members(config, top_k=10)}


def test_cli_budget_too_small_is_a_clear_error(project, capsys):
    from spine_ml.cli import main

    root, _, _ = project
    code = main(["ensemble", str(root / "sweeps" / "ens.yaml"), "--no-submission", "--budget-hours", "0.001"])
    assert code == 2
    assert "raise --budget-hours" in capsys.readouterr().err


def test_submission_blends_cached_member_predictions(project, tmp_path, capsys, caplog):
    """Test predictions already stored on the member runs (keyed by test data and localizer) are
    blended with the fitted weights and temperatures, written, validated and scored on test labels."""
    from mlflow import MlflowClient

    from spine_ml.ensemble.run import EnsembleOptions, run_ensemble
    from spine_ml.ensemble.testpred import CACHE_FOLDER, prediction_key
    from spine_ml.tracking.store import tracking_uri

    root, config, runs = project
    data = root / "data"
    test_truth, test_logits = make_truth(6, seed=5)
    test_truth["study_id"] += 50_000
    test_truth["row_id"] = [V.make_row_id(s, c, lv) for s, c, lv in zip(test_truth.study_id, test_truth.condition, test_truth.level)]
    studies = sorted(test_truth.study_id.unique())
    pd.DataFrame({"study_id": studies, "series_id": [s * 10 for s in studies],
                  "series_description": V.SAGITTAL_T2}).to_csv(data / "test_series_descriptions.csv", index=False)
    labels_to_wide(test_truth).to_csv(data / "test_labels.csv", index=False)
    key = prediction_key(data, studies, "localizer-key")
    client = MlflowClient(tracking_uri(config))
    for index, (name, noise) in enumerate((("good", 1.0), ("fair", 1.2), ("weak", 1.4))):
        frame = normalised_frame(test_truth.row_id, member_predictions(test_logits, noise, seed=index))
        if name == "weak":  # stored, but broken: half its rows are gone
            frame = frame.iloc[::2]
        path = tmp_path / name / f"{key}.csv"
        path.parent.mkdir()
        frame.to_csv(path, index=False)
        client.log_artifact(runs[name], str(path), artifact_path=CACHE_FOLDER)
    out = tmp_path / "submission.csv"
    options = EnsembleOptions.from_config(config, out=out, localizer=(None, "localizer-key"), budget_hours=1.0)
    with caplog.at_level(logging.WARNING):
        outcome = run_ensemble(config, options)
    printed = capsys.readouterr().out
    assert outcome.submission == out and f"wrote {out}" in printed and "test: ensemble" in printed
    # the broken member was dropped and the weights refit over the other two
    assert f"run {runs['weak']}" in caplog.text and "refit without it" in caplog.text
    assert [m.run_id for m in outcome.summary.members] == [runs["good"], runs["fair"]]
    submission = pd.read_csv(out)
    assert len(submission) == 25 * len(studies)
    assert np.allclose(submission[list(V.PROBABILITY_COLUMNS)].sum(1), 1.0, atol=1e-6)
    # the file is exactly the chosen blend of the cached member predictions
    from spine_ml.ensemble.objective import CONDITION_INDEX, align_predictions

    chosen = outcome.summary.chosen
    row_ids = submission.row_id.to_numpy()
    cached = np.zeros((2, len(row_ids), 3))
    for index, (name, noise) in enumerate((("good", 1.0), ("fair", 1.2))):
        frame = normalised_frame(test_truth.row_id, member_predictions(test_logits, noise, seed=index))
        cached[[m.run_id for m in outcome.summary.members].index(runs[name])] = align_predictions(frame, row_ids, name)
    conditions = np.array([CONDITION_INDEX[V.parse_row_id(r)[1]] for r in row_ids])
    expected = chosen.blend.apply(cached, conditions)
    assert np.allclose(submission[list(V.PROBABILITY_COLUMNS)].to_numpy(), expected, atol=1e-6)
    assert outcome.summary.test_parts["ensemble"]["score"] > 0
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert "submission.csv" in artifacts


LOCALIZER_SETTINGS = """\
localizer:
  input_px: 64
  epochs: 2
  batch_size: 32
  holdout_fraction: 0.25
predict:
  crops_dir: data/test-crops
"""


@pytest.mark.slow
def test_two_trained_runs_ensembled_through_the_cli(tiny_project, tmp_path, capsys, monkeypatch):
    """Real end to end: two `spine-ml train` runs and a localizer on the tiny data set, then
    `spine-ml ensemble` writes a validated submission; a second ensemble reuses the stored test
    predictions of the members instead of predicting again."""
    from mlflow import MlflowClient

    from spine_ml.cli import main
    from spine_ml.config import load_config
    from spine_ml.ensemble.select import TEST_PREDICTIONS_ARTIFACT
    from spine_ml.tracking.store import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config_path = tiny_project / "sweeps" / "tiny.yaml"
    config_path.write_text(config_path.read_text() + LOCALIZER_SETTINGS)
    assert main(["-q", "train", str(config_path), "--set", "train.max_batches_per_epoch=2"]) == 0
    assert main(["-q", "train", str(config_path), "--set", "train.max_batches_per_epoch=2",
                 "--set", "model.crop_px=16", "--set", "train.seed=1"]) == 0
    assert main(["-q", "train-localizer", str(config_path)]) == 0
    capsys.readouterr()

    out = tmp_path / "submission.csv"
    assert main(["-q", "ensemble", str(config_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "test: ensemble" in printed  # tiny data ships test_labels.csv
    config = load_config(config_path)
    assert main(["validate", str(out), "--data", str(config.path(config.data.root))]) == 0

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    members = client.search_runs([experiment.experiment_id], "tags.`spine_ml.run_kind` = 'train'")
    assert len(members) == 2
    [ensemble] = client.search_runs([experiment.experiment_id], "tags.`spine_ml.run_kind` = 'ensemble'")
    kept = ensemble.data.tags["spine_ml.members"].split(",")
    assert set(kept) <= {m.info.run_id for m in members}
    assert ensemble.data.metrics["score"] <= ensemble.data.metrics["best_member_score"] + 1e-9
    for run_id in kept:
        assert client.list_artifacts(run_id, TEST_PREDICTIONS_ARTIFACT)

    # Again, with other weights (caruana would do, but a budget change is what users make): cached.
    again = tmp_path / "again.csv"
    assert main(["ensemble", str(config_path), "--out", str(again), "--budget-hours", "50"]) == 0
    assert "predicting" not in capsys.readouterr().err
