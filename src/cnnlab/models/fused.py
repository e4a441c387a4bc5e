"""Layers in C on the CPU (cnnlab/native/kernels.c): Conv2D on few channels + MaxPool2D(2) in one
kernel, MaxPool2D(2) alone in training, the weight gradient (and for small ones the input
gradient) of a Conv2D under a MaxPool2D(2) from the pooled gradient (`conv_then_pool`),
Dropout, a MaxPool2D(2) with its deferred ReLU and the Dropout after it in one pass
(`pool_dropout`), a Conv2D on 16-channel multiples under those two with all of its gradients
from the pool's winners (`conv_pool_dropout`), and a head, Dense, Dropout and Dense, in one
call each way (`dense_head`: in float32 for `tiny`'s small one, training steps 1.03-1.19x
faster; under bf16 autocast a larger first Dense in bf16 dot products, `dropout`'s steps
1.09-1.13x).

The first block of a small CNN takes half of a PyTorch training step on the CPU: a one-channel
convolution runs at under 10 GFLOP/s in oneDNN, and max pooling writes, reads back and
zero-fills full-resolution tensors. `conv_pool` computes the pooled output straight from the
input and, in training, the weight gradient straight from the pooled gradient. The result is
the same as the conv and pool modules', with the convolution in fp32, or under bf16 autocast
on CPUs with AVX512-BF16 in bf16 dot products on the rounded input and weights, as autocast's
conv would take them (`first_block_in_pairs`).

Under bf16 autocast on CPUs with AVX512-BF16, `conv_then_pool` also runs the later convs it
takes (`tiny`'s and `basic`'s second) together with their pool in one C kernel of bf16 dot
products (`bf16_conv_pool_fits`): training steps 1.15x (tiny) and 1.06x (basic) faster.

CnnModel.forward uses it when `fusable` holds for a Conv2D and the MaxPool2D after it, and
`fusable_now` for the input: anywhere else, and whenever something watches the layers (hooks,
an input gradient, tracing, torch.compile), the two modules run as they are.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnlab import native

if TYPE_CHECKING:  # layers.py imports this module
    from cnnlab.models.layers import KerasConv2D, KerasDense, KerasMaxPool2D

MAX_IN_CHANNELS = 4  # beyond a few input channels oneDNN's convolution is the faster one
GRAD_CHUNK = 16  # images per partial weight gradient: sums in a fixed order, whatever the threads
# `conv_then_pool` where each winner's kernel row (kw * in_channels values) spans at least 8
# vectors: there the C weight gradient beats oneDNN's dense one (`basic`'s 4x4 conv on 32
# channels: training steps 1.12x, faster in 16 of 16 interleaved rounds); with 2-4 vectors a row
# it does not on its own (`tiny`'s 3x3 on 8 channels 1.01x, `dropout`'s 2x2 on 32 channels
# 0.97x), only together with the C input gradient (below).
MIN_RUN = 8 * native.LANES
# The C input gradient (pooled_input_grad) where its shifted kernels fit in L1 (48 KiB on this
# machine's cores): each window reads every channel's kernel once, so beyond L1 it waits on
# memory and oneDNN's dense input gradient wins (`basic`'s 400 KiB: 5x slower alone). `tiny`'s
# second conv (32 KiB), input and weight gradients both in C: training steps 1.07x.
MAX_SHIFTED_BYTES = 32 * 1024


def _padding(conv: KerasConv2D) -> tuple[int, int]:
    """(top, left) zero padding of the convolution."""
    if conv.uneven_pad is not None:
        left, _, top, _ = conv.uneven_pad
        return top, left
    top, left = conv.padding  # type: ignore[misc]
    return int(top), int(left)


def fusable(conv: KerasConv2D, pool: KerasMaxPool2D) -> bool:
    """Whether this Conv2D and the MaxPool2D after it fit the fused kernel: stride 1, zero
    padding, at most MAX_IN_CHANNELS input channels, ReLU or no activation, a 2x2 pool with
    stride 2 padded (if at all) below and to the right, as TF's 'same' pads."""
    conv_ok = (
        conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.in_channels <= MAX_IN_CHANNELS
        and conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels <= native.MAX_TAPS
        and conv.activation_name in (None, "relu")
    )
    return conv_ok and _two_by_two(pool)


def _two_by_two(pool: KerasMaxPool2D) -> bool:
    """A 2x2 pool with stride 2, padded (if at all) below and to the right, as TF's 'same' pads:
    the window clipping the kernels do."""
    pad = pool.pad or (0, 0, 0, 0)  # (left, right, top, bottom)
    return (
        tuple(pool.kernel_size) == (2, 2)  # type: ignore[arg-type]
        and tuple(pool.stride) == (2, 2)  # type: ignore[arg-type]
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and pad[0] == 0
        and pad[2] == 0
        and max(pad) <= 1
    )


def _kernels_usable() -> bool:
    """Outside tracing, scripting and torch.compile (the kernels are opaque to them), and built."""
    return (
        not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and native.library() is not None
    )


def _watched(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _globally_watched() -> bool:
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def unwatched(*modules: nn.Module) -> bool:
    """Whether no hook watches these modules (nor every module) and nothing traces, scripts or
    compiles the call: their layers may then run in another shape or grouping than their own."""
    return not (
        any(_watched(module) for module in modules)
        or _globally_watched()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
    )


def fusable_now(conv: KerasConv2D, pool: KerasMaxPool2D, x: torch.Tensor) -> bool:
    """Whether this call can take the kernel: a float32 CPU input that needs no gradient,
    float32 weights, nothing hooked, no tracing or compiling, and the kernel built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.shape[0] > 0
        and not x.requires_grad
        and conv.weight.dtype == torch.float32
        and conv.weight.device.type == "cpu"
        and not (_watched(conv) or _watched(pool) or _watched(conv.act) or _globally_watched())
        and _kernels_usable()
    )


def first_block_geometry(
    conv: KerasConv2D, pool: KerasMaxPool2D, x: torch.Tensor, pad_after: tuple[int, int]
) -> native.ConvPoolGeometry:
    """The geometry of `conv_pool` for this `fusable` pair on x, its output padded by
    pad_after (rows, columns) below and to the right."""
    top, left = _padding(conv)
    if conv.uneven_pad is not None:
        pad_h, pad_w = top + conv.uneven_pad[3], left + conv.uneven_pad[1]
    else:
        pad_h, pad_w = 2 * top, 2 * left
    return block_geometry(conv, pool, x.shape, (top, left), (pad_h, pad_w), pad_after)


def block_geometry(
    conv: KerasConv2D,
    pool: KerasMaxPool2D,
    shape: torch.Size,
    top_left: tuple[int, int],
    total_pad: tuple[int, int],
    pad_after: tuple[int, int] = (0, 0),
) -> native.ConvPoolGeometry:
    """Conv and pool sizes for an input of this shape (B, C, H, W), zero-padded by top_left
    above and to the left and by total_pad in all (rows, columns); the pooled output laid out
    with pad_after more (rows, columns) of zeros below and to the right."""
    _, in_c, in_h, in_w = shape
    kh, kw = conv.kernel_size
    conv_h, conv_w = in_h + total_pad[0] - kh + 1, in_w + total_pad[1] - kw + 1
    pool_pad = pool.pad or (0, 0, 0, 0)
    pool_h, pool_w = (conv_h + pool_pad[3]) // 2, (conv_w + pool_pad[1]) // 2
    relu = int(conv.activation_name == "relu")
    sizes = (in_h, in_w, in_c, conv.out_channels, kh, kw, *top_left, conv_h, conv_w)
    layout = (pool_h + pad_after[0], pool_w + pad_after[1])
    return _geometry_of(*sizes, pool_h, pool_w, relu, *layout)


@functools.lru_cache(maxsize=256)
def _geometry_of(*fields: int) -> native.ConvPoolGeometry:
    """A Geometry with these fields (in ConvPoolGeometry's order), built once per distinct set:
    building a ctypes Structure costs more than the rest of a small block's Python. The kernels
    only read it."""
    return native.ConvPoolGeometry(*fields)


def _pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def padded_to_lanes(values: int) -> int:
    """values rounded up to whole vectors of native.LANES."""
    return -(-values // native.LANES) * native.LANES


def bf16_autocast() -> bool:
    """Whether CPU autocast to bf16 is on here."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"cnnlab conv-pool kernel failed with status {status}")


def conv_pool_run(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: native.ConvPoolGeometry,
    out_dtype: torch.dtype,
    train: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The first block's kernel (conv_pool_forward) on x: the pooled output (out_dtype,
    channels_last), x as (B, H, W, C) and, in training, the winning window positions that
    `conv_pool_grads` takes."""
    lib = native.library()
    assert lib is not None
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels_last or 1 channel
    w = weight.detach().contiguous()  # the kernel relays it out (weights_by_tap)
    b = bias.detach().contiguous() if bias is not None else None
    batch = x.shape[0]
    y = torch.empty(
        (batch, g.out_c, g.out_rows, g.out_cols), dtype=out_dtype, memory_format=torch.channels_last
    )
    argmax = (
        torch.empty((batch, g.out_rows, g.out_cols, g.out_c), dtype=torch.uint8) if train else None
    )
    y_is_bf16 = int(out_dtype == torch.bfloat16)
    inputs = (_pointer(x_nhwc), _pointer(w), _pointer(b))
    outputs = (_pointer(y), y_is_bf16, _pointer(argmax))
    threads = torch.get_num_threads()
    kernel = (
        lib.conv_pool_forward_pairs if first_block_in_pairs(g, out_dtype) else lib.conv_pool_forward
    )
    _check(kernel(ctypes.byref(g), *inputs, batch, *outputs, threads))
    return y, x_nhwc, argmax


def first_block_in_pairs(g: native.ConvPoolGeometry, out_dtype: torch.dtype) -> bool:
    """Whether `conv_pool_run` takes the bf16 dot-product kernel (conv_pool_forward_pairs):
    a bf16 output (under bf16 autocast, where a conv would round its input and weights to bf16
    too), AVX512-BF16 built in, kernel rows of two values or more, and more output channels than
    half a vector (the float32 kernel packs two windows into each vector of 8 channels).
    `basic`'s first block (4x4): 1.29-1.32x faster, `dropout`'s and `fast`'s (3x3): 1.10-1.16x."""
    return (
        out_dtype == torch.bfloat16
        and g.out_c > native.LANES // 2
        and g.kw * g.in_c >= 2
        and bf16_conv_pool_built()
    )


def conv_pool_grads(
    g: native.ConvPoolGeometry,
    x_nhwc: torch.Tensor,
    argmax: torch.Tensor,
    grad_y: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first block's weight and bias gradients (conv_pool_weight_grad) from `conv_pool_run`'s
    x_nhwc and positions and the gradient of its output."""
    lib = native.library()
    assert lib is not None
    if grad_y.dtype not in (torch.float32, torch.bfloat16):
        grad_y = grad_y.float()
    grad = grad_y.permute(0, 2, 3, 1).contiguous()  # (B, pool_h, pool_w, out_c)
    weight_grad = torch.empty((g.out_c, g.in_c, g.kh, g.kw))
    bias_grad = torch.empty(g.out_c) if has_bias else None
    inputs = (_pointer(x_nhwc), _pointer(grad), int(grad.dtype == torch.bfloat16))
    images = (_pointer(argmax), grad.shape[0], GRAD_CHUNK)
    outputs = (_pointer(weight_grad), _pointer(bias_grad), torch.get_num_threads())
    _check(lib.conv_pool_weight_grad(ctypes.byref(g), *inputs, *images, *outputs))
    return weight_grad, bias_grad


class _ConvPool(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geometry: native.ConvPoolGeometry,
        out_dtype: torch.dtype,
        train: bool,
    ) -> torch.Tensor:
        y, x_nhwc, argmax = conv_pool_run(x, weight, bias, geometry, out_dtype, train)
        if train:
            ctx.save_for_backward(x_nhwc, argmax)
            ctx.geometry, ctx.has_bias = geometry, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x_nhwc, argmax = ctx.saved_tensors
        weight_grad, bias_grad = conv_pool_grads(ctx.geometry, x_nhwc, argmax, grad_y, ctx.has_bias)
        return (
            None,
            weight_grad if ctx.needs_input_grad[1] else None,
            bias_grad if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def conv_pool(
    conv: KerasConv2D, pool: KerasMaxPool2D, x: torch.Tensor, pad_after: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """pool(conv(x)) for a `fusable` pair and a `fusable_now` input, in one kernel. The output
    is bf16 under CPU bf16 autocast (as the conv's would be), else float32; channels_last.
    With pad_after = (rows, columns) it comes zero-padded below and to the right by as many:
    the uneven 'same' padding of a next conv (see `bottom_right_pad`), without a pad pass."""
    out_dtype = torch.bfloat16 if bf16_autocast() else torch.float32
    parameters = [conv.weight] if conv.bias is None else [conv.weight, conv.bias]
    train = torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
    geometry = first_block_geometry(conv, pool, x, pad_after)
    return _ConvPool.apply(x, conv.weight, conv.bias, geometry, out_dtype, train)


def bottom_right_pad(conv: KerasConv2D) -> tuple[int, int] | None:
    """(rows, columns) of zeros that this conv adds below and to the right of its input, where
    that is all the padding it has (TF's 'same' for even kernels: (0, 1, 0, 1)) and no hook
    watches it: `conv_pool` can then write them, and the conv runs on its input as it is
    (KerasConv2D.forward_padded)."""
    pad = conv.uneven_pad
    if pad is None or pad[0] or pad[2] or _watched(conv) or _globally_watched():
        return None
    return pad[3], pad[1]


def pool_fits(pool: KerasMaxPool2D, x: torch.Tensor) -> bool:
    """Whether `max_pool` can pool x for this layer: a 2x2 pool on a channels_last float32 or
    bf16 CPU tensor, outside tracing and compiling, with the kernels built."""
    return (
        _two_by_two(pool)
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[0] * x.shape[1] > 0
        and _kernels_usable()
    )


def _pool_outputs(
    x: torch.Tensor, pool_h: int, pool_w: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """An empty pooled output for x (channels_last, x's dtype), one byte per pooled value for
    the window positions, and the kernels' (batch, h, w, c, pool_h, pool_w)."""
    batch, channels, height, width = x.shape
    y = torch.empty(
        (batch, channels, pool_h, pool_w), dtype=x.dtype, memory_format=torch.channels_last
    )
    positions = torch.empty((batch, pool_h, pool_w, channels), dtype=torch.uint8)
    return y, positions, (batch, height, width, channels, pool_h, pool_w)


def _unpool_buffers(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled gradient in the forward input's dtype and layout, and an empty input
    gradient, for a backward pass whose ctx keeps `_pool_outputs`' shape and the dtype."""
    batch, height, width, channels, _, _ = ctx.shape
    grad = grad_y.to(ctx.dtype).contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty(
        (batch, channels, height, width), dtype=ctx.dtype, memory_format=torch.channels_last
    )
    return grad, grad_x


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool_h: int, pool_w: int) -> torch.Tensor:  # type: ignore[override]
        lib = native.library()
        assert lib is not None
        y, argmax, shape = _pool_outputs(x, pool_h, pool_w)
        is_bf16 = int(x.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        _check(
            lib.max_pool_forward(
                _pointer(x), is_bf16, *shape, _pointer(y), _pointer(argmax), threads
            )
        )
        ctx.save_for_backward(argmax)
        ctx.shape, ctx.dtype = shape, x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        lib = native.library()
        assert lib is not None
        (argmax,) = ctx.saved_tensors
        grad, grad_x = _unpool_buffers(ctx, grad_y)
        is_bf16 = int(ctx.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        _check(
            lib.max_pool_backward(
                _pointer(grad), is_bf16, _pointer(argmax), *ctx.shape, _pointer(grad_x), threads
            )
        )
        return grad_x, None, None


def max_pool(pool: KerasMaxPool2D, x: torch.Tensor) -> torch.Tensor:
    """pool(x) for a `pool_fits` input, padding included. With its backward 1.4x faster than
    max_pool2d on `fast`'s 128x48x14x14 bf16 activations: one-byte window positions instead of
    int64 indices, and an input gradient written in one pass instead of zero-filled and then
    scattered into."""
    return _MaxPool.apply(x, *_pooled_size(pool, x))


def _pooled_size(pool: KerasMaxPool2D, x: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a 2x2 pool's output for x, its bottom and right padding included."""
    pad = pool.pad or (0, 0, 0, 0)
    return (x.shape[2] + pad[3]) // 2, (x.shape[3] + pad[1]) // 2


def pool_dropout_fits(pool: KerasMaxPool2D, dropout: nn.Dropout, x: torch.Tensor) -> bool:
    """Whether `pool_dropout` can take this MaxPool2D, the Dropout after it and x: both layers
    in training with 0 < p < 1, the activation deferred to the pool ReLU or none, an input that
    `pool_fits` with a multiple of 16 channels, and nothing watching the layers."""
    act = pool.deferred_act
    return (
        pool.training
        and dropout.training
        and 0.0 < dropout.p < 1.0
        and (act is None or type(act) is nn.ReLU)
        and pool_fits(pool, x)
        and x.shape[1] % native.LANES == 0
        and unwatched(pool, dropout, *([act] if act is not None else []))
    )


def dropout_seed() -> int:
    """One draw from PyTorch's generator seeding a C dropout call's mask, as `_Dropout` draws it,
    so that `torch.manual_seed` and checkpoints govern the mask."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def dropout_seeds(count: int) -> list[int]:
    """`count` calls of `dropout_seed` in one op: the same seeds, and the generator left in the
    same state (tests/test_models_chain_step.py)."""
    return torch.randint(0, 2**63 - 1, (count,), dtype=torch.int64).tolist() if count else []


def _run_pool_dropout(
    x: torch.Tensor, pool_h: int, pool_w: int, relu: bool, p: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """pool_dropout_forward on x: the output, its codes and `_pool_outputs`' shape."""
    lib = native.library()
    assert lib is not None
    y, code, shape = _pool_outputs(x, pool_h, pool_w)
    seed = dropout_seed()
    is_bf16 = int(x.dtype == torch.bfloat16)
    outputs = (_pointer(y), _pointer(code), torch.get_num_threads())
    _check(lib.pool_dropout_forward(_pointer(x), is_bf16, *shape, int(relu), p, seed, *outputs))
    return y, code, shape


class _PoolDropout(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, pool_h: int, pool_w: int, relu: bool, p: float
    ) -> torch.Tensor:
        y, code, shape = _run_pool_dropout(x, pool_h, pool_w, relu, p)
        ctx.save_for_backward(code)
        ctx.shape, ctx.dtype, ctx.p = shape, x.dtype, p
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        lib = native.library()
        assert lib is not None
        (code,) = ctx.saved_tensors
        grad, grad_x = _unpool_buffers(ctx, grad_y)
        is_bf16 = int(ctx.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        _check(
            lib.pool_dropout_backward(
                _pointer(grad),
                is_bf16,
                _pointer(code),
                *ctx.shape,
                ctx.p,
                _pointer(grad_x),
                threads,
            )
        )
        return grad_x, None, None, None, None


def pool_dropout(pool: KerasMaxPool2D, dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """dropout(act(pool(x))) for a `pool_dropout_fits` triple in one C pass each way: bit for bit
    what `max_pool`, the ReLU and `dropout` give, the same mask for the same generator state,
    and the mask kept in the pool's one-byte window positions for the backward pass."""
    relu = pool.deferred_act is not None
    return _PoolDropout.apply(x, *_pooled_size(pool, x), relu, dropout.p)


def _trained_plain_conv(conv: KerasConv2D) -> bool:
    """A training step (gradient on the fp32 weights) of a stride-1, undilated, ungrouped conv
    with zero padding, whose activation (if any) the pool after it applies."""
    return (
        torch.is_grad_enabled()
        and conv.weight.requires_grad
        and conv.weight.dtype == torch.float32
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and (conv.activation_name is None or conv.defer_activation)
    )


def conv_pool_dropout_fits(
    conv: KerasConv2D,
    pool: KerasMaxPool2D,
    dropout: nn.Dropout,
    x: torch.Tensor,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> bool:
    """Whether `conv_pool_dropout` can take this Conv2D, the MaxPool2D and the Dropout after it,
    and x once padded by pad (left, right, top, bottom): a training step (gradient on
    the weights) of a stride-1 conv without padding of its own, whose activation (ReLU or none)
    the pool applies; in and out channels whole multiples of 16, at most 256 out; a kernel
    whose kh * kw * in_c values fit the C kernel's registers (`winners_backward` in kernels.c);
    a 'valid' 2x2 pool and a Dropout that `pool_dropout_fits` would take; a channels_last
    float32 or bf16 CPU input; nothing watching the layers."""
    act = pool.deferred_act
    return (
        _trained_plain_conv(conv)
        and winners_fit(conv, pool)
        # on other channel counts oneDNN's fp32 conv of the input padded here can round a
        # value 1 ulp away from the layers' own conv (1 input channel, 'same' 2x1 kernel)
        and conv.in_channels % native.LANES == 0
        and pool.training
        and dropout.training
        and 0.0 < dropout.p < 1.0
        and (act is None or type(act) is nn.ReLU)
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] > 0
        and x.shape[2] + pad[2] + pad[3] >= conv.kernel_size[0] + 1
        and x.shape[3] + pad[0] + pad[1] >= conv.kernel_size[1] + 1
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and _two_by_two(pool)
        and unwatched(conv, conv.act, pool, dropout, *([act] if act is not None else []))
        and _kernels_usable()
    )


def winners_fit(conv: KerasConv2D, pool: KerasMaxPool2D) -> bool:
    """Whether the C kernel that computes a conv's gradients from its 2x2 pool's winners
    (winners_backward in kernels.c) takes this conv and pool: out channels a whole multiple of
    16, at most 256, kernel rows (kw x in channels) of at most 256 values, no padding left to the
    conv itself (its input comes padded), and a 'valid' pool."""
    return (
        conv.out_channels % native.LANES == 0
        and conv.out_channels <= native.MAX_WINNERS_CHANNELS
        and isinstance(conv.padding, tuple)
        and all(int(p) == 0 for p in conv.padding)
        and pool.pad is None
        and _winners_shape(*conv.kernel_size, conv.in_channels)
    )


@functools.lru_cache(maxsize=64)
def _winners_shape(kh: int, kw: int, in_c: int) -> bool:
    lib = native.library()
    run = padded_to_lanes(kw * in_c) // native.LANES
    return lib is not None and bool(lib.winners_shape_supported(kh, run))


WINNERS_METHODS = ("by position", "by union rows", "in bf16 dot products")
# The last of WINNERS_METHODS that `winners_grads` may take: benchmarks/bench_levers.py and the
# tests lower it to run the others.
WINNERS_MAX_METHOD = len(WINNERS_METHODS) - 1


def winners_method(g: native.ConvPoolGeometry, x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """How `winners_grads` goes for a conv of geometry g on x_dtype inputs and w_dtype weights
    (winners_backward in kernels.c), one of WINNERS_METHODS: a window's input gradient position
    by position, or by rows of the union of its four patches where in_c is whole vectors; and
    under bf16 autocast with in_c a multiple of 32 and AVX512-BF16, both gradients in bf16 dot
    products. The last two give the same bits on the same operands. Training steps on
    Fashion-MNIST against position by position: `basic` 1.09x faster; `dropout` 1.01x, and
    1.03-1.04x more once its 2x2 kernels' windows went all rows at once."""
    lib = native.library()
    assert lib is not None
    x_bf16, w_bf16 = int(x_dtype == torch.bfloat16), int(w_dtype == torch.bfloat16)
    method = lib.winners_method(ctypes.byref(g), x_bf16, w_bf16, x_bf16, WINNERS_MAX_METHOD)
    return WINNERS_METHODS[method]


def winners_grads(
    g: native.ConvPoolGeometry,
    x_in: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
    code: torch.Tensor,
    p: float,
    *,
    input_grad: bool,
    has_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The input (with `input_grad`), weight and bias (with `has_bias`) gradients of the conv of
    geometry g that ran on x_in with weights w under the 2x2 pool (and the dropout of rate p, 0
    for none) whose codes and output gradient (in x_in's dtype, channels_last) these are
    (winners_backward in kernels.c)."""
    lib = native.library()
    assert lib is not None
    grad_x = torch.empty_like(x_in) if input_grad else None
    grad_w = torch.empty((g.out_c, g.in_c, g.kh, g.kw), memory_format=torch.channels_last)
    grad_b = torch.empty(g.out_c) if has_bias else None
    is_bf16 = int(x_in.dtype == torch.bfloat16)
    w_nhwc = w.permute(0, 2, 3, 1).contiguous()  # no copy for channels_last weights
    inputs = (_pointer(x_in), is_bf16, _pointer(w_nhwc), int(w.dtype == torch.bfloat16))
    pooled = (_pointer(grad), is_bf16, _pointer(code), p)
    batch = (x_in.shape[0], GRAD_CHUNK)
    outputs = (_pointer(grad_x), _pointer(grad_w), _pointer(grad_b))
    settings = (WINNERS_MAX_METHOD, torch.get_num_threads())
    _check(lib.winners_backward(ctypes.byref(g), *inputs, *pooled, *batch, *outputs, *settings))
    return grad_x, grad_w, grad_b


def _conv_pool_bf16(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: native.ConvPoolGeometry,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 conv-pool kernel on x (bf16, channels_last, padded as the conv needs): the pooled
    output and its window positions; with `relu`, after the ReLU (NO_GRADIENT where it cut)."""
    lib = native.library()
    assert lib is not None
    batch = x.shape[0]
    pooled = torch.empty(
        (batch, g.out_c, g.pool_h, g.pool_w),
        dtype=torch.bfloat16,
        memory_format=torch.channels_last,
    )
    code = torch.empty((batch, g.pool_h, g.pool_w, g.out_c), dtype=torch.uint8)
    w32 = weight.detach().contiguous()  # kept alive until the kernel has read it
    b32 = bias.detach().contiguous() if bias is not None else None
    inputs = (_pointer(x), _pointer(w32), _pointer(b32), batch)
    outputs = (_pointer(pooled), _pointer(code), int(relu), torch.get_num_threads())
    _check(lib.conv_pool_forward_bf16(ctypes.byref(g), *inputs, *outputs))
    return pooled, code


def conv_pool_act_dropout_bf16(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g: native.ConvPoolGeometry,
    relu: bool,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_conv_pool_bf16`, then the ReLU and the dropout of rate p in place (act_dropout_forward:
    the mask `_run_pool_dropout` draws for the same generator state; with p = 0 no draw and no
    dropout, and the ReLU in the conv-pool kernel, which gives the same values and codes without
    a pass of its own): the output and its codes, which `winners_grads` takes with the same p."""
    lib = native.library()
    assert lib is not None
    if p == 0.0:
        return _conv_pool_bf16(x, weight, bias, g, relu)
    pooled, code = _conv_pool_bf16(x, weight, bias, g)
    seed, n, threads = dropout_seed(), pooled.numel(), torch.get_num_threads()
    _check(
        lib.act_dropout_forward(_pointer(pooled), 1, _pointer(code), n, int(relu), p, seed, threads)
    )
    return pooled, code


class _ConvPoolDropout(torch.autograd.Function):
    """The conv and pool (under bf16 autocast in one C kernel of bf16 dot products where
    `bf16_conv_pool_fits`, else oneDNN's conv and the C pool), the ReLU and the dropout; in the
    backward pass the conv's input, weight and bias gradients in C from the pool's winners alone
    (winners_backward in kernels.c)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: KerasConv2D,
        pool: KerasMaxPool2D,
        p: float,
    ) -> torch.Tensor:
        dtype = torch.bfloat16 if bf16_autocast() else x.dtype
        x_in = x.to(dtype).contiguous(memory_format=torch.channels_last)
        w = weight.to(dtype)
        relu = pool.deferred_act is not None
        g = block_geometry(conv, pool, x_in.shape, (0, 0), (0, 0))
        if dtype == torch.bfloat16 and bf16_conv_pool_fits(conv):
            pooled, code = conv_pool_act_dropout_bf16(x_in, weight, bias, g, relu, p)
        else:
            with torch.autocast("cpu", enabled=False):
                b = bias.to(dtype) if bias is not None else None
                y = torch.nn.functional.conv2d(x_in, w, b)
            y = y.contiguous(memory_format=torch.channels_last)
            pooled, code, _ = _run_pool_dropout(y, *_pooled_size(pool, y), relu, p)
        ctx.save_for_backward(x_in, w, code)
        ctx.winners_geometry = g
        ctx.p, ctx.has_bias, ctx.x_dtype = p, bias is not None, x.dtype
        return pooled

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x_in, w, code = ctx.saved_tensors
        grad = grad_y.to(x_in.dtype).contiguous(memory_format=torch.channels_last)
        grad_x, grad_w, grad_b = winners_grads(
            ctx.winners_geometry,
            x_in,
            w,
            grad,
            code,
            ctx.p,
            input_grad=ctx.needs_input_grad[0],
            has_bias=ctx.has_bias,
        )
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def conv_pool_dropout(
    conv: KerasConv2D, pool: KerasMaxPool2D, dropout: nn.Dropout, x: torch.Tensor
) -> torch.Tensor:
    """dropout(act(pool(conv(x)))) for a `conv_pool_dropout_fits` triple and x padded as the conv
    needs (it runs unpadded here): the layers' forward values (the same dropout mask for the same
    generator state; under bf16 autocast, where the bf16 conv-pool kernel runs the conv, within
    bf16's precision of them, 1.11x faster steps), with the conv's gradients computed in C from
    the pool's winners alone: a quarter of the conv's outputs, fewer after the ReLU and the
    dropout, where oneDNN's backward passes go through all of them (`dropout`'s second and third
    conv: training steps 1.24-1.28x faster). The gradients are summed in fp32: the same values
    as the layers' up to rounding (oneDNN rounds a bf16 conv's weight gradient to bf16)."""
    return _ConvPoolDropout.apply(x, conv.weight, conv.bias, conv, pool, dropout.p)


def pooled_grad_fits(conv: KerasConv2D, pool: KerasMaxPool2D, x: torch.Tensor) -> bool:
    """Whether `conv_then_pool` can take this Conv2D, the MaxPool2D after it and x: a training
    step (gradient on the weights), a stride-1 conv with kw * in_channels at most MAX_RUN and at
    least MIN_RUN, unless x takes a gradient too and `input_grad_fits` (the C weight gradient
    pays on narrower rows only beside the C input gradient), its activation (if any) applied
    after the pool, a pool that `pool_fits`, a channels_last
    float32 or bf16 CPU input, nothing hooked, and the kernels built."""
    kw = conv.kernel_size[1]
    return (
        _trained_plain_conv(conv)
        and kw * conv.in_channels <= native.MAX_RUN
        and (kw * conv.in_channels >= MIN_RUN or (x.requires_grad and input_grad_fits(conv)))
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] > 0
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and _two_by_two(pool)
        and not (_watched(conv) or _watched(pool) or _watched(conv.act) or _globally_watched())
        and _kernels_usable()
    )


def _shifted_floats(out_c: int, in_c: int, kh: int, kw: int) -> int:
    """Floats of pooled_input_grad's shifted kernels: [out_c][4][kh + 1][wide_run], wide_run =
    (kw + 1) * in_c rounded up to whole vectors."""
    return out_c * 4 * (kh + 1) * padded_to_lanes((kw + 1) * in_c)


def input_grad_fits(conv: KerasConv2D) -> bool:
    """Whether `conv_then_pool` computes this conv's input gradient in C (pooled_input_grad)."""
    kh, kw = conv.kernel_size
    return (
        padded_to_lanes((kw + 1) * conv.in_channels) <= native.MAX_RUN
        and 4 * _shifted_floats(conv.out_channels, conv.in_channels, kh, kw) <= MAX_SHIFTED_BYTES
    )


def bf16_conv_pool_built() -> bool:
    """Whether the kernels were built with AVX512-BF16 (conv_pool_forward_bf16 in kernels.c)."""
    lib = native.library()
    return lib is not None and _has_bf16_conv_pool(lib)


@functools.lru_cache(maxsize=4)  # per library: tests load builds with other flags
def _has_bf16_conv_pool(lib: ctypes.CDLL) -> bool:
    return bool(lib.conv_pool_bf16_available())


def bf16_conv_pool_fits(conv: KerasConv2D) -> bool:
    """Whether `conv_then_pool` runs this conv and its pool in one C kernel under bf16 autocast
    (conv_pool_forward_bf16: bf16 dot products): an even number of input channels, no padding
    left to the conv itself (uneven 'same' padding is padded before), AVX512-BF16 built in."""
    return (
        conv.in_channels % 2 == 0
        and isinstance(conv.padding, tuple)
        and all(int(p) == 0 for p in conv.padding)
        and bf16_conv_pool_built()
    )


class _ConvThenPool(torch.autograd.Function):
    """conv then the C max pool (under bf16 autocast, both in one C kernel where
    `bf16_conv_pool_fits`, else PyTorch's conv); in the backward pass the C weight gradient from the
    pooled gradient (pooled_weight_grad in kernels.c) and the input gradient in C
    (pooled_input_grad) where `input_grad_fits`, else PyTorch's from the unpooled gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: KerasConv2D,
        pool: KerasMaxPool2D,
    ) -> torch.Tensor:
        lib = native.library()
        assert lib is not None
        padded = torch.nn.functional.pad(x, conv.uneven_pad) if conv.uneven_pad else x
        dtype = torch.bfloat16 if bf16_autocast() else x.dtype
        padded = padded.to(dtype).contiguous(memory_format=torch.channels_last)
        w = weight.to(dtype)
        top, left = (int(p) for p in conv.padding)  # type: ignore[union-attr]
        g = block_geometry(conv, pool, padded.shape, (top, left), (2 * top, 2 * left))
        batch = padded.shape[0]
        is_bf16 = int(dtype == torch.bfloat16)
        shape = (batch, g.conv_h, g.conv_w, g.out_c, g.pool_h, g.pool_w)
        if is_bf16 and bf16_conv_pool_fits(conv):
            pooled, argmax = _conv_pool_bf16(padded, weight, bias, g)
        else:
            pooled = torch.empty(
                (batch, g.out_c, g.pool_h, g.pool_w), dtype=dtype, memory_format=torch.channels_last
            )
            argmax = torch.empty((batch, g.pool_h, g.pool_w, g.out_c), dtype=torch.uint8)
            threads = torch.get_num_threads()
            b = bias.to(dtype) if bias is not None else None
            with torch.autocast("cpu", enabled=False):
                y = torch.nn.functional.conv2d(padded, w, b, padding=conv.padding)
            y = y.contiguous(memory_format=torch.channels_last)
            _check(
                lib.max_pool_forward(
                    _pointer(y), is_bf16, *shape, _pointer(pooled), _pointer(argmax), threads
                )
            )
        ctx.save_for_backward(padded, w, argmax)
        ctx.conv, ctx.geometry, ctx.shape, ctx.dtype = conv, g, shape, dtype
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        ctx.winners_geometry = g if winners_fit(conv, pool) else None
        return pooled

    @staticmethod
    def backward(ctx: Any, grad_pooled: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        padded, w, argmax = ctx.saved_tensors
        grad = grad_pooled.to(ctx.dtype).contiguous(memory_format=torch.channels_last)
        if ctx.winners_geometry is not None:
            grad_x, grad_w, grad_b = winners_grads(
                ctx.winners_geometry,
                padded,
                w,
                grad,
                argmax,
                0.0,
                input_grad=ctx.needs_input_grad[0],
                has_bias=ctx.has_bias,
            )
            return _cropped(ctx, grad_x), grad_w, grad_b, None, None
        lib = native.library()
        assert lib is not None
        conv: KerasConv2D = ctx.conv
        batch, conv_h, conv_w, out_c, _, _ = ctx.shape
        is_bf16 = int(ctx.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        g = ctx.geometry
        grad_x = None
        if ctx.needs_input_grad[0] and input_grad_fits(conv):
            grad_x = torch.empty_like(padded)  # channels_last, as padded
            w_nhwc = w.float().permute(0, 2, 3, 1).contiguous()  # [out_c][kh][kw][in_c]
            _check(
                lib.pooled_input_grad(
                    ctypes.byref(g),
                    _pointer(w_nhwc),
                    _pointer(grad),
                    is_bf16,
                    _pointer(argmax),
                    batch,
                    _pointer(grad_x),
                    is_bf16,
                    threads,
                )
            )
        elif ctx.needs_input_grad[0]:
            grad_y = torch.empty(
                (batch, out_c, conv_h, conv_w), dtype=ctx.dtype, memory_format=torch.channels_last
            )
            _check(
                lib.max_pool_backward(
                    _pointer(grad), is_bf16, _pointer(argmax), *ctx.shape, _pointer(grad_y), threads
                )
            )
            grad_x = torch.ops.aten.convolution_backward(
                grad_y,
                padded,
                w,
                None,
                [1, 1],
                list(conv.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [True, False, False],
            )[0]
        grad_x = _cropped(ctx, grad_x)
        grad_w = torch.empty((out_c, g.in_c, g.kh, g.kw), memory_format=torch.channels_last)
        grad_b = torch.empty(out_c) if ctx.has_bias else None
        x_nhwc = padded.permute(0, 2, 3, 1)  # contiguous: padded is channels_last
        _check(
            lib.pooled_weight_grad(
                ctypes.byref(g),
                _pointer(x_nhwc),
                is_bf16,
                _pointer(grad),
                is_bf16,
                _pointer(argmax),
                batch,
                GRAD_CHUNK,
                _pointer(grad_w),
                _pointer(grad_b),
                threads,
            )
        )
        return grad_x, grad_w, grad_b, None, None


def _cropped(ctx: Any, grad_x: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient of `_ConvThenPool`'s input from that of its padded copy."""
    pad = ctx.conv.uneven_pad
    if grad_x is None or not pad:
        return grad_x
    left, _, top, _ = pad
    height, width = ctx.input_shape[2:]
    return grad_x[:, :, top : top + height, left : left + width]


def conv_then_pool(conv: KerasConv2D, pool: KerasMaxPool2D, x: torch.Tensor) -> torch.Tensor:
    """pool(act(conv(x))) for a `pooled_grad_fits` pair in training: the same values as the two
    modules, and the same gradients, with the conv's weight gradient (and, where
    `input_grad_fits`, its input gradient) computed in C from the pooled gradient's winners alone
    (a quarter of the conv's outputs, fewer after a ReLU)."""
    y = _ConvThenPool.apply(x, conv.weight, conv.bias, conv, pool)
    return pool.deferred_act(y) if pool.deferred_act is not None else y


def dropout_fits(x: torch.Tensor) -> bool:
    """Whether `dropout` can take x: a dense float32 or bf16 CPU tensor (contiguous or
    channels_last), outside tracing and compiling, with the kernels built."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.numel() > 0
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and _kernels_usable()
    )


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    lib = native.library()
    assert lib is not None
    y = torch.empty_like(x)  # the same strides, so element i of x is element i of y in memory
    is_bf16 = int(x.dtype == torch.bfloat16)
    threads = torch.get_num_threads()
    _check(lib.dropout(_pointer(x), _pointer(y), is_bf16, x.numel(), p, seed, threads))
    return y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        seed = dropout_seed()
        ctx.p, ctx.seed = p, seed
        ctx.dtype, ctx.memory_format = x.dtype, _memory_format(x)
        return _apply_dropout(x, p, seed)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad = grad_y.to(ctx.dtype).contiguous(memory_format=ctx.memory_format)
        return _apply_dropout(grad, ctx.p, ctx.seed), None  # the same mask, drawn again


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of a `dropout_fits` tensor in training, 0 <= p < 1: each value zeroed with
    probability p (rounded to a multiple of 1/65536), the rest scaled by the inverse of the keep
    rate. The mask comes from Philox4x32-10 counters (kernels.c), so it is the same for any
    thread count, and the backward pass draws it again instead of keeping it in memory."""
    return _Dropout.apply(x, p)


def dense_head_fits(
    first: KerasDense, dropout: nn.Dropout | None, second: KerasDense, x: torch.Tensor
) -> bool:
    """Whether `dense_head` can take Dense `first`, the Dropout after it (or None) and Dense
    `second` on x: in training with autograd, x a (batch, features) float32 or bf16 CPU tensor,
    `first` with a ReLU or no activation, `second` with none (a final softmax is stripped), a
    Dropout in training (the head would drop values that one in eval() keeps) with 0 <= p < 1,
    float32 weights that all train, and nothing watching or tracing the modules."""
    shapes_fit = (
        first.training
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[0] > 0
        and x.shape[1] == first.in_features
        and second.in_features == first.out_features
        and type(first.act) in (nn.ReLU, nn.Identity)
        and type(second.act) is nn.Identity
        and (dropout is None or (dropout.training and 0.0 <= dropout.p < 1.0))
    )
    if not shapes_fit:
        return False
    parameters = (first.weight, first.bias, second.weight, second.bias)
    watched = (first, first.act, second, second.act, *(() if dropout is None else (dropout,)))
    return (
        all(
            p is None or (p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad)
            for p in parameters
        )
        and unwatched(*watched)
        and _kernels_usable()
    )


# What `dense_head_run` keeps for `dense_head_grads`: the weights, the float32 input copies, the
# activations before and after the dropout, the dropout's factors, and the call's settings.
@dataclasses.dataclass(frozen=True)
class DenseHeadSaved:
    bf16: bool
    w1: torch.Tensor
    w2: torch.Tensor
    xf: torch.Tensor
    act: torch.Tensor
    dropped: torch.Tensor
    factor: torch.Tensor
    relu: bool
    x_dtype: torch.dtype
    biases: tuple[bool, bool]
    parts: int
    threads: int


def dense_head_run(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    relu: bool,
    p: float,
    bf16: bool,
) -> tuple[torch.Tensor, DenseHeadSaved]:
    """dense_head_forward on x (B, in_f): the float32 logits (B, out_f) and what the backward
    pass needs; with `bf16`, the first Dense's products in bf16 (`dense_head_options`). Draws
    the dropout's seed as the Dropout module would (none when p = 0)."""
    lib = native.library()
    assert lib is not None
    x, w1, w2 = x.contiguous(), w1.detach().contiguous(), w2.detach().contiguous()
    b1 = b1.detach().contiguous() if b1 is not None else None
    b2 = b2.detach().contiguous() if b2 is not None else None
    (batch, in_f), hidden, out_f = x.shape, w1.shape[0], w2.shape[0]
    threads = torch.get_num_threads()
    parts = min(threads, padded_to_lanes(hidden) // native.LANES)  # of the hidden units, per thread
    xf = torch.empty(parts, lib.dense_head_xf_floats(batch, in_f, int(bf16)))
    act = torch.empty(batch, padded_to_lanes(hidden))
    dropped, factor = torch.empty_like(act), torch.empty_like(act)
    logits = torch.empty(batch, out_f)
    seed = dropout_seed() if p > 0.0 else 0  # as the Dropout module draws it
    _check(
        lib.dense_head_forward(
            _pointer(x),
            int(x.dtype == torch.bfloat16),
            batch,
            in_f,
            hidden,
            out_f,
            _pointer(w1),
            _pointer(b1),
            int(relu),
            p,
            seed,
            _pointer(w2),
            _pointer(b2),
            parts,
            *map(_pointer, (xf, act, dropped, factor, logits)),
            threads,
            int(bf16),
        )
    )
    biases = (b1 is not None, b2 is not None)
    saved = DenseHeadSaved(
        bf16, w1, w2, xf, act, dropped, factor, relu, x.dtype, biases, parts, threads
    )
    return logits, saved


def dense_head_grads(
    saved: DenseHeadSaved, grad_logits: torch.Tensor, input_grad: bool
) -> tuple[torch.Tensor | None, ...]:
    """dense_head_backward: the gradients of x (with `input_grad`, in x's dtype), w1, b1, w2
    and b2 (None for a missing bias) of the `dense_head_run` that gave `saved`."""
    lib = native.library()
    assert lib is not None
    s = saved
    grad = grad_logits.float().contiguous()
    (hidden, in_f), batch, out_f = s.w1.shape, grad.shape[0], s.w2.shape[0]
    grad_x = torch.empty(batch, in_f, dtype=s.x_dtype) if input_grad else None
    grad_w1, grad_w2 = torch.empty_like(s.w1), torch.empty_like(s.w2)
    grad_b1 = torch.empty(hidden) if s.biases[0] else None
    grad_b2 = torch.empty(out_f) if s.biases[1] else None
    _check(
        lib.dense_head_backward(
            _pointer(grad),
            batch,
            in_f,
            hidden,
            out_f,
            _pointer(s.w1),
            int(s.relu),
            _pointer(s.w2),
            s.parts,
            *map(_pointer, (s.xf, s.act, s.dropped, s.factor, grad_x)),
            int(s.x_dtype == torch.bfloat16),
            *map(_pointer, (grad_w1, grad_b1, grad_w2, grad_b2)),
            s.threads,
            int(s.bf16),
        )
    )
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class _DenseHead(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor,
        b2: torch.Tensor | None,
        relu: bool,
        p: float,
        bf16: bool,
    ) -> torch.Tensor:
        logits, ctx.saved = dense_head_run(x, w1, b1, w2, b2, relu, p, bf16)
        ctx.save_for_backward(w1, w2)  # autograd's check that nothing changed them in place
        return logits

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018  (raises if the weights changed since the forward pass)
        grads = dense_head_grads(ctx.saved, grad_logits, ctx.needs_input_grad[0])
        del ctx.saved
        return *grads, None, None, None


def dense_head(
    first: KerasDense, dropout: nn.Dropout | None, second: KerasDense, x: torch.Tensor
) -> torch.Tensor:
    """second(dropout(first(x))) for a `dense_head_fits` trio in one C call each way, in float32
    as the modules compute it (their matrix products sum in another order: values within
    float32 rounding of theirs), or with the first Dense's products in bf16 where autocast would
    run it in bf16 (`dense_head_options`); the dropout's mask the one `dropout` draws for the
    same generator state."""
    relu, p, bf16 = dense_head_options(first, dropout)
    weights = (first.weight, first.bias, second.weight, second.bias)
    return _DenseHead.apply(x, *weights, relu, p, bf16)


def dense_head_options(first: KerasDense, dropout: nn.Dropout | None) -> tuple[bool, float, bool]:
    """The head kernel's (relu, p, bf16) for a `dense_head_fits` Dense and the Dropout after
    it: bf16 where autocast would run the Dense in bf16 (larger than FP32_DENSE_MAX_WEIGHTS,
    under bf16 autocast). The head then multiplies bf16 pairs (AVX512-BF16) and sums them in
    float32 as oneDNN does, but keeps the hidden values in float32 where the modules round them
    to bf16. Forward and backward 1.68x as fast as the float32 head on `dropout`'s 576-512-10,
    1.43x on `basic`'s 512-256-10; training steps against the modules (oneDNN's bf16 products):
    `dropout` 1.09-1.13x, `basic` 1.00-1.04x."""
    relu, p = type(first.act) is nn.ReLU, dropout.p if dropout is not None else 0.0
    return relu, p, bf16_autocast() and not first.fp32_under_autocast


def bf16_dense_head_fits() -> bool:
    """Whether the head can run its first Dense in bf16 here: under bf16 autocast, with
    AVX512-BF16 in the kernels."""
    return bf16_autocast() and bf16_conv_pool_built()
