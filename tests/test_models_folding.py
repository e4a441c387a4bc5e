"""Inference copies: BatchNorm folded, activations after max pooling; same outputs, fewer
layers and pixels, the model itself untouched."""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.inference import Preprocessing, predict_logits
from cnnlab.models import (
    BatchNormalization,
    Conv2D,
    Dense,
    Flatten,
    GlobalMaxPooling2D,
    MaxPool2D,
    build_model,
    preset_layers,
)
from cnnlab.models.folding import fold_batchnorm, inference_copy
from cnnlab.models.layers import KerasConv2D


def _with_running_stats(model: nn.Module, negative_scale: bool = False) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, as after some training."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            if module.weight is not None:
                module.weight.data.uniform_(0.5, 1.5)
                if negative_scale:
                    module.weight.data[0] = -1.0
            if module.bias is not None:
                module.bias.data.uniform_(-1, 1)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_default_net_folds_every_batchnorm_and_keeps_its_outputs():
    model = _with_running_stats(
        build_model(preset_layers("fast", 10, (1, 28, 28)), (1, 28, 28), 10)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert _batchnorms(model) == 3 and _batchnorms(folded) == 0
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched


def test_a_negative_scale_after_a_pool_keeps_its_batchnorm():
    # s * max(x) is min(s * x) for s < 0: folding into the conv before the pool would be wrong.
    layers = [
        Conv2D(4, 3, use_bias=False),
        MaxPool2D(2),
        BatchNormalization(),  # channel 0 gets a negative scale: kept
        Conv2D(4, 3, use_bias=False),
        BatchNormalization(),  # right after its conv: folds whatever the sign
        Flatten(),
        Dense(3),
    ]
    model = _with_running_stats(build_model(layers, (1, 12, 12), 3), negative_scale=True)
    folded = fold_batchnorm(model)
    assert isinstance(folded.layers.batch_normalization, nn.BatchNorm2d)
    assert isinstance(folded.layers.batch_normalization_1, nn.Identity)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_folding_keeps_conv_biases_and_skips_activated_convs():
    layers = [
        Conv2D(4, 3, padding="same"),  # with a bias: folded into it
        BatchNormalization(scale=False, center=False),
        Conv2D(4, 3, activation="relu"),  # BN after ReLU cannot fold
        BatchNormalization(),
        GlobalMaxPooling2D(),
        Dense(3),
    ]
    model = _with_running_stats(build_model(layers, (2, 9, 9), 3))
    folded = fold_batchnorm(model)
    assert _batchnorms(folded) == 1
    x = torch.randn(4, 2, 9, 9)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_predictions_use_the_folded_copy_and_leave_the_model_training():
    model = _with_running_stats(
        build_model(preset_layers("fast", 10, (1, 28, 28)), (1, 28, 28), 10)
    )
    model.train()
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    logits = predict_logits(model, images, Preprocessing((1, 28, 28)))
    assert model.training and _batchnorms(model) == 3
    model.eval()
    with torch.no_grad():
        expected = model(images.float() / 255)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_inference_copies_apply_relu_after_the_pool_with_identical_outputs():
    model = build_model(preset_layers("tiny", 10), (1, 28, 28), 10).eval()
    fast = inference_copy(model)
    convs = [m for m in fast.modules() if isinstance(m, KerasConv2D)]
    assert all(conv.defer_activation and conv.defer_in_eval for conv in convs)
    assert not any(m.defer_in_eval for m in model.modules() if isinstance(m, KerasConv2D))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))  # max and ReLU commute exactly
    assert inference_copy(model, defer_activations=False) is model  # nothing to fold in tiny


def test_channels_last_inference_copies_restride_one_channel_weights():
    model = build_model(preset_layers("fast", 10), (1, 28, 28), 10).eval()  # as loaded: NCHW
    first = model.layers[0].weight
    assert first.stride(1) != 1  # (18, 1, 3, 3) NCHW: .contiguous(channels_last) keeps this
    fast = inference_copy(model, channels_last=True)
    assert all(
        p.stride(1) == 1 and p.is_contiguous(memory_format=torch.channels_last)
        for p in fast.parameters()
        if p.dim() == 4
    )
    assert model.layers[0].weight is first and first.stride(1) != 1  # the model is untouched
    tiny = build_model(preset_layers("tiny", 10), (1, 28, 28), 10).eval()  # nothing to fold
    assert inference_copy(tiny, defer_activations=False, channels_last=True) is not tiny
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
