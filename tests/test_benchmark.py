"""The bench helpers: FLOP counts of known nets, a positive matmul ceiling, sane preset results."""

from __future__ import annotations

import pytest
import torch

from cnnlab.benchmark import bench_presets, matmul_ceiling
from cnnlab.cli import main
from cnnlab.inference import Preprocessing, autocast_for, cpu_has_fast_bf16, predict_logits
from cnnlab.models import (
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    build_model,
    preset_layers,
    summarize,
)


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
    assert kinds[:6] == [
        "Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D", "BatchNormalization", "Activation"
    ]  # fmt: skip
    summary = summarize(layers, (1, 28, 28), 10)
    assert summary.total_params == 134_284
    # BN and ReLU run on 7x7 after the second conv, not 14x14
    assert summary.rows[4].output_shape == (None, 7, 7, 48)


def test_training_flops_count_only_the_gradients_a_step_computes():
    layers = [
        Conv2D(4, (3, 3), trainable=False),  # forward only: 2*26*26*4*9
        MaxPool2D((2, 2)),  # forward only: 676
        Conv2D(2, (3, 3)),  # forward + weight gradients: 2 x 2*11*11*2*9*4
        Flatten(),
        Dense(10),  # forward, weight and input gradients: 3 x 2*242*10
    ]
    summary = summarize(layers, (1, 28, 28), 10)
    frozen = 2 * 26 * 26 * 4 * 9 + 676
    assert summary.train_flops == frozen + 2 * (2 * 11 * 11 * 2 * 9 * 4) + 3 * (2 * 242 * 10)


def test_matmul_ceiling_is_positive_and_quick():
    ceiling = matmul_ceiling(size=128, rounds=2)
    assert ceiling.dtype == "float32" and ceiling.size == 128
    assert ceiling.gflops > 0


def test_bench_presets_reports_flops_consistent_with_throughput():
    (result,) = bench_presets(
        ["tiny"], batch_size=16, steps=1, rounds=1, eval_images=64, device=torch.device("cpu")
    )
    summary = summarize(preset_layers("tiny", 10), (1, 28, 28), 10)
    assert result.forward_flops == summary.flops and result.train_flops == summary.train_flops
    assert result.train_images_per_second > 0 and result.eval_images_per_second > 0
    expected = result.train_images_per_second * summary.train_flops / 1e9
    assert result.train_gflops == pytest.approx(expected)


def test_cpu_autocast_is_bf16_only_where_the_cpu_has_bf16_in_hardware():
    autocast = autocast_for(torch.device("cpu"))
    assert isinstance(autocast, torch.autocast) == cpu_has_fast_bf16()
    assert not isinstance(autocast_for(torch.device("cpu"), enabled=False), torch.autocast)


def _raises() -> bool:
    raise RuntimeError("probe failed")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "fast"),
    [
        (lambda: True, lambda: False, True),  # Intel Sapphire Rapids and later
        (lambda: False, lambda: True, True),  # AMD Zen 4 and later, Intel Cooper Lake
        (lambda: False, lambda: False, False),  # bf16 would be emulated
        (_raises, lambda: True, True),  # a failing probe does not hide the other
        (_raises, _raises, False),
        (None, None, False),  # a torch without the probes
    ],
)
def test_fast_bf16_means_amx_tiles_or_avx512_bf16(monkeypatch, amx, avx512_bf16, fast):
    for name, probe in (
        ("_is_amx_tile_supported", amx),
        ("_is_avx512_bf16_supported", avx512_bf16),
    ):
        if probe is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, probe, raising=False)
    assert cpu_has_fast_bf16() is fast
    assert isinstance(autocast_for(torch.device("cpu")), torch.autocast) is fast


def test_predictions_are_exact_fp32_unless_amp_is_asked_for():
    torch.manual_seed(0)
    model = build_model(preset_layers("tiny", 10), (1, 28, 28), 10).eval()
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    prep = Preprocessing((1, 28, 28))
    with torch.no_grad():
        expected = model(images.float() / 255)
    exact = predict_logits(model, images, prep, channels_last=False)
    assert (exact - expected).abs().max().item() < 1e-5
    mixed = predict_logits(model, images, prep, amp=True)
    assert mixed.dtype == torch.float32
    assert (mixed - expected).abs().max().item() < 0.05  # bf16 keeps 3 significant digits


def test_cpu_batches_on_worker_threads_match_one_thread_in_order():
    torch.manual_seed(0)
    model = build_model(preset_layers("fast", 10), (1, 28, 28), 10).train()
    images = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    prep = Preprocessing((1, 28, 28))
    threads_before = torch.get_num_threads()
    for amp in (False, True):
        alone = predict_logits(model, images, prep, batch_size=16, amp=amp, threads=1)
        shared = predict_logits(model, images, prep, batch_size=16, amp=amp, threads=3)
        assert shared.shape == (70, 10) and not shared.requires_grad  # workers run inference_mode
        assert (shared - alone).abs().max().item() < 1e-5  # same batches, same order, same dtype
    whole = predict_logits(model, images, prep, batch_size=16, threads=1)
    one_by_one = torch.cat([predict_logits(model, images[i : i + 1], prep) for i in range(70)])
    assert (whole - one_by_one).abs().max().item() < 1e-4
    assert model.training  # left as it was
    assert torch.get_num_threads() == threads_before  # workers set their own thread count


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


@pytest.mark.parametrize("preset", ["tiny", "fast"])
def test_a_stepper_step_trains_every_parameter_with_any_optimiser_steps(preset):
    """Stepper steps as the Trainer does (a whole-model chain without a graph for `tiny` under
    bf16, autograd for `fast`), with its own updater or another one in its place
    (benchmarks/bench_levers.py swaps in torch.optim's)."""
    from cnnlab.benchmark import Stepper

    stepper = Stepper(preset, (1, 28, 28), 8, torch.device("cpu"), amp=True)

    class TorchOptimSteps:
        def zero_grad(self) -> None:
            stepper.optimizer.zero_grad(set_to_none=True)

        def step(self) -> None:
            stepper.optimizer.step()

    for updater in (stepper.updater, TorchOptimSteps()):
        stepper.updater = updater
        before = [p.detach().clone() for p in stepper.params]
        stepper.step()
        assert all(not torch.equal(p, b) for p, b in zip(stepper.params, before, strict=True))
