"""A training step's forward pass, loss and gradients: through autograd, or without a graph where
one chain of C kernels runs the whole model.

Where `cnnlab.models.chain` runs every layer of a model as one chain (`tiny`, `basic` and
`dropout` on a CPU with bf16), no autograd graph is built: the chain's forward pass gives the
logits, one C call (`softmax_cross_entropy`) the loss, its gradient and the accuracy count, the
chain's backward pass the gradients, which go to the parameters as autograd would put them, and
one more C call checks that they are finite. Both passes run as a `StepProgram`
(cnnlab.models.chain_step): the chain's kernels on buffers kept from step to step. That skips
the autograd Function, the engine, a gradient node per parameter and a dozen small PyTorch ops
around the kernels; on a 2-core CPU each of those costs several times what it does in a loop of
its own, because the kernels between them leave the caches and branch predictors cold (README,
Performance).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import native
from cnnlab.inference import autocast_for
from cnnlab.models.chain import accumulate_grads, whole_model_chain
from cnnlab.models.chain_step import program_for


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """What a training step reports: the batch's mean loss, how many of its images the model
    classified right, and whether every gradient is finite."""

    loss: float
    correct: int
    finite_grads: bool


def loss_and_grads(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    device: torch.device,
    amp: bool,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> StepLoss:
    """Run `model` (or `forward`, a compiled form of it) on a batch under autocast as `amp`
    asks, take the cross-entropy loss and add its gradients to the parameters' `.grad`. The
    report checks the gradients of `params` (those the optimiser steps)."""
    forward = forward or model
    with autocast_for(device, amp):
        whole = whole_model_chain(model, inputs) if forward is model else None
        program = program_for(whole, inputs.shape[0]) if whole is not None else None
        if program is None:
            logits = forward(inputs)
        else:
            with torch.no_grad():
                logits = program.forward(inputs)
    if program is None:
        loss = F.cross_entropy(
            logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing
        )
        loss.backward()
        return _checked(loss.detach(), logits.detach(), labels, params)
    if class_weights is None:
        grad, loss_value, correct = softmax_cross_entropy(logits, labels, label_smoothing)
    else:  # the program's logits are a buffer it keeps: a leaf of their own for autograd
        leaf = logits.detach().float().requires_grad_()
        loss = F.cross_entropy(leaf, labels, weight=class_weights, label_smoothing=label_smoothing)
        loss.backward()
        grad, loss_value = leaf.grad, loss.item()
        correct = int((logits.argmax(1) == labels).sum())
    with torch.no_grad():
        grads = program.backward(grad.to(logits.dtype).contiguous())
    accumulate_grads(program.chain.params, grads)
    present = [p.grad for p in params if p.grad is not None]
    return StepLoss(loss_value, correct, all_finite(present))


def _checked(
    loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, params: Sequence[torch.Tensor]
) -> StepLoss:
    """The report of a step through autograd, with one device-to-host transfer for the loss,
    the accuracy count and the finiteness check (each sync stalls a GPU's queue), in as few ops
    as can do it. NaN or inf in any gradient makes its norm, and so the sum of norms,
    non-finite."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    correct = (logits.argmax(1) == labels).sum(dtype=torch.float32)
    loss_value, correct_value, *norm_values = torch.stack(
        [loss, correct, *(norm.float() for norm in norms)]
    ).tolist()
    return StepLoss(loss_value, int(correct_value), math.isfinite(math.fsum(norm_values)))


def softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, float, int]:
    """F.cross_entropy's batch mean of float32 CPU logits (N, K), without class weights, in one
    C call: its gradient with respect to the logits, the loss and the number of rows whose
    largest logit is the label."""
    logits = logits.float().contiguous()
    labels = labels.to(torch.int64).contiguous()
    grad = torch.empty_like(logits)
    loss, correct = ctypes.c_double(), ctypes.c_int64()
    lib = native.library()
    assert lib is not None  # a whole-model chain runs the C kernels
    status = lib.softmax_cross_entropy(
        logits.data_ptr(),
        labels.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        label_smoothing,
        grad.data_ptr(),
        ctypes.byref(loss),
        ctypes.byref(correct),
    )
    if status:
        bad = labels[(labels < 0) | (labels >= logits.shape[1])][0]
        raise IndexError(f"Target {int(bad)} is out of bounds for {logits.shape[1]} classes.")
    return grad, loss.value, correct.value


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of these tensors is finite: one C call where all are dense float32
    CPU tensors (a whole-model chain's gradients), torch ops otherwise."""
    lib = native.library()
    if lib is None or not all(_plain_float32(t) for t in tensors):
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    count = len(tensors)
    arrays = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * count)(*[t.numel() for t in tensors])
    return bool(lib.all_finite(arrays, sizes, count))


def _plain_float32(tensor: torch.Tensor) -> bool:
    """A float32 CPU tensor whose values fill `numel` floats from its data pointer: contiguous,
    or a channels_last conv weight."""
    return (
        tensor.dtype == torch.float32
        and tensor.is_cpu
        and (
            tensor.is_contiguous()
            or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
        )
    )
