"""Patch whitening and frozen layers: the filters whiten, specs that cannot work fail clearly,
trainable=False freezes weights (and BatchNorm statistics) the way Keras does."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cnnlab.config import TrainConfig
from cnnlab.data.types import ImageSet
from cnnlab.errors import ModelSpecError
from cnnlab.inference import Preprocessing
from cnnlab.models import (
    BatchNormalization,
    Conv2D,
    Dense,
    Flatten,
    GlobalMaxPooling2D,
    MaxPool2D,
    build_model,
    parse_spec,
    preset_layers,
    spec_to_list,
    summarize,
)
from cnnlab.models.whitening import patch_covariance, whitening_filters
from cnnlab.training.loop import Trainer


def smooth_images(n: int = 64, size: int = 12, channels: int = 1) -> torch.Tensor:
    """Blurred noise in [0, 1]: neighbouring pixels correlate, as in real images."""
    torch.manual_seed(0)
    noise = torch.rand(n, channels, size + 2, size + 2)
    return F.avg_pool2d(noise, 3, stride=1)  # (n, channels, size, size)


def whitening_net(filters: int = 18, channels: int = 1, **conv) -> list:
    return [
        Conv2D(filters, 3, kernel_initializer="patch_whitening", trainable=False, **conv),
        MaxPool2D(2),
        Flatten(),
        Dense(3),
    ]


def test_whitening_filters_decorrelate_patches_and_come_in_opposite_pairs():
    images = smooth_images()
    model = build_model(whitening_net(), (1, 12, 12), 3)
    conv = model.layers[0]
    filters = whitening_filters(patch_covariance(images, conv), conv)
    plus, minus = filters[:9], filters[9:]
    assert torch.equal(minus, -plus)
    # The nine "plus" responses over all valid patches: unit variance, no correlation.
    responses = F.conv2d(images.double(), plus.double()).transpose(0, 1).reshape(9, -1)
    covariance = responses @ responses.T / responses.shape[1]
    eigenvalues = torch.linalg.eigvalsh(patch_covariance(images, conv))
    expected = torch.diag((eigenvalues / (eigenvalues + 5e-4)).flip(0))
    assert torch.allclose(covariance, expected, atol=1e-6)
    assert (covariance.diagonal()[:3] > 0.9).all()  # the strong directions come out at ~1


def test_fewer_filters_keep_the_strongest_directions_with_both_signs():
    images = smooth_images(channels=3)
    model = build_model(whitening_net(filters=5), (3, 12, 12), 3)
    conv = model.layers[0]
    full = build_model(whitening_net(filters=54), (3, 12, 12), 3).layers[0]
    covariance = patch_covariance(images, conv)
    five, all_54 = whitening_filters(covariance, conv), whitening_filters(covariance, full)
    assert five.shape == (5, 3, 3, 3)
    assert torch.allclose(five[:3], all_54[:3]) and torch.allclose(five[3:], -all_54[:2])


def test_too_many_filters_and_too_small_inputs_are_clear_spec_errors():
    with pytest.raises(ModelSpecError, match=r"at most 18 filters for a 3x3 kernel on 1 input"):
        build_model(whitening_net(filters=24), (1, 12, 12), 3)
    with pytest.raises(ModelSpecError, match=r"takes 3x3 patches from inside its input of 2x2"):
        build_model(whitening_net(padding="same"), (1, 2, 2), 3)


def test_patch_whitening_is_for_conv_kernels_only():
    with pytest.raises(ModelSpecError, match=r"patch_whitening is for Conv2D kernels only"):
        Dense(3, kernel_initializer="patch_whitening")
    with pytest.raises(ModelSpecError, match=r"unknown bias_initializer 'patch_whitening'"):
        Conv2D(4, 3, bias_initializer="patch_whitening")
    with pytest.raises(ModelSpecError, match=r"trainable must be true or false"):
        Conv2D(4, 3, trainable="no")


def test_trainable_false_freezes_weights_and_survives_the_yaml_round_trip():
    layers = whitening_net()
    model = build_model(layers, (1, 12, 12), 3)
    assert not model.layers[0].weight.requires_grad
    assert all(p.requires_grad for p in model.layers[-1].parameters())
    summary = summarize(layers, (1, 12, 12), 3)
    assert summary.non_trainable_params == 18 * 9 + 18  # kernel and bias
    specs = parse_spec(spec_to_list(parse_spec(layers)))
    assert specs[0].args["trainable"] is False
    assert specs[0].args["kernel_initializer"] == "patch_whitening"


def test_a_frozen_batchnorm_normalises_with_its_moving_statistics_as_in_keras():
    layers = [
        Conv2D(4, 3),
        BatchNormalization(trainable=False),
        GlobalMaxPooling2D(),
        Dense(3),
    ]
    model = build_model(layers, (1, 8, 8), 3)
    norm = model.layers[1]
    model.train()
    assert model.training and not norm.training
    before = norm.running_mean.clone()
    model(torch.rand(4, 1, 8, 8))
    assert torch.equal(norm.running_mean, before)
    assert not norm.weight.requires_grad


def tiny_train_set(n: int = 96) -> ImageSet:
    images = (smooth_images(n, 12) * 255).to(torch.uint8)
    return ImageSet(images, torch.arange(n) % 3)


def test_the_trainer_whitens_from_its_training_images_and_never_moves_frozen_weights():
    train = tiny_train_set()
    prep = Preprocessing((1, 12, 12))
    model = build_model(whitening_net(), (1, 12, 12), 3)
    config = TrainConfig(epochs=2, batch_size=32, channels_last=False, amp=False)
    trainer = Trainer(model, config, train, None, prep)
    conv = model.layers[0]
    expected = whitening_filters(patch_covariance(train.images.float() / 255, conv), conv)
    assert torch.allclose(conv.weight, expected.float(), atol=1e-5)
    head_before = model.layers[-1].weight.clone()
    trainer.fit()
    assert torch.allclose(conv.weight, expected.float(), atol=1e-5)
    assert not torch.equal(model.layers[-1].weight, head_before)


def test_the_fast_preset_starts_with_a_frozen_whitening_conv():
    first = preset_layers("fast", 10)[0]
    assert first == {
        "Conv2D": {
            "filters": 18,
            "kernel_size": (3, 3),
            "padding": "same",
            "use_bias": False,
            "activation": "relu",
            "kernel_initializer": "patch_whitening",
            "trainable": False,
        }
    }
