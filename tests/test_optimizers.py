"""The Updater: the same updates as optimizer.step(), through the fused kernel where it can."""

import copy

import pytest
import torch

from cnnlab.config import TrainConfig
from cnnlab.training.optimizers import Updater, make_optimizer


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def set_grads(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def train(
    model: torch.nn.Module, optimizer, steps: int, *, updater: Updater | None, start: int = 0
) -> None:
    for step in range(start, start + steps):
        if updater is not None:
            updater.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)
        set_grads(model, step)
        optimizer.param_groups[0]["lr"] = 1e-2 / (step + 1)  # as the trainer's schedule sets it
        if updater is not None:
            updater.step()
        else:
            optimizer.step()


def assert_same(a: torch.nn.Module, opt_a, b: torch.nn.Module, opt_b) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_b.state[pb][key]), key


def trained_pair(steps: int):
    """A model trained by optimizer.step() and its twin trained by an Updater, `steps` each."""
    config = TrainConfig(optimizer="adam")
    reference, direct = make_model(), make_model()
    opt_ref, opt_direct = make_optimizer(reference, config), make_optimizer(direct, config)
    updater = Updater(opt_direct)
    train(reference, opt_ref, steps, updater=None)
    train(direct, opt_direct, steps, updater=updater)
    return reference, opt_ref, direct, opt_direct, updater


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_adam_steps_equal_optimizer_steps_bit_for_bit(name, weight_decay) -> None:
    config = TrainConfig(optimizer=name, weight_decay=weight_decay)
    reference, direct = make_model(), make_model()
    opt_ref, opt_direct = make_optimizer(reference, config), make_optimizer(direct, config)
    updater = Updater(opt_direct)
    calls = []
    original = opt_direct.step
    opt_direct.step = lambda *a, **k: calls.append(1) or original(*a, **k)
    train(reference, opt_ref, 6, updater=None)
    train(direct, opt_direct, 6, updater=updater)
    assert_same(reference, opt_ref, direct, opt_direct)
    assert len(calls) == 1  # the first step creates the state; the other five call the kernel


def test_a_loaded_optimizer_state_is_used_not_the_lists_gathered_before() -> None:
    config = TrainConfig(optimizer="adam")
    reference, resumed = make_model(), make_model()
    opt_ref, opt_resumed = make_optimizer(reference, config), make_optimizer(resumed, config)
    train(reference, opt_ref, 3, updater=None)
    # state_dict() holds the live tensors, which later steps update in place: copies, as a
    # checkpoint file would hold.
    saved_model, saved_opt = copy.deepcopy((reference.state_dict(), opt_ref.state_dict()))
    train(reference, opt_ref, 2, updater=None, start=3)

    updater = Updater(opt_resumed)
    train(resumed, opt_resumed, 4, updater=updater)  # lists gathered from a state about to go
    resumed.load_state_dict(saved_model)
    opt_resumed.load_state_dict(saved_opt)
    train(resumed, opt_resumed, 2, updater=updater, start=3)
    assert_same(reference, opt_ref, resumed, opt_resumed)


def test_step_counts_share_one_tensor_and_survive_a_checkpoint(tmp_path) -> None:
    reference, opt_ref, direct, opt_direct, _ = trained_pair(3)
    steps = [opt_direct.state[p]["step"] for p in direct.parameters()]
    assert len({step.untyped_storage().data_ptr() for step in steps}) == 1
    assert [float(step) for step in steps] == [3.0] * len(steps)

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": direct.state_dict(), "optimizer": opt_direct.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    resumed = make_model()
    opt_resumed = make_optimizer(resumed, TrainConfig(optimizer="adam"))
    resumed.load_state_dict(loaded["model"])
    opt_resumed.load_state_dict(loaded["optimizer"])
    train(reference, opt_ref, 2, updater=None, start=3)
    train(resumed, opt_resumed, 2, updater=Updater(opt_resumed), start=3)
    assert_same(reference, opt_ref, resumed, opt_resumed)


def test_a_missing_gradient_or_a_hook_goes_through_optimizer_step() -> None:
    reference, opt_ref, direct, opt_direct, updater = trained_pair(2)
    for model, step in ((reference, opt_ref.step), (direct, updater.step)):
        set_grads(model, 7)
        model[0].bias.grad = None  # torch's Adam leaves such a parameter and its state alone
        step()
    assert_same(reference, opt_ref, direct, opt_direct)

    seen = []
    opt_direct.register_step_post_hook(lambda *args: seen.append(1))
    set_grads(direct, 8)
    updater.step()
    assert seen == [1]


@pytest.mark.parametrize("name", ["sgd", "adamax", "rmsprop"])
def test_other_optimizers_step_as_they_are(name) -> None:
    config = TrainConfig(optimizer=name, momentum=0.9)
    reference, direct = make_model(), make_model()
    opt_ref, opt_direct = make_optimizer(reference, config), make_optimizer(direct, config)
    train(reference, opt_ref, 4, updater=None)
    train(direct, opt_direct, 4, updater=Updater(opt_direct))
    assert_same(reference, opt_ref, direct, opt_direct)
