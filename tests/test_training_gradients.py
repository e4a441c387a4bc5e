"""cnnlab.training.gradients: a whole-model chain's training step without an autograd graph
gives the loss, accuracy count and gradients of the step through autograd, and steps aside
wherever something could see the difference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import through_autograd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab.config import TrainConfig
from cnnlab.inference import Preprocessing
from cnnlab.models import (
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    build_model,
    chain,
    preset_layers,
)
from cnnlab.models.layers import CnnModel
from cnnlab.training import gradients
from cnnlab.training.loop import NonFiniteLossError, Trainer

SHAPE = (1, 28, 28)
CPU = torch.device("cpu")


def preset_model(preset: str, seed: int = 0) -> CnnModel:
    torch.manual_seed(seed)
    model = build_model(preset_layers(preset, 10, SHAPE), SHAPE, 10)
    return model.to(memory_format=torch.channels_last).train()


def batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *SHAPE), generator=generator).contiguous(
        memory_format=torch.channels_last
    )
    return images, torch.randint(0, 10, (n,), generator=generator)


def step(
    model: CnnModel, x: torch.Tensor, y: torch.Tensor, amp: bool = True, **options
) -> gradients.StepLoss:
    torch.manual_seed(7)  # the same dropout masks for each way
    return gradients.loss_and_grads(
        model, x, y, list(model.parameters()), device=CPU, amp=amp, **options
    )


def both_ways(model: CnnModel, amp: bool = True, **options):
    """The report and gradients of one step without a graph and of the same step through
    autograd, on copies of one model."""
    direct, autograd = copy.deepcopy(model), copy.deepcopy(model)
    x, y = batch()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        assert gradients.whole_model_chain(direct, x) is not None  # the path under test runs
    direct_loss = step(direct, x, y, amp, **options)
    with through_autograd():
        autograd_loss = step(autograd, x, y, amp, **options)
    grads = [
        (p.grad, q.grad) for p, q in zip(direct.parameters(), autograd.parameters(), strict=True)
    ]
    return direct_loss, autograd_loss, grads


def assert_close_grads(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for mine, reference in grads:
        assert mine.dtype == reference.dtype and mine.stride() == reference.stride()
        scale = reference.abs().max().item()
        assert (mine - reference).abs().max().item() <= 1e-3 * scale + 1e-7


@pytest.mark.parametrize("preset", ["tiny", "basic", "dropout"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_step_without_a_graph_gives_the_autograd_step(bf16_kernels, preset, smoothing):
    direct, autograd, grads = both_ways(preset_model(preset), label_smoothing=smoothing)
    assert direct.loss == pytest.approx(autograd.loss, rel=1e-6)
    assert direct.correct == autograd.correct
    assert direct.finite_grads and autograd.finite_grads
    assert_close_grads(grads)


def test_a_chain_of_a_first_block_and_a_head_steps_without_a_graph_too(bf16_kernels):
    """A conv-pool block on the input and a Dense-Dropout-Dense head make a whole chain under
    bf16 autocast, with no conv after the first (a chain of other stages than the presets')."""
    layers = [
        Conv2D(16, (3, 3), activation="relu"),
        MaxPool2D((2, 2)),
        Flatten(),
        Dense(32, activation="relu"),
        Dropout(0.25),
        Dense(10),
    ]
    torch.manual_seed(0)
    model = build_model(layers, SHAPE, 10).to(memory_format=torch.channels_last)
    direct, autograd, grads = both_ways(model, label_smoothing=0.1)
    assert direct.loss == pytest.approx(autograd.loss, rel=1e-6)
    assert direct.correct == autograd.correct
    assert_close_grads(grads)


def test_class_weights_take_torch_s_loss_on_the_logits(bf16_kernels):
    weights = torch.linspace(0.5, 2.0, 10)
    direct, autograd, grads = both_ways(preset_model("basic"), class_weights=weights)
    assert direct.loss == pytest.approx(autograd.loss, rel=1e-6)
    assert direct.correct == autograd.correct
    assert_close_grads(grads)


def test_class_weights_leave_the_kept_logits_alone_from_step_to_step(bf16_kernels):
    """The loss with class weights takes autograd on the logits, which a StepProgram keeps in a
    buffer: a second step on the same batch gives the first step's gradients again, not a sum."""
    model, (x, y) = preset_model("basic"), batch()
    weights = torch.linspace(0.5, 2.0, 10)
    grads = []
    for _ in range(2):
        model.zero_grad()
        step(model, x, y, class_weights=weights)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_training_without_a_graph_stays_beside_the_autograd_steps(bf16_kernels, squares):
    """Two epochs through the Trainer (Adam, dropout, a smaller last batch) end on nearly the
    same weights; the loss differs only in its last bits (another order of sums)."""

    def trained(through_graph: bool) -> tuple[CnnModel, list[dict[str, float]]]:
        torch.manual_seed(0)
        model = build_model(preset_layers("tiny", 4, (1, 12, 12)), (1, 12, 12), 4)
        config = TrainConfig(epochs=2, batch_size=24, lr=3e-3)
        trainer = Trainer(model, config, squares, None, Preprocessing((1, 12, 12)), seed=3)
        if through_graph:
            with through_autograd():
                return model, trainer.fit()
        return model, trainer.fit()

    (direct, direct_history), (autograd, autograd_history) = trained(False), trained(True)
    for mine, reference in zip(direct.parameters(), autograd.parameters(), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    for mine, reference in zip(direct_history, autograd_history, strict=True):
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
        assert mine["train_accuracy"] == reference["train_accuracy"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_stops_the_trainer_before_the_update(bf16_kernels, squares, bad):
    model = build_model(preset_layers("tiny", 4, (1, 12, 12)), (1, 12, 12), 4)
    trainer = Trainer(model, TrainConfig(epochs=1), squares, None, Preprocessing((1, 12, 12)))
    original = chain.accumulate_grads

    def poisoned(params, grads):
        original(params, grads)
        params[-1].grad[0] = bad  # the last Dense's bias

    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradients.accumulate_grads = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match="a gradient became NaN or infinite"):
            trainer.fit()
    finally:
        gradients.accumulate_grads = original
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_and_other_forwards_take_autograd(bf16_kernels):
    """Hooks see what autograd does only if autograd runs: the step takes it then."""
    x, _ = batch(8)

    def whole(model: torch.nn.Module) -> bool:
        with torch.autocast("cpu", torch.bfloat16):
            return gradients.whole_model_chain(model, x) is not None

    model = preset_model("basic")
    assert whole(model)
    handle = model.register_forward_hook(lambda *args: None)
    assert not whole(model)
    handle.remove()
    handle = model.layers[-1].weight.register_hook(lambda grad: grad)
    assert not whole(model)
    handle.remove()
    handle = model.layers[0].weight.register_post_accumulate_grad_hook(lambda p: None)
    assert not whole(model)
    handle.remove()
    assert whole(model)
    assert not whole(model.eval())
    with torch.no_grad():
        assert not whole(model.train())
    # a model the chain covers only in part: a BatchNormalization after the head
    layers = [*preset_layers("basic", 10, SHAPE), {"BatchNormalization": {}}]
    assert not whole(build_model(layers, SHAPE, 10).to(memory_format=torch.channels_last))


def test_a_compiled_forward_takes_autograd(bf16_kernels, monkeypatch):
    model = preset_model("tiny")
    x, y = batch(8)
    called = []

    def compiled(inputs: torch.Tensor) -> torch.Tensor:
        called.append(1)
        return model(inputs)

    monkeypatch.setattr(gradients, "whole_model_chain", lambda *args: pytest.fail("planned"))
    step(model, x, y, forward=compiled)
    assert called and all(p.grad is not None for p in model.parameters())


def test_accumulate_grads_keeps_autograd_s_dtype_layout_and_sums():
    conv = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.zeros(4, requires_grad=True)
    frozen = torch.zeros(4)
    conv_grad = torch.ones(4, 3, 2, 2)  # contiguous: autograd gives the parameter's layout
    chain.accumulate_grads(
        [conv, bias, frozen, None], [conv_grad, torch.ones(4), torch.ones(4), None]
    )
    assert conv.grad.stride() == conv.stride() and torch.equal(conv.grad, conv_grad)
    assert frozen.grad is None
    chain.accumulate_grads([bias], [torch.ones(4, dtype=torch.bfloat16)])
    assert bias.grad.dtype == torch.float32 and torch.equal(bias.grad, torch.full((4,), 2.0))
    # a dimension of size 1 may have any stride, as autograd allows
    weight = torch.zeros(5, 1, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.ones(5, 1, 3, 3).to(memory_format=torch.channels_last)
    grad = grad.as_strided(grad.shape, (9, 9, 3, 1))
    chain.accumulate_grads([weight], [grad])
    assert weight.grad is grad


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 40),
    k=st.integers(2, 12),
    scale=st.sampled_from([0.1, 3.0, 40.0]),
    smoothing=st.sampled_from([0.0, 0.1, 0.37]),
    seed=st.integers(0, 2**16),
)
def test_softmax_cross_entropy_is_torch_s(kernels, n, k, scale, smoothing, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator) * scale
    labels = torch.randint(0, k, (n,), generator=generator)
    grad, loss, correct = gradients.softmax_cross_entropy(logits, labels, smoothing)
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, labels, label_smoothing=smoothing)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)
    assert correct == int((logits.argmax(1) == labels).sum())


def test_softmax_cross_entropy_ties_non_finite_logits_and_bad_labels(kernels):
    logits = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]])
    _, loss, correct = gradients.softmax_cross_entropy(logits[:2], torch.tensor([1, 0]), 0.0)
    assert correct == 2  # the first of tied maxima, as torch.argmax
    _, loss, _ = gradients.softmax_cross_entropy(logits, torch.tensor([1, 0, 2]), 0.0)
    assert math.isnan(loss)
    infinite = torch.tensor([[float("inf"), 0.0]])
    assert math.isnan(gradients.softmax_cross_entropy(infinite, torch.tensor([0]), 0.0)[1])
    with pytest.raises(IndexError, match="Target 3 is out of bounds for 3 classes"):
        gradients.softmax_cross_entropy(logits, torch.tensor([0, 3, 1]), 0.0)
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        gradients.softmax_cross_entropy(logits, torch.tensor([-1, 0, 1]), 0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_a_non_finite_value_anywhere(kernels, bad):
    check_all_finite(bad)


def test_all_finite_without_the_kernels(torch_only):
    check_all_finite(float("nan"))


def check_all_finite(bad: float) -> None:
    tensors = [
        torch.randn(7),
        torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last),
        torch.randn(33, 17),
        torch.randn(5, 6).t(),  # not contiguous: torch ops check it
        torch.randn(3, dtype=torch.float64),
    ]
    assert gradients.all_finite(tensors)
    assert gradients.all_finite([])
    for i, tensor in enumerate(tensors):
        poisoned = list(tensors)
        poisoned[i] = tensor.clone()
        poisoned[i][(-1,) * tensor.dim()] = bad
        assert not gradients.all_finite(poisoned), i
        assert not gradients.all_finite(poisoned[i:]), i  # the C call alone where all are plain
