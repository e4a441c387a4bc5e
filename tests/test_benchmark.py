"""The bench helpers: FLOP counts of known nets, a positive matmul ceiling, sane preset results."""

from __future__ import annotations

import pytest
import torch

from cnnlab.benchmark import TRAIN_FLOPS_PER_FORWARD, bench_presets, matmul_ceiling
from cnnlab.cli import main
from cnnlab.inference import autocast_for, cpu_has_fast_bf16, train_autocast_for
from cnnlab.models import Conv2D, Dense, Flatten, MaxPool2D, preset_layers, summarize


def test_flops_of_a_known_net_are_counted_by_hand():
    layers = [
        Conv2D(4, (3, 3), activation="relu"),  # 26x26x4 out: 2*26*26*4*9*1 MACs + relu 2704
        MaxPool2D((2, 2)),  # 13x13x4 = 676
        Flatten(),
        Dense(10, activation="softmax"),  # 2*676*10 + 10
    ]
    summary = summarize(layers, (1, 28, 28), 10)
    assert summary.flops == 2 * 26 * 26 * 4 * 9 + 2704 + 676 + 2 * 676 * 10 + 10


def test_fast_preset_pools_before_batchnorm_and_keeps_its_size():
    layers = preset_layers("fast", 10)
    kinds = [next(iter(layer)) for layer in layers]
    assert kinds[:4] == ["Conv2D", "MaxPool2D", "BatchNormalization", "Activation"]
    summary = summarize(layers, (1, 28, 28), 10)
    assert summary.total_params == 137_026
    # BN and GELU now run on 14x14 after the first conv, not 28x28
    assert summary.rows[2].output_shape == (None, 14, 14, 24)


def test_matmul_ceiling_is_positive_and_quick():
    ceiling = matmul_ceiling(size=128, rounds=2)
    assert ceiling.dtype == "float32" and ceiling.size == 128
    assert ceiling.gflops > 0


def test_bench_presets_reports_flops_consistent_with_throughput():
    (result,) = bench_presets(
        ["tiny"], batch_size=16, steps=1, rounds=1, eval_images=64, device=torch.device("cpu")
    )
    flops = summarize(preset_layers("tiny", 10), (1, 28, 28), 10).flops
    assert result.forward_flops == flops
    assert result.train_images_per_second > 0 and result.eval_images_per_second > 0
    expected = result.train_images_per_second * flops * TRAIN_FLOPS_PER_FORWARD / 1e9
    assert result.train_gflops == pytest.approx(expected)


def test_inference_autocast_stays_fp32_on_cpu():
    assert not isinstance(autocast_for(torch.device("cpu")), torch.autocast)
    training = train_autocast_for(torch.device("cpu"))
    assert isinstance(training, torch.autocast) == cpu_has_fast_bf16()
    assert not isinstance(train_autocast_for(torch.device("cpu"), enabled=False), torch.autocast)


def test_bench_command_prints_json(capsys):
    code = main(
        [
            "bench",
            "--presets",
            "tiny",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--batch-size",
            "8",
            "--format",
            "json",
        ]
    )
    assert code == 0
    import json

    payload = json.loads(capsys.readouterr().out)
    assert payload["ceilings"][0]["gflops"] > 0
    assert payload["presets"][0]["preset"] == "tiny"
    assert payload["presets"][0]["fraction_of_float32_ceiling"] > 0


def test_bench_command_rejects_an_unknown_preset(capsys):
    assert main(["bench", "--presets", "nope"]) == 2
    assert "Unknown preset" in capsys.readouterr().err
