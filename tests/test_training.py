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
from spine_ml.training.prior import gap_closed, prior_submission, prior_table

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
