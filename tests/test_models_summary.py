"""Summaries: Keras' names, shapes and parameter counts, FLOPs, the printed table and JSON."""

from __future__ import annotations

import json

from cnnlab.models import (
    Activation,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    build_model,
    format_summary,
    preset_layers,
    summarize,
    summarize_model,
)


def test_batch_norm_counts_like_keras():
    layers = [Conv2D(4, 3), BatchNormalization(), Flatten(), Dense(2)]
    bn = summarize(layers, (1, 5, 5), 2).rows[1]
    assert (bn.name, bn.params, bn.trainable) == ("batch_normalization (BatchNormalization)", 16, 8)
    no_center = [Conv2D(4, 3), BatchNormalization(center=False), Flatten(), Dense(2)]
    bn = summarize(no_center, (1, 5, 5), 2).rows[1]
    assert (bn.params, bn.trainable) == (12, 4)  # gamma + moving mean + moving variance
    summary = summarize(layers, (1, 5, 5), 2)
    assert summary.non_trainable_params == 8
    assert summary.total_params == 40 + 16 + 36 * 2 + 2


def test_rows_have_keras_names_shapes_params_and_flops():
    layers = [
        Conv2D(8, 3, padding="same", activation="relu"),
        MaxPool2D(),
        Dropout(0.5),
        Flatten(),
        Dense(4, activation="softmax"),
    ]
    rows = summarize(layers, (2, 6, 6), 4).rows
    assert [row.name for row in rows] == [
        "conv2d (Conv2D)",
        "max_pooling2d (MaxPooling2D)",
        "dropout (Dropout)",
        "flatten (Flatten)",
        "dense (Dense)",
    ]
    assert [row.output_shape for row in rows] == [
        (None, 6, 6, 8),
        (None, 3, 3, 8),
        (None, 3, 3, 8),
        (None, 72),
        (None, 4),
    ]
    assert [row.params for row in rows] == [8 * 18 + 8, 0, 0, 0, 72 * 4 + 4]
    conv_flops = 2 * (6 * 6 * 8) * (3 * 3 * 2) + 6 * 6 * 8  # 2 x MACs + one per ReLU output
    assert [row.flops for row in rows] == [conv_flops, 3 * 3 * 8, 0, 0, 2 * 72 * 4 + 4]


def test_format_summary_prints_a_keras_table():
    text = format_summary(summarize(preset_layers("basic", 10), (3, 32, 32), 10))
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "conv2d_1 (Conv2D)" in text and "(None, 29, 29, 32)" in text
    assert "205,056" in text  # thousands separators in the table
    assert "Total params: 225,610 (881.29 KB)" in text
    assert "Trainable params: 225,610 (881.29 KB)" in text
    assert "Non-trainable params: 0 (0.00 B)" in text
    assert "FLOPs per image: 7.00 M" in text


def test_to_dict_is_json_ready():
    summary = summarize([Flatten(), Dense(3, activation="softmax")], (1, 2, 2), 3)
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["rows"][1] == {
        "name": "dense (Dense)",
        "output_shape": [None, 3],
        "params": 15,
        "trainable": 15,
        "flops": 2 * 4 * 3 + 3,
    }
    assert data["input_shape"] == [1, 2, 2] and data["total_params"] == 15
    assert data["final_activation"] == "softmax"


def test_trailing_activation_row_and_frozen_layers():
    model = build_model([Flatten(), Dense(3), Activation("softmax")], (1, 2, 2), 3)
    model.layers.dense.weight.requires_grad_(False)
    summary = summarize_model(model)
    assert summary.rows[-1].name == "activation (Activation)"
    assert (summary.rows[-1].params, summary.rows[-1].flops) == (0, 3)
    assert (summary.trainable_params, summary.non_trainable_params) == (3, 12)
