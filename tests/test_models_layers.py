"""Layer specs: parsing, the Python layer functions, initializers and the built CnnModel."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo  # imported at collection: the first optimizer would pay ~1.5 s for it
import yaml

from cnnlab.models import (
    Activation,
    AveragePooling2D,
    BatchNormalization,
    CnnModel,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    GlobalMaxPooling2D,
    Input,
    LayerSpec,
    MaxPool2D,
    Rescaling,
    build_model,
    parse_spec,
    spec_to_list,
)


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    # torch.testing.assert_close would import torch.distributed (~2 s) on its first call.
    assert got.shape == expected.shape
    difference = (got - expected).abs().max().item()
    assert difference <= atol, f"max abs difference {difference} > {atol}"


YAML_SPEC = """
- Conv2D: {filters: 32, kernel_size: [4, 4], activation: relu}
- MaxPool2D: {pool_size: [2, 2]}
- Flatten
- Dense: {units: 10, activation: softmax}
"""


def test_python_layer_functions_equal_the_dict_form():
    assert Conv2D(32, (3, 3), activation="relu") == {
        "Conv2D": {"filters": 32, "kernel_size": (3, 3), "activation": "relu"}
    }
    assert MaxPool2D() == {"MaxPool2D": {"pool_size": 2}}
    assert Dropout(0.25) == {"Dropout": {"rate": 0.25}}
    assert Flatten() == {"Flatten": {}}
    assert Dense(10, activation="softmax") == {"Dense": {"units": 10, "activation": "softmax"}}
    assert Rescaling(1 / 255) == {"Rescaling": {"scale": 1 / 255, "offset": 0.0}}
    assert BatchNormalization(momentum=0.9) == {"BatchNormalization": {"momentum": 0.9}}
    assert Activation("gelu") == {"Activation": {"activation": "gelu"}}
    assert GlobalAveragePooling2D() == {"GlobalAveragePooling2D": {}}
    assert GlobalMaxPooling2D() == {"GlobalMaxPooling2D": {}}
    assert AveragePooling2D(3, strides=1) == {"AveragePooling2D": {"pool_size": 3, "strides": 1}}


def test_python_and_yaml_specs_parse_to_the_same_layers():
    python = [
        Conv2D(32, (4, 4), activation="relu"),
        MaxPool2D((2, 2)),
        Flatten(),
        Dense(10, activation="softmax"),
    ]
    assert parse_spec(python) == parse_spec(yaml.safe_load(YAML_SPEC))


def test_parse_fills_keras_defaults_and_normalises():
    conv, pool, flat, dense = parse_spec(yaml.safe_load(YAML_SPEC))
    assert conv == LayerSpec(
        "Conv2D",
        {
            "filters": 32,
            "kernel_size": (4, 4),
            "strides": (1, 1),
            "padding": "valid",
            "activation": "relu",
            "use_bias": True,
            "kernel_initializer": "glorot_uniform",
            "bias_initializer": "zeros",
            "dilation_rate": (1, 1),
        },
    )
    assert pool.kind == "MaxPooling2D"  # MaxPool2D is Keras' alias
    assert pool.args == {"pool_size": (2, 2), "strides": (2, 2), "padding": "valid"}
    assert flat == LayerSpec("Flatten", {})
    assert dense.args["use_bias"] is True
    (bn, act, lin) = parse_spec(
        [BatchNormalization(), Activation("swish"), Dense(3, activation="linear")]
    )
    assert bn.args == {"momentum": 0.99, "epsilon": 1e-3, "center": True, "scale": True}
    assert act.args == {"activation": "silu"}
    assert lin.args["activation"] is None
    (init,) = parse_spec([Dense(2, kernel_initializer="HeNormal")])
    assert init.args["kernel_initializer"] == "he_normal"


def test_spec_round_trips_through_yaml():
    specs = parse_spec(
        [
            Input((28, 28, 1)),
            Rescaling(1 / 255),
            Conv2D(8, 3, strides=(2, 1), padding="same", name="stem"),
            BatchNormalization(center=False),
            AveragePooling2D(2),
            Dropout(0.1),
            Flatten(),
            Dense(4, activation="softmax", kernel_initializer="lecun_normal"),
        ]
    )
    plain = spec_to_list(specs)
    assert parse_spec(plain) == specs
    assert parse_spec(yaml.safe_load(yaml.safe_dump(plain))) == specs
    assert plain[2]["Conv2D"]["kernel_size"] == [3, 3]  # lists, not tuples, for YAML


def test_final_softmax_is_stripped_and_recorded():
    model = build_model([Flatten(), Dense(4, activation="softmax")], (1, 3, 3), 4)
    assert model.final_activation == "softmax"
    assert isinstance(model.layers.dense.act, torch.nn.Identity)
    x = torch.randn(5, 1, 3, 3)
    logits = model(x)
    assert logits.shape == (5, 4)
    expected = x.permute(0, 2, 3, 1).flatten(1) @ model.layers.dense.weight.T
    assert_close(logits, expected + model.layers.dense.bias)

    trailing = build_model([Flatten(), Dense(4), Activation("softmax")], (1, 3, 3), 4)
    assert trailing.final_activation == "softmax"
    assert list(trailing.layers.named_children()) == [
        ("flatten", trailing.layers.flatten),
        ("dense", trailing.layers.dense),
    ]
    sigmoid = build_model([Flatten(), Dense(3, activation="sigmoid")], (1, 3, 3), 3)
    assert sigmoid.final_activation == "sigmoid"
    plain = build_model([Flatten(), Dense(3, activation="relu")], (1, 3, 3), 3)
    assert plain.final_activation is None
    assert (plain(torch.randn(8, 1, 3, 3)) >= 0).all()  # a non-final activation stays


def test_flatten_uses_keras_channels_last_order():
    model = build_model([Flatten(), Dense(12, use_bias=False)], (3, 2, 2), 12)
    with torch.no_grad():
        model.layers.dense.weight.copy_(torch.eye(12))
    x = torch.arange(12.0).reshape(1, 3, 2, 2)  # (B, C, H, W)
    assert model(x).tolist() == [x[0].permute(1, 2, 0).flatten().tolist()]  # (H, W, C) order


def test_layer_names_follow_keras():
    model = build_model(
        [Conv2D(4, 3), MaxPool2D(), Conv2D(4, 1, name="head"), Conv2D(4, 1), Flatten(), Dense(2)],
        (1, 8, 8),
        2,
    )
    assert model.layer_names == (
        "conv2d",
        "max_pooling2d",
        "head",
        "conv2d_1",
        "flatten",
        "dense",
    )
    assert "layers.head.weight" in model.state_dict()


def test_channels_last_input_gives_the_same_logits():
    torch.manual_seed(0)
    layers = [
        Conv2D(6, 2, padding="same", strides=2),
        BatchNormalization(),
        Activation("relu"),
        AveragePooling2D(3, strides=2, padding="same"),
        Conv2D(8, 3, padding="same"),
        MaxPool2D(2, padding="same"),
        Flatten(),
        Dense(5, activation="softmax"),
    ]
    model = build_model(layers, (3, 13, 11), 5).eval()
    x = torch.randn(4, 3, 13, 11)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last))
    assert_close(got, expected, atol=1e-5)


def test_config_round_trip_rebuilds_an_equal_model():
    torch.manual_seed(0)
    model = build_model([Conv2D(4, 3, activation="elu"), Flatten(), Dense(3)], (2, 5, 5), 3)
    clone = CnnModel.from_config(model.get_config())
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 5, 5)
    assert_close(clone(x), model(x))
    assert clone.specs == model.specs and clone.input_shape == (2, 5, 5)


def test_batch_norm_takes_keras_momentum_and_epsilon():
    model = build_model(
        [BatchNormalization(momentum=0.9, epsilon=0.01, center=False), Flatten(), Dense(2)],
        (3, 2, 2),
        2,
    )
    bn = model.layers.batch_normalization
    assert bn.momentum == pytest.approx(0.1) and bn.eps == 0.01
    assert bn.bias is None and bn.weight.shape == (3,)


@pytest.mark.parametrize(
    ("name", "limit"),
    [("glorot_uniform", math.sqrt(6 / (3 * 9 + 64 * 9))), ("he_uniform", math.sqrt(6 / 27))],
)
def test_uniform_initializers_stay_within_keras_limits(name, limit):
    torch.manual_seed(0)
    model = build_model(
        [Conv2D(64, 3, kernel_initializer=name), GlobalMaxPooling2D(), Dense(2)], (3, 5, 5), 2
    )
    weight = model.layers.conv2d.weight  # fans include the 3x3 receptive field
    assert weight.abs().max() <= limit
    assert weight.abs().max() > 0.95 * limit  # the full range is used, not a narrower one
    assert model.layers.conv2d.bias.abs().max() == 0  # bias_initializer='zeros'


@pytest.mark.parametrize(
    ("name", "std"),
    [
        ("glorot_normal", math.sqrt(2 / (200 + 300))),
        ("he_normal", math.sqrt(2 / 200)),
        ("lecun_normal", math.sqrt(1 / 200)),
    ],
)
def test_normal_initializers_are_keras_truncated_normals(name, std):
    torch.manual_seed(0)
    model = build_model([Flatten(), Dense(300, kernel_initializer=name), Dense(2)], (200, 1, 1), 2)
    weight = model.layers.dense.weight
    raw_std = std / 0.87962566103423978
    assert weight.abs().max() <= 2 * raw_std  # truncated at two (uncorrected) standard deviations
    assert weight.std().item() == pytest.approx(std, rel=0.03)  # the corrected std is the target


def test_constant_and_random_initializers():
    torch.manual_seed(0)
    model = build_model(
        [
            Flatten(),
            Dense(50, kernel_initializer="ones", bias_initializer="random_uniform"),
            Dense(2, kernel_initializer="random_normal", bias_initializer="ones"),
        ],
        (1, 10, 10),
        2,
    )
    assert (model.layers.dense.weight == 1).all()
    assert model.layers.dense.bias.abs().max() <= 0.05
    assert model.layers.dense_1.weight.std().item() == pytest.approx(0.05, rel=0.2)
    assert (model.layers.dense_1.bias == 1).all()


def test_rescaling_and_global_pools_compute_what_keras_does():
    model = build_model([Rescaling(0.5, offset=-1.0), GlobalAveragePooling2D()], (2, 2, 2), 2)
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]], [[1.0, 1.0], [1.0, 9.0]]]])
    assert model(x).tolist() == [[0.5, 0.5]]  # means of x / 2 - 1 per channel
    maxed = build_model([GlobalMaxPooling2D()], (2, 2, 2), 2)
    assert maxed(x).tolist() == [[6.0, 9.0]]


def test_global_max_pool_matches_amax_and_sends_each_gradient_to_one_maximum():
    model = build_model([GlobalMaxPooling2D()], (4, 5, 5), 4)
    x = torch.randn(3, 4, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert torch.equal(model(x), x.amax(dim=(2, 3)))
    tied = torch.zeros(1, 4, 5, 5, requires_grad=True)  # every pixel ties for the maximum
    model(tied).sum().backward()
    assert tied.grad.sum((2, 3)).tolist() == [[1.0] * 4]
    assert (tied.grad != 0).sum().item() == 4  # one pixel per channel gets the whole gradient


def test_a_small_model_overfits_a_random_batch():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % 4
    model = build_model(
        [
            Conv2D(8, 3, activation="relu"),
            Flatten(),
            Dense(32, activation="relu"),
            Dense(4, activation="softmax"),
        ],
        (1, 8, 8),
        4,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy == 1.0


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    ("pool", "padding", "size"),
    [((2, 2), "valid", 8), ((2, 2), "valid", 7), ((2, 2), "same", 7), ((3, 3), "valid", 10)],
)
def test_max_pool_without_autograd_equals_max_pool2d(pool, padding, size, channels_last):
    # Without autograd, tiled pools run tile_max (rows, then columns) instead of max_pool2d.
    torch.manual_seed(0)
    model = build_model([MaxPool2D(pool, padding=padding), Flatten(), Dense(2)], (3, size, size), 2)
    pool_layer = model.layers.max_pooling2d
    x = torch.randn(4, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = pool_layer(x)
    expected = pool_layer(x.requires_grad_()).detach()  # the autograd path: max_pool2d itself
    assert fast.shape == expected.shape
    assert torch.equal(fast, expected)


def _keras_order_copy(model: CnnModel) -> CnnModel:
    """The same model with every activation applied where Keras applies it."""
    copy = build_model(spec_to_list(model.specs), model.input_shape, model.num_classes)
    copy.load_state_dict(model.state_dict())
    for module in copy.modules():
        if hasattr(module, "defer_activation"):
            module.defer_activation = False
        if hasattr(module, "deferred_act"):
            module.deferred_act = None
    return copy


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_activation_moved_after_the_pool_gives_identical_gradients(activation, padding):
    torch.manual_seed(0)
    layers = [
        Conv2D(4, 3, activation=activation),
        MaxPool2D(2, padding=padding),
        Flatten(),
        Dense(3, activation="softmax"),
    ]
    model = build_model(layers, (1, 9, 9), 3)
    assert model.layers.conv2d.defer_activation  # the move happens
    keras_order = _keras_order_copy(model)
    x, y = torch.randn(8, 1, 9, 9), torch.arange(8) % 3
    grads = []
    for m in (model, keras_order):
        m.train()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads.append([p.grad for p in m.parameters()])
    for moved, kept in zip(*grads, strict=True):
        assert torch.equal(moved, kept)
    model.eval()  # evaluation and explanations see Keras' order: the conv output is activated
    keras_order.eval()
    with torch.no_grad():
        assert torch.equal(model.layers.conv2d(x), keras_order.layers.conv2d(x))
        assert torch.equal(model(x), keras_order(x))


def test_activations_that_do_not_commute_with_max_stay_on_the_conv():
    model = build_model(
        [Conv2D(4, 3, activation="gelu"), MaxPool2D(2), Flatten(), Dense(4)], (1, 8, 8), 4
    )
    assert not model.layers.conv2d.defer_activation
    assert model.layers.max_pooling2d.deferred_act is None


def test_dropout_zeroes_at_its_rate_and_keeps_the_mean():
    model = build_model([Flatten(), Dropout(0.25), Dense(2)], (1, 100, 100), 2)
    dropout = model.layers.dropout
    x = torch.ones(8, 10_000, requires_grad=True)
    torch.manual_seed(0)
    out = dropout(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.01)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    out.sum().backward()  # the gradient passes where the value was kept, scaled the same way
    assert torch.equal(x.grad, out.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)  # drawn from the global generator: seeded runs repeat
    model.eval()
    assert torch.equal(dropout(x), x)


def test_small_dense_layers_run_in_fp32_under_cpu_autocast_and_large_ones_in_bf16():
    from cnnlab.models.layers import FP32_DENSE_MAX_WEIGHTS

    units = FP32_DENSE_MAX_WEIGHTS // 64
    model = build_model([Flatten(), Dense(units, activation="relu"), Dense(3)], (1, 8, 8), 3)
    big = build_model([Flatten(), Dense(units + 1), Dense(3)], (1, 8, 8), 3).layers.dense
    x = torch.randn(5, 1, 8, 8).bfloat16().requires_grad_()  # as a bf16 conv stack hands it on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small_out, big_out = model(x), big(x.flatten(1))
    assert small_out.dtype == torch.float32 and big_out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert_close(small_out, model(x.float()), atol=0.0)  # fp32 throughout, bit for bit
    small_out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16  # the conv stack's own dtype
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
