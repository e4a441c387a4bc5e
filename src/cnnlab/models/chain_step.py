"""A whole-model chain's training step with its buffers kept between steps (`StepProgram`).

`Chain.forward_kept` and `Chain.backward_kept` run a chain's stages through the helpers in
cnnlab.models.fused, which allocate every output, save buffer and gradient afresh and lay out
the weights with a few PyTorch ops per stage: some seventy small ops a `dropout` step. Between
C kernels each costs several times what it does in a loop of its own (the caches and branch
predictors are cold), about 0.3 ms of a 4 ms step. Where one chain runs the whole model and no
autograd graph is built (cnnlab.training.gradients), nothing outside the step can see its
activations, window codes or the gradients passed between stages, so a `StepProgram` allocates
them once per plan and batch size and hands the kernels their addresses: a step then calls the
same kernels on the same values, with the same dropout seeds drawn in the same order, and
allocates only the parameters' gradients (which the step gives away). Its logits and weight
gradients are bit for bit those of `forward_kept` and `backward_kept`
(tests/test_models_chain_step.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from cnnlab import native
from cnnlab.models import fused
from cnnlab.models.chain import (
    BF16,
    Chain,
    DenseHeadStage,
    FirstBlock,
    FlattenStage,
    Grads,
    WinnersBlock,
)

Pointer = int  # a tensor's data_ptr(), as the kernels take it


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"cnnlab chain kernel failed with status {status}")


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself where it is contiguous, else a contiguous copy (kept alive by the
    caller until the kernel has read it)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-d tensor whose data holds its values in (B, H, W, C) order: the tensor itself where
    it is channels_last (no op), else a permuted copy."""
    if tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor
    return tensor.permute(0, 2, 3, 1).contiguous()


class _FirstRun:
    """`FirstBlock` (conv_pool_run, conv_pool_grads) on kept output and window buffers."""

    def __init__(self, stage: FirstBlock, batch: int) -> None:
        g = self.geometry = stage.geometry
        self.stage, self.batch, self.ref = stage, batch, ctypes.byref(g)
        self.y = torch.empty(
            (batch, g.out_c, g.out_rows, g.out_cols),
            dtype=stage.out_dtype,
            memory_format=torch.channels_last,
        )
        self.argmax = torch.empty((batch, g.out_rows, g.out_cols, g.out_c), dtype=torch.uint8)
        lib = native.library()
        pairs = fused.first_block_in_pairs(g, stage.out_dtype)
        self.kernel = lib.conv_pool_forward_pairs if pairs else lib.conv_pool_forward
        self.weight_grad = lib.conv_pool_weight_grad
        self.out_dtype = stage.out_dtype
        self.p = 0.0  # no dropout
        self.weight, self.bias = stage.params  # fixed for the chain (Chain.params)

    def forward(self, x: torch.Tensor, threads: int) -> Pointer:
        self.x_nhwc = _nhwc(x)
        weight, bias = _dense(self.weight), self.bias
        bias = _dense(bias) if bias is not None else None
        self.trains = self.weight.requires_grad or (bias is not None and bias.requires_grad)
        _check(
            self.kernel(
                self.ref,
                self.x_nhwc.data_ptr(),
                weight.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                self.batch,
                self.y.data_ptr(),
                int(self.out_dtype == BF16),
                self.argmax.data_ptr() if self.trains else None,
                threads,
            )
        )
        return self.y.data_ptr()

    def backward(self, grad: Pointer, threads: int) -> Grads:
        """grad: the gradient of our output, in its dtype."""
        if not self.trains:
            return [None, None]
        g = self.geometry
        grad_w = torch.empty((g.out_c, g.in_c, g.kh, g.kw))
        grad_b = torch.empty(g.out_c) if self.bias is not None else None
        _check(
            self.weight_grad(
                self.ref,
                self.x_nhwc.data_ptr(),
                grad,
                int(self.out_dtype == BF16),
                self.argmax.data_ptr(),
                self.batch,
                fused.GRAD_CHUNK,
                grad_w.data_ptr(),
                grad_b.data_ptr() if grad_b is not None else None,
                threads,
            )
        )
        del self.x_nhwc
        return [grad_w, grad_b]


class _WinnersRun:
    """`WinnersBlock` (conv_pool_act_dropout_bf16, winners_grads) on kept output, code and
    input-gradient buffers; its input is the previous stage's output buffer, padded as the
    conv needs where the previous stage did not write the padding."""

    def __init__(self, stage: WinnersBlock, batch: int, in_shape: tuple[int, ...]) -> None:
        g = self.geometry = stage.geometry
        self.stage, self.batch, self.ref = stage, batch, ctypes.byref(g)
        self.in_shape, self.p = in_shape, stage.p
        self.weight, self.bias = stage.params
        left, right, top, bottom = stage.pad
        padded = (batch, in_shape[1], in_shape[2] + top + bottom, in_shape[3] + left + right)
        self.grad_x = torch.empty(padded, dtype=BF16, memory_format=torch.channels_last)
        # the input padded here where its conv pads (else the previous stage's output as it is)
        self.x_in = torch.empty_like(self.grad_x) if any(stage.pad) else None
        self.y = torch.empty(
            (batch, g.out_c, g.pool_h, g.pool_w), dtype=BF16, memory_format=torch.channels_last
        )
        self.code = torch.empty((batch, g.pool_h, g.pool_w, g.out_c), dtype=torch.uint8)
        lib = native.library()
        self.conv_pool, self.act_dropout = lib.conv_pool_forward_bf16, lib.act_dropout_forward
        self.winners = lib.winners_backward

    def forward(self, x: torch.Tensor, threads: int, seeds: Iterator[int]) -> Pointer:
        """x: the previous stage's output buffer, as a (B, C, H, W) channels_last tensor; seeds:
        the step's dropout seeds in stage order."""
        stage = self.stage
        if self.x_in is not None:
            self.x_in.copy_(F.pad(x, stage.pad))
        self.x_ptr = (x if self.x_in is None else self.x_in).data_ptr()
        weight = _dense(self.weight)
        bias = _dense(self.bias) if self.bias is not None else None
        _check(
            self.conv_pool(
                self.ref,
                self.x_ptr,
                weight.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                self.batch,
                self.y.data_ptr(),
                self.code.data_ptr(),
                int(stage.relu and self.p == 0.0),  # the ReLU in the kernel where no dropout
                threads,
            )
        )
        if self.p > 0.0:  # the ReLU and the dropout in one pass
            n, seed = self.y.numel(), next(seeds)
            y, code = self.y.data_ptr(), self.code.data_ptr()
            relu = int(stage.relu)
            _check(self.act_dropout(y, 1, code, n, relu, self.p, seed, threads))
        return self.y.data_ptr()

    def backward(
        self, grad: Pointer, input_grad: bool, threads: int
    ) -> tuple[Pointer | None, Grads]:
        """grad: the gradient of our output, in bf16 as the output is."""
        g = self.geometry
        weight = _nhwc(self.weight.to(BF16))  # as autocast's conv multiplies by it (no grad here)
        grad_w = torch.empty((g.out_c, g.in_c, g.kh, g.kw), memory_format=torch.channels_last)
        grad_b = torch.empty(g.out_c) if self.bias is not None else None
        _check(
            self.winners(
                self.ref,
                self.x_ptr,
                1,
                weight.data_ptr(),
                1,
                grad,
                1,
                self.code.data_ptr(),
                self.p,
                self.batch,
                fused.GRAD_CHUNK,
                self.grad_x.data_ptr() if input_grad else None,
                grad_w.data_ptr(),
                grad_b.data_ptr() if grad_b is not None else None,
                fused.WINNERS_MAX_METHOD,
                threads,
            )
        )
        if not input_grad:
            return None, [grad_w, grad_b]
        if any(self.stage.pad):  # the unpadded input's gradient, as the previous stage reads it
            left, _, top, _ = self.stage.pad
            _, _, height, width = self.in_shape
            cropped = self.grad_x[:, :, top : top + height, left : left + width]
            self.grad_in = _nhwc(cropped)
            return self.grad_in.data_ptr(), [grad_w, grad_b]
        return self.grad_x.data_ptr(), [grad_w, grad_b]


class _HeadRun:
    """`DenseHeadStage` (dense_head_run, dense_head_grads) on kept buffers."""

    def __init__(
        self, stage: DenseHeadStage, batch: int, in_f: int, x_dtype: torch.dtype, threads: int
    ) -> None:
        lib = native.library()
        self.stage, self.batch, self.in_f, self.x_dtype = stage, batch, in_f, x_dtype
        self.relu, self.p, self.bf16 = fused.dense_head_options(stage.first, stage.dropout)
        self.params = stage.params
        hidden, out_f = stage.first.weight.shape[0], stage.second.weight.shape[0]
        self.hidden, self.out_f = hidden, out_f
        self.parts = min(threads, fused.padded_to_lanes(hidden) // native.LANES)
        self.xf = torch.empty(self.parts, lib.dense_head_xf_floats(batch, in_f, int(self.bf16)))
        self.act = torch.empty(batch, fused.padded_to_lanes(hidden))
        self.dropped, self.factor = torch.empty_like(self.act), torch.empty_like(self.act)
        self.logits = torch.empty(batch, out_f)
        self.forward_kernel, self.backward_kernel = lib.dense_head_forward, lib.dense_head_backward
        self.grad_x = torch.empty(batch, in_f, dtype=x_dtype)  # in the input's dtype

    def forward(self, x: Pointer, threads: int, seeds: Iterator[int]) -> torch.Tensor:
        self.weights = [_dense(t) if t is not None else None for t in self.params]
        w1, b1, w2, b2 = (t.data_ptr() if t is not None else None for t in self.weights)
        seed = next(seeds) if self.p > 0.0 else 0
        buffers = (self.xf, self.act, self.dropped, self.factor, self.logits)
        _check(
            self.forward_kernel(
                x,
                int(self.x_dtype == BF16),
                self.batch,
                self.in_f,
                self.hidden,
                self.out_f,
                w1,
                b1,
                int(self.relu),
                self.p,
                seed,
                w2,
                b2,
                self.parts,
                *(t.data_ptr() for t in buffers),
                threads,
                int(self.bf16),
            )
        )
        return self.logits

    def backward(
        self, grad_logits: torch.Tensor, input_grad: bool, threads: int
    ) -> tuple[Pointer | None, Grads]:
        w1, b1, w2, b2 = self.weights
        grad_x = self.grad_x if input_grad else None
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        grad_b1 = torch.empty(self.hidden) if b1 is not None else None
        grad_b2 = torch.empty(self.out_f) if b2 is not None else None
        grads = [grad_w1, grad_b1, grad_w2, grad_b2]
        buffers = (self.xf, self.act, self.dropped, self.factor)
        _check(
            self.backward_kernel(
                grad_logits.data_ptr(),
                self.batch,
                self.in_f,
                self.hidden,
                self.out_f,
                w1.data_ptr(),
                int(self.relu),
                w2.data_ptr(),
                self.parts,
                *(t.data_ptr() for t in buffers),
                grad_x.data_ptr() if grad_x is not None else None,
                int(self.x_dtype == BF16),
                *(t.data_ptr() if t is not None else None for t in grads),
                threads,
                int(self.bf16),
            )
        )
        del self.weights
        return (grad_x.data_ptr() if grad_x is not None else None), grads


class StepProgram:
    """A whole-model chain's forward and backward passes for one batch size, on buffers kept
    between steps. `forward` gives the logits (a kept buffer: read it before the next step);
    `backward` takes their gradient and gives one gradient per entry of `chain.params`."""

    def __init__(self, chain: Chain, batch: int, threads: int) -> None:
        self.chain, self.batch, self.threads = chain, batch, threads
        self.runs: list[Any] = []
        shape: tuple[int, ...] = ()
        for stage in chain.stages:
            if isinstance(stage, FirstBlock):
                run: Any = _FirstRun(stage, batch)
                shape, dtype = tuple(run.y.shape), run.y.dtype
            elif isinstance(stage, WinnersBlock):
                run = _WinnersRun(stage, batch, shape)
                shape, dtype = tuple(run.y.shape), run.y.dtype
            elif isinstance(stage, FlattenStage):
                shape = (batch, shape[1] * shape[2] * shape[3])
                continue  # a channels_last output is already flat in memory
            else:
                run = _HeadRun(stage, batch, shape[1], dtype, threads)
            self.runs.append(run)
        self.dropouts = sum(run.p > 0.0 for run in self.runs)  # seeds a step draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = self.threads
        first, *middle, head = self.runs
        # one draw for every dropout of the step, as each Dropout module would draw its own
        seeds = iter(fused.dropout_seeds(self.dropouts))
        pointer = first.forward(x, threads)
        out = first.y
        for run in middle:
            pointer = run.forward(out, threads, seeds)
            out = run.y
        return head.forward(pointer, threads, seeds)

    def backward(self, grad_logits: torch.Tensor) -> Grads:
        threads = self.threads
        first, *middle, head = self.runs
        pointer, grads = head.backward(grad_logits, True, threads)
        for run in reversed(middle):  # each gives its input's gradient in that input's dtype
            pointer, stage_grads = run.backward(pointer, True, threads)
            grads[:0] = stage_grads
        return first.backward(pointer, threads) + grads


def fits(chain: Chain) -> bool:
    """Whether a StepProgram can run this chain: a first block, winners blocks, a flatten and a
    dense head, in that order (every whole-model chain `chain.plan` makes)."""
    stages = chain.stages
    return (
        len(stages) >= 3
        and isinstance(stages[0], FirstBlock)
        and isinstance(stages[-1], DenseHeadStage)
        and isinstance(stages[-2], FlattenStage)
        and all(isinstance(s, WinnersBlock) for s in stages[1:-2])
    )


def program_for(chain: Chain, batch: int) -> StepProgram | None:
    """The chain's StepProgram for this batch size and thread count, made once and kept on the
    chain (whose plan already fixes the batch size); None where `fits` says no."""
    if not fits(chain):
        return None
    threads = torch.get_num_threads()
    kept = chain.__dict__.get("_program")
    if kept is None or kept.batch != batch or kept.threads != threads:
        kept = StepProgram(chain, batch, threads)
        # in the frozen chain's own __dict__, as functools.cached_property keeps its values
        object.__setattr__(chain, "_program", kept)
    return kept
