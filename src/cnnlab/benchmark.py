"""Machine benchmarks behind `cnnlab bench`: matmul ceiling, training GFLOP/s per preset, eval images/s."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cnnlab.inference import (
    Preprocessing,
    predict_logits,
    prepare_batch,
    select_device,
    uses_bf16,
)
from cnnlab.models import build_model, preset_layers, summarize_model
from cnnlab.training.gradients import loss_and_grads
from cnnlab.training.optimizers import Updater


@dataclass
class Ceiling:
    """Measured dense matmul throughput, GFLOP/s (best of several timed rounds)."""

    dtype: str
    size: int
    gflops: float


@dataclass
class PresetBench:
    """Training and evaluation throughput of one preset."""

    preset: str
    precision: str  # "fp32" or "bf16 autocast"
    batch_size: int
    forward_flops: int  # per image, counted by cnnlab.models.summarize
    train_flops: int  # per image and training step: forward and the gradients it needs
    train_images_per_second: float  # median over rounds
    train_images_per_second_best: float
    train_gflops: float  # median images/s x train_flops
    eval_images_per_second: float  # predict_logits on uint8 images, median

    def fraction_of(self, ceiling: Ceiling) -> float:
        return self.train_gflops / ceiling.gflops

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def matmul_ceiling(
    size: int = 2048,
    dtype: torch.dtype = torch.float32,
    *,
    rounds: int = 5,
    device: torch.device | None = None,
) -> Ceiling:
    """GFLOP/s of a square (size x size) @ (size x size) matmul: 2 * size**3 FLOPs each.

    The best round counts: a ceiling is what the machine can do, and on a shared machine the
    slower rounds measure the neighbours. size=2048 in fp32 takes ~0.2 s a round on 2 cores.
    """
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: thread pool, packing buffers
    flops = 2 * size**3
    best = max(flops / _timed(lambda: a @ b, device) for _ in range(max(rounds, 1)))
    return Ceiling(dtype=str(dtype).removeprefix("torch."), size=size, gflops=best / 1e9)


class Stepper:
    """One preset's model, optimiser and a fixed batch; `step()` is one training step as the
    Trainer does it (normalise uint8, channels_last, autocast, cross-entropy, the gradient
    checks, fused Adam).
    Frozen layers stay frozen; random weights stand in for patch whitening's."""

    def __init__(
        self,
        preset: str,
        input_shape: tuple[int, int, int],
        batch_size: int,
        device: torch.device,
        amp: bool,
        num_classes: int = 10,
        channels_last: bool = True,
        layers: list[Any] | None = None,  # instead of the preset's (benchmarks/bench_levers.py)
    ) -> None:
        torch.manual_seed(0)
        layers = layers or preset_layers(preset, num_classes, input_shape)
        self.model = build_model(layers, input_shape, num_classes).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        summary = summarize_model(self.model)
        self.flops, self.train_flops = summary.flops, summary.train_flops
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-3, fused=True)
        self.updater = Updater(self.optimizer)  # as training steps it
        self.prep = Preprocessing(input_shape)
        self.images = torch.randint(
            0, 256, (batch_size, *input_shape), dtype=torch.uint8, device=device
        )
        self.labels = torch.randint(0, num_classes, (batch_size,), device=device)
        self.device, self.amp, self.batch_size = device, amp, batch_size

    def step(self) -> None:
        inputs = prepare_batch(self.images, self.prep, self.device, self.channels_last)
        self.updater.zero_grad()
        loss_and_grads(
            self.model, inputs, self.labels, self.params, device=self.device, amp=self.amp
        )
        self.updater.step()


def bench_presets(
    presets: Sequence[str],
    *,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    batch_size: int = 128,
    steps: int = 10,
    rounds: int = 5,
    eval_images: int = 10_000,
    amp: bool = True,
    device: torch.device | None = None,
) -> list[PresetBench]:
    """Training and evaluation throughput of each preset on random uint8 images.

    Rounds go round-robin over the presets (preset A, B, C, then A, B, C again), so load
    from other processes spreads over all of them; medians are reported.
    """
    device = device or select_device("auto")
    steppers = [Stepper(p, input_shape, batch_size, device, amp) for p in presets]
    for s in steppers:  # warm-up: oneDNN primitive creation, allocator
        for _ in range(3):
            s.step()
    train_rates: list[list[float]] = [[] for _ in presets]
    for _ in range(max(rounds, 1)):
        for i, s in enumerate(steppers):
            s.model.train()
            seconds = _timed(lambda s=s: [s.step() for _ in range(steps)], device)
            train_rates[i].append(steps * batch_size / seconds)
    eval_rates: list[list[float]] = [[] for _ in presets]
    images = torch.randint(0, 256, (eval_images, *input_shape), dtype=torch.uint8)
    for s in steppers:
        predict_logits(s.model, images[:1024], s.prep, device=device, amp=amp)  # warm-up
    for _ in range(max(rounds // 2, 1)):
        for i, s in enumerate(steppers):
            seconds = _timed(
                lambda s=s: predict_logits(s.model, images, s.prep, device=device, amp=amp),
                device,
            )
            eval_rates[i].append(eval_images / seconds)
    precision = "bf16 autocast" if uses_bf16(device, amp) else "fp32"
    results = []
    for preset, s, rates, evals in zip(presets, steppers, train_rates, eval_rates, strict=True):
        rate = statistics.median(rates)
        results.append(
            PresetBench(
                preset=preset,
                precision=precision,
                batch_size=batch_size,
                forward_flops=s.flops,
                train_flops=s.train_flops,
                train_images_per_second=rate,
                train_images_per_second_best=max(rates),
                train_gflops=rate * s.train_flops / 1e9,
                eval_images_per_second=statistics.median(evals),
            )
        )
    return results
