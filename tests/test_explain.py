"""Explanations: Grad-CAM points at the evidence, maps line up with the pixels, the CLI writes PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import corner_squares
from PIL import Image
from test_report import digits_run

from cnnlab.cli import main
from cnnlab.explain import (
    explain_images,
    feature_grid,
    feature_maps,
    first_layer_filters,
    grad_cam,
)
from cnnlab.inference import Preprocessing
from cnnlab.models import build_model, preset_layers
from cnnlab.training.checkpoint import ModelInfo

SQUARES_LAYERS = [
    {"Conv2D": {"filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"}},
    {"MaxPooling2D": {"pool_size": 2}},
    {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"}},
    {"Flatten": {}},
    {"Dense": {"units": 4, "activation": "softmax"}},
]
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


GAP_LAYERS = [*SQUARES_LAYERS[:3], {"GlobalAveragePooling2D": {}}, SQUARES_LAYERS[4]]


def train_squares(layers: list) -> tuple:
    """A small CNN trained to tell which corner holds the bright square."""
    torch.manual_seed(0)
    model = build_model(layers, (1, 12, 12), 4)
    info = ModelInfo(layers, CORNERS, Preprocessing((1, 12, 12)))
    train = corner_squares(256, seed=0)
    x = train.images.float() / 255.0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(80):
        batch = torch.arange(64) + 64 * (step % 4)
        loss = F.cross_entropy(model(x[batch]), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, info


@pytest.fixture(scope="module")
def squares_model():
    return train_squares(SQUARES_LAYERS)


@pytest.mark.parametrize(
    ("layers", "method"), [(SQUARES_LAYERS, "HiResCAM"), (GAP_LAYERS, "Grad-CAM")]
)
def test_cam_maximum_lies_in_the_square_quadrant(layers: list, method: str) -> None:
    model, info = train_squares(layers)
    test = corner_squares(80, seed=1)
    with torch.no_grad():
        accuracy = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert accuracy > 0.95, "the model must have learnt the task for its CAM to mean anything"
    explanations = explain_images(model, info, test.images, targets=test.labels)
    assert {e.method for e in explanations} == {method}
    hits = 0
    for explanation, label in zip(explanations, test.labels.tolist(), strict=True):
        assert explanation.cam.shape == (12, 12) and explanation.saliency.shape == (12, 12)
        assert explanation.cam.min() >= 0.0 and explanation.cam.max() <= 1.0
        row, col = np.unravel_index(np.argmax(explanation.cam), explanation.cam.shape)
        hits += (row // 6, col // 6) == (label // 2, label % 2)
    assert hits / len(explanations) >= 0.9


def test_saliency_is_strongest_inside_the_square(squares_model) -> None:
    model, info = squares_model
    test = corner_squares(40, seed=2)
    explanations = explain_images(model, info, test.images, targets=test.labels)
    inside = []
    for explanation, label in zip(explanations, test.labels.tolist(), strict=True):
        top, left = (label // 2) * 6, (label % 2) * 6
        quadrant = explanation.saliency[top : top + 6, left : left + 6].sum()
        inside.append(quadrant / explanation.saliency.sum())
    assert np.mean(inside) > 0.25  # more than its share of a quarter of the image


def test_feature_grid_maps_valid_convolutions_back_onto_the_pixels() -> None:
    # basic on 28x28: conv 4x4 (centre +1.5), pool 2 (x2, +0.5), conv 4x4 (+1.5): 5 + 2j.
    model = build_model(preset_layers("basic", 10, (1, 28, 28)), (1, 28, 28), 10)
    assert feature_grid(model, "conv2d_1") == ([5.0, 5.0], [2.0, 2.0])
    # A 'same' 3x3 conv keeps the grid; 2x2 pooling puts cell j at 2j + 0.5.
    model = build_model(SQUARES_LAYERS, (1, 12, 12), 4)
    assert feature_grid(model, "conv2d_1") == ([0.5, 0.5], [2.0, 2.0])


def test_grad_cam_of_a_single_hot_cell_lands_on_its_pixels(squares_model) -> None:
    model, _ = squares_model
    batch = corner_squares(4, seed=3).images.float() / 255
    cams = grad_cam(model, batch, torch.arange(4))
    assert cams.shape == (4, 12, 12)
    assert np.allclose(cams.max(axis=(1, 2)), 1.0)


def test_feature_maps_and_filters_have_the_layer_shapes(squares_model) -> None:
    model, info = squares_model
    maps = feature_maps(model, info, corner_squares(1).images[0])
    assert [(name, m.shape) for name, m in maps] == [
        ("conv2d", (8, 12, 12)),
        ("conv2d_1", (16, 6, 6)),
    ]
    name, kernels = first_layer_filters(model)
    assert name == "conv2d" and kernels.shape == (8, 3, 3)
    assert kernels.min() >= 0.0 and kernels.max() <= 1.0


def test_cli_explain_writes_overlays_feature_maps_and_filters(
    trained_digits_run, tmp_path, capsys
) -> None:
    picture = np.zeros((64, 48, 3), dtype=np.uint8)  # a big RGB "1", decoded like predict does
    picture[8:56, 20:28] = 255
    Image.fromarray(picture).save(tmp_path / "one.png")
    out_dir = tmp_path / "explained"
    code = main(
        [
            "explain",
            str(trained_digits_run),
            str(tmp_path / "one.png"),
            "--target",
            "3",
            "--feature-maps",
            "--filters",
            "--out",
            str(out_dir),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "explain class '3'" in captured.out and f"Results saved to {out_dir}" in captured.out
    written = sorted(p.name for p in out_dir.iterdir())
    assert "one_explain.png" in written and any(n.startswith("filters_") for n in written)
    assert sum(n.startswith("one_features_") for n in written) == 2  # one per Conv2D
    for name in written:
        with Image.open(out_dir / name) as image:
            assert image.format == "PNG" and image.width > 200


def test_cli_explain_rejects_an_unknown_target(trained_digits_run, tmp_path, capsys) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "blank.png")
    code = main(
        ["explain", str(trained_digits_run), str(tmp_path / "blank.png"), "--target", "cat"]
    )
    assert code == 2
    assert "Unknown class 'cat'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_digits_run(tmp_path_factory):
    return digits_run(tmp_path_factory)
