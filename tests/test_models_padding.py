"""'same' and 'valid' padding match Keras/TF: output sizes, and the odd pixel on the bottom/right."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from cnnlab.models import (
    AveragePooling2D,
    Conv2D,
    Dense,
    Flatten,
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


# A 'same' conv whose bottom/right padding only feeds outputs that the 'valid' max pool after it
# drops runs with that padding trimmed (KerasConv2D.pad_for_pool): the same pooled values and
# gradients, fewer products.
TRIM_GRID = [
    (size, kernel, stride, dilation, pool, pool_stride)
    for size in (5, 6, 7, 8, 9)
    for kernel in (1, 2, 3, 4)
    for stride in (1, 2)
    for dilation in (1, 2)
    for pool, pool_stride in ((2, 2), (3, 3), (3, 2), (2, 1))
    if stride == 1 or dilation == 1  # Keras takes strides > 1 or dilation > 1, not both
]


@pytest.mark.parametrize(("size", "kernel", "stride", "dilation", "pool", "pool_stride"), TRIM_GRID)
def test_trimmed_padding_gives_the_same_pooled_values_and_gradients(
    size, kernel, stride, dilation, pool, pool_stride
):
    torch.manual_seed(size * 100 + kernel * 10 + stride)
    layers = [
        Conv2D(3, kernel, strides=stride, padding="same", dilation_rate=dilation),
        MaxPool2D(pool, strides=pool_stride),
        GlobalMaxPooling2D(),
    ]
    model = build_model(layers, (2, size, size + 1), 3)
    conv, max_pool = model.layers.conv2d, model.layers.max_pooling2d
    x = torch.randn(2, 2, size, size + 1, dtype=torch.float64, requires_grad=True)
    model.double()
    expected = max_pool(conv(x))  # the conv's full 'same' padding
    (expected_x, expected_w) = torch.autograd.grad(expected.square().sum(), (x, conv.weight))
    pad = conv.pad_for_pool(max_pool, size, size + 1)
    if conv.uneven_pad is None:
        assert pad is None
        return
    # The oracle: the least bottom and right padding whose pooled output has every position of
    # the full padding's (whose values the asserts below compare).
    left, right, top, bottom = conv.uneven_pad

    def pooled_shape(r: int, b: int) -> torch.Size | None:
        try:
            return max_pool(conv.forward_padded(F.pad(x, (left, r, top, b)))).shape
        except RuntimeError:  # too few outputs for one window
            return None

    fits = [
        (r, b)
        for r in range(right + 1)
        for b in range(bottom + 1)
        if pooled_shape(r, b) == expected.shape
    ]
    least = min(fits, key=sum)
    assert all(r >= least[0] and b >= least[1] for r, b in fits)
    if least == (right, bottom):
        assert pad is None  # nothing to trim
        return
    assert pad == (left, least[0], top, least[1])
    got = max_pool(conv.forward_padded(F.pad(x, pad)))
    # The same sums, up to their order (the convolution blocks a narrower input differently).
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    (got_x, got_w) = torch.autograd.grad(got.square().sum(), (x, conv.weight))
    assert torch.allclose(got_x, expected_x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_w, expected_w, rtol=1e-12, atol=1e-12)


def test_trimming_covers_dropouts_third_conv_on_fashion_mnist_maps():
    model = build_model(
        [
            Conv2D(4, 2, padding="same"),
            MaxPool2D(),
            Conv2D(4, 3, padding="same"),
            MaxPool2D(),
            GlobalMaxPooling2D(),
        ],
        (1, 7, 7),
        4,
    )
    stack = model.layers
    # 7x7 through a 2x2 'same' conv: the pool reads 6x6 outputs, which need no padding at all.
    assert stack.conv2d.pad_for_pool(stack.max_pooling2d, 7, 7) == (0, 0, 0, 0)
    assert stack.conv2d.pad_for_pool(stack.max_pooling2d, 8, 8) is None  # reads all 8x8
    # Even padding (3x3 'same') is the conv's own and is left alone.
    assert stack.conv2d_1.pad_for_pool(stack.max_pooling2d_1, 3, 3) is None
    # Only a MaxPool2D straight after the conv, without 'same' padding of its own, trims.
    assert stack.conv2d.pad_for_pool(stack.conv2d_1, 7, 7) is None
    same_pool = build_model(
        [Conv2D(4, 2, padding="same"), MaxPool2D(padding="same"), GlobalMaxPooling2D()],
        (1, 7, 7),
        4,
    )
    assert same_pool.layers.conv2d.pad_for_pool(same_pool.layers.max_pooling2d, 7, 7) is None


@pytest.mark.parametrize("train", [True, False])
def test_the_model_runs_a_trimmable_conv_unpadded_unless_hooked(train):
    torch.manual_seed(0)
    layers = [Conv2D(8, 2, padding="same", activation="relu"), MaxPool2D(), Flatten(), Dense(3)]
    model = build_model(layers, (6, 7, 7), 3).train(train)
    conv = model.layers.conv2d
    seen: list[tuple[int, ...]] = []
    padded = conv.forward_padded

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[2:]))
        return padded(x)

    conv.forward_padded = recording  # an instance attribute, not a hook: trimming still runs
    x = torch.randn(5, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    trimmed = model(x)
    assert seen == [(7, 7)]  # unpadded: the 2x2 'same' conv would pad to 8x8
    del conv.forward_padded
    outputs: list[torch.Tensor] = []
    conv.register_forward_hook(lambda module, args, out: outputs.append(out))
    hooked = model(x)  # the hook sees the conv's full output, padding included
    assert outputs[0].shape[2:] == (7, 7)
    assert torch.allclose(trimmed, hooked, atol=1e-6)
