"""The fused conv-pool kernel gives what the Conv2D and MaxPool2D modules give: outputs, weight
and bias gradients, in fp32 and under bf16 autocast, for any geometry it accepts; and every
case it does not accept runs the modules."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import counted, per_block
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab import native
from cnnlab.models import build_model, fused, preset_layers
from cnnlab.models.layers import CnnModel

# The `kernels` fixture only skips; it holds no state that examples could share.
property_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def conv_layer(
    filters: int, kernel: tuple[int, int], padding: str, activation: str | None, use_bias: bool
) -> dict:
    return {
        "Conv2D": {
            "filters": filters,
            "kernel_size": list(kernel),
            "padding": padding,
            "activation": activation,
            "use_bias": use_bias,
        }
    }


def block_model(
    in_shape: tuple[int, int, int],
    filters: int,
    kernel: tuple[int, int],
    padding: str,
    pool_padding: str,
    activation: str | None,
    use_bias: bool,
) -> CnnModel:
    layers = [
        conv_layer(filters, kernel, padding, activation, use_bias),
        {"MaxPool2D": {"pool_size": 2, "padding": pool_padding}},
        {"Flatten": {}},
        {"Dense": {"units": 3}},
    ]
    return build_model(layers, in_shape, 3)


def block_is_empty(height, width, kh, kw, padding, pool_padding) -> bool:
    """Whether such a conv, or the 2x2 pool after it, has no output at all."""
    if padding == "valid" and (kh > height or kw > width):
        return True
    conv_h = height if padding == "same" else height - kh + 1
    conv_w = width if padding == "same" else width - kw + 1
    return pool_padding == "valid" and (conv_h < 2 or conv_w < 2)


def run(model: CnnModel, x: torch.Tensor, *, use_kernel: bool, bf16: bool = False):
    """Logits and parameter gradients of one training pass, with or without the kernel."""
    model = copy.deepcopy(model)
    conv, pool = model.layers[0], model.layers[1]
    fused_ok = fused.fusable_now
    fused.fusable_now = (lambda *a: fused_ok(*a)) if use_kernel else (lambda *a: False)
    try:
        with (
            per_block(),
            counted("conv_pool") as calls,
            torch.autocast("cpu", torch.bfloat16, enabled=bf16),
        ):
            logits = model(x)
        F.cross_entropy(logits.float(), torch.arange(x.shape[0]) % 3).backward()
    finally:
        fused.fusable_now = fused_ok
    assert len(calls) == (1 if use_kernel else 0), "the kernel ran where it should not, or not"
    assert fused.fusable(conv, pool)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach().float(), grads


# The first blocks the fused kernel takes: a Conv2D on 1-4 channels and its 2x2 MaxPool2D.
first_blocks = {
    "in_c": st.integers(1, 4),
    "height": st.integers(3, 13),
    "width": st.integers(3, 13),
    "kh": st.integers(1, 5),
    "kw": st.integers(1, 5),
    "padding": st.sampled_from(["valid", "same"]),
    "pool_padding": st.sampled_from(["valid", "same"]),
    "activation": st.sampled_from([None, "relu"]),
    "use_bias": st.booleans(),
}


@property_settings
@given(
    **first_blocks,
    filters=st.sampled_from([8, 16, 32]) | st.integers(1, 40),  # 8: two windows a vector
    batch=st.integers(1, 37),
)
def test_kernel_matches_the_modules_in_fp32(
    kernels,
    in_c,
    height,
    width,
    filters,
    kh,
    kw,
    padding,
    pool_padding,
    activation,
    use_bias,
    batch,
):
    if block_is_empty(height, width, kh, kw, padding, pool_padding):
        return
    torch.manual_seed(height * 100 + width)
    model = block_model((in_c, height, width), filters, (kh, kw), padding, pool_padding, activation, use_bias)  # fmt: skip
    x = torch.randn(batch, in_c, height, width).contiguous(memory_format=torch.channels_last)
    logits, grads = run(model, x, use_kernel=True)
    want_logits, want_grads = run(model, x, use_kernel=False)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("filters", "kernel", "padding", "pool_padding"),
    [
        (32, (4, 4), "valid", "valid"),  # basic's
        (32, (3, 3), "same", "same"),  # dropout's, with a 'same' pool
        (16, (1, 7), "valid", "same"),  # the longest rows
        (48, (2, 7), "same", "valid"),
        (16, (5, 3), "valid", "valid"),
        (8, (3, 3), "valid", "valid"),  # tiny's: two windows to a vector
        (8, (5, 5), "same", "same"),  # the widest kernel rows that pair windows
        (8, (2, 3), "same", "valid"),
        (8, (1, 6), "valid", "valid"),  # too wide to pair: four FMAs a tap
    ],
)
def test_one_channel_weight_gradient_matches_the_modules(
    kernels, filters, kernel, padding, pool_padding
):
    """Grey images' first convs on whole vectors of channels, or on half a vector with two
    windows to a vector (AVX-512 builds pick each channel's input at its winner by a lane
    permutation): the same gradients as the modules, with windows
    the ReLU zeroed, windows that the pool's padding cuts, and a batch that is not a whole number
    of chunks."""
    torch.manual_seed(filters)
    model = block_model((1, 13, 11), filters, kernel, padding, pool_padding, "relu", True)
    x = torch.randn(37, 1, 13, 11).contiguous(memory_format=torch.channels_last)
    logits, grads = run(model, x, use_kernel=True)
    want_logits, want_grads = run(model, x, use_kernel=False)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("preset", ["tiny", "basic", "dropout", "fast"])
def test_kernel_matches_the_modules_under_bf16_autocast(kernels, preset):
    """The kernel convolves in fp32 and rounds once to bf16; autocast's conv rounds its inputs
    first. Close, not equal: within bf16's precision."""
    torch.manual_seed(0)
    model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10)
    x = torch.randn(16, 1, 28, 28)
    conv, pool = model.layers[0], model.layers[1]
    assert fused.fusable(conv, pool)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.conv_pool(conv, pool, x)
        conv.defer_activation = False
        want = pool(conv(x))
    assert got.dtype == want.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_bf16_training_gradients_are_as_close_to_fp32_as_autocasts(kernels):
    """Under bf16 autocast the gradient reaching the first block is rounded by the layers after
    it either way; the kernel's weight gradient is no further from the fp32 one than the
    modules' (it convolves in fp32, they in bf16)."""
    torch.manual_seed(1)
    model = build_model(preset_layers("basic", 10, (1, 28, 28)), (1, 28, 28), 10)
    x = torch.randn(24, 1, 28, 28)
    _, fp32 = run(model, x, use_kernel=False)
    _, kernel = run(model, x, use_kernel=True, bf16=True)
    _, modules = run(model, x, use_kernel=False, bf16=True)
    for name in ("layers.conv2d.weight", "layers.conv2d.bias"):
        error = ((kernel[name] - fp32[name]).norm() / fp32[name].norm()).item()
        modules_error = ((modules[name] - fp32[name]).norm() / fp32[name].norm()).item()
        assert error < 0.15 and error <= modules_error * 1.2, (name, error, modules_error)


def padded_block_model(filters: int) -> CnnModel:
    """conv-pool, then a 2x2 'same' conv (TF pads it below and to the right only) and a pool."""
    torch.manual_seed(0)
    layers = [
        {"Conv2D": {"filters": filters, "kernel_size": 3, "padding": "same", "activation": "relu"}},
        {"MaxPool2D": {"pool_size": 2}},
        {"Conv2D": {"filters": 16, "kernel_size": 2, "padding": "same", "activation": "relu"}},
        {"MaxPool2D": {"pool_size": 2}},
        {"Flatten": {}},
        {"Dense": {"units": 3}},
    ]
    return build_model(layers, (1, 12, 10), 3)


def padded_run(model: CnnModel, x: torch.Tensor, *, write_padding: bool, bf16: bool):
    """Logits, gradients and conv_pool's output shapes of one training pass."""
    model = copy.deepcopy(model)
    original_pad, original_pool = fused.bottom_right_pad, fused.conv_pool
    shapes = []

    def recording(*args):
        y = original_pool(*args)
        shapes.append(tuple(y.shape[2:]))
        return y

    fused.conv_pool = recording
    if not write_padding:
        fused.bottom_right_pad = lambda conv: None
    try:
        with (
            per_block(),
            counted("conv_then_pool") as pooled,
            torch.autocast("cpu", enabled=bf16),
        ):
            logits = model(x)
        F.cross_entropy(logits.float(), torch.arange(x.shape[0]) % 3).backward()
    finally:
        fused.bottom_right_pad, fused.conv_pool = original_pad, original_pool
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), grads, shapes, len(pooled)


# On 32 channels the 2x2 conv runs as a module (as in `dropout`); on 8 conv_then_pool takes it.
@pytest.mark.parametrize("filters", [32, 8])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_kernel_writes_the_next_convs_padding_with_the_same_results(kernels, filters, bf16):
    model, x = padded_block_model(filters), torch.randn(5, 1, 12, 10)
    logits, grads, shapes, pooled = padded_run(model, x, write_padding=True, bf16=bf16)
    ref_logits, ref_grads, ref_shapes, ref_pooled = padded_run(
        model, x, write_padding=False, bf16=bf16
    )
    assert shapes == [(7, 6)] and ref_shapes == [(6, 5)]  # one row and column of zeros more
    assert pooled == ref_pooled == (1 if filters == 8 else 0)
    assert torch.equal(logits, ref_logits)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


def test_a_hooked_next_conv_gets_its_input_unpadded(kernels):
    model, x = padded_block_model(32), torch.randn(5, 1, 12, 10)
    seen = []
    model.layers[2].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    _, _, shapes, _ = padded_run(model, x, write_padding=True, bf16=False)
    assert shapes == [(6, 5)] and seen == [torch.Size([5, 32, 6, 5])]


def test_nan_and_ties_follow_max_pool(kernels):
    """NaN wins a window, as in torch.max_pool2d; a tie sends the gradient to the first max."""
    model = block_model((1, 4, 4), 2, (1, 1), "valid", "valid", None, False)
    with torch.no_grad():
        model.layers[0].weight.fill_(1.0)
    x = torch.tensor([[1.0, 1.0, 0.0, 2.0], [1.0, 1.0, float("nan"), 0.0]] * 2).view(1, 1, 4, 4)
    logits, grads = run(model, x, use_kernel=True)
    want_logits, want_grads = run(model, x, use_kernel=False)
    assert torch.isnan(logits).all() and torch.isnan(want_logits).all()
    x[0, 0, 1::2, 2] = 0.0  # no NaN left; windows (0, 0) and (1, 0) are four-way ties
    _, grads = run(model, x, use_kernel=True)
    _, want_grads = run(model, x, use_kernel=False)
    torch.testing.assert_close(grads["layers.conv2d.weight"], want_grads["layers.conv2d.weight"])


def test_weight_gradient_does_not_depend_on_threads(kernels):
    torch.manual_seed(2)
    model = build_model(preset_layers("basic", 10, (1, 28, 28)), (1, 28, 28), 10)
    x = torch.randn(70, 1, 28, 28)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = run(model, x, use_kernel=True)
        torch.set_num_threads(2)
        _, two = run(model, x, use_kernel=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one["layers.conv2d.weight"], two["layers.conv2d.weight"])


def test_the_modules_run_when_something_watches_them(kernels):
    """Hooks (Grad-CAM, summaries), an input gradient (saliency) or a non-float32 input keep
    the two modules, so everything that inspects them sees them run."""
    model = build_model(preset_layers("tiny", 10, (1, 28, 28)), (1, 28, 28), 10)
    conv, pool = model.layers[0], model.layers[1]
    x = torch.randn(2, 1, 28, 28)
    assert fused.fusable_now(conv, pool, x)
    seen = []
    handle = conv.register_forward_hook(lambda *args: seen.append("conv"))
    model(x)
    handle.remove()
    assert seen == ["conv"]
    assert not fused.fusable_now(conv, pool, x.requires_grad_())
    assert not fused.fusable_now(conv, pool, x.detach().double())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not fused.fusable_now(conv, pool, x.detach())
    finally:
        handle.remove()


def test_blocks_the_kernel_does_not_fit_are_not_fused():
    def first_pair(layers, shape=(1, 12, 12)):
        model = build_model([*layers, {"Flatten": {}}, {"Dense": {"units": 2}}], shape, 2)
        return model.layers[0], model.layers[1]

    conv = {"Conv2D": {"filters": 4, "kernel_size": 3}}
    pool = {"MaxPool2D": {"pool_size": 2}}
    assert fused.fusable(*first_pair([conv, pool]))
    strided = {"Conv2D": {"filters": 4, "kernel_size": 3, "strides": 2}}
    assert not fused.fusable(*first_pair([strided, pool]))
    gelu = {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "gelu"}}
    assert not fused.fusable(*first_pair([gelu, pool]))
    assert not fused.fusable(*first_pair([conv, {"MaxPool2D": {"pool_size": 3}}]))
    assert not fused.fusable(*first_pair([conv, {"MaxPool2D": {"pool_size": 2, "strides": 1}}]))
    assert not fused.fusable(*first_pair([conv, pool], shape=(8, 12, 12)))  # many channels


def test_without_the_kernel_the_modules_give_the_same_training(torch_only, squares):
    """CNNLAB_NATIVE=0 (or no compiler): the model still trains, on the PyTorch modules."""
    assert native.library() is None
    model = build_model(preset_layers("tiny", 4, (1, 12, 12)), (1, 12, 12), 4)
    logits = model(squares.images[:8].float() / 255)
    F.cross_entropy(logits, squares.labels[:8]).backward()
    assert model.layers[0].weight.grad is not None


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="cnnlab.native"):
            assert native.library() is None
        assert "could not build cnnlab's C kernels with false" in caplog.text
        assert "CNNLAB_NATIVE=0" in caplog.text
        assert not list(tmp_path.rglob("*.so")), "no half-built library is left behind"
    finally:
        native.library.cache_clear()


def test_the_build_is_cached_by_source_compiler_and_cpu(kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").glob("kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp, "a second process reuses the build"
        assert not list(tmp_path.rglob("*.tmp"))
    finally:
        native.library.cache_clear()


def pool_layer(pool_padding: str, in_shape: tuple[int, int, int]):
    layers = [{"MaxPool2D": {"pool_size": 2, "padding": pool_padding}}, {"Flatten": {}}]
    return build_model([*layers, {"Dense": {"units": 2}}], in_shape, 2).layers[0]


@property_settings
@given(
    channels=st.integers(1, 40),
    height=st.integers(2, 11),
    width=st.integers(2, 11),
    batch=st.integers(1, 9),
    pool_padding=st.sampled_from(["valid", "same"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_max_pool_kernel_matches_max_pool2d(
    kernels, channels, height, width, batch, pool_padding, dtype
):
    pool = pool_layer(pool_padding, (channels, height, width))
    torch.manual_seed(channels * 100 + height)
    # Few distinct values, so that windows have ties.
    x = torch.randint(-3, 4, (batch, channels, height, width)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    outputs, grads = [], []
    for use_kernel in (True, False):
        leaf = x.clone().requires_grad_()
        fits = fused.pool_fits
        fused.pool_fits = fits if use_kernel else (lambda *a: False)
        try:
            assert fits(pool, leaf)
            y = pool(leaf)
        finally:
            fused.pool_fits = fits
        weights = torch.arange(y.numel(), dtype=torch.float32).view(y.shape) % 7
        (y.float() * weights).sum().backward()
        outputs.append(y.detach())
        grads.append(leaf.grad)
    assert outputs[0].dtype == dtype and grads[0].dtype == dtype
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1]), "the gradient goes to the same (first) maximum"


def test_max_pool_kernel_passes_nan_and_skips_other_layouts(kernels):
    pool = pool_layer("valid", (3, 4, 4))
    x = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 3] = float("nan")
    leaf = x.clone().requires_grad_()
    assert fused.pool_fits(pool, leaf)
    y = pool(leaf)
    assert torch.isnan(y[1, 2, 1, 1]) and torch.isnan(y).sum() == 1
    assert torch.isnan(F.max_pool2d(x, 2)[1, 2, 1, 1])
    assert not fused.pool_fits(pool, x.contiguous().requires_grad_())  # NCHW: max_pool2d runs
    assert not fused.pool_fits(pool, x.double().contiguous(memory_format=torch.channels_last))


# ------------------------------------------------- bf16 conv and pool in one kernel (AVX512-BF16)


@pytest.fixture
def bf16_kernel(kernels):
    """The kernels, where they were built with AVX512-BF16 (conv_pool_forward_bf16)."""
    if not fused.bf16_conv_pool_built():
        pytest.skip("this build has no AVX512-BF16: conv_then_pool keeps PyTorch's conv")


def bf16_conv_pool(
    x, w, bias, pool_padding: str, pad_after: tuple[int, int], threads: int = 2, relu: bool = False
):
    """conv_pool_forward_bf16 called directly: the pooled output and the winning positions."""
    batch, in_c, height, width = x.shape
    out_c, _, kh, kw = w.shape
    conv_h, conv_w = height - kh + 1, width - kw + 1
    extra = int(pool_padding == "same")
    pool_h, pool_w = (conv_h + extra * (conv_h % 2)) // 2, (conv_w + extra * (conv_w % 2)) // 2
    rows, cols = pool_h + pad_after[0], pool_w + pad_after[1]
    sizes = (height, width, in_c, out_c, kh, kw, 0, 0, conv_h, conv_w, pool_h, pool_w, 1)
    geometry = native.ConvPoolGeometry(*sizes, rows, cols)
    y = torch.full((batch, out_c, rows, cols), float("nan"), dtype=torch.bfloat16)
    y = y.contiguous(memory_format=torch.channels_last)
    argmax = torch.full((batch, rows, cols, out_c), 99, dtype=torch.uint8)
    x_nhwc, w_contiguous = x.permute(0, 2, 3, 1).contiguous(), w.contiguous()  # alive in the call
    lib = native.library()
    status = lib.conv_pool_forward_bf16(
        geometry,
        x_nhwc.data_ptr(),
        w_contiguous.data_ptr(),
        None if bias is None else bias.data_ptr(),
        batch,
        y.data_ptr(),
        argmax.data_ptr(),
        int(relu),
        threads,
    )
    assert status == 0
    return y, argmax, (pool_h, pool_w)


@property_settings
@given(
    in_c=st.sampled_from([8, 32]) | st.integers(1, 20).map(lambda n: 2 * n),
    height=st.integers(2, 12),
    width=st.integers(2, 12),
    filters=st.sampled_from([16, 32, 64]) | st.integers(1, 40),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    pool_padding=st.sampled_from(["valid", "same"]),
    use_bias=st.booleans(),
    batch=st.integers(1, 9),
    pad_after=st.sampled_from([(0, 0), (1, 1), (0, 1)]),
)
def test_bf16_conv_pool_kernel_matches_conv_and_max_pool(
    bf16_kernel, in_c, height, width, filters, kh, kw, pool_padding, use_bias, batch, pad_after
):
    """Each output is the pooled maximum of the conv on bf16 inputs and bf16-rounded weights
    and bias, summed in float32 and rounded once; its position holds that maximum (up to the
    float32 sums' rounding); the rows and columns after the pooled output are zero."""
    if block_is_empty(height, width, kh, kw, "valid", pool_padding):
        return
    torch.manual_seed(in_c * 1000 + height * 10 + width)
    x = torch.randn(batch, in_c, height, width).bfloat16()
    w = torch.randn(filters, in_c, kh, kw) / (in_c * kh * kw) ** 0.5
    bias = torch.randn(filters) if use_bias else None
    y, argmax, (pool_h, pool_w) = bf16_conv_pool(x, w, bias, pool_padding, pad_after)
    b = None if bias is None else bias.bfloat16().double()
    conv = F.conv2d(x.double(), w.bfloat16().double(), b)
    if pool_padding == "same":
        conv = F.pad(conv, (0, conv.shape[3] % 2, 0, conv.shape[2] % 2), value=float("-inf"))
    pooled = F.max_pool2d(conv, 2)
    got = y[:, :, :pool_h, :pool_w].double()
    torch.testing.assert_close(got, pooled.bfloat16().double(), rtol=2**-7, atol=1e-5)
    # The winning position's conv value is the maximum, up to float32 rounding of the sums.
    wins = argmax[:, :pool_h, :pool_w].permute(0, 3, 1, 2).long()  # (B, out_c, pool_h, pool_w)
    assert wins.max() <= 3
    rows = 2 * torch.arange(pool_h).view(1, 1, -1, 1) + wins // 2
    cols = 2 * torch.arange(pool_w).view(1, 1, 1, -1) + wins % 2
    width_padded = conv.shape[3]
    won = conv.flatten(2).gather(2, (rows * width_padded + cols).flatten(2)).view_as(pooled)
    torch.testing.assert_close(won, pooled, rtol=1e-5, atol=1e-5)
    assert not torch.isinf(won).any(), "a clipped position (pool padding) never wins"
    assert (y[:, :, pool_h:] == 0).all() and (y[:, :, :, pool_w:] == 0).all()


def test_bf16_conv_pool_kernel_does_not_depend_on_threads_and_passes_nan(bf16_kernel):
    torch.manual_seed(6)
    x = torch.randn(7, 8, 13, 13).bfloat16()
    x[3, 5, 6, 6] = float("nan")
    w, bias = torch.randn(16, 8, 3, 3) / 8, torch.randn(16)
    one = bf16_conv_pool(x, w, bias, "valid", (0, 0), threads=1)
    two = bf16_conv_pool(x, w, bias, "valid", (0, 0), threads=2)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(one[1], two[1])
    assert torch.isnan(one[0][3]).any() and not torch.isnan(one[0][[0, 1, 2, 4, 5, 6]]).any()


def test_the_relu_in_the_bf16_conv_pool_kernel_is_the_act_pass(bf16_kernel):
    """With `relu` the kernel writes what act_dropout_forward writes after it without a dropout:
    the same bits, NaN and zeros included, and NO_GRADIENT codes where the ReLU cut."""
    torch.manual_seed(8)
    x = torch.randn(5, 8, 11, 11).bfloat16()
    x[2, 3, 4, 4] = float("nan")
    x[4] = 0.0  # every window ties at the bias
    w, bias = torch.randn(16, 8, 3, 3) / 8, torch.randn(16)
    fused_y, fused_code, _ = bf16_conv_pool(x, w, bias, "valid", (0, 0), relu=True)
    y, code, _ = bf16_conv_pool(x, w, bias, "valid", (0, 0))
    lib = native.library()
    assert lib.act_dropout_forward(y.data_ptr(), 1, code.data_ptr(), y.numel(), 1, 0.0, 0, 2) == 0
    assert torch.equal(fused_y.view(torch.int16), y.view(torch.int16))
    assert torch.equal(fused_code, code)
    no_gradient = 255  # NO_GRADIENT in kernels.c
    assert (fused_code == no_gradient).any() and torch.isnan(fused_y[2]).any()


def test_bf16_conv_pool_takes_even_unpadded_convs_only(bf16_kernel):
    def second_conv(preset):
        return build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10).layers[2]

    assert fused.bf16_conv_pool_fits(second_conv("tiny"))  # 8 channels, 'valid'
    assert fused.bf16_conv_pool_fits(second_conv("basic"))
    assert fused.bf16_conv_pool_fits(second_conv("dropout"))  # 'same' padded before it
    odd = block_model((3, 8, 8), 4, (3, 3), "valid", "valid", "relu", True).layers[0]
    assert not fused.bf16_conv_pool_fits(odd)
    centred = block_model((4, 8, 8), 4, (3, 3), "same", "valid", "relu", True).layers[0]
    assert not fused.bf16_conv_pool_fits(centred)  # padding on both sides stays the conv's


def test_bf16_conv_pool_is_built_only_with_avx512_bf16(kernels):
    lib = native.library()
    assert fused.bf16_conv_pool_built() == bool(lib.conv_pool_bf16_available())
    if os.environ.get("CNNLAB_CFLAGS") == "-mno-avx512f":
        assert not fused.bf16_conv_pool_built()
        x = torch.zeros(1, 2, 2, 2, dtype=torch.bfloat16)
        geometry = native.ConvPoolGeometry(2, 2, 2, 1, 1, 1, 0, 0, 2, 2, 1, 1, 0, 1, 1)
        out = torch.zeros(1, dtype=torch.bfloat16)
        status = lib.conv_pool_forward_bf16(
            geometry,
            x.data_ptr(),
            torch.zeros(1, 2).data_ptr(),
            None,
            1,
            out.data_ptr(),
            None,
            0,
            1,
        )
        assert status == -1


# ------------------------------------ the first block in bf16 dot products (AVX512-BF16)


def first_block_in_pairs(model: CnnModel, x: torch.Tensor, threads: int = 2):
    """conv_pool_run on the model's first conv and pool with a bf16 output, through
    conv_pool_forward_pairs: the pooled output and the winning positions."""
    conv, pool = model.layers[0], model.layers[1]
    geometry = fused.first_block_geometry(conv, pool, x, (0, 0))
    assert fused.first_block_in_pairs(geometry, torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, _, argmax = fused.conv_pool_run(
            x, conv.weight, conv.bias, geometry, torch.bfloat16, train=True
        )
    finally:
        torch.set_num_threads(previous)
    return y, argmax


@property_settings
@given(
    **first_blocks, filters=st.sampled_from([16, 32]) | st.integers(9, 40), batch=st.integers(1, 9)
)
def test_first_block_in_pairs_matches_conv_and_max_pool_on_bf16_inputs(
    bf16_kernel,
    in_c,
    height,
    width,
    filters,
    kh,
    kw,
    padding,
    pool_padding,
    activation,
    use_bias,
    batch,
):
    """Each output is the pooled maximum (after the ReLU) of the conv on the input and weights
    rounded to bf16, with the float32 bias, summed in float32 and rounded once; its position
    holds that maximum, up to the float32 sums' rounding. Odd kernel rows (3x3 grey, 1x3 on
    three channels) end with a pair whose first weight is zero."""
    if kw * in_c < 2 or block_is_empty(height, width, kh, kw, padding, pool_padding):
        return
    torch.manual_seed(in_c * 1000 + height * 10 + width)
    model = block_model((in_c, height, width), filters, (kh, kw), padding, pool_padding, activation, use_bias)  # fmt: skip
    x = torch.randn(batch, in_c, height, width).contiguous(memory_format=torch.channels_last)
    y, argmax = first_block_in_pairs(model, x)
    conv, pool = copy.deepcopy(model.layers[0]).double(), copy.deepcopy(model.layers[1])
    conv.defer_activation = False
    with torch.no_grad():
        conv.weight.copy_(conv.weight.bfloat16().double())
        unpooled = conv(x.bfloat16().double())
        pooled = pool(unpooled)
    assert y.dtype == torch.bfloat16 and y.shape == pooled.shape
    torch.testing.assert_close(y.double(), pooled.bfloat16().double(), rtol=2**-7, atol=1e-5)
    # The winning position's conv value is the maximum, up to float32 rounding of the sums;
    # where the ReLU cut the maximum, no position takes a gradient.
    wins = argmax.permute(0, 3, 1, 2).long()  # (B, out_c, pool_h, pool_w)
    live = wins != 255
    near_zero = pooled.abs() < 1e-4  # the float32 sums may fall either side of 0 there
    assert ((live == (pooled > 0)) | near_zero).all() if activation else live.all()
    rows = 2 * torch.arange(pooled.shape[2]).view(1, 1, -1, 1) + wins.clamp(max=3) // 2
    cols = 2 * torch.arange(pooled.shape[3]).view(1, 1, 1, -1) + wins.clamp(max=3) % 2
    if not activation:
        unpooled = F.pad(unpooled, (0, 2, 0, 2))  # a 'same' pool's clipped positions never win
        index = (rows * unpooled.shape[3] + cols).flatten(2)
        won = unpooled.flatten(2).gather(2, index).view_as(pooled)
        torch.testing.assert_close(won, pooled, rtol=1e-5, atol=1e-5)


def test_first_block_in_pairs_does_not_depend_on_threads_and_passes_nan(bf16_kernel):
    torch.manual_seed(7)
    model = block_model((1, 28, 28), 32, (4, 4), "valid", "valid", "relu", True)
    x = torch.randn(7, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    x[3, 0, 10, 10] = float("nan")
    one, two = first_block_in_pairs(model, x, threads=1), first_block_in_pairs(model, x, threads=2)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(one[1], two[1])
    assert torch.isnan(one[0][3]).any() and not torch.isnan(one[0][[0, 1, 2, 4, 5, 6]]).any()


@pytest.mark.parametrize("preset", ["basic", "dropout", "fast", "tiny"])
def test_first_blocks_run_in_pairs_under_bf16_autocast_with_more_than_8_filters(kernels, preset):
    """The presets' first blocks with more than 8 filters take the bf16 dot products under bf16
    autocast; `tiny`'s 8 filters, a float32 output and a build without AVX512-BF16 keep the
    float32 kernel."""
    model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10)
    x = torch.zeros(2, 1, 28, 28)
    geometry = fused.first_block_geometry(model.layers[0], model.layers[1], x, (0, 0))
    in_pairs = fused.first_block_in_pairs(geometry, torch.bfloat16)
    assert in_pairs == (preset != "tiny" and fused.bf16_conv_pool_built())
    assert not fused.first_block_in_pairs(geometry, torch.float32)
    if not fused.bf16_conv_pool_built():  # the library says no itself
        lib = native.library()
        status = lib.conv_pool_forward_pairs(
            geometry, x.data_ptr(), model.layers[0].weight.detach().data_ptr(), None, 2,
            torch.empty(2, 32, 12, 12, dtype=torch.bfloat16).data_ptr(), 1, None, 1,
        )  # fmt: skip
        assert status == -1


# ----------------------------------------------------------------------------------- dropout


def raw_dropout(x: torch.Tensor, p: float, seed: int, threads: int = 1) -> torch.Tensor:
    y = torch.full((x.numel() + 64,), 7.0, dtype=x.dtype)  # slack after the end: never written
    status = native.library().dropout(
        x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), x.numel(), p, seed, threads
    )
    assert status == 0
    assert (y[x.numel() :] == 7.0).all()
    return y[: x.numel()]


def philox4x32_10(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 in plain Python (Salmon et al., SC 2011): the reference for the kernel."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def test_the_reference_philox_gives_random123s_published_numbers():
    ones = 0xFFFFFFFF
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((ones,) * 4, (ones, ones)) == (
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    )
    assert philox4x32_10(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
    ) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("seed", [0, 0x0123456789ABCDEF, 2**63 - 1])
def test_dropout_keeps_what_philox_draws_for_each_element(kernels, seed):
    # Element e: block e // 128; lane e % 16 takes counter block * 16 + lane; part (e % 128) // 16
    # takes the low (even part) or high half of word part // 2; kept when that half >= p * 65536.
    n, threshold = 300, 40000
    kept = raw_dropout(torch.ones(n), threshold / 65536, seed=seed) != 0
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for e in range(n):
        block, lane, part = e // 128, e % 16, (e % 128) // 16
        words = philox4x32_10((block * 16 + lane, 0, 0, 0), key)
        half = (words[part // 2] >> (16 * (part % 2))) & 0xFFFF
        assert bool(kept[e]) == (half >= threshold), e


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_1_minus_p_and_scales_by_the_keep_rate(kernels, p, dtype):
    x = torch.rand(1 << 20).add(0.5).to(dtype)  # no zeros: a zero output means dropped
    y = raw_dropout(x, p, seed=12345)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003  # 6 standard deviations
    drop_below = int(p * 65536 + 0.5)
    scale = torch.tensor(65536 / (65536 - drop_below), dtype=torch.float32)
    assert torch.equal(y[kept], (x[kept].float() * scale).to(dtype))  # one rounding, to even


@pytest.mark.parametrize("n", [1, 15, 16, 17, 127, 129, 1000])
def test_dropout_tails_use_the_same_numbers_as_whole_blocks(kernels, n):
    whole = raw_dropout(torch.ones(1024), 0.5, seed=99)
    assert torch.equal(raw_dropout(torch.ones(n), 0.5, seed=99), whole[:n])


def test_dropout_mask_does_not_depend_on_threads_and_changes_with_the_seed(kernels):
    x = torch.ones(100_003)
    one = raw_dropout(x, 0.3, seed=7, threads=1)
    assert torch.equal(raw_dropout(x, 0.3, seed=7, threads=2), one)
    assert torch.equal(raw_dropout(x, 0.3, seed=7, threads=5), one)
    assert not torch.equal(raw_dropout(x, 0.3, seed=8), one)


def test_dropout_layer_follows_torch_manual_seed_and_draws_new_masks(kernels):
    layer = build_model([{"Dropout": {"rate": 0.5}}, {"Flatten": {}}], (4, 6, 6), 144).layers[0]
    layer.train()
    x = torch.ones(8, 4, 6, 6)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_backward_draws_the_same_mask_in_any_gradient_layout(kernels, dtype):
    x = torch.rand(16, 8, 5, 5).add(0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    # no zeros in x: a zero output means dropped
    x.requires_grad_(True)
    y = fused.dropout(x, 0.4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.rand(16, 8, 5, 5).add(0.5).to(dtype)  # NCHW, unlike x
    y.backward(grad)
    scale = torch.tensor(65536 / (65536 - int(0.4 * 65536 + 0.5)))
    kept = y.detach() != 0
    assert 0.5 < kept.float().mean() < 0.7
    assert torch.equal(x.grad, (grad.float() * scale * kept).to(dtype))


def test_dropout_passes_nan_and_leaves_other_tensors_to_torch(kernels):
    y = fused.dropout(torch.full((4096,), float("nan")), 0.5)
    assert y.isnan().all()  # x * 0 for dropped values, as PyTorch's dropout gives
    strided = torch.ones(64, 64)[:, ::2]
    assert not fused.dropout_fits(strided)
    assert not fused.dropout_fits(torch.ones(8, dtype=torch.float16))
    assert fused.dropout_fits(torch.ones(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    layer = build_model([{"Dropout": {"rate": 0.5}}, {"Flatten": {}}], (1, 64, 32), 2048)
    layer.train()
    out = layer.layers[0](strided.reshape(1, 1, 64, 32))
    assert set(out.unique().tolist()) <= {0.0, 2.0}


# ------------------------------------------------- max pool, ReLU and dropout in one pass
# (fused.pool_dropout, pool_dropout_forward and pool_dropout_backward in kernels.c)


def pool_and_dropout(pool_padding: str, in_shape: tuple[int, int, int], p: float, relu: bool):
    layers = [
        {"MaxPool2D": {"pool_size": 2, "padding": pool_padding}},
        {"Dropout": {"rate": p}},
        {"Flatten": {}},
    ]
    model = build_model([*layers, {"Dense": {"units": 2}}], in_shape, 2).train()
    pool, dropout = model.layers[0], model.layers[1]
    pool.deferred_act = torch.nn.ReLU() if relu else None  # as a Conv2D(activation="relu") sets it
    return pool, dropout


def pool_then_dropout(pool, dropout, x: torch.Tensor, *, fused_op: bool):
    """The output and input gradient of dropout(act(pool(x))), through pool_dropout or through
    the three layers one by one, from the same generator state."""
    leaf = x.clone().requires_grad_()
    torch.manual_seed(5)
    if fused_op:
        assert fused.pool_dropout_fits(pool, dropout, leaf)
        y = fused.pool_dropout(pool, dropout, leaf)
    else:
        y = dropout(pool(leaf))
    weights = torch.arange(y.numel(), dtype=torch.float32).view(y.shape) % 7 - 3
    (y.float() * weights).sum().backward()
    return y.detach(), leaf.grad


@property_settings
@given(
    channels=st.sampled_from([16, 32, 48, 64]),
    height=st.integers(2, 11),
    width=st.integers(2, 11),
    batch=st.integers(1, 9),
    pool_padding=st.sampled_from(["valid", "same"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    p=st.sampled_from([0.1, 0.25, 0.5, 0.9]),
    relu=st.booleans(),
)
def test_pool_dropout_gives_the_three_layers_results_bit_for_bit(
    kernels, channels, height, width, batch, pool_padding, dtype, p, relu
):
    pool, dropout = pool_and_dropout(pool_padding, (channels, height, width), p, relu)
    torch.manual_seed(channels * 100 + height * 10 + width)
    # Few distinct values, so that windows have ties, negative ones for the ReLU, and a NaN.
    x = torch.randint(-3, 4, (batch, channels, height, width)).to(dtype)
    x[0, channels // 2, 0, 0] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    y, grad = pool_then_dropout(pool, dropout, x, fused_op=True)
    expected_y, expected_grad = pool_then_dropout(pool, dropout, x, fused_op=False)
    assert y.dtype == dtype and grad.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.isnan(), expected_y.isnan())
    assert torch.equal(y.nan_to_num(), expected_y.nan_to_num())
    assert torch.equal(grad, expected_grad)


@property_settings
@given(
    channels=st.sampled_from([16, 32, 64]),
    height=st.integers(2, 11),
    width=st.integers(2, 11),
    batch=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    p=st.sampled_from([0.1, 0.25, 0.5, 0.9]),
    relu=st.booleans(),
    seed=st.integers(0, 2**63 - 1),
)
def test_act_dropout_after_a_pool_gives_pool_dropouts_results(
    kernels, channels, height, width, batch, dtype, p, relu, seed
):
    """act_dropout_forward on a pool that already ran (in conv_pool_dropout, the bf16 conv-pool
    kernel's) writes what pool_dropout_forward gives for the same seed, output and codes, bit
    for bit."""
    lib, pointer = native.library(), fused._pointer
    torch.manual_seed(channels * 100 + height * 10 + width)
    x = torch.randint(-3, 4, (batch, channels, height, width)).to(dtype)  # ties, negatives
    x[0, channels // 2, 0, 0] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    is_bf16 = int(dtype == torch.bfloat16)
    want, want_code, shape = fused._pool_outputs(x, height // 2, width // 2)
    outputs = (pointer(want), pointer(want_code), 2)
    assert lib.pool_dropout_forward(pointer(x), is_bf16, *shape, int(relu), p, seed, *outputs) == 0
    pooled, code, _ = fused._pool_outputs(x, height // 2, width // 2)
    assert lib.max_pool_forward(pointer(x), is_bf16, *shape, pointer(pooled), pointer(code), 2) == 0
    n = pooled.numel()
    status = lib.act_dropout_forward(
        pointer(pooled), is_bf16, pointer(code), n, int(relu), p, seed, 2
    )
    assert status == 0
    assert torch.equal(code, want_code)
    assert torch.equal(pooled.isnan(), want.isnan())
    assert torch.equal(pooled.nan_to_num(), want.nan_to_num())


def test_pool_dropout_keeps_1_minus_p_and_does_not_depend_on_threads(kernels):
    pool, dropout = pool_and_dropout("valid", (32, 14, 14), 0.25, relu=False)
    x = torch.rand(64, 32, 14, 14).add(1).contiguous(memory_format=torch.channels_last)
    outputs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            outputs.append(fused.pool_dropout(pool, dropout, x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    kept = (outputs[0] != 0).float().mean().item()
    assert 0.74 < kept < 0.76  # x > 0, so only the dropout makes zeros
    torch.manual_seed(1)
    assert not torch.equal(fused.pool_dropout(pool, dropout, x), outputs[0])


def test_pool_dropout_runs_only_where_it_gives_the_same_results(kernels):
    pool, dropout = pool_and_dropout("valid", (32, 6, 6), 0.25, relu=True)
    x = torch.rand(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    assert fused.pool_dropout_fits(pool, dropout, x)
    assert not fused.pool_dropout_fits(pool, dropout, x.contiguous())  # NCHW
    narrow = pool_and_dropout("valid", (24, 6, 6), 0.25, relu=True)
    wide_x = torch.rand(2, 24, 6, 6).contiguous(memory_format=torch.channels_last)
    assert not fused.pool_dropout_fits(*narrow, wide_x)  # channels not a multiple of 16
    dropout.eval()
    assert not fused.pool_dropout_fits(pool, dropout, x)
    dropout.train()
    pool.deferred_act = torch.nn.Sigmoid()
    assert not fused.pool_dropout_fits(pool, dropout, x)
    pool.deferred_act = torch.nn.ReLU()
    handle = dropout.register_forward_hook(lambda *args: None)
    assert not fused.pool_dropout_fits(pool, dropout, x)
    handle.remove()
    assert fused.pool_dropout_fits(pool, dropout, x)


def no_conv_fusion(*args, **kwargs) -> bool:
    """fused.conv_pool_dropout_fits for tests of the pool and dropout on their own."""
    return False


@pytest.mark.parametrize("bf16", [False, True])
def test_dropout_preset_trains_the_same_with_pool_dropout(kernels, bf16):
    torch.manual_seed(0)
    model = build_model(preset_layers("dropout", 10), (1, 28, 28), 10).train()
    x = torch.rand(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    fits = fused.pool_dropout_fits
    runs: list[bool] = []
    results = []

    def counted(*args) -> bool:
        runs.append(fits(*args))
        return runs[-1]

    for use_it in (True, False):
        trained = copy.deepcopy(model)
        fused.pool_dropout_fits = counted if use_it else (lambda *a: False)
        conv_fits, fused.conv_pool_dropout_fits = fused.conv_pool_dropout_fits, no_conv_fusion
        try:
            torch.manual_seed(1)
            with per_block(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = trained(x)
            (logits.float() * torch.linspace(-1, 1, 10)).sum().backward()
        finally:
            fused.pool_dropout_fits, fused.conv_pool_dropout_fits = fits, conv_fits
        results.append((logits.detach(), [p.grad for p in trained.parameters()]))
    assert runs == [True, True]  # the second and third pools, each with the dropout after it
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


# ---------------------------------------------------------------- conv weight and input gradients
# from the pooled gradient (fused.conv_then_pool, pooled_weight_grad and pooled_input_grad in
# kernels.c)


def run_pooled(
    model: CnnModel,
    x: torch.Tensor,
    *,
    use_kernel: bool,
    bf16: bool = False,
    c_input_grad: bool | None = None,
):
    """Logits, parameter gradients and the input gradient of one training pass through the
    first Conv2D + MaxPool2D, with or without conv_then_pool (at any kw * in_channels); its
    input gradient in C wherever it can run (c_input_grad True), never (False), or where it
    pays (None)."""
    model = copy.deepcopy(model)
    leaf = x.clone().requires_grad_()
    fits, min_run, max_shifted = fused.pooled_grad_fits, fused.MIN_RUN, fused.MAX_SHIFTED_BYTES
    fused.MIN_RUN = 1
    if c_input_grad is not None:
        fused.MAX_SHIFTED_BYTES = 1 << 40 if c_input_grad else 0
    fused.pooled_grad_fits = fits if use_kernel else (lambda *a: False)
    conv_fits, fused.conv_pool_dropout_fits = fused.conv_pool_dropout_fits, no_conv_fusion
    torch.manual_seed(5)  # the same dropout masks in every run
    try:
        with (
            counted("conv_then_pool") as calls,
            torch.autocast("cpu", torch.bfloat16, enabled=bf16),
        ):
            logits = model(leaf)
        F.cross_entropy(logits.float(), torch.arange(x.shape[0]) % 3).backward()
    finally:
        fused.pooled_grad_fits, fused.MIN_RUN = fits, min_run
        fused.MAX_SHIFTED_BYTES = max_shifted
        fused.conv_pool_dropout_fits = conv_fits
    assert bool(calls) == use_kernel, "conv_then_pool ran where it should not, or not"
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach().float(), grads, leaf.grad


def assert_close_grads(ours, theirs, rtol: float) -> None:
    for name, grad in theirs.items():
        scale = grad.abs().max().item() + 1e-6
        assert (ours[name] - grad).abs().max().item() <= rtol * scale, name


@property_settings
@given(
    in_c=st.sampled_from([8, 16, 32]) | st.integers(1, 40),
    height=st.integers(2, 12),
    width=st.integers(2, 12),
    filters=st.sampled_from([16, 32]) | st.integers(1, 20),  # 16 and 32: winners_backward
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    padding=st.sampled_from(["valid", "same"]),
    pool_padding=st.sampled_from(["valid", "same"]),
    activation=st.sampled_from([None, "relu"]),
    use_bias=st.booleans(),
    batch=st.integers(1, 37),
    c_input_grad=st.booleans(),
)
def test_pooled_gradients_match_the_modules_in_fp32(
    kernels,
    in_c,
    height,
    width,
    filters,
    kh,
    kw,
    padding,
    pool_padding,
    activation,
    use_bias,
    batch,
    c_input_grad,
):
    if block_is_empty(height, width, kh, kw, padding, pool_padding):
        return
    model = block_model(
        (in_c, height, width), filters, (kh, kw), padding, pool_padding, activation, use_bias
    )
    torch.manual_seed(batch)
    x = torch.randn(batch, in_c, height, width).contiguous(memory_format=torch.channels_last)
    logits, grads, grad_x = run_pooled(model, x, use_kernel=True, c_input_grad=c_input_grad)
    ref_logits, ref_grads, ref_grad_x = run_pooled(model, x, use_kernel=False)
    assert torch.equal(logits, ref_logits)
    assert_close_grads(grads, ref_grads, rtol=1e-5)
    assert torch.allclose(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("preset", "c_input_grad"),
    [("tiny", None), ("basic", None), ("dropout", None), ("basic", True), ("dropout", True)],
)
def test_pooled_gradients_under_bf16_autocast(kernels, preset, c_input_grad):
    """The second conv's gradients (and the first's, which take its input gradient) against
    oneDNN's under autocast: tiny's input gradient in C where it pays, basic's and dropout's
    both ways. Where the conv's forward pass is PyTorch's, the kernels' gradients match oneDNN's
    value by value. Where it is the bf16 conv-and-pool kernel, its sums in another order can
    pick another of two positions that round to the same bf16 maximum, and the gradient follows
    that position: there both are held to their distance from the fp32 gradients."""
    distances = {}  # parameter -> [ours, autocast's], relative to fp32, summed over the seeds
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10)
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(20, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        _, fp32_grads, _ = run_pooled(model, x, use_kernel=False)
        logits, grads, grad_x = run_pooled(
            model, x, use_kernel=True, bf16=True, c_input_grad=c_input_grad
        )
        ref_logits, ref_grads, ref_grad_x = run_pooled(model, x, use_kernel=False, bf16=True)
        assert grads["layers.conv2d_1.weight"].dtype == torch.float32
        if fused.bf16_conv_pool_built():
            torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
        else:  # PyTorch's conv, then the C pool
            assert torch.equal(logits, ref_logits)
            # oneDNN rounds its weight gradient to bf16; the kernel sums bf16 products in fp32
            assert_close_grads(grads, ref_grads, rtol=2e-2)
            scale = ref_grad_x.abs().max()
            assert torch.allclose(grad_x, ref_grad_x, rtol=2e-2, atol=1e-3 * scale)
        for name, exact in fp32_grads.items():
            ours, theirs = distances.setdefault(name, [0.0, 0.0])
            distances[name] = [
                ours + ((grads[name] - exact).norm() / exact.norm()).item(),
                theirs + ((ref_grads[name] - exact).norm() / exact.norm()).item(),
            ]
    for name, (ours, theirs) in distances.items():  # as close to fp32 as autocast's own
        assert ours <= 1.1 * theirs + 3e-3, (name, ours, theirs)


@pytest.mark.parametrize("preset", ["tiny", "basic"])
def test_pooled_gradients_do_not_depend_on_threads(kernels, preset):
    """Weight gradients summed in a fixed order; input gradients image by image (tiny's in C,
    so the first conv's weight gradient, computed from it, comes out the same too)."""
    torch.manual_seed(4)
    model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10)
    x = torch.randn(70, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one, _ = run_pooled(model, x, use_kernel=True, bf16=True)
        torch.set_num_threads(2)
        _, two, _ = run_pooled(model, x, use_kernel=True, bf16=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one["layers.conv2d_1.weight"], two["layers.conv2d_1.weight"])
    assert torch.equal(one["layers.conv2d_1.bias"], two["layers.conv2d_1.bias"])
    if preset == "tiny":
        assert torch.equal(one["layers.conv2d.weight"], two["layers.conv2d.weight"])


def test_pooled_gradients_run_where_they_pay_and_only_in_training(kernels):
    """basic's second conv (4x4 on 32 channels: 8 vectors a kernel row) takes the C weight
    gradient in training; tiny's (3x3 on 8 channels: shifted kernels in L1) both C gradients
    when its input takes a gradient too; dropout's, evaluation, frozen convs and hooks keep the
    modules."""

    def second_pair(preset):
        model = build_model(preset_layers(preset, 10, (1, 28, 28)), (1, 28, 28), 10)
        return model.layers[2], model.layers[3]

    x = torch.randn(2, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    conv, pool = second_pair("basic")
    assert fused.pooled_grad_fits(conv, pool, x)
    with torch.no_grad():
        assert not fused.pooled_grad_fits(conv, pool, x)
    assert not fused.pooled_grad_fits(conv, pool, x.contiguous())  # not channels_last
    handle = pool.register_forward_hook(lambda *args: None)
    assert not fused.pooled_grad_fits(conv, pool, x)
    handle.remove()
    conv.requires_grad_(False)
    assert not fused.pooled_grad_fits(conv, pool, x)
    assert not fused.input_grad_fits(conv)
    conv, pool = second_pair("tiny")
    y = torch.randn(2, 8, 13, 13).contiguous(memory_format=torch.channels_last)
    assert fused.input_grad_fits(conv)
    assert not fused.pooled_grad_fits(conv, pool, y)  # no input gradient: the C weight gradient
    assert fused.pooled_grad_fits(conv, pool, y.requires_grad_())  # alone would not pay
    conv, pool = second_pair("dropout")
    y = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    assert not fused.pooled_grad_fits(conv, pool, y)


# ------------------------------------- conv, pool and dropout with the conv's gradients in C
# from the pool's winners alone (fused.conv_pool_dropout, winners_backward in kernels.c)


def conv_pool_dropout_model(
    in_shape: tuple[int, int, int],
    filters: int,
    kernel: tuple[int, int],
    padding: str,
    activation: str | None,
    use_bias: bool,
    p: float,
) -> CnnModel:
    layers = [
        conv_layer(filters, kernel, padding, activation, use_bias),
        {"MaxPool2D": {"pool_size": 2}},
        {"Dropout": {"rate": p}},
        {"Flatten": {}},
        {"Dense": {"units": 3}},
    ]
    return build_model(layers, in_shape, 3).train()


def winners_shape_fits(kw: int, in_c: int) -> bool:
    """The kernel rows winners_backward takes: at most 256 values (MAX_RUN_VECTORS vectors)."""
    return kw * in_c <= 256


def run_conv_pool_dropout(
    model: CnnModel, x: torch.Tensor, *, use_kernel: bool, bf16: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
    """Logits, parameter gradients and input gradient of one training pass, with
    conv_pool_dropout where it fits or with the layers one by one (the same dropout masks);
    and how many times conv_pool_dropout ran."""
    model = copy.deepcopy(model)
    leaf = x.clone().requires_grad_()
    fits = fused.conv_pool_dropout_fits
    fused.conv_pool_dropout_fits = fits if use_kernel else no_conv_fusion
    torch.manual_seed(5)
    try:
        with (
            counted("conv_pool_dropout") as calls,
            torch.autocast("cpu", torch.bfloat16, enabled=bf16),
        ):
            logits = model(leaf)
        F.cross_entropy(logits.float(), torch.arange(x.shape[0]) % logits.shape[1]).backward()
    finally:
        fused.conv_pool_dropout_fits = fits
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach().float(), grads, leaf.grad, len(calls)


@property_settings
@given(
    in_c=st.sampled_from([16, 32, 48]),
    filters=st.sampled_from([16, 32, 64]),
    height=st.integers(2, 11),
    width=st.integers(2, 11),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    padding=st.sampled_from(["valid", "same"]),
    activation=st.sampled_from([None, "relu"]),
    use_bias=st.booleans(),
    batch=st.integers(1, 37),
    p=st.sampled_from([0.1, 0.25, 0.5]),
    channels_last_weights=st.booleans(),
)
def test_conv_pool_dropout_gradients_match_the_layers_in_fp32(
    kernels,
    in_c,
    filters,
    height,
    width,
    kh,
    kw,
    padding,
    activation,
    use_bias,
    batch,
    p,
    channels_last_weights,
):
    """Any geometry: where it runs, the same logits bit for bit (the same conv and pool-dropout
    forward) and the same gradients up to the order of the fp32 sums, whatever the weights'
    memory layout (the trainer keeps them channels_last); where it does not, the layers run."""
    if block_is_empty(height, width, kh, kw, padding, "valid"):
        return
    model = conv_pool_dropout_model(
        (in_c, height, width), filters, (kh, kw), padding, activation, use_bias, p
    )
    if channels_last_weights:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(batch)
    x = torch.randn(batch, in_c, height, width).contiguous(memory_format=torch.channels_last)
    logits, grads, grad_x, ran = run_conv_pool_dropout(model, x, use_kernel=True)
    ref_logits, ref_grads, ref_grad_x, _ = run_conv_pool_dropout(model, x, use_kernel=False)
    # 'same' with odd kernels pads evenly inside the conv itself: conv_pool_dropout leaves those
    pads_itself = padding == "same" and kh % 2 == 1 and kw % 2 == 1 and kh * kw > 1
    assert ran == int(winners_shape_fits(kw, in_c) and not pads_itself)
    assert torch.equal(logits, ref_logits)
    assert_close_grads(grads, ref_grads, rtol=1e-5)
    assert torch.allclose(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_winners_gradients_on_rows_of_part_vectors_keep_inf_in_the_patch(kernels, bf16):
    """`tiny`'s second conv (8 input channels: kernel rows of 24 values, read as two vectors):
    the same gradients as the modules', and an infinite pooled gradient reaches the input
    gradient under its winner's patch only (the 8 lanes past each row would add inf x 0 = NaN
    to the next pixel if they were not masked off)."""
    torch.manual_seed(0)
    model = block_model((8, 13, 13), 16, (3, 3), "valid", "valid", None, True).train()
    conv, pool = model.layers[0], model.layers[1]
    assert fused.winners_fit(conv, pool)

    def winners_fit(in_c: int, kernel: tuple[int, int]) -> bool:
        layers = block_model((in_c, 9, 9), 16, kernel, "valid", "valid", None, True).layers
        return fused.winners_fit(layers[0], layers[1])

    assert winners_fit(24, (3, 3))  # rows of 3 x 24 values, read as 5 whole vectors
    assert winners_fit(3, (5, 5))  # rows of 15 values in one vector
    assert winners_fit(85, (3, 3))  # rows of 255 values: 16 vectors
    assert not winners_fit(86, (3, 3))  # rows of 258 values: 17 vectors
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(3, 8, 13, 13).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 16, 5, 5)
    grad[1, 4, 2, 3], grad[2, 0, 4, 4] = float("inf"), float("-inf")
    grad = grad.to(dtype).contiguous(memory_format=torch.channels_last)
    results = []
    for use_kernel in (True, False):
        leaf = x.clone().requires_grad_()
        conv.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            y = fused.conv_then_pool(conv, pool, leaf) if use_kernel else pool(conv(leaf))
        y.backward(grad.to(y.dtype))
        results.append((leaf.grad.float(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    (ours_x, ours_w, ours_b), (ref_x, ref_w, ref_b) = results
    assert ours_x.isinf().any() and not ours_x[0].isinf().any()
    assert torch.equal(ours_x.isnan(), ref_x.isnan()) and torch.equal(ours_x.isinf(), ref_x.isinf())
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    finite = ref_x.isfinite()
    torch.testing.assert_close(ours_x[finite], ref_x[finite], **tolerance)
    torch.testing.assert_close(ours_w, ref_w, equal_nan=True, **tolerance)
    torch.testing.assert_close(ours_b, ref_b, equal_nan=True, **tolerance)


@pytest.mark.parametrize("channels_last_weights", [False, True])
def test_dropout_preset_takes_conv_pool_dropout_under_bf16_autocast(kernels, channels_last_weights):
    """The `dropout` preset's second and third convs, with their pools and dropouts, as the
    trainer holds the model (channels_last weights) and as built, against the layers under
    autocast. Where the forward pass is oneDNN's conv: the same logits, and gradients close to
    autocast's. Where it is the bf16 conv-and-pool kernel: logits within bf16's precision (its
    sums in another order can pick another of two positions that round to the same bf16
    maximum, and the gradient follows that position). Either way the gradients are as close to
    the fp32 ones as autocast's own (oneDNN rounds a bf16 conv's weight gradient to bf16; the
    kernel sums the bf16 products in fp32)."""
    distances = {}  # parameter -> [ours, autocast's], relative to fp32, summed over the seeds
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        model = build_model(preset_layers("dropout", 10, (1, 28, 28)), (1, 28, 28), 10).train()
        if channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        x = torch.randn(20, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        _, exact_grads, _, _ = run_conv_pool_dropout(model, x, use_kernel=False)
        logits, grads, _, ran = run_conv_pool_dropout(model, x, use_kernel=True, bf16=True)
        ref_logits, ref_grads, _, _ = run_conv_pool_dropout(model, x, use_kernel=False, bf16=True)
        assert ran == 2
        if fused.bf16_conv_pool_built():
            torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(logits, ref_logits)
            assert_close_grads(grads, ref_grads, rtol=2e-2)
        for name, exact in exact_grads.items():
            ours, theirs = distances.setdefault(name, [0.0, 0.0])
            distances[name] = [
                ours + ((grads[name] - exact).norm() / exact.norm()).item(),
                theirs + ((ref_grads[name] - exact).norm() / exact.norm()).item(),
            ]
    for name, (ours, theirs) in distances.items():
        assert ours <= 1.1 * theirs + 3e-3, (name, ours, theirs)


def test_conv_pool_dropout_gradients_do_not_depend_on_threads(kernels):
    """Weight and bias gradients summed in a fixed order of 16-image chunks; input gradients
    image by image: the same bits on 1, 2 and 3 threads, in fp32 and bf16."""
    model = conv_pool_dropout_model((32, 14, 14), 32, (2, 2), "same", "relu", True, 0.25)
    x = torch.randn(45, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    for bf16 in (False, True):
        results = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                results.append(run_conv_pool_dropout(model, x, use_kernel=True, bf16=bf16))
        finally:
            torch.set_num_threads(threads)
        _, grads, grad_x, ran = results[0]
        assert ran == 1
        for _, other_grads, other_grad_x, _ in results[1:]:
            assert torch.equal(other_grad_x, grad_x)
            assert all(torch.equal(other_grads[name], grads[name]) for name in grads)


# The (in_c, kw) pairs whose kernel rows winners_backward takes in bf16 dot products
# (SPLIT_UNION_SHAPES in kernels.c): in_c a multiple of 32, rows of at most 256 values.
SPLIT_SHAPES = [(32, kw) for kw in range(1, 6)] + [(64, kw) for kw in range(1, 5)]
SPLIT_SHAPES += [(96, 1), (96, 2), (128, 1), (128, 2)]
NO_GRADIENT, DROPPED = 255, 4  # winners_backward's codes besides the positions 0-3


def winners_inputs(
    batch: int, in_c: int, out_c: int, kh: int, kw: int, size: tuple[int, int], p: float, seed: int
) -> tuple[native.ConvPoolGeometry, list[torch.Tensor]]:
    """A geometry and random bf16 operands for fused.winners_grads: the conv's input, weights,
    pooled gradient and codes (every position, some without a gradient, some dropped where p)."""
    in_h, in_w = size
    conv_h, conv_w = in_h - kh + 1, in_w - kw + 1
    pool_h, pool_w = conv_h // 2, conv_w // 2
    g = native.ConvPoolGeometry(
        in_h, in_w, in_c, out_c, kh, kw, 0, 0, conv_h, conv_w, pool_h, pool_w, 1, pool_h, pool_w
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_c, in_h, in_w, generator=gen)
    w = torch.randn(out_c, in_c, kh, kw, generator=gen) / (kh * kw * in_c) ** 0.5
    grad = torch.randn(batch, out_c, pool_h, pool_w, generator=gen)
    code = torch.randint(0, 4, (batch, pool_h, pool_w, out_c), generator=gen, dtype=torch.uint8)
    code[torch.rand(code.shape, generator=gen) < 0.3] = NO_GRADIENT  # a ReLU's dead winners
    if p > 0:
        dropped = torch.rand(code.shape, generator=gen) < p
        code[dropped & (code != NO_GRADIENT)] |= DROPPED
    operands = [
        t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for t in (x, w, grad)
    ]
    return g, [*operands, code]


@property_settings
@given(
    shape=st.sampled_from(SPLIT_SHAPES),
    out_c=st.sampled_from([16, 32, 48, 64]),
    kh=st.integers(1, 4),
    size=st.tuples(st.integers(2, 13), st.integers(2, 13)),
    batch=st.integers(1, 37),
    p=st.sampled_from([0.0, 0.25]),
    has_bias=st.booleans(),
)
def test_winners_in_bf16_dot_products_give_the_bits_of_float32_union_rows(
    kernels, shape, out_c, kh, size, batch, p, has_bias
):
    """winners_backward on bf16 operands in bf16 dot products (where the build has AVX512-BF16)
    and by union rows in float32: the same bits. Each dot product adds g x one bfloat16 value and
    0 x its neighbour, and the products of bfloat16 values are exact in float32, so each is one
    rounding of the same sum as the float32 FMA, in the same order. Union rows change only the
    order of the input gradient's sums from position by position (and agree with the modules:
    test_conv_pool_dropout_gradients_match_the_layers_in_fp32)."""
    in_c, kw = shape
    if size[0] < kh + 1 or size[1] < kw + 1:
        return
    g, operands = winners_inputs(batch, in_c, out_c, kh, kw, size, p, seed=batch)
    expected = "in bf16 dot products" if fused.bf16_conv_pool_built() else "by union rows"
    assert fused.winners_method(g, torch.bfloat16, torch.bfloat16) == expected
    assert fused.winners_method(g, torch.float32, torch.float32) == "by union rows"
    results = []
    try:
        for method in (2, 1, 0):
            fused.WINNERS_MAX_METHOD = method
            results.append(fused.winners_grads(g, *operands, p, input_grad=True, has_bias=has_bias))
    finally:
        fused.WINNERS_MAX_METHOD = 2
    (ours_x, ours_w, ours_b), (ref_x, ref_w, ref_b), (by_position_x, *by_position) = results
    assert ours_x.dtype == torch.bfloat16 and ours_w.dtype == torch.float32
    assert torch.equal(ours_x, ref_x) and torch.equal(ours_w, ref_w)
    assert not has_bias or torch.equal(ours_b, ref_b)
    assert torch.equal(by_position[0], ref_w)  # the weight gradient goes the same way
    scale = by_position_x.float().abs().max().item() + 1e-6
    torch.testing.assert_close(ref_x.float(), by_position_x.float(), rtol=0, atol=2e-2 * scale)


def test_winners_methods_of_the_presets(kernels):
    """`basic`'s and `dropout`'s convs after the first (32 input channels) go by union rows in
    float32 and in bf16 dot products under bf16 autocast where the build has AVX512-BF16;
    `tiny`'s (8 input channels, not whole vectors) position by position; fewer where
    WINNERS_MAX_METHOD says."""
    for preset, in_c, kernel in (("tiny", 8, 3), ("basic", 32, 4), ("dropout", 32, 2)):
        g = native.ConvPoolGeometry(9, 9, in_c, 32, kernel, kernel, 0, 0, 6, 6, 3, 3, 1, 3, 3)
        fp32, bf16 = (fused.winners_method(g, t, t) for t in (torch.float32, torch.bfloat16))
        if preset == "tiny":
            assert fp32 == bf16 == "by position"
            continue
        assert fp32 == "by union rows"
        assert bf16 == ("in bf16 dot products" if fused.bf16_conv_pool_built() else fp32)
        # float32 weights (no autocast) keep the float32 sums
        assert fused.winners_method(g, torch.bfloat16, torch.float32) == "by union rows"
        try:
            fused.WINNERS_MAX_METHOD = 0
            assert fused.winners_method(g, torch.bfloat16, torch.bfloat16) == "by position"
        finally:
            fused.WINNERS_MAX_METHOD = 2


def test_conv_pool_dropout_runs_only_where_it_gives_the_same_results(kernels):
    model = conv_pool_dropout_model((32, 8, 8), 32, (2, 2), "valid", "relu", True, 0.25)
    conv, pool, dropout = model.layers[0], model.layers[1], model.layers[2]
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    assert fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x.contiguous())  # NCHW
    corner = x[:, :, :2, :2].contiguous(memory_format=torch.channels_last)
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, corner)  # one row, one column
    assert fused.conv_pool_dropout_fits(conv, pool, dropout, corner, (0, 1, 0, 1))  # padded
    with torch.no_grad():
        assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    dropout.eval()
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    dropout.train()
    handle = conv.register_forward_hook(lambda *args: None)
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    handle.remove()
    conv.requires_grad_(False)
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    conv.requires_grad_(True)
    pool.deferred_act = torch.nn.Sigmoid()
    assert not fused.conv_pool_dropout_fits(conv, pool, dropout, x)
    pool.deferred_act = torch.nn.ReLU()

    def fits(in_shape, filters, kernel, padding="valid", pool_padding="valid", strides=1):
        layers = [
            {
                "Conv2D": {
                    "filters": filters,
                    "kernel_size": list(kernel),
                    "padding": padding,
                    "strides": strides,
                    "activation": "relu",
                }
            },
            {"MaxPool2D": {"pool_size": 2, "padding": pool_padding}},
            {"Dropout": {"rate": 0.25}},
        ]
        layers_ = build_model([*layers, {"Flatten": {}}, {"Dense": {"units": 2}}], in_shape, 2)
        layers_ = layers_.train().layers
        inputs = torch.randn(2, *in_shape).contiguous(memory_format=torch.channels_last)
        return fused.conv_pool_dropout_fits(layers_[0], layers_[1], layers_[2], inputs)

    assert fits((16, 9, 9), 16, (3, 3))
    assert not fits((24, 9, 9), 16, (3, 3))  # input channels not a multiple of 16
    assert not fits((16, 9, 9), 24, (3, 3))  # output channels not a multiple of 16
    assert not fits((16, 9, 9), 272, (3, 3))  # more output channels than the kernel holds
    assert fits((32, 9, 9), 16, (3, 3))  # 3 x 3 x 32 values: in groups of rows
    assert not fits((96, 9, 9), 16, (3, 3))  # rows of 3 x 96 values: longer than it takes
    assert not fits((16, 9, 9), 16, (3, 3), padding="same")  # the conv pads itself
    assert not fits((16, 9, 9), 16, (3, 3), pool_padding="same")  # pads 7 x 7 below, right
    assert fits((16, 9, 9), 16, (2, 2), pool_padding="same")  # 8 x 8: nothing to pad
    assert not fits((16, 9, 9), 16, (2, 2), strides=2)
