"""cnnlab.models.chain_step: a StepProgram runs a whole-model chain's training step on buffers it
keeps between steps, and gives bit for bit the logits and gradients of the chain's stages run
one by one (`Chain.forward_kept`, `Chain.backward_kept`), step after step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cnnlab.models import (
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    build_model,
    chain,
    chain_step,
    fused,
    preset_layers,
)
from cnnlab.models.layers import CnnModel

SHAPE = (1, 28, 28)
FIRST_BLOCK_AND_HEAD = [
    Conv2D(16, (3, 3), activation="relu"),
    MaxPool2D((2, 2)),
    Flatten(),
    Dense(32, activation="relu"),
    Dropout(0.25),
    Dense(10),
]
PADDED_WINNERS = [  # the 4x4 'same' conv's input takes an F.pad on every side
    Conv2D(16, (3, 3), activation="relu"),
    MaxPool2D((2, 2)),
    Conv2D(32, (4, 4), padding="same", activation="relu"),
    MaxPool2D((2, 2)),
    Dropout(0.2),
    Flatten(),
    Dense(32, activation="relu"),
    Dense(10),
]
MODELS = {
    "tiny": preset_layers("tiny", 10, SHAPE),
    "basic": preset_layers("basic", 10, SHAPE),
    "dropout": preset_layers("dropout", 10, SHAPE),
    "padded winners": PADDED_WINNERS,
    "first block and head": FIRST_BLOCK_AND_HEAD,
}


def model_of(layers: list, seed: int = 0) -> CnnModel:
    torch.manual_seed(seed)
    return build_model(layers, SHAPE, 10).to(memory_format=torch.channels_last).train()


def images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=generator)
    return x.contiguous(memory_format=torch.channels_last)


def whole_chain(model: CnnModel, x: torch.Tensor, amp: bool) -> chain.Chain:
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        found = chain.whole_model_chain(model, x)
    assert found is not None
    return found


def by_stages(found: chain.Chain, x: torch.Tensor, grad: torch.Tensor, amp: bool):
    torch.manual_seed(7)  # the same dropout seeds each way
    with torch.autocast("cpu", torch.bfloat16, enabled=amp), torch.no_grad():
        logits, kept = found.forward_kept(x)
        _, grads = found.backward_kept(kept, grad.to(logits.dtype), input_grad=False)
    return logits, grads


def by_program(found: chain.Chain, x: torch.Tensor, grad: torch.Tensor, amp: bool):
    torch.manual_seed(7)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp), torch.no_grad():
        program = chain_step.program_for(found, x.shape[0])
        assert program is not None
        logits = program.forward(x).clone()  # a kept buffer: the next step writes over it
        grads = program.backward(grad.to(logits.dtype).contiguous())
    return logits, grads


def assert_same(mine, reference) -> None:
    (logits, grads), (ref_logits, ref_grads) = mine, reference
    assert torch.equal(logits, ref_logits)
    assert len(grads) == len(ref_grads)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert grad.dtype == ref.dtype and grad.shape == ref.shape
            assert grad.stride() == ref.stride()
            assert torch.equal(grad, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_program_gives_the_stages_bits_step_after_step(bf16_kernels, name):
    """Two steps on other batches (the second writes over the first's buffers), each against
    the stages one by one."""
    model = model_of(MODELS[name])
    for seed in (1, 2):
        x = images(24, seed)
        found = whole_chain(model, x, amp=True)
        grad = torch.randn(24, 10, generator=torch.Generator().manual_seed(seed))
        assert_same(by_program(found, x, grad, True), by_stages(found, x, grad, True))


def test_the_padded_winners_model_takes_a_padded_input(bf16_kernels):
    found = whole_chain(model_of(PADDED_WINNERS), images(8, 1), amp=True)
    assert any(isinstance(s, chain.WinnersBlock) and any(s.pad) for s in found.stages)


def test_a_frozen_first_conv_takes_no_gradient(bf16_kernels):
    model = model_of(preset_layers("dropout", 10, SHAPE))
    model.layers[0].weight.requires_grad_(False)
    model.layers[0].bias.requires_grad_(False)
    x, grad = images(16, 4), torch.randn(16, 10)
    found = whole_chain(model, x, amp=True)
    mine = by_program(found, x, grad, True)
    assert mine[1][:2] == [None, None]
    assert_same(mine, by_stages(found, x, grad, True))


def test_a_program_is_kept_and_remade_for_another_thread_count(bf16_kernels):
    model, x = model_of(preset_layers("dropout", 10, SHAPE)), images(16, 5)
    found = whole_chain(model, x, amp=True)
    with torch.autocast("cpu", torch.bfloat16):
        first = chain_step.program_for(found, 16)
        assert chain_step.program_for(found, 16) is first
        threads = torch.get_num_threads()
        other = 1 if threads > 1 else 2  # the dense head's parts follow the threads
        try:
            torch.set_num_threads(other)
            remade = chain_step.program_for(found, 16)
            assert remade is not first and remade.threads == other
            grad = torch.randn(16, 10)
            assert_same(by_program(found, x, grad, True), by_stages(found, x, grad, True))
        finally:
            torch.set_num_threads(threads)


def test_chains_of_other_stages_take_no_program(bf16_kernels):
    found = whole_chain(model_of(preset_layers("dropout", 10, SHAPE)), images(8, 1), amp=True)
    assert chain_step.fits(found)
    no_head = dataclasses.replace(found, stages=found.stages[:-2])
    assert not chain_step.fits(no_head)
    assert chain_step.program_for(no_head, 8) is None


@pytest.mark.parametrize("count", [0, 1, 3])
def test_seeds_drawn_at_once_are_those_drawn_one_by_one(count):
    torch.manual_seed(11)
    one_by_one = [fused.dropout_seed() for _ in range(count)]
    after = torch.rand(3)
    torch.manual_seed(11)
    assert fused.dropout_seeds(count) == one_by_one
    assert torch.equal(torch.rand(3), after)  # the generator moved on as far
