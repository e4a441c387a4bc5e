"""The C dense head (fused.dense_head: Dense, optional Dropout, Dense in one call each way) gives
what the modules give: logits, every parameter gradient and the input gradient within float32
rounding, the same dropout mask from the same generator state, NaN and infinities where the
modules put them, the same bits on any number of threads; and the modules run wherever it does
not fit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import counted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab import native
from cnnlab.models import build_model, fused, preset_layers
from cnnlab.models.layers import FP32_DENSE_MAX_WEIGHTS, CnnModel

# The `kernels` fixture only skips; it holds no state that examples could share.
property_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def head_model(
    in_f: int, hidden: int, out_f: int, relu: bool, p: float | None, use_bias: bool = True
) -> CnnModel:
    """Flatten, Dense(hidden), [Dropout(p),] Dense(out_f, softmax) on (in_f, 1, 1) inputs."""
    activation = "relu" if relu else None
    layers: list[dict] = [
        {"Flatten": {}},
        {"Dense": {"units": hidden, "activation": activation, "use_bias": use_bias}},
    ]
    if p is not None:
        layers.append({"Dropout": {"rate": p}})
    layers.append({"Dense": {"units": out_f, "activation": "softmax", "use_bias": use_bias}})
    return build_model(layers, (in_f, 1, 1), out_f).train()


def run_head(
    model: CnnModel, x: torch.Tensor, *, use_kernel: bool, bf16: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int, torch.Tensor]:
    """Logits, parameter gradients and input gradient of one training pass with the C head where
    it fits or with the modules; how many times the C head ran; and the generator's next draw."""
    model = copy.deepcopy(model)
    leaf = x.clone().requires_grad_()
    fits = fused.dense_head_fits
    fused.dense_head_fits = fits if use_kernel else lambda *args: False
    torch.manual_seed(5)
    try:
        with counted("dense_head") as calls, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(leaf)
        labels = torch.arange(x.shape[0]) % logits.shape[1]
        F.cross_entropy(logits.float(), labels).backward()
        next_draw = torch.rand(4)
    finally:
        fused.dense_head_fits = fits
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), grads, leaf.grad, len(calls), next_draw


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal but for the order of float32 sums: NaN and infinities where expected has them."""
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=1e-5 * scale + 1e-7, equal_nan=True
    )


def assert_same_training_pass(kernel, modules, bf16_input: bool) -> None:
    logits, grads, grad_x, ran, draw = kernel
    ref_logits, ref_grads, ref_grad_x, ran_modules, ref_draw = modules
    assert (ran, ran_modules) == (1, 0)
    assert logits.dtype == ref_logits.dtype == torch.float32
    assert grad_x.dtype == ref_grad_x.dtype
    assert torch.equal(draw, ref_draw)  # as many draws from the generator as the modules
    assert_close_fp32(logits, ref_logits)
    for name in ref_grads:
        assert_close_fp32(grads[name], ref_grads[name])
    if bf16_input:  # the same float32 gradient, rounded: one bf16 step apart at most
        torch.testing.assert_close(
            grad_x.float(), ref_grad_x.float(), rtol=2**-7, atol=1e-6, equal_nan=True
        )
    else:
        assert_close_fp32(grad_x, ref_grad_x)


@property_settings
@given(
    batch=st.integers(1, 40),
    in_f=st.integers(1, 70),
    hidden=st.integers(1, 70),
    out_f=st.integers(2, 20),
    relu=st.booleans(),
    p=st.sampled_from([None, 0.0, 0.2, 0.5]),
    use_bias=st.booleans(),
    bf16=st.booleans(),
)
def test_dense_head_matches_the_modules(
    kernels, batch, in_f, hidden, out_f, relu, p, use_bias, bf16
):
    """Any sizes (whole vectors or not), with or without ReLU, dropout and biases, from float32
    inputs or bf16 ones under autocast (the Dense layers stay float32 there)."""
    torch.manual_seed(batch * 1000 + in_f)
    model = head_model(in_f, hidden, out_f, relu, p, use_bias)
    x = torch.randn(batch, in_f, 1, 1)
    if bf16:
        x = x.to(torch.bfloat16)
    kernel = run_head(model, x, use_kernel=True, bf16=bf16)
    modules = run_head(model, x, use_kernel=False, bf16=bf16)
    assert_same_training_pass(kernel, modules, bf16)


@pytest.mark.parametrize("bf16", [False, True])
def test_dense_head_keeps_nan_and_infinities_where_the_modules_do(kernels, bf16):
    """Infinite and NaN inputs give NaN and infinite hidden values: the ReLU keeps NaN and its
    gradient, the dropout's 0 times infinity is NaN both ways, and nothing leaks from one
    hidden unit or image into another (nor from the lanes past the last whole vector)."""
    torch.manual_seed(3)
    model = head_model(37, 24, 5, relu=True, p=0.3)
    x = torch.randn(19, 37, 1, 1)
    x[2, 5] = float("inf")
    x[7, 36] = float("-inf")
    x[11, 0] = float("nan")
    x[13, 3], x[13, 4] = float("inf"), float("-inf")
    if bf16:
        x = x.to(torch.bfloat16)
    kernel = run_head(model, x, use_kernel=True, bf16=bf16)
    modules = run_head(model, x, use_kernel=False, bf16=bf16)
    assert not kernel[0].isfinite().all()  # the case is what it says
    assert kernel[0][0].isfinite().all()  # an image without them stays finite
    assert_same_training_pass(kernel, modules, bf16)


@pytest.mark.parametrize(("in_f", "hidden"), [(100, 64), (100, 40), (300, 150)])
def test_dense_head_does_not_depend_on_threads(kernels, in_f, hidden):
    """Each hidden unit's values and gradients are summed by one thread in one order, whatever
    the number of threads (parts of the hidden units): the same bits on 1 to 4 threads, in
    float32 and with a first Dense in bf16 dot products (300 x 150 weights under autocast)."""
    if in_f * hidden > FP32_DENSE_MAX_WEIGHTS and not fused.bf16_conv_pool_built():
        pytest.skip("this build has no AVX512-BF16: a large first Dense stays with oneDNN")
    torch.manual_seed(6)
    model = head_model(in_f, hidden, 10, relu=True, p=0.2)
    x = torch.randn(51, in_f, 1, 1).to(torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            results.append(run_head(model, x, use_kernel=True, bf16=True))
    finally:
        torch.set_num_threads(threads)
    logits, grads, grad_x, ran, _ = results[0]
    assert ran == 1
    for other_logits, other_grads, other_grad_x, _, _ in results[1:]:
        assert torch.equal(other_logits, logits)
        assert torch.equal(other_grad_x, grad_x)
        assert all(torch.equal(other_grads[name], grads[name]) for name in grads)


def test_dense_head_draws_the_mask_that_dropout_draws(kernels):
    """The hidden values the second Dense sees are dropout's output for the seed the head drew
    from the generator: zero exactly where `fused.dropout` with that seed zeroes them (read
    through an identity second Dense)."""
    torch.manual_seed(8)
    model = head_model(32, 48, 48, relu=False, p=0.5)
    first, dropout, second = model.layers[1], model.layers[2], model.layers[3]
    with torch.no_grad():
        second.weight.copy_(torch.eye(48))
        second.bias.zero_()
    x = torch.randn(9, 32)
    torch.manual_seed(11)
    seed = fused.dropout_seed()
    expected = fused._apply_dropout(F.linear(x, first.weight, first.bias), 0.5, seed)
    torch.manual_seed(11)
    seen = fused.dense_head(first, dropout, second, x.requires_grad_()).detach()
    assert 0.3 < (expected == 0).float().mean() < 0.7
    assert torch.equal(seen == 0, expected == 0)
    torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-6)


def test_tiny_takes_the_dense_head_in_training_only(kernels):
    """tiny's head (Dense 400 -> 64 with ReLU, Dropout 0.2, Dense 10) runs in C in training
    under bf16 autocast, with the same results as its modules; evaluation runs the modules."""
    torch.manual_seed(2)
    model = build_model(preset_layers("tiny", 10, (1, 28, 28)), (1, 28, 28), 10).train()
    x = torch.randn(24, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    kernel = run_head(model, x, use_kernel=True, bf16=True)
    modules = run_head(model, x, use_kernel=False, bf16=True)
    logits, grads, _, ran, _ = kernel
    assert ran == 1
    assert_close_fp32(logits, modules[0])
    for name, grad in grads.items():
        expected = modules[1][name]
        if name.startswith("layers.dense"):
            assert_close_fp32(grad, expected)
        else:  # through the head's bf16 input gradient: bf16 rounding apart
            atol = 1e-2 * expected.abs().max().item()
            torch.testing.assert_close(grad, expected, rtol=2e-2, atol=atol)
    with counted("dense_head") as calls, torch.no_grad():
        model.eval()(x)
    assert calls == []


def test_dense_head_runs_only_where_it_gives_the_same_results(kernels):
    model = head_model(30, 20, 4, relu=True, p=0.25)
    first, dropout, second = model.layers[1], model.layers[2], model.layers[3]
    x = torch.randn(3, 30)
    assert fused.dense_head_fits(first, dropout, second, x)
    assert fused.dense_head_fits(first, None, second, x)
    assert fused.dense_head_fits(first, dropout, second, x.to(torch.bfloat16))
    assert not fused.dense_head_fits(first, dropout, second, x.double())
    assert not fused.dense_head_fits(first, dropout, second, x[:, :20])  # the wrong width
    assert not fused.dense_head_fits(first, dropout, second, x[:0])  # no images
    with torch.no_grad():
        assert not fused.dense_head_fits(first, dropout, second, x)
    first.eval()
    assert not fused.dense_head_fits(first, dropout, second, x)
    first.train()
    dropout.p = 1.0  # Dropout(1.0) zeroes everything: the module's own case
    assert not fused.dense_head_fits(first, dropout, second, x)
    dropout.p = 0.25
    handle = dropout.register_forward_hook(lambda *args: None)
    assert not fused.dense_head_fits(first, dropout, second, x)
    handle.remove()
    second.bias.requires_grad_(False)  # a frozen parameter: the modules leave it alone
    assert not fused.dense_head_fits(first, dropout, second, x)
    second.bias.requires_grad_(True)
    first.act = torch.nn.Sigmoid()  # only ReLU or no activation between the two
    assert not fused.dense_head_fits(first, dropout, second, x)
    first.act = torch.nn.ReLU()
    second.act = torch.nn.ReLU()  # the last Dense has none (its softmax is the loss's)
    assert not fused.dense_head_fits(first, dropout, second, x)

    def head_calls(in_f, hidden, out_f, bf16=False):
        model = head_model(in_f, hidden, out_f, relu=True, p=0.1)
        with counted("dense_head") as calls, torch.autocast("cpu", enabled=bf16):
            model(torch.randn(2, in_f, 1, 1))
        return len(calls)

    assert head_calls(512, 64, 10) == 1  # 32768 weights: float32 under autocast
    assert FP32_DENSE_MAX_WEIGHTS == 512 * 64
    assert head_calls(513, 64, 10) == 0  # float32 and large: oneDNN's matrix products
    # bf16 under autocast: the head's bf16 products where the build has AVX512-BF16
    assert head_calls(513, 64, 10, bf16=True) == int(fused.bf16_conv_pool_built())
    assert head_calls(64, 64, 513, bf16=True) == 0  # a large second Dense: the modules


def test_dense_head_kernel_refuses_what_it_cannot_do(kernels):
    """Sizes below one, more parts than vectors of hidden units, p outside [0, 1): status 1,
    nothing written."""
    lib = native.library()
    logits = torch.full((2, 3), 7.0)
    x, w1, w2 = torch.ones(2, 4), torch.ones(16, 4), torch.ones(3, 16)
    buffers = [torch.zeros(2, 2, 16), torch.zeros(2, 16), torch.zeros(2, 16), torch.zeros(2, 16)]

    def forward(batch=2, hidden=16, parts=1, p=0.5):
        return lib.dense_head_forward(
            x.data_ptr(), 0, batch, 4, hidden, 3, w1.data_ptr(), None, 1, p, 1,
            w2.data_ptr(), None, parts, *(b.data_ptr() for b in buffers), logits.data_ptr(), 1, 0,
        )  # fmt: skip

    assert forward(batch=0) == 1
    assert forward(hidden=0) == 1
    assert forward(parts=2) == 1  # 16 hidden units: one vector, one part at most
    assert forward(p=1.0) == 1
    assert forward(p=-0.1) == 1
    assert torch.equal(logits, torch.full((2, 3), 7.0))
    assert forward() == 0
    assert torch.isfinite(logits).all() and not torch.equal(logits, torch.full((2, 3), 7.0))


def test_dense_head_takes_weights_in_any_layout(kernels):
    """Weights that are views of transposed storage (as a loaded or hand-set tensor can be)
    give the results of contiguous ones."""
    torch.manual_seed(9)
    model = head_model(20, 32, 6, relu=True, p=0.2)
    x = torch.randn(7, 20, 1, 1)
    expected = run_head(model, x, use_kernel=True)
    strided = copy.deepcopy(model)
    for layer in (strided.layers[1], strided.layers[3]):
        weight = layer.weight.detach().t().contiguous().t()  # same values, column-major
        layer.weight = torch.nn.Parameter(weight)
        assert not layer.weight.is_contiguous()
    seen = run_head(strided, x, use_kernel=True)
    assert seen[3] == 1
    assert torch.equal(seen[0], expected[0])
    assert all(torch.equal(seen[1][name], expected[1][name]) for name in expected[1])


def test_a_dropout_in_evaluation_mode_leaves_the_head_to_the_modules(kernels):
    """A Dropout switched to eval() inside a training model drops nothing; the C head would
    apply its rate, so the modules run."""
    torch.manual_seed(4)
    model = head_model(20, 32, 6, relu=True, p=0.5)
    model.layers[2].eval()
    x = torch.randn(7, 20, 1, 1)
    logits, grads, _, calls, _ = run_head(model, x, use_kernel=True)
    ref_logits, ref_grads, _, _, _ = run_head(model, x, use_kernel=False)
    assert calls == 0
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[name], ref_grads[name]) for name in ref_grads)


# ------------------------------------ the first Dense in bf16 dot products (AVX512-BF16)


@pytest.fixture
def bf16_head(kernels):
    """The kernels, where they were built with AVX512-BF16 (the head's bf16 products)."""
    if not fused.bf16_conv_pool_built():
        pytest.skip("this build has no AVX512-BF16: a large first Dense stays with oneDNN")


def bf16_values(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().double()


@property_settings
@given(
    batch=st.integers(1, 41),
    in_f=st.integers(1, 90),
    hidden=st.integers(1, 90),
    out_f=st.integers(1, 12),
    relu=st.booleans(),
    p=st.sampled_from([0.0, 0.3]),
    use_bias=st.booleans(),
    bf16_input=st.booleans(),
    threads=st.integers(1, 3),
)
def test_bf16_head_multiplies_bf16_values_and_sums_in_float32(
    bf16_head, batch, in_f, hidden, out_f, relu, p, use_bias, bf16_input, threads
):
    """With bf16 set, the first Dense's three products (forward, weight and input gradients)
    take the input, the weights and the hidden gradient rounded to bf16 and sum in float32 (here
    against float64 sums of the same rounded values); the hidden values, the dropout, the second
    Dense and the bias gradients stay float32. Odd sizes pair their last value with a zero."""
    torch.manual_seed(batch * 10_000 + in_f * 100 + hidden)
    x = torch.randn(batch, in_f)
    x = x.bfloat16() if bf16_input else x
    w1, w2 = torch.randn(hidden, in_f) / in_f**0.5, torch.randn(out_f, hidden) / hidden**0.5
    b1, b2 = (torch.randn(hidden), torch.randn(out_f)) if use_bias else (None, None)
    grad_logits = torch.randn(batch, out_f)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        logits, saved = fused.dense_head_run(x, w1, b1, w2, b2, relu, p, bf16=True)
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = fused.dense_head_grads(
            saved, grad_logits, input_grad=True
        )
    finally:
        torch.set_num_threads(previous)
    torch.manual_seed(3)
    ones = torch.ones(batch, hidden)
    factor = (fused._apply_dropout(ones, p, fused.dropout_seed()) if p else ones).double()
    hidden_values = bf16_values(x) @ bf16_values(w1).T + (b1.double() if use_bias else 0.0)
    act = saved.act[:, :hidden].double()  # the kernel's own ReLU decides the mask below
    assert_close_fp32(act, hidden_values.clamp(min=0) if relu else hidden_values)
    dropped = act * factor
    assert_close_fp32(logits.double(), dropped @ w2.double().T + (b2.double() if use_bias else 0.0))
    grad_hidden = (grad_logits.double() @ w2.double()) * factor
    if relu:
        grad_hidden[act <= 0] = 0.0
    assert_close_fp32(grad_w2.double(), grad_logits.double().T @ dropped)
    if use_bias:
        assert_close_fp32(grad_b1.double(), grad_hidden.sum(0))
        assert_close_fp32(grad_b2.double(), grad_logits.double().sum(0))
    # the hidden gradient, rounded to bf16 by the kernel from its float32 sums, may round the
    # other way where it lies at a rounding boundary: one bf16 step in a product at most
    want_w1 = bf16_values(grad_hidden).T @ bf16_values(x)
    want_x = bf16_values(grad_hidden) @ bf16_values(w1)
    for got, want in ((grad_w1, want_w1), (grad_x, want_x)):
        scale = want.abs().max().item() + 1e-12
        rtol = 2**-7 if got.dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=4e-3 * scale)
    assert grad_x.dtype == x.dtype


@pytest.mark.parametrize("preset", ["basic", "dropout"])
def test_large_first_dense_trains_as_close_to_the_modules_as_bf16_allows(bf16_head, preset):
    """`basic`'s and `dropout`'s heads (a first Dense of 131k and 295k weights) run in the
    kernel under bf16 autocast: logits and every gradient within bf16 rounding of the modules'
    (which also round the hidden values to bf16), and the same draws from the generator."""
    torch.manual_seed(4)
    model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10).train()
    x = torch.randn(33, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    logits, grads, _, ran, draw = run_head(model, x, use_kernel=True, bf16=True)
    ref_logits, ref_grads, _, ref_ran, ref_draw = run_head(model, x, use_kernel=False, bf16=True)
    assert (ran, ref_ran) == (1, 0)
    assert torch.equal(draw, ref_draw)

    def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.float() - want.float()).norm() / want.float().norm()).item()

    assert relative_error(logits, ref_logits) < 1e-2
    for name, grad in grads.items():
        assert relative_error(grad, ref_grads[name]) < 2e-2, name


def test_a_build_without_avx512_bf16_refuses_bf16_products(kernels):
    """Status 1 from both calls where the build has no AVX512-BF16; the head then never asks."""
    if fused.bf16_conv_pool_built():
        pytest.skip("this build has AVX512-BF16")
    lib = native.library()
    x, w1, w2 = torch.ones(2, 4), torch.ones(16, 4), torch.ones(3, 16)
    buffers = [torch.zeros(2, 2, 16), torch.zeros(2, 16), torch.zeros(2, 16), torch.zeros(2, 16)]
    logits = torch.zeros(2, 3)
    status = lib.dense_head_forward(
        x.data_ptr(), 0, 2, 4, 16, 3, w1.data_ptr(), None, 1, 0.0, 1, w2.data_ptr(), None, 1,
        *(b.data_ptr() for b in buffers), logits.data_ptr(), 1, 1,
    )  # fmt: skip
    assert status == 1
    with torch.autocast("cpu", torch.bfloat16):
        assert not fused.bf16_dense_head_fits()
