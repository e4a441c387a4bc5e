"""Every way a model spec can be wrong gets a ModelSpecError that says what and what is allowed."""

from __future__ import annotations

import pytest

from cnnlab.errors import CnnlabError, ModelSpecError
from cnnlab.models import (
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    Input,
    MaxPool2D,
    build_model,
    parse_spec,
)


def spec_error(layers, input_shape=(3, 32, 32), num_classes=10) -> str:
    with pytest.raises(ModelSpecError) as caught:
        build_model(layers, input_shape, num_classes)
    assert isinstance(caught.value, CnnlabError)
    return str(caught.value)


def test_unknown_layer_names_position_name_suggestion_and_valid_layers():
    message = spec_error([Conv2D(8, 3), {"MaxPool": {"pool_size": 2}}, Flatten(), Dense(10)])
    assert "Layer 2" in message
    assert "'MaxPool'" in message
    assert "Did you mean 'MaxPool2D'?" in message
    for valid in ("Conv2D", "Dense", "Flatten", "GlobalMaxPooling2D", "BatchNormalization"):
        assert valid in message


def test_layer_names_are_case_insensitive():
    assert parse_spec(["flatten", {"dense": {"units": 3}}]) == parse_spec(["Flatten", Dense(3)])


def test_unknown_argument_names_layer_argument_suggestion_and_valid_arguments():
    message = spec_error([{"Conv2D": {"filter": 8, "kernel_size": 3}}])
    assert "Layer 1 (Conv2D)" in message
    assert "'filter'" in message
    assert "Did you mean 'filters'?" in message
    assert "kernel_size" in message and "dilation_rate" in message


def test_python_layer_function_checks_its_arguments_at_once():
    with pytest.raises(ModelSpecError, match="Did you mean 'units'"):
        Dense(10, unit=3)
    with pytest.raises(ModelSpecError, match="rate must be"):
        Dropout(1.5)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ({"Conv2D": {"filters": -4, "kernel_size": 3}}, ["filters", "-4", "positive"]),
        ({"Conv2D": {"filters": 8.5, "kernel_size": 3}}, ["filters", "8.5"]),
        ({"Conv2D": {"filters": True, "kernel_size": 3}}, ["filters", "True"]),
        ({"Conv2D": {"filters": 8, "kernel_size": [3, 3, 3]}}, ["kernel_size", "pair"]),
        ({"Conv2D": {"filters": 8, "kernel_size": 0}}, ["kernel_size", "received 0"]),
        ({"Conv2D": {"filters": 8, "kernel_size": 3, "padding": "full"}}, ["'full'", "'same'"]),
        ({"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "rleu"}}, ["'relu'"]),
        ({"Conv2D": {"filters": 8, "kernel_size": 3, "use_bias": "yes"}}, ["use_bias", "true"]),
        ({"Conv2D": {"filters": 8}}, ["kernel_size", "needs"]),
        ({"Dense": {"units": 4, "kernel_initializer": "glorot"}}, ["glorot_uniform"]),
        ({"Dropout": {"rate": 1.0}}, ["rate", "1.0", "0 <= rate < 1"]),
        ({"Dropout": {"rate": -0.1}}, ["rate", "-0.1"]),
        ({"BatchNormalization": {"momentum": 1.5}}, ["momentum", "1.5"]),
        ({"BatchNormalization": {"epsilon": 0}}, ["epsilon", "greater than 0"]),
        ({"Rescaling": {"scale": "1/255"}}, ["scale", "'1/255'"]),
        ({"Dense": [10]}, ["arguments of Dense", "[10]"]),
        ({"Conv2D": {}, "Dense": {}}, ["one-key mapping"]),
        (42, ["one-key mapping", "42"]),
    ],
)
def test_bad_values_say_what_was_received_and_what_is_allowed(layer, expected):
    message = spec_error([layer, Flatten(), Dense(10)])
    assert message.startswith("Layer 1")
    for text in expected:
        assert text in message


def test_spec_must_be_a_non_empty_list():
    assert "list of layers" in spec_error({"Dense": {"units": 10}})
    assert "list of layers" in spec_error("Dense")
    assert "no layers" in spec_error([])


def test_kernel_larger_than_input_says_the_shapes_and_the_fix():
    message = spec_error(
        [Conv2D(8, 4), MaxPool2D(), Conv2D(8, 4), MaxPool2D(), Conv2D(8, 4), Flatten(), Dense(10)],
        input_shape=(1, 16, 16),
    )
    assert "Layer 5 (Conv2D)" in message
    assert "kernel_size 4x4" in message and "1x1x8" in message  # 16 -> 13 -> 6 -> 3 -> 1
    assert "padding='same'" in message


def test_pool_larger_than_input():
    message = spec_error([MaxPool2D(3), Flatten(), Dense(10)], input_shape=(1, 2, 2))
    assert "pool_size 3x3" in message and "2x2x1" in message


def test_dense_on_an_image_tensor_asks_for_flatten():
    message = spec_error([Conv2D(8, 3), Dense(10)], input_shape=(1, 8, 8))
    assert "Layer 2 (Dense)" in message
    assert "(None, 6, 6, 8)" in message
    assert "Flatten()" in message and "GlobalAveragePooling2D()" in message


def test_image_layer_after_flatten():
    message = spec_error([Flatten(), Conv2D(8, 3), Dense(10)])
    assert "Layer 2 (Conv2D)" in message and "flat vector of 3072" in message


def test_wrong_final_units_names_the_number_of_classes():
    message = spec_error([Flatten(), Dense(64), Dense(12, activation="softmax")])
    assert "Layer 3 (Dense)" in message
    assert "units=12" in message and "10 classes" in message and "units=10" in message


def test_keras_binary_head_gets_a_hint():
    message = spec_error([Flatten(), Dense(1, activation="sigmoid")], num_classes=2)
    assert "Dense(2, activation='softmax')" in message


def test_model_without_a_classifier_head():
    message = spec_error([Conv2D(10, 3)], input_shape=(1, 8, 8))
    assert "(None, 6, 6, 10)" in message and "Dense(10, activation='softmax')" in message
    message = spec_error([Conv2D(4, 3), GlobalAveragePooling2D()], input_shape=(1, 8, 8))
    assert "outputs 4 values" in message and "10 classes" in message


def test_declared_input_shape_must_match_the_data():
    message = spec_error([Conv2D(8, 3, input_shape=(28, 28, 1)), Flatten(), Dense(10)])
    assert "[28, 28, 1]" in message and "[32, 32, 3]" in message
    message = spec_error([Input((28, 28, 1)), Flatten(), Dense(10)])
    assert "[28, 28, 1]" in message and "[32, 32, 3]" in message
    model = build_model([Input((32, 32, 3)), Flatten(), Dense(10)], (3, 32, 32), 10)
    assert model.output_shapes[-1] == (10,)
    mlp = build_model([Flatten(input_shape=(28, 28)), Dense(10)], (1, 28, 28), 10)  # Keras MNIST
    assert mlp.output_shapes == ((784,), (10,))


def test_duplicate_layer_names():
    message = spec_error([Flatten(name="a"), Dense(10, name="a")])
    assert "same name a;" in message


def test_bad_input_shape_and_num_classes():
    assert "(channels, height, width)" in spec_error([Flatten(), Dense(10)], input_shape=(28, 28))
    assert "num_classes" in spec_error([Flatten(), Dense(10)], num_classes=0)
