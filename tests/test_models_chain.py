"""cnnlab.models.chain: the first layers of a model as one autograd Function in training give
bit for bit the logits and gradients that the fused blocks give one by one, and run only where
each of their stages fits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import per_block, state_hash, through_autograd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cnnlab.errors import ModelSpecError
from cnnlab.inference import Preprocessing
from cnnlab.models import build_model, chain, fused, preset_layers
from cnnlab.models.layers import CnnModel
from cnnlab.training.loop import Trainer

property_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SHAPE = (1, 28, 28)


def preset_model(preset: str, seed: int = 0) -> CnnModel:
    torch.manual_seed(seed)
    model = build_model(preset_layers(preset, 10, SHAPE), SHAPE, 10)
    return model.to(memory_format=torch.channels_last).train()


def stage_names(model: CnnModel, x: torch.Tensor, bf16: bool = True) -> list[str] | None:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        found = chain.plan(list(model.layers), x)
    return None if found is None else [type(stage).__name__ for stage in found.stages]


class ChainCalls:
    """Counts the chains that run (a context manager around chain.Chain.__call__)."""

    def __enter__(self) -> ChainCalls:
        self.calls = 0
        self.original = chain.Chain.__call__

        def counting(this: chain.Chain, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.original(this, x)

        chain.Chain.__call__ = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        chain.Chain.__call__ = self.original  # type: ignore[method-assign]


def train_pass(model: CnnModel, x: torch.Tensor, *, chained: bool, bf16: bool = True):
    """Logits, parameter gradients and the number of chains run in one training pass of a copy
    of the model, with the chain or with the blocks one by one."""
    model = copy.deepcopy(model)
    labels = torch.arange(x.shape[0]) % model.num_classes
    torch.manual_seed(11)  # the same dropout masks either way
    with ChainCalls() as counter:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            if chained:
                logits = model(x)
            else:
                with per_block():
                    logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, counter.calls


def assert_same_pass(model: CnnModel, x: torch.Tensor, bf16: bool = True) -> int:
    """The chain's pass equals the blocks' bit for bit; returns how many chains ran."""
    logits, grads, calls = train_pass(model, x, chained=True, bf16=bf16)
    ref_logits, ref_grads, ref_calls = train_pass(model, x, chained=False, bf16=bf16)
    assert ref_calls == 0
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    return calls


@pytest.mark.parametrize(
    ("preset", "stages", "modules"),
    [
        ("tiny", ["FirstBlock", "WinnersBlock", "FlattenStage", "DenseHeadStage"], 8),
        ("basic", ["FirstBlock", "WinnersBlock", "FlattenStage", "DenseHeadStage"], 7),
        (
            "dropout",
            ["FirstBlock", "WinnersBlock", "WinnersBlock", "FlattenStage", "DenseHeadStage"],
            12,
        ),
        ("fast", None, 0),  # BatchNorm after its second block: one kernel stage only
    ],
)
def test_presets_chain_these_stages(bf16_kernels, preset, stages, modules):
    model, x = preset_model(preset), torch.randn(4, *SHAPE)
    assert stage_names(model, x) == stages
    if stages is not None:
        with torch.autocast("cpu", torch.bfloat16):
            assert chain.plan(list(model.layers), x).modules == modules  # type: ignore[union-attr]


def test_dropouts_first_block_writes_the_next_convs_padding(bf16_kernels):
    """`dropout`'s second conv pads only below and to the right: the first block writes those
    zeros, and the conv's stage pads nothing itself."""
    model, x = preset_model("dropout"), torch.randn(4, *SHAPE)
    with torch.autocast("cpu", torch.bfloat16):
        first, second, third = chain.plan(list(model.layers), x).stages[:3]  # type: ignore[union-attr]
    assert (first.geometry.out_rows, first.geometry.out_cols) == (15, 15)  # 14x14 pooled + 1
    assert second.pad == third.pad == (0, 0, 0, 0)  # the third's 7x7 input needs none
    assert (second.p, third.p) == (0.25, 0.25)


@pytest.mark.parametrize("preset", ["tiny", "basic", "dropout"])
def test_presets_train_bit_for_bit_as_the_blocks_do(bf16_kernels, preset):
    model = preset_model(preset)
    assert assert_same_pass(model, torch.randn(9, *SHAPE)) == 1


def test_without_bf16_kernels_the_presets_run_block_by_block(kernels):
    if fused.bf16_conv_pool_built():
        pytest.skip("this build has the bf16 conv-pool kernel")
    for preset in ("tiny", "basic", "dropout"):
        model = preset_model(preset)
        assert stage_names(model, torch.randn(2, *SHAPE)) is None
        assert assert_same_pass(model, torch.randn(3, *SHAPE)) == 0


def head_model(in_c: int = 1, dropout: float | None = 0.3) -> CnnModel:
    """A first block, Flatten and a small head: a chain on any build, fp32 or bf16."""
    torch.manual_seed(2)
    layers = [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        {"MaxPool2D": {"pool_size": 2}},
        {"Flatten": {}},
        {"Dense": {"units": 20, "activation": "relu"}},
        *([{"Dropout": {"rate": dropout}}] if dropout is not None else []),
        {"Dense": {"units": 4, "activation": "softmax"}},
    ]
    return build_model(layers, (in_c, 10, 9), 4).to(memory_format=torch.channels_last).train()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("dropout", [None, 0.0, 0.3])
def test_a_first_block_and_a_head_chain_in_fp32_and_bf16(kernels, bf16, dropout):
    model, x = head_model(dropout=dropout), torch.randn(7, 1, 10, 9)
    assert stage_names(model, x, bf16) == ["FirstBlock", "FlattenStage", "DenseHeadStage"]
    assert assert_same_pass(model, x, bf16) == 1


def layer_stack(
    in_c: int,
    first: tuple[int, int, str],
    blocks: list[tuple[int, int, int, str, str | None, float | None]],
    head: tuple[int | None, float | None],
) -> list[dict]:
    filters, kernel, padding = first
    layers = [
        {"Conv2D": {"filters": filters, "kernel_size": kernel, "padding": padding, "activation": "relu"}},
        {"MaxPool2D": {"pool_size": 2}},
    ]  # fmt: skip
    for filters, kh, kw, padding, activation, rate in blocks:
        conv = {"filters": filters, "kernel_size": [kh, kw], "padding": padding}
        layers += [{"Conv2D": {**conv, "activation": activation}}, {"MaxPool2D": {"pool_size": 2}}]
        if rate is not None:
            layers.append({"Dropout": {"rate": rate}})
    hidden, rate = head
    layers.append({"Flatten": {}})
    if hidden is not None:
        layers.append({"Dense": {"units": hidden, "activation": "relu"}})
        if rate is not None:
            layers.append({"Dropout": {"rate": rate}})
    layers.append({"Dense": {"units": 3, "activation": "softmax"}})
    return layers


@property_settings
@given(
    in_c=st.integers(1, 3),
    first=st.tuples(
        st.sampled_from([8, 16, 32]), st.integers(1, 4), st.sampled_from(["valid", "same"])
    ),
    blocks=st.lists(
        st.tuples(
            st.sampled_from([16, 32]),
            st.integers(1, 3),
            st.integers(1, 3),
            st.sampled_from(["valid", "same"]),
            st.sampled_from(["relu", None]),
            st.sampled_from([None, 0.0, 0.25, 0.25]),
        ),
        max_size=2,
    ),
    head=st.tuples(st.sampled_from([None, 16, 40]), st.sampled_from([None, 0.2])),
    batch=st.integers(1, 9),
    bf16=st.sampled_from([True, True, False]),
)
# tiny-like, dropout-like (on RGB, the first block writing the next conv's padding), a
# Dropout(0) after a block, and a 32-filter first block feeding a 3x3 conv
@example(1, (8, 3, "valid"), [(16, 3, 3, "valid", "relu", None)], (40, 0.2), 5, True)
@example(
    3,
    (32, 3, "same"),
    [(32, 2, 2, "same", "relu", 0.25), (16, 2, 2, "same", None, 0.25)],
    (None, None),
    3,
    True,
)
@example(2, (8, 2, "valid"), [(16, 2, 2, "valid", "relu", 0.0)], (16, None), 4, True)
@example(1, (32, 3, "same"), [(16, 3, 3, "valid", "relu", None)], (None, None), 2, True)
def test_any_chain_trains_bit_for_bit_as_the_blocks_do(
    kernels, in_c, first, blocks, head, batch, bf16
):
    """Over stacks of a first block, up to two conv blocks (any of them a WinnersBlock or not)
    and a head (a DenseHeadStage or not): whatever the chain takes, the results are the blocks'."""
    layers = layer_stack(in_c, first, blocks, head)
    torch.manual_seed(3)
    try:
        model = build_model(layers, (in_c, 17, 15), 3)
    except ModelSpecError:  # a block that pools to nothing on this input
        return
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, in_c, 17, 15).contiguous(memory_format=torch.channels_last)
    names = stage_names(model, x, bf16)
    calls = assert_same_pass(model, x, bf16)
    assert calls == (0 if names is None else 1)


def test_no_chain_where_hooks_watch_or_in_evaluation_or_for_inputs_with_gradients(bf16_kernels):
    model, x = preset_model("tiny"), torch.randn(5, *SHAPE)
    with ChainCalls() as counter, torch.autocast("cpu", torch.bfloat16):
        model(x)  # the chain, as a baseline
        model(x.clone().requires_grad_())  # the first block takes no input gradient
        with torch.no_grad():
            model(x)
        model.eval()(x)
        model.train()
        handle = model.layers[3].deferred_act.register_forward_hook(lambda *args: None)
        model(x)  # a hook on a module inside the chain's layers
        handle.remove()
        model(x)
    assert counter.calls == 2
    hooked = preset_model("tiny")
    hooked.layers[5].register_forward_pre_hook(lambda *args: None)  # the head's first Dense
    assert stage_names(hooked, x) == ["FirstBlock", "WinnersBlock"]  # the head runs as modules
    assert assert_same_pass(hooked, x) == 1


def test_the_chain_follows_frozen_layers_and_new_dropout_rates(bf16_kernels):
    model, x = preset_model("dropout"), torch.randn(6, *SHAPE)
    assert assert_same_pass(model, x) == 1
    model.layers[2].requires_grad_(False)  # the second conv: no WinnersBlock for it now
    assert stage_names(model, x) is None
    assert assert_same_pass(model, x) == 0
    model.layers[2].requires_grad_(True)
    model.layers[4].p = 0.5
    with torch.autocast("cpu", torch.bfloat16):
        stages = chain.plan(list(model.layers), x).stages  # type: ignore[union-attr]
    assert stages[1].p == 0.5
    assert assert_same_pass(model, x) == 1


def test_a_weight_changed_before_the_backward_pass_is_an_error(bf16_kernels):
    model, x = preset_model("tiny"), torch.randn(4, *SHAPE)
    with torch.autocast("cpu", torch.bfloat16):
        logits = model(x)
    with torch.no_grad():
        model.layers[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.float().sum().backward()


def test_two_passes_before_one_backward_keep_their_own_values(bf16_kernels):
    """Gradient accumulation over two batches: each chain call keeps its own tensors."""
    model = preset_model("tiny")
    a, b = torch.randn(4, *SHAPE), torch.randn(3, *SHAPE)

    def accumulated(chained: bool) -> dict[str, torch.Tensor]:
        trained = copy.deepcopy(model)
        torch.manual_seed(4)
        with torch.autocast("cpu", torch.bfloat16):
            if chained:
                logits_a, logits_b = trained(a), trained(b)
            else:
                with per_block():
                    logits_a, logits_b = trained(a), trained(b)
        (logits_a.float().sum() + 2 * logits_b.float().pow(2).sum()).backward()
        return {name: p.grad for name, p in trained.named_parameters()}

    chained, blocks = accumulated(True), accumulated(False)
    for name, grad in chained.items():
        assert torch.equal(grad, blocks[name]), name


def test_training_with_the_chain_gives_the_blocks_weights(bf16_kernels, squares):
    """A few epochs through the Trainer (Adam, dropout, a smaller last batch) end on the same
    weights bit for bit."""
    from cnnlab.config import TrainConfig

    def trained(chained: bool) -> str:
        torch.manual_seed(0)
        layers = preset_layers("tiny", 4, (1, 12, 12))
        model = build_model(layers, (1, 12, 12), 4)
        config = TrainConfig(epochs=2, batch_size=24, lr=3e-3)
        trainer = Trainer(model, config, squares, None, Preprocessing((1, 12, 12)), seed=3)
        with ChainCalls() as counter, through_autograd():
            if chained:
                trainer.fit()
            else:
                with per_block():
                    trainer.fit()
        assert counter.calls == (2 * 3 if chained else 0)  # 64 images: batches of 24, 24, 16
        return state_hash(model.state_dict())

    assert trained(True) == trained(False)


def test_the_plan_follows_replaced_and_converted_parameters(bf16_kernels):
    """Plans are cached per model, keyed by what they depend on: a parameter replaced or
    converted to another dtype plans afresh."""
    model, x = preset_model("tiny"), torch.randn(4, *SHAPE)

    def current_stages() -> list[str]:
        with torch.autocast("cpu", torch.bfloat16):
            found = chain.chain_prefix(model.layers, list(model.layers), x)
        return [type(stage).__name__ for stage in found.stages] if found is not None else []

    assert current_stages() == ["FirstBlock", "WinnersBlock", "FlattenStage", "DenseHeadStage"]
    conv = model.layers[2]
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 0.5, requires_grad=False)
    assert current_stages() == []  # the new weight is frozen: the blocks run one by one
    conv.weight.requires_grad_(True)
    assert assert_same_pass(model, x) == 1
    model.layers[7].double()  # the head's second Dense: no float32 head any more
    assert current_stages() == ["FirstBlock", "WinnersBlock"]
