"""Presets: Keras' parameter counts and shapes, every preset on every input size, clear misfits."""

from __future__ import annotations

import pytest
import torch

from cnnlab.errors import ModelSpecError
from cnnlab.models import (
    PRESETS,
    build_model,
    get_preset,
    list_presets,
    preset_layers,
    presets_that_fit,
    summarize,
)


def param_count(name: str, input_shape: tuple[int, int, int], num_classes: int = 10) -> int:
    model = build_model(preset_layers(name, num_classes), input_shape, num_classes)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "input_shape", "expected"),
    [
        ("tiny", (1, 28, 28), 27_562),
        ("basic", (3, 32, 32), 225_610),
        ("dropout", (3, 32, 32), 543_210),
    ],
)
def test_parameter_counts_equal_keras(name, input_shape, expected):
    assert param_count(name, input_shape) == expected
    assert summarize(preset_layers(name, 10), input_shape, 10).total_params == expected


def test_basic_output_shapes_equal_keras():
    rows = summarize(preset_layers("basic", 10), (3, 32, 32), 10).rows
    assert [row.output_shape for row in rows] == [
        (None, 29, 29, 32),
        (None, 14, 14, 32),
        (None, 11, 11, 32),
        (None, 5, 5, 32),
        (None, 800),
        (None, 256),
        (None, 10),
    ]


def test_registry_lists_every_preset_with_a_description():
    assert list_presets() == ["basic", "dropout", "fast", "tiny", "wide"]
    for name in list_presets():
        preset = get_preset(name)
        assert preset.name == name and preset is PRESETS[name]
        assert preset.description and "\n" not in preset.description


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ModelSpecError, match=r"Unknown model preset 'fsat'\. Did you mean 'fast'"):
        get_preset("fsat")
    with pytest.raises(ModelSpecError, match="basic, dropout, fast, tiny, wide"):
        preset_layers("resnet", 10)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 32, 32)])
def test_every_preset_builds_and_runs(name, input_shape):
    torch.manual_seed(0)
    model = build_model(preset_layers(name, 7, input_shape=input_shape), input_shape, 7).eval()
    logits = model(torch.rand(2, *input_shape))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    assert model.final_activation == "softmax"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_on_8x8_digits_work_or_say_which_fit(name):
    fits = presets_that_fit((1, 8, 8), 10)
    assert fits == ["dropout", "fast", "wide"]
    if name in fits:
        model = build_model(preset_layers(name, 10, input_shape=(1, 8, 8)), (1, 8, 8), 10)
        assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
        return
    with pytest.raises(ModelSpecError) as caught:
        preset_layers(name, 10, input_shape=(1, 8, 8))
    message = str(caught.value)
    assert f"Preset '{name}' does not fit 8x8x1 images" in message
    assert "'dropout', 'fast', 'wide'" in message


def test_fast_preset_is_small_and_cheap_on_28x28():
    summary = summarize(preset_layers("fast", 10), (1, 28, 28), 10)
    assert summary.total_params == 134_284
    # the frozen whitening conv's 18 3x3 filters, and BN moving statistics
    assert summary.non_trainable_params == 18 * 9 + 2 * (48 + 96 + 96)
    assert 10e6 < summary.flops < 100e6
    assert summary.train_flops < 3 * summary.flops  # nothing to compute back through the first


def test_wide_preset_is_fast_with_a_third_more_channels():
    fast, wide = preset_layers("fast", 10), preset_layers("wide", 10)
    widths = {48: 64, 96: 128}
    for fast_layer, wide_layer in zip(fast, wide, strict=True):
        [(kind, fast_args)] = fast_layer.items()
        [(wide_kind, wide_args)] = wide_layer.items()
        assert kind == wide_kind
        if kind == "Conv2D":
            filters = fast_args["filters"]
            assert wide_args == {**fast_args, "filters": widths.get(filters, filters)}
        else:
            assert wide_args == fast_args
    summary = summarize(wide, (1, 28, 28), 10)
    assert summary.total_params == 234_284
    assert 1.6 < summary.flops / summarize(fast, (1, 28, 28), 10).flops < 1.8


def test_num_classes_must_be_positive():
    with pytest.raises(ModelSpecError, match="num_classes"):
        preset_layers("tiny", 0)
