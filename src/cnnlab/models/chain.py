"""A model's first layers in training as one autograd Function of C kernel calls (`chain_prefix`).

`LayerStack` runs each fused block of a small CNN (cnnlab.models.fused) as its own autograd
Function, and checks before each one whether it still fits: for `tiny` that is three Functions,
three sets of gates and the autograd nodes between them. On a 2-core CPU that Python costs as
much as the C kernels themselves (half of a 2.4 ms `tiny` step). Here the run of blocks at the
start of a model is planned once per input shape and setting (`Chain`, cached per model) and
runs as one Function: its forward pass calls the kernels one after the other, its backward pass
calls their gradients in reverse order, and nothing else runs between them.

The stages, in the order a chain may take them:
- `FirstBlock`: Conv2D on few channels and its MaxPool2D (`fused.conv_pool_run`), writing the
  next conv's bottom and right padding where that conv pads only there;
- `WinnersBlock` (under bf16 autocast, with AVX512-BF16): a Conv2D, its MaxPool2D, the deferred
  ReLU and an optional Dropout in the bf16 conv-pool kernel, the gradients from the pool's
  winners (`fused.winners_grads`);
- `FlattenStage`: Keras' channels-last flatten, a view;
- `DenseHeadStage`: Dense, optional Dropout, Dense (`fused.dense_head_run`: in float32, or the
  first Dense's products in bf16 where autocast would run that Dense in bf16).
A chain starts with a first block and takes at least two kernel stages; the layers after it run
as they did. It takes a block only where the blocks one by one would run the same kernels on
it, and draws dropout seeds in the same order, so logits and gradients are bit for bit the
blocks' (tests/test_models_chain.py). `tiny`'s training steps: 1.10-1.13x faster.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import native
from cnnlab.models import fused

if TYPE_CHECKING:  # layers.py imports this module
    from cnnlab.models.layers import KerasConv2D, KerasDense, KerasMaxPool2D

Pad = tuple[int, int, int, int]  # (left, right, top, bottom), as F.pad takes it
Grads = list[torch.Tensor | None]
MIN_KERNEL_STAGES = 2  # one kernel stage alone is what its own Function already does
BF16 = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class FirstBlock:
    """Conv2D and MaxPool2D on the model's input (which takes no gradient); the geometry's
    out_rows and out_cols may exceed the pooled size by the next conv's bottom and right
    padding, which the kernel writes as zeros."""

    conv: KerasConv2D
    geometry: native.ConvPoolGeometry
    out_dtype: torch.dtype

    @property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        return self.conv.weight, self.conv.bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        train = any(p is not None and p.requires_grad for p in self.params)
        y, x_nhwc, argmax = fused.conv_pool_run(
            x, self.conv.weight, self.conv.bias, self.geometry, self.out_dtype, train
        )
        return y, (x_nhwc, argmax)

    def backward(self, saved: Any, grad: torch.Tensor, input_grad: bool) -> tuple[None, Grads]:
        x_nhwc, argmax = saved
        if argmax is None:  # frozen
            return None, [None, None]
        has_bias = self.conv.bias is not None
        weight, bias = fused.conv_pool_grads(self.geometry, x_nhwc, argmax, grad, has_bias)
        return None, [weight, bias]


@dataclasses.dataclass(frozen=True)
class WinnersBlock:
    """Conv2D (on its input padded by `pad`), MaxPool2D, the ReLU the pool applies (or none) and
    the Dropout after them (p = 0 for none), in bf16."""

    conv: KerasConv2D
    geometry: native.ConvPoolGeometry
    pad: Pad
    relu: bool
    dropout: nn.Dropout | None

    @property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        return self.conv.weight, self.conv.bias

    @property
    def p(self) -> float:
        return self.dropout.p if self.dropout is not None else 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x_in = F.pad(x, self.pad) if any(self.pad) else x
        x_in = x_in.contiguous(memory_format=torch.channels_last)
        weight, bias = self.conv.weight, self.conv.bias
        y, code = fused.conv_pool_act_dropout_bf16(
            x_in, weight, bias, self.geometry, self.relu, self.p
        )
        return y, (x_in, code, x.shape)

    def backward(
        self, saved: Any, grad: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor | None, Grads]:
        x_in, code, in_shape = saved
        grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        weight = self.conv.weight.detach().to(BF16)  # as autocast's conv would multiply by it
        has_bias = self.conv.bias is not None
        grad_x, grad_w, grad_b = fused.winners_grads(
            self.geometry,
            x_in,
            weight,
            grad,
            code,
            self.p,
            input_grad=input_grad,
            has_bias=has_bias,
        )
        if grad_x is not None and any(self.pad):
            left, _, top, _ = self.pad
            grad_x = grad_x[:, :, top : top + in_shape[2], left : left + in_shape[3]]
        return grad_x, [grad_w, grad_b]


@dataclasses.dataclass(frozen=True)
class FlattenStage:
    """Keras' Flatten, (B, C, H, W) -> (B, H*W*C): a view of a channels_last tensor."""

    @property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        return ()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x.permute(0, 2, 3, 1).flatten(1), x.shape

    def backward(self, saved: Any, grad: torch.Tensor, input_grad: bool) -> tuple[Any, Grads]:
        batch, channels, height, width = saved
        return grad.view(batch, height, width, channels).permute(0, 3, 1, 2), []


@dataclasses.dataclass(frozen=True)
class DenseHeadStage:
    """Dense (ReLU or none), an optional Dropout and Dense: float32 logits."""

    first: KerasDense
    dropout: nn.Dropout | None
    second: KerasDense

    @property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        return self.first.weight, self.first.bias, self.second.weight, self.second.bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        relu, p, bf16 = fused.dense_head_options(self.first, self.dropout)
        return fused.dense_head_run(x, *self.params, relu, p, bf16)

    def backward(
        self, saved: Any, grad: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor | None, Grads]:
        grad_x, *grads = fused.dense_head_grads(saved, grad, input_grad)
        return grad_x, grads


Stage = FirstBlock | WinnersBlock | FlattenStage | DenseHeadStage


@dataclasses.dataclass(frozen=True)
class Chain:
    """Stages that run `modules` layers of a model as one Function."""

    stages: tuple[Stage, ...]
    modules: int

    @functools.cached_property
    def params(self) -> tuple[torch.Tensor | None, ...]:
        """The stages' parameters (None for a missing bias), read once: a chain is planned for
        the parameters its plan's key names, so another parameter takes another chain."""
        return tuple(p for stage in self.stages for p in stage.params)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _ChainFunction.apply(x, self, *self.params)

    def forward_kept(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """The stages' forward passes outside autograd: the output, and what each stage keeps
        for its backward pass."""
        kept = []
        for stage in self.stages:
            x, saved = stage.forward(x)
            kept.append(saved)
        return x, kept

    def backward_kept(
        self, kept: list[Any], grad: torch.Tensor, input_grad: bool
    ) -> tuple[torch.Tensor | None, Grads]:
        """The stages' backward passes in reverse order, from the gradient of the output: the
        input's gradient (None unless `input_grad`) and one gradient per entry of `params`."""
        grads: Grads = []
        for k in reversed(range(len(self.stages))):
            grad, stage_grads = self.stages[k].backward(kept[k], grad, k > 0 or input_grad)
            grads[:0] = stage_grads
        return grad, grads


class _ChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, chain: Chain, *params: Any) -> torch.Tensor:  # type: ignore[override]
        x, ctx.kept = chain.forward_kept(x)
        ctx.chain = chain
        ctx.save_for_backward(*(p for p in params if p is not None))  # in-place change checks
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018  (raises if a weight changed since the forward pass)
        grad, grads = ctx.chain.backward_kept(ctx.kept, grad, ctx.needs_input_grad[0])
        del ctx.kept
        needed = ctx.needs_input_grad[2:]
        return grad, None, *(g if need else None for g, need in zip(grads, needed, strict=True))


# ------------------------------------------------------------------------------ planning


def _stand_in(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the shape, dtype and layout a stage outputs, for the gates that look at one."""
    if len(shape) == 4:
        return torch.empty(tuple(shape), dtype=dtype, memory_format=torch.channels_last)
    return torch.empty(tuple(shape), dtype=dtype)


def _conv_and_pool(
    modules: Sequence[nn.Module], i: int, shape: Sequence[int]
) -> tuple[KerasConv2D, KerasMaxPool2D, Pad] | None:
    """The Conv2D and MaxPool2D at modules[i:] and the padding the conv's input needs there (its
    uneven 'same' padding less what the pool never reads), for an input of this shape."""
    from cnnlab.models.layers import KerasConv2D, KerasMaxPool2D

    conv, pool = [*modules[i : i + 2], None, None][:2]
    if not (isinstance(conv, KerasConv2D) and isinstance(pool, KerasMaxPool2D)):
        return None
    pad = conv.pad_for_pool(pool, shape[2], shape[3]) or conv.uneven_pad or (0, 0, 0, 0)
    return conv, pool, pad


def _winners_block(
    modules: Sequence[nn.Module], i: int, shape: Sequence[int], padded: bool
) -> tuple[WinnersBlock, int, tuple[int, ...]] | None:
    """The WinnersBlock at modules[i:] on a bf16 input of this shape (which already carries the
    conv's padding where `padded`): the stage, how many modules it takes and its output shape.
    None unless the blocks one by one would run the same kernels on these layers (the bf16
    conv-pool kernel, its ReLU and dropout, and `winners_backward`), so that the chain changes
    how they are called and nothing else."""
    from cnnlab.models.layers import KerasDropout

    found = _conv_and_pool(modules, i, shape)
    if found is None:
        return None
    conv, pool, pad = found
    dropout = modules[i + 2] if i + 2 < len(modules) else None
    if not isinstance(dropout, KerasDropout):
        dropout = None
    batch, channels, height, width = shape
    x = _stand_in(shape, BF16).requires_grad_()
    p = dropout.p if dropout is not None and dropout.training else 0.0
    if padded:
        pad = (0, 0, 0, 0)
    padded_x = _stand_in((batch, channels, height + pad[2] + pad[3], width + pad[0] + pad[1]), BF16)
    act = pool.deferred_act
    if not (
        conv.training
        and pool.training
        and (act is None or type(act) is nn.ReLU)
        and fused.winners_fit(conv, pool)
        and fused.bf16_conv_pool_fits(conv)
        and (
            fused.conv_pool_dropout_fits(conv, pool, dropout, x, pad)  # type: ignore[arg-type]
            if p > 0.0
            else fused.pooled_grad_fits(conv, pool, padded_x.requires_grad_())
        )
    ):
        return None
    geometry = fused.block_geometry(conv, pool, padded_x.shape, (0, 0), (0, 0))
    stage = WinnersBlock(conv, geometry, pad, act is not None, dropout if p > 0.0 else None)
    out = (batch, geometry.out_c, geometry.pool_h, geometry.pool_w)
    return stage, 2 if dropout is None else 3, out


def _written_padding(modules: Sequence[nn.Module], shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of zeros the first block can write below and to the right of its output
    of this shape for a WinnersBlock after it, whose conv pads only there; (0, 0) elsewhere."""
    found = _conv_and_pool(modules, 2, shape)
    if found is None:
        return 0, 0
    left, right, top, bottom = found[2]
    if left or top or not (right or bottom) or _winners_block(modules, 2, shape, False) is None:
        return 0, 0
    return bottom, right


def _dense_head(
    modules: Sequence[nn.Module], i: int, shape: Sequence[int], dtype: torch.dtype
) -> tuple[DenseHeadStage, int] | None:
    """The DenseHeadStage at modules[i:] on an input of this shape and dtype, and how many
    modules it takes; None where it does not fit."""
    from cnnlab.models.layers import LayerStack

    x = _stand_in(shape, dtype).requires_grad_()
    found = LayerStack.dense_head_at(list(modules), i, x)
    if found is None:
        return None
    first, dropout, second = found
    return DenseHeadStage(first, dropout, second), 2 if dropout is None else 3


def plan(modules: Sequence[nn.Module], x: torch.Tensor) -> Chain | None:
    """The chain for a training step of these layers on x, or None where none fits."""
    from cnnlab.models.layers import KerasConv2D, KerasFlatten, KerasMaxPool2D

    conv, pool = [*modules[:2], None, None][:2]
    if not (
        isinstance(conv, KerasConv2D)
        and isinstance(pool, KerasMaxPool2D)
        and torch.is_grad_enabled()
        and fused.fusable(conv, pool)
        and fused.fusable_now(conv, pool, x)
    ):
        return None
    bf16 = fused.bf16_autocast()
    dtype = BF16 if bf16 else torch.float32
    geometry = fused.first_block_geometry(conv, pool, x, (0, 0))
    shape: tuple[int, ...] = (x.shape[0], geometry.out_c, geometry.pool_h, geometry.pool_w)
    written = _written_padding(modules, shape) if bf16 else (0, 0)
    if any(written):
        geometry = fused.first_block_geometry(conv, pool, x, written)
        shape = (*shape[:2], geometry.out_rows, geometry.out_cols)
    stages: list[Stage] = [FirstBlock(conv, geometry, dtype)]
    i, kernel_stages = 2, 1
    while i < len(modules):
        block = _winners_block(modules, i, shape, i == 2 and any(written)) if bf16 else None
        if block is not None:
            stage, taken, shape = block
            stages.append(stage)
            i, kernel_stages = i + taken, kernel_stages + 1
        elif isinstance(modules[i], KerasFlatten) and len(shape) == 4:
            stages.append(FlattenStage())
            shape, i = (shape[0], shape[1] * shape[2] * shape[3]), i + 1
        else:
            head = _dense_head(modules, i, shape, dtype) if len(shape) == 2 else None
            if head is not None:
                stages.append(head[0])
                i, kernel_stages = i + head[1], kernel_stages + 1
            break
    if isinstance(stages[-1], FlattenStage):  # a view: nothing gained by ending on it
        stages.pop()
        i -= 1
    if kernel_stages < MIN_KERNEL_STAGES:
        return None
    return Chain(tuple(stages), i)


@dataclasses.dataclass
class _StackPlans:
    """A LayerStack's plans and the modules their keys read, gathered once per set of layers."""

    layers: tuple[nn.Module, ...]
    modules: tuple[tuple[nn.Module, ...], ...]  # per layer: the layer and every module inside it
    plans: dict[tuple, Chain | None] = dataclasses.field(default_factory=dict)
    _watched: dict[int, tuple[nn.Module, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> _StackPlans:
        return cls(tuple(layers), tuple(tuple(layer.modules()) for layer in layers))

    @functools.cached_property
    def _all(self) -> tuple[nn.Module, ...]:
        return tuple(m for layer in self.modules for m in layer)

    @functools.cached_property
    def _rates(self) -> tuple[nn.Module, ...]:
        return tuple(m for m in self._all if isinstance(getattr(m, "p", None), float))

    @functools.cached_property
    def _parameter_dicts(self) -> tuple[dict[str, Any], ...]:
        return tuple(m._parameters for m in self._all)

    def key(self, x: torch.Tensor) -> tuple:
        """What a plan depends on that can change between calls: the input, autocast, the kernels
        built, each module's mode and dropout rate, and its parameters (which tensors, whether
        they train, their dtypes and devices)."""
        params = [p for d in self._parameter_dicts for p in d.values() if p is not None]
        return (
            x.shape,
            x.dtype,
            x.is_cpu,
            x.requires_grad,
            fused.bf16_autocast(),
            id(native.library()),
            tuple([m.training for m in self._all]),
            tuple([m.p for m in self._rates]),  # type: ignore[misc]
            tuple(map(id, params)),
            tuple([p.requires_grad for p in params]),
            tuple([p.dtype for p in params]),
            tuple([p.is_cpu for p in params]),
        )

    def watched(self, count: int) -> bool:
        """Whether a hook watches any of the first `count` layers or a module inside them (or
        every module), or something traces or compiles the call."""
        modules = self._watched.get(count)
        if modules is None:
            modules = self._watched[count] = tuple(
                m for layer in self.modules[:count] for m in layer
            )
        return not fused.unwatched(*modules)


MAX_PLANS = 64  # per model: input shapes and settings seen; more are planned afresh


# Per LayerStack, weakly held: a model that is gone takes its plans with it.
_stacks: weakref.WeakKeyDictionary[nn.Module, _StackPlans] = weakref.WeakKeyDictionary()


def chain_prefix(stack: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> Chain | None:
    """The chain to run at the start of `stack` (a LayerStack of these layers) on x in this
    training step, or None: planned once per `_StackPlans.key`, and only taken while nothing
    watches or traces the layers it runs."""
    if not (stack.training and torch.is_grad_enabled()):
        return None
    entry = _stacks.get(stack)
    if entry is None or entry.layers != tuple(layers):
        entry = _stacks[stack] = _StackPlans.of(layers)
    key = entry.key(x)
    chain = entry.plans.get(key, False)
    if chain is False:
        if len(entry.plans) >= MAX_PLANS:
            entry.plans.clear()
        chain = entry.plans[key] = plan(layers, x)
    if chain is None or entry.watched(chain.modules):
        return None
    return chain


def whole_model_chain(model: nn.Module, x: torch.Tensor) -> Chain | None:
    """The chain that runs every layer of `model` (a CnnModel) in this training step on x, where
    one does and no hook watches the model, its layers or its parameters' gradients; else None.

    A step of such a model needs no autograd graph around it: `Chain.forward_kept`, then
    `Chain.backward_kept` from the logits' gradient, then `accumulate_grads` (see
    cnnlab.training.gradients)."""
    from cnnlab.models.layers import CnnModel

    if not isinstance(model, CnnModel) or type(model).forward is not CnnModel.forward:
        return None
    stack = model.layers
    if not fused.unwatched(model, stack):
        return None
    layers = list(stack)
    found = chain_prefix(stack, layers, x)
    if found is None or found.modules != len(layers):
        return None
    for param in found.params:
        if param is not None and (param._backward_hooks or param._post_accumulate_grad_hooks):
            return None
    return found


def accumulate_grads(params: Sequence[torch.Tensor | None], grads: Grads) -> None:
    """Add each gradient to its parameter's `.grad` as autograd does: in the parameter's dtype
    and layout, set where `.grad` is None and added where it is not. Parameters that take no
    gradient are left alone."""
    for param, grad in zip(params, grads, strict=True):
        if param is None or grad is None or not param.requires_grad:
            continue
        same_strides = grad.stride() == param.stride()  # the usual case, without a loop
        if grad.dtype != param.dtype or not (same_strides or _same_layout(grad, param)):
            grad = torch.empty_like(param).copy_(grad)
        if param.grad is None:
            param.grad = grad
        else:
            param.grad += grad


def _same_layout(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether autograd would keep `grad` as `param`'s gradient as it is: the same strides,
    except along dimensions of size 1 (which no element steps along)."""
    return all(
        stride == wanted or (size == 1 and stride != 0)
        for size, stride, wanted in zip(grad.shape, grad.stride(), param.stride(), strict=True)
    )
