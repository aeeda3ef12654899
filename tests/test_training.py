"""Training: the loss, the prior, device handling, run_trial over real synthetic data, `spine-ml train`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from spine_ml.competition import metric
from spine_ml.competition import vocabulary as V
from spine_ml.competition.tables import read_train_labels
from spine_ml.config import Config
from spine_ml.training.device import DeviceError, cap_threads, resolve_device
from spine_ml.training.loop import make_optimizer, make_scheduler
from spine_ml.training.losses import SeverityLoss, any_severe_loss
from spine_ml.training.prior import gap_closed, prior_submission, prior_table, train_prior_submission

from conftest import REAL_LABELS

SPINAL, LEFT_FORAMINAL, LEFT_SUBARTICULAR = 0, 1, 3


def loss_config(**updates):
    return Config().loss.model_copy(update=updates)


def test_weighted_cross_entropy_matches_the_metrics_weighting():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 2, -1, 0])
    conditions = torch.tensor([SPINAL, LEFT_FORAMINAL, LEFT_SUBARTICULAR, SPINAL, SPINAL, LEFT_SUBARTICULAR])
    loss = SeverityLoss(loss_config(group_weights={"spinal": 2.0, "foraminal": 1.0, "subarticular": 0.5}))
    probs = torch.softmax(logits, 1).numpy()
    weights = np.array([1 * 2, 2 * 1, 4 * 0.5, 4 * 2, 0, 1 * 0.5])  # class weight x group weight; -1 -> 0
    expected = metric.weighted_log_loss(labels.clamp(min=0).numpy(), probs, weights)
    assert float(loss(logits, labels, conditions)) == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_raises_the_loss_of_confident_right_answers():
    logits = torch.tensor([[8.0, 0.0, 0.0]])
    labels, conditions = torch.tensor([0]), torch.tensor([SPINAL])
    plain = float(SeverityLoss(loss_config())(logits, labels, conditions))
    smooth = float(SeverityLoss(loss_config(label_smoothing=0.1))(logits, labels, conditions))
    assert smooth > plain + 0.05


def test_any_severe_term_is_the_metrics_study_level_log_loss():
    torch.manual_seed(1)
    studies = torch.tensor([7, 7, 7, 9, 9, 9, 9])
    conditions = torch.tensor([SPINAL, SPINAL, LEFT_FORAMINAL, SPINAL, SPINAL, SPINAL, LEFT_SUBARTICULAR])
    labels = torch.tensor([0, 2, 2, 0, 1, 0, 2])  # study 7: spinal severe; study 9: no spinal severe
    logits = torch.randn(7, 3, requires_grad=True)
    value = any_severe_loss(logits, labels, conditions, studies, torch.tensor([1.0, 2.0, 4.0]),
                            torch.tensor([0, 1, 1, 2, 2]))
    p_severe = torch.softmax(logits, 1)[:, 2].detach().numpy()
    expected = metric.binary_log_loss(np.array([1.0, 0.0]), np.array([p_severe[:2].max(), p_severe[3:6].max()]),
                                      np.array([4.0, 2.0]))  # weight = the study's max spinal sample weight
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[6].abs().sum() == 0  # not spinal: no gradient


def test_any_severe_weight_adds_the_term_and_survives_batches_without_spinal():
    logits = torch.randn(4, 3)
    labels, studies = torch.tensor([2, 0, 1, 0]), torch.tensor([1, 1, 2, 2])
    spinal = torch.tensor([SPINAL, SPINAL, SPINAL, LEFT_FORAMINAL])
    base = float(SeverityLoss(loss_config())(logits, labels, spinal, studies))
    with_term = float(SeverityLoss(loss_config(any_severe_weight=0.5))(logits, labels, spinal, studies))
    assert with_term > base
    no_spinal = torch.full((4,), LEFT_FORAMINAL)
    value = SeverityLoss(loss_config(any_severe_weight=0.5))(logits, labels, no_spinal, studies)
    assert math.isfinite(float(value))


@pytest.mark.skipif(not (REAL_LABELS / "train.csv").is_file(), reason="public train.csv copy not present")
def test_best_constant_prior_scores_the_reference_figure_on_real_labels():
    truth = read_train_labels(REAL_LABELS / "train.csv")
    score = metric.score(truth, prior_submission(truth)).score
    assert score == pytest.approx(0.790, abs=0.0015)  # ../shared/reference/competition.md


def test_prior_is_class_frequency_times_sample_weight():
    truth = pd.DataFrame({"condition": ["spinal_canal_stenosis"] * 4, "level": ["l1_l2"] * 4, "label": [0, 0, 1, -1]})
    table = prior_table(truth)
    np.testing.assert_allclose(table.loc[("spinal_canal_stenosis", "l1_l2")].to_numpy(), [2 / 4, 2 / 4, 0])
    np.testing.assert_allclose(table.loc[("spinal_canal_stenosis", "l2_l3")].to_numpy(), [1 / 3] * 3)  # no labels
    smoothed = prior_table(truth, pseudo_count=0.5).loc[("spinal_canal_stenosis", "l1_l2")].to_numpy()
    assert smoothed[2] > 0 and smoothed.sum() == pytest.approx(1)
    assert gap_closed(0.4, prior=0.8, oracle=0.3) == pytest.approx(0.8)
    assert gap_closed(0.4, prior=0.8, oracle=None) is None


def test_train_prior_submission_scores_test_rows_with_the_train_frequencies():
    """The test split's "prior" end: train labels (2 normal, 1 moderate) with the fill pseudo-count
    0.5, weighted 1/2/4: (2.5, 3.0, 2.0) / 7.5, whatever the test labels are."""
    train = pd.DataFrame({"condition": ["spinal_canal_stenosis"] * 3, "level": ["l1_l2"] * 3, "label": [0, 0, 1]})
    truth = pd.DataFrame({"row_id": ["7_spinal_canal_stenosis_l1_l2"], "study_id": [7],
                          "condition": ["spinal_canal_stenosis"], "level": ["l1_l2"], "label": [2]})
    frame = train_prior_submission(truth, train)
    assert list(frame.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    np.testing.assert_allclose(frame.iloc[0, 1:].to_numpy(np.float64), [2.5 / 7.5, 3.0 / 7.5, 2.0 / 7.5])


def test_schedules_shape_the_learning_rate():
    model = torch.nn.Linear(2, 2)
    for schedule, check in (("cosine", lambda lrs: lrs[0] == 1e-3 and lrs[-1] < 1e-4),
                            ("onecycle", lambda lrs: max(lrs) == pytest.approx(1e-3) and lrs[0] < 1e-4),
                            ("constant", lambda lrs: set(lrs) == {1e-3})):
        train = Config().train.model_copy(update={"schedule": schedule, "lr": 1e-3})
        optimizer = make_optimizer(model, train)
        scheduler = make_scheduler(optimizer, train, total_steps=20)
        lrs = []
        for _ in range(20):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        assert check(lrs), (schedule, lrs)


def test_device_auto_and_missing_cuda():
    train = Config().train
    assert resolve_device(train).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="train.device"):
            resolve_device(train.model_copy(update={"device": "cuda"}))


def test_thread_count_chosen_by_the_caller_is_kept():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cap_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- run_trial and `spine-ml train` on the real pipeline: synthetic DICOM -> crop cache -> timm ---

@pytest.fixture()
def tiny_cache(tiny_config):
    from spine_ml.prepare.cache import ensure_cache

    return ensure_cache(tiny_config, progress=False)


def test_run_trial_gives_scored_oof_for_every_row_and_reloadable_checkpoints(tiny_config, tiny_cache, tmp_path):
    from spine_ml.competition.commands import read_submission
    from spine_ml.models.classifier import load_fold_models
    from spine_ml.training.trial import TRUTH_COLUMNS, run_trial

    config = tiny_config.with_updates({"train.epochs": 2, "train.max_batches_per_epoch": 2})
    reports = []
    result = run_trial(config, tmp_path / "trial", on_epoch=reports.append, cache=tiny_cache)
    index = tiny_cache.index

    assert [(r.fold, r.epoch) for r in reports] == [(0, 1), (0, 2), (1, 1), (1, 2)]  # fold 0 first, all epochs
    assert all(math.isfinite(r.val_score) and r.val_score == r.val_parts["score"] for r in reports)
    assert len(result.history) == 4 and result.best_epochs and all(e in (1, 2) for e in result.best_epochs)
    assert set(result.metrics) == set(V.METRIC_PARTS)

    studies = index.study_id.unique()
    assert sorted(result.oof.row_id) == sorted(r for s in studies for r in V.study_row_ids(s))
    values = result.oof[list(V.PROBABILITY_COLUMNS)].to_numpy()
    assert np.isfinite(values).all() and np.allclose(values.sum(1), 1)
    on_disk = read_submission(str(result.oof_path))
    truth = index.loc[index.label >= 0, TRUTH_COLUMNS]
    rescored = metric.score(truth, on_disk).as_dict()
    for name in V.METRIC_PARTS:
        assert rescored[name] == pytest.approx(result.metrics[name], abs=1e-6)

    # a row without a sample carries its fold's training prior, not a model output
    no_sample = index[index["sample"] < 0]
    if len(no_sample):
        row = no_sample.iloc[0]
        table = prior_table(index[index.fold != row.fold], pseudo_count=0.5)
        expected = table.loc[(row.condition, row.level)].to_numpy()
        got = result.oof.set_index("row_id").loc[row.row_id, list(V.PROBABILITY_COLUMNS)].to_numpy(float)
        np.testing.assert_allclose(got, expected, rtol=1e-6)

    assert [p.name for p in result.checkpoints] == ["fold0.pt", "fold1.pt"]
    models = load_fold_models(result.checkpoints, config)
    assert len(models) == 2 and result.inference_seconds_per_study > 0 and result.device == "cpu"


def test_same_seed_same_oof_on_cpu(tiny_config, tiny_cache, tmp_path):
    from spine_ml.training.trial import run_trial

    config = tiny_config.with_updates({"train.max_batches_per_epoch": 1})
    first = run_trial(config, tmp_path / "a", cache=tiny_cache)
    second = run_trial(config, tmp_path / "b", cache=tiny_cache)
    pd.testing.assert_frame_equal(first.oof, second.oof)
    other = run_trial(config.with_updates({"train.seed": 7}), tmp_path / "c", cache=tiny_cache)
    assert not np.allclose(first.oof[list(V.PROBABILITY_COLUMNS)], other.oof[list(V.PROBABILITY_COLUMNS)])


def test_every_option_trains(tiny_config, tiny_cache, tmp_path):
    from spine_ml.training.trial import run_trial

    config = tiny_config.with_updates({
        "model.slice_pooling": "attention", "model.crop_px": 16, "model.input_px": 32, "model.drop_rate": 0.2,
        "loss.any_severe_weight": 0.5, "loss.label_smoothing": 0.05, "loss.class_weights": [1.0, 1.5, 3.0],
        "loss.group_weights": {"spinal": 2.0}, "train.schedule": "onecycle", "train.ema": 0.9,
        "train.grad_clip": None, "train.max_batches_per_epoch": 3})
    result = run_trial(config, tmp_path / "t", cache=tiny_cache)
    assert math.isfinite(result.metrics["score"])


def test_callback_abort_propagates_and_leaves_no_oof(tiny_config, tiny_cache, tmp_path):
    from spine_ml.training.trial import run_trial

    class Pruned(Exception):
        pass

    def prune(report):
        raise Pruned(f"fold {report.fold} epoch {report.epoch}")

    with pytest.raises(Pruned, match="fold 0 epoch 1"):
        run_trial(tiny_config.with_updates({"train.max_batches_per_epoch": 1}), tmp_path / "t", on_epoch=prune,
                  cache=tiny_cache)
    assert not (tmp_path / "t" / "oof.csv").exists() and not list(tmp_path.glob("t/checkpoints/*.pt"))


def test_nan_loss_fails_the_trial_naming_fold_and_epoch(tiny_config, tiny_cache, tmp_path):
    from spine_ml.training.result import TrialFailed
    from spine_ml.training.trial import run_trial

    config = tiny_config.with_updates({"train.lr": 1e30, "train.grad_clip": None, "train.schedule": "constant"})
    with pytest.raises(TrialFailed, match="fold 0 epoch 1") as error:
        run_trial(config, tmp_path / "t", cache=tiny_cache)
    assert "train.lr" in str(error.value)


def test_crop_larger_than_the_cached_patch_names_both(tiny_config, tiny_cache, tmp_path):
    from spine_ml.errors import UserError
    from spine_ml.training.trial import run_trial

    with pytest.raises(UserError, match=r"crop_px=40.*32 px"):
        run_trial(tiny_config.with_updates({"model.crop_px": 40}), tmp_path / "t", cache=tiny_cache)


def test_spine_ml_train_end_to_end_logs_one_mlflow_run(tiny_project, capsys, monkeypatch):
    from mlflow import MlflowClient

    from spine_ml.cli import main
    from spine_ml.config import load_config
    from spine_ml.tracking.store import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config_path = tiny_project / "sweeps" / "tiny.yaml"
    assert main(["train", str(config_path), "--set", "train.max_batches_per_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert "OOF score" in out and "spine-ml ui" in out
    run_id = out.split("MLflow run ")[1].split()[0]
    assert "oracle" in out and "of the prior->oracle gap" in out  # synthetic data ships oracle_train.csv

    config = load_config(config_path)
    run = MlflowClient(tracking_uri(config)).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["spine_ml.run_kind"] == "train"
    assert set(V.METRIC_PARTS) <= set(run.data.metrics) and run.data.params["model.backbone"] == "resnet10t"
    assert (tiny_project / "mlruns" / "mlflow.db").is_file()

    assert main(["train", str(config_path), "--set", "model.backbone=resnet10x"]) == 2
    assert "close timm names" in capsys.readouterr().err
