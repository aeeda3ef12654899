"""The training loss; its weights are the "loss weights" the sweep samples.

- weighted cross-entropy: per-class weights (``loss.class_weights``, the metric's 1/2/4 by default)
  times a weight per condition group (``loss.group_weights``), normalised by the weight sum like the
  metric's sklearn log loss; optional label smoothing;
- optional auxiliary any_severe_spinal term (``loss.any_severe_weight``): the metric's study-level
  binary log loss, computed over the spinal samples of each study present in the batch (prediction =
  max severe probability, target = any severe, weight = max sample weight, exactly as the metric
  aggregates a study). A batch rarely holds all five levels of a study, so this is the metric's term
  on the visible part of each study; it still pulls the severe column towards calibrated study-level
  maxima, which is what the any_severe part of the score rewards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from spine_ml.competition import vocabulary as V
from spine_ml.models.classifier import CONDITION_GROUP

if TYPE_CHECKING:
    from spine_ml.config import LossConfig

SEVERE = V.SEVERITIES.index("Severe")
SPINAL_GROUP = V.GROUPS.index("spinal")


class SeverityLoss(nn.Module):
    """loss(logits (B,3), labels (B,), conditions (B,), studies (B,) or None) -> scalar tensor.

    Labels of -1 (no truth) carry no weight.
    """

    def __init__(self, loss_cfg: LossConfig):
        super().__init__()
        group_weights = [float(loss_cfg.group_weights.get(g, 1.0)) for g in V.GROUPS]
        self.register_buffer("class_weights", torch.tensor(loss_cfg.class_weights, dtype=torch.float32))
        self.register_buffer("group_weights", torch.tensor(group_weights, dtype=torch.float32))
        self.register_buffer("condition_group", torch.tensor(CONDITION_GROUP, dtype=torch.long))
        self.label_smoothing = float(loss_cfg.label_smoothing)
        self.any_severe_weight = float(loss_cfg.any_severe_weight)

    def sample_weights(self, labels: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        known = labels >= 0
        weights = self.class_weights[labels.clamp(min=0)] * self.group_weights[self.condition_group[conditions]]
        return weights * known

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, conditions: torch.Tensor,
                studies: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 even under bf16 autocast
        weights = self.sample_weights(labels, conditions)
        per_sample = F.cross_entropy(logits, labels.clamp(min=0), reduction="none",
                                     label_smoothing=self.label_smoothing)
        loss = (weights * per_sample).sum() / weights.sum().clamp_min(1e-12)
        if self.any_severe_weight > 0 and studies is not None:
            loss = loss + self.any_severe_weight * any_severe_loss(
                logits, labels, conditions, studies, self.class_weights, self.condition_group)
        return loss


def any_severe_loss(logits: torch.Tensor, labels: torch.Tensor, conditions: torch.Tensor, studies: torch.Tensor,
                    class_weights: torch.Tensor, condition_group: torch.Tensor) -> torch.Tensor:
    """The metric's any_severe_spinal binary log loss over the studies whose spinal samples are in the batch."""
    spinal = (condition_group[conditions] == SPINAL_GROUP) & (labels >= 0)
    log_probs = torch.log_softmax(logits, dim=1)
    # log p(severe) and log(1 - p(severe)) from logits, without subtracting probabilities.
    log_severe = log_probs[:, SEVERE]
    log_not_severe = torch.logsumexp(torch.cat([log_probs[:, :SEVERE], log_probs[:, SEVERE + 1:]], 1), dim=1)
    # Work on all rows with masks (no boolean indexing: keeps shapes static and avoids a host sync).
    _, study_slot = torch.unique(studies, return_inverse=True)
    slots = len(studies)
    neg_inf = torch.full((slots,), float("-inf"), device=logits.device)
    pos_inf = torch.full((slots,), float("inf"), device=logits.device)
    masked_severe = torch.where(spinal, log_severe, torch.full_like(log_severe, float("-inf")))
    masked_not = torch.where(spinal, log_not_severe, torch.full_like(log_not_severe, float("inf")))
    # The study's prediction is its max severe probability: max of log p, min of log(1 - p) (monotone).
    study_log_severe = neg_inf.scatter_reduce(0, study_slot, masked_severe, "amax")
    study_log_not = pos_inf.scatter_reduce(0, study_slot, masked_not, "amin")
    zero = torch.zeros(slots, device=logits.device)
    target = zero.scatter_reduce(0, study_slot, ((labels == SEVERE) & spinal).float(), "amax")
    row_weight = class_weights[labels.clamp(min=0)] * spinal
    weight = zero.scatter_reduce(0, study_slot, row_weight, "amax")
    present = weight > 0
    # Slots without spinal samples hold ±inf; zero them before the product so no NaN leaks into grads.
    study_log_severe = torch.where(present, study_log_severe, zero)
    study_log_not = torch.where(present, study_log_not, zero)
    losses = -(target * study_log_severe + (1 - target) * study_log_not)
    return (weight * losses).sum() / weight.sum().clamp_min(1e-12)
