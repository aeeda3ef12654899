"""The classifier: timm backbones, slice pooling, per-group heads, loud errors, checkpoints."""
from __future__ import annotations

import time

import pytest
import torch

from spine_ml.competition import vocabulary as V
from spine_ml.config import Config
from spine_ml.models.classifier import CONDITION_GROUP, ModelError, build_classifier, load_fold_models

SPINAL = V.CONDITIONS.index("spinal_canal_stenosis")
LEFT_FORAMINAL = V.CONDITIONS.index("left_neural_foraminal_narrowing")
RIGHT_FORAMINAL = V.CONDITIONS.index("right_neural_foraminal_narrowing")
LEFT_SUBARTICULAR = V.CONDITIONS.index("left_subarticular_stenosis")


def model_config(**updates):
    return Config().model.model_copy(update={"backbone": "resnet10t", **updates})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_condition_groups_follow_the_vocabulary():
    assert [V.GROUPS[g] for g in CONDITION_GROUP] == ["spinal", "foraminal", "foraminal", "subarticular", "subarticular"]


@pytest.mark.parametrize("pooling", ["channels", "mean", "attention"])
def test_forward_gives_three_logits_per_sample_for_each_pooling(pooling):
    model = build_classifier(model_config(slice_pooling=pooling), slices=3).eval()
    images = torch.randn(4, 3, 32, 32)
    logits = model(images, torch.tensor([SPINAL, LEFT_FORAMINAL, RIGHT_FORAMINAL, LEFT_SUBARTICULAR]))
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits).all()
    in_chans = 3 if pooling == "channels" else 1
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == in_chans


def test_each_condition_uses_its_groups_head():
    model = build_classifier(model_config(), slices=3).eval()
    image = torch.randn(1, 3, 32, 32).expand(5, -1, -1, -1)
    with torch.no_grad():
        logits = model(image, torch.arange(5))
        features = model.features(image[:1])
        all_heads = model.heads(features).reshape(3, 3)
    for condition in range(5):
        torch.testing.assert_close(logits[condition], all_heads[CONDITION_GROUP[condition]])
    # left and right share a head; spinal, foraminal and subarticular do not
    torch.testing.assert_close(logits[LEFT_FORAMINAL], logits[RIGHT_FORAMINAL])
    assert not torch.allclose(logits[SPINAL], logits[LEFT_FORAMINAL])
    assert not torch.allclose(logits[LEFT_FORAMINAL], logits[LEFT_SUBARTICULAR])


def test_attention_pooling_weights_slices_and_gets_gradients():
    model = build_classifier(model_config(slice_pooling="attention"), slices=5)
    logits = model(torch.randn(3, 5, 32, 32), torch.tensor([0, 1, 3]))
    logits.sum().backward()
    assert model.slice_attention.weight.grad is not None and model.slice_attention.weight.grad.abs().sum() > 0


def test_unknown_backbone_lists_close_timm_names():
    with pytest.raises(ModelError) as error:
        build_classifier(model_config(backbone="resnet10x"), slices=3)
    message = str(error.value)
    assert "model.backbone" in message and "resnet10x" in message and "resnet10t" in message


def test_pretrained_without_hub_access_fails_fast_pointing_to_checkpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelError) as error:
        build_classifier(model_config(pretrained=True), slices=3)
    assert time.perf_counter() - start < 10
    assert "model.checkpoint" in str(error.value) and "resnet10t" in str(error.value)


def test_local_checkpoint_loads_backbone_weights_and_adapts_input_channels(tmp_path):
    import timm

    imagenet_like = timm.create_model("resnet10t", pretrained=False)  # 3 channels, 1000 classes
    path = tmp_path / "resnet10t.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = build_classifier(model_config(checkpoint=path), slices=5)
    torch.testing.assert_close(model.backbone.layer2[0].conv1.weight, imagenet_like.layer2[0].conv1.weight)
    assert model.backbone.conv1[0].weight.shape[1] == 5

    with pytest.raises(ModelError, match="not found"):
        build_classifier(model_config(checkpoint=tmp_path / "missing.pth"), slices=5)
    with pytest.raises(ModelError, match="does not fit resnet18"):
        build_classifier(model_config(backbone="resnet18", checkpoint=path), slices=5)


def test_fold_checkpoints_round_trip_weights_only(tmp_path):
    config = Config().with_updates({"model.backbone": "resnet10t", "prepare.slices": 3,
                                    "model.slice_pooling": "mean"})
    trained = build_classifier(config.model, slices=3).eval()
    path = tmp_path / "fold0.pt"
    torch.save(trained.state_dict(), path)
    images, conditions = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    [loaded] = load_fold_models([path], config)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, conditions), trained(images, conditions))
    with pytest.raises(ModelError, match="does not fit"):
        load_fold_models([path], config.with_updates({"model.slice_pooling": "attention"}))
