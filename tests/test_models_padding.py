"""'same' and 'valid' padding match Keras/TF: output sizes, and the odd pixel on the bottom/right."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from cnnlab.models import (
    AveragePooling2D,
    Conv2D,
    GlobalMaxPooling2D,
    MaxPool2D,
    build_model,
    infer_shapes,
    same_padding,
)


def tf_same_total_padding(size: int, kernel: int, stride: int) -> int:
    """TF's documented rule (tf.nn.convolution): pad so the output has ceil(size / stride)."""
    if size % stride == 0:
        return max(kernel - stride, 0)
    return max(kernel - size % stride, 0)


GRID = [(size, k, s) for size in (5, 6, 7, 8) for k in (1, 2, 3, 4) for s in (1, 2, 3)]


@pytest.mark.parametrize(("size", "kernel", "stride"), GRID)
def test_same_padding_matches_tf(size, kernel, stride):
    before, after = same_padding(size, kernel, stride)
    total = tf_same_total_padding(size, kernel, stride)
    assert (before, after) == (total // 2, total - total // 2)  # the odd pixel goes after
    (shape, _) = infer_shapes(
        [Conv2D(2, kernel, strides=stride, padding="same"), GlobalMaxPooling2D()], (1, size, size)
    )
    assert shape == (2, math.ceil(size / stride), math.ceil(size / stride))


def test_same_conv_forward_equals_explicit_tf_padding_over_a_grid():
    torch.manual_seed(0)
    for size, kernel, stride in GRID:
        model = build_model(
            [Conv2D(2, kernel, strides=stride, padding="same"), GlobalMaxPooling2D()],
            (1, size, size + 1),
            2,
        )
        conv = model.layers.conv2d
        x = torch.randn(1, 1, size, size + 1)
        th = tf_same_total_padding(size, kernel, stride)
        tw = tf_same_total_padding(size + 1, kernel, stride)
        padded = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
        expected = F.conv2d(padded, conv.weight, conv.bias, stride=stride)
        assert torch.allclose(conv(x), expected, atol=1e-6), (size, kernel, stride)
        assert expected.shape[2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))


@pytest.mark.parametrize(("size", "kernel", "stride"), GRID)
def test_valid_output_size(size, kernel, stride):
    layers = [Conv2D(2, kernel, strides=stride), GlobalMaxPooling2D()]
    (shape, _) = infer_shapes(layers, (1, size, size))
    assert shape[1] == (size - kernel) // stride + 1


def test_even_kernel_same_padding_is_on_the_bottom_and_right():
    # 2x2 all-ones kernel over [[1, 2, 3], [4, 5, 6], [7, 8, 9]]; TF pads one row below and one
    # column to the right, so output[0, 0] sums 1 + 2 + 4 + 5 (top-left padding would give 1).
    model = build_model(
        [
            Conv2D(1, (2, 2), padding="same", use_bias=False, kernel_initializer="ones"),
            GlobalMaxPooling2D(),
        ],
        (1, 3, 3),
        1,
    )
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    out = model.layers.conv2d(x)
    assert out[0, 0].tolist() == [[12.0, 16.0, 9.0], [24.0, 28.0, 15.0], [15.0, 17.0, 9.0]]


def test_strided_same_padding_is_on_the_bottom_and_right():
    # 4x4 input, 3x3 kernel, stride 2: output 2x2, one pixel of padding, after.
    model = build_model(
        [
            Conv2D(1, 3, strides=2, padding="same", use_bias=False, kernel_initializer="ones"),
            GlobalMaxPooling2D(),
        ],
        (1, 4, 4),
        1,
    )
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = model.layers.conv2d(x)[0, 0]
    assert out[0, 0] == x[0, 0, 0:3, 0:3].sum()
    assert out[1, 1] == x[0, 0, 2:4, 2:4].sum()


def test_same_max_pool_never_takes_the_padding():
    model = build_model([MaxPool2D(2, padding="same"), GlobalMaxPooling2D()], (1, 3, 3), 1)
    x = -torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # all negative: zero padding would win
    out = model.layers.max_pooling2d(x)
    assert out[0, 0].tolist() == [[-1.0, -3.0], [-7.0, -9.0]]


def test_same_average_pool_leaves_the_padding_out():
    model = build_model(
        [AveragePooling2D(2, strides=1, padding="same"), GlobalMaxPooling2D()], (1, 3, 3), 1
    )
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    out = model.layers.average_pooling2d(x)[0, 0]
    assert out.tolist() == [[3.0, 4.0, 4.5], [6.0, 7.0, 7.5], [7.5, 8.5, 9.0]]


def test_valid_pooling_floors_like_keras():
    (shape, _) = infer_shapes([MaxPool2D(2), GlobalMaxPooling2D()], (4, 7, 5))
    assert shape == (4, 3, 2)
    (shape, _) = infer_shapes([MaxPool2D(3, strides=2), GlobalMaxPooling2D()], (4, 7, 8))
    assert shape == (4, 3, 3)
