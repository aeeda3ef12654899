"""The severity classifier: a timm backbone reading a 2.5D crop, one head per condition group.

One model grades all five conditions: each sample's condition picks the head of its group
(spinal / foraminal / subarticular). Left and right share a head because a left/right flip turns
one into the other (the dataset swaps the condition when it flips).

Slices reach the backbone in one of three ways (``model.slice_pooling``):
- ``channels``: the k slices are the k input channels of one 2D backbone (cheapest);
- ``mean``: each slice goes through the backbone alone (1 channel), features are averaged;
- ``attention``: as ``mean`` but with learned softmax weights over slices.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError

if TYPE_CHECKING:
    from spine_ml.config import Config, ModelConfig

# Condition index (into vocabulary.CONDITIONS) -> group index (into vocabulary.GROUPS).
CONDITION_GROUP: tuple[int, ...] = tuple(V.GROUPS.index(V.condition_group(c)) for c in V.CONDITIONS)
NUM_CLASSES = len(V.SEVERITIES)


class ModelError(UserError):
    """A model setting that cannot be built (unknown backbone, unreachable weights, bad checkpoint)."""


class SpineClassifier(nn.Module):
    """(images (B, slices, H, W), condition_index (B,)) -> logits (B, 3)."""

    def __init__(self, backbone: nn.Module, slices: int, slice_pooling: str, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.slices = slices
        self.slice_pooling = slice_pooling
        # timm's pooled output width: head_hidden_size where a pre-logits layer follows the pooling
        # (MobileNetV3's conv_head gives 1024 from 288 channels), num_features otherwise
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.slice_attention = nn.Linear(features, 1) if slice_pooling == "attention" else None
        self.dropout = nn.Dropout(drop_rate)
        # All group heads as one linear layer: one matmul instead of three, then a gather.
        self.heads = nn.Linear(features, len(V.GROUPS) * NUM_CLASSES)
        self.register_buffer("condition_group", torch.tensor(CONDITION_GROUP, dtype=torch.long), persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.slice_pooling == "channels":
            return self.backbone(images)
        batch, slices = images.shape[:2]
        per_slice = self.backbone(images.reshape(batch * slices, 1, *images.shape[2:]))
        per_slice = per_slice.reshape(batch, slices, -1)
        if self.slice_attention is None:
            return per_slice.mean(1)
        weights = torch.softmax(self.slice_attention(per_slice), dim=1)
        return (weights * per_slice).sum(1)

    def forward(self, images: torch.Tensor, condition_index: torch.Tensor) -> torch.Tensor:
        logits = self.heads(self.dropout(self.features(images)))
        logits = logits.reshape(len(images), len(V.GROUPS), NUM_CLASSES)
        group = self.condition_group[condition_index].reshape(-1, 1, 1).expand(-1, 1, NUM_CLASSES)
        return logits.gather(1, group).squeeze(1)


def check_backbone_name(name: str) -> None:
    """Unknown timm names fail loudly with the closest names timm knows."""
    import timm

    if timm.is_model(name):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.5)
    hint = f"close timm names: {', '.join(close)}" if close else "see timm.list_models() for the names timm knows"
    raise ModelError(f"model.backbone: unknown timm model {name!r}; {hint}")


def create_backbone(model_cfg: ModelConfig, in_chans: int, project_root: Path | None = None) -> nn.Module:
    """A timm backbone without its classifier (num_classes=0) for `in_chans` input channels.

    ``model.checkpoint`` loads a local weights file through timm's own pretrained loader, which
    adapts the first convolution to `in_chans` and drops the ImageNet classifier.
    """
    import timm

    check_backbone_name(model_cfg.backbone)
    # Dropout lives in our head (SpineClassifier.dropout), not twice in timm's pooled features.
    common = dict(num_classes=0, in_chans=in_chans)
    if model_cfg.checkpoint is not None:
        path = Path(model_cfg.checkpoint)
        if not path.is_absolute() and project_root is not None:
            path = (project_root / path).resolve()
        if not path.is_file():
            raise ModelError(f"model.checkpoint: {path} not found (a local weights file for {model_cfg.backbone})")
        try:
            return timm.create_model(model_cfg.backbone, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(path)), **common)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            raise ModelError(f"model.checkpoint: {path} does not fit {model_cfg.backbone}: {error}") from None
    if not model_cfg.pretrained:
        return timm.create_model(model_cfg.backbone, pretrained=False, **common)
    advice = (f"Download them where there is internet and set model.checkpoint to the local file, set "
              f"HF_HUB_OFFLINE=1 if they are in the local Hugging Face cache, or set model.pretrained=false.")
    unreachable = _hub_unreachable()
    if unreachable:  # fail in seconds rather than after the hub client's minute of retries
        raise ModelError(f"model.pretrained: true but the pretrained weights of {model_cfg.backbone} cannot be "
                         f"fetched here: {unreachable}. {advice}")
    try:
        return timm.create_model(model_cfg.backbone, pretrained=True, **common)
    except Exception as error:  # hub/network failures come in many types (OSError, HTTPError, LocalEntryNotFound)
        raise ModelError(
            f"model.pretrained: true but the pretrained weights of {model_cfg.backbone} cannot be fetched "
            f"here ({type(error).__name__}: {str(error)[:200]}). {advice}"
        ) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (None when it can, or when the user chose offline mode)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # weights come from the local cache; timm reports a miss itself
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port} is unreachable ({error})"
    return None


def build_classifier(model_cfg: ModelConfig, slices: int, project_root: Path | None = None) -> SpineClassifier:
    """The classifier for crops of `slices` slices, per the model section of the config."""
    in_chans = slices if model_cfg.slice_pooling == "channels" else 1
    backbone = create_backbone(model_cfg, in_chans, project_root)
    return SpineClassifier(backbone, slices, model_cfg.slice_pooling, model_cfg.drop_rate)


def load_fold_models(checkpoint_paths: Sequence[Path | str], config: Config,
                     device: torch.device | str = "cpu") -> list[SpineClassifier]:
    """The fold models of a trial, in eval mode on `device` (weights-only checkpoints)."""
    # The checkpoint holds every weight, so the backbone is built bare: no hub, no local file needed.
    import pickle  # only for its error type: torch refuses non-weights objects with UnpicklingError

    bare = config.model.model_copy(update={"pretrained": False, "checkpoint": None})
    models = []
    for path in checkpoint_paths:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"fold checkpoint {path} not found")
        model = build_classifier(bare, config.prepare.slices)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:  # pickle/size mismatches
            raise ModelError(f"fold checkpoint {path} does not fit {config.model.backbone} "
                             f"(slices={config.prepare.slices}, pooling={config.model.slice_pooling}): {error}") from None
        models.append(model.to(device).eval())
    return models
