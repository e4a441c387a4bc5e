"""Batched inference over uint8 images: normalisation exactly as in training, logits and probabilities."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cnnlab.data.transforms import normalize
from cnnlab.models.folding import inference_copy


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become model input; saved beside the weights in model.json."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...] | None = None  # per channel, in [0, 1] units; None: rescale only
    std: tuple[float, ...] | None = None
    color_mode: str = "grayscale"  # how predict converts a user's image
    resize: str = "stretch"  # how predict brings a user's image to (H, W)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        mean, std = raw.get("mean"), raw.get("std")
        return cls(
            input_shape=tuple(raw["input_shape"]),  # type: ignore[arg-type]
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
            color_mode=raw.get("color_mode", "grayscale"),
            resize=raw.get("resize", "stretch"),
        )


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from cnnlab.errors import ConfigError

        raise ConfigError(
            "--device cuda was asked for, but no CUDA GPU is visible. Use --device cpu."
        )
    return torch.device(name)


BF16_PROBES = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


def cpu_bf16_hardware() -> str | None:
    """The CPU's bf16 arithmetic in hardware, "AMX" (tiles: Intel Sapphire Rapids and later) or
    "AVX512-BF16" (dot products: AMD Zen 4 and later, Intel Cooper Lake); None where bf16 would
    be emulated. A probe that is missing or fails counts as no."""
    for name, probe_name in BF16_PROBES:
        probe = getattr(torch.cpu, probe_name, None)
        try:
            if probe is not None and probe():
                return name
        except RuntimeError:
            continue
    return None


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions and matmuls faster than fp32: the CPU has bf16
    in hardware (cpu_bf16_hardware).

    Measured, batch-128 training steps against fp32: on an AMX Xeon 1.6-1.8x; on an AMD EPYC
    with AVX512-BF16 and no AMX, basic 1.51x, dropout 1.55x, fast 1.38x, tiny 1.03x."""
    return cpu_bf16_hardware() is not None


def autocast_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast where it is fast: CUDA, and CPUs with bf16 in hardware (cpu_has_fast_bf16:
    1.4-1.8x faster training steps and 1.7-2x faster evaluation at equal accuracy, measured in
    benchmarks/); fp32 on other CPUs.
    Weights, optimiser state and the loss stay fp32."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_bf16(device: torch.device, enabled: bool = True) -> bool:
    """Whether autocast_for(device, enabled) runs bf16 (else plain fp32)."""
    return isinstance(autocast_for(device, enabled), torch.autocast)


def prepare_batch(
    images: torch.Tensor, prep: Preprocessing, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised float32 on `device`."""
    batch = normalize(images.to(device, non_blocking=True), prep.mean, prep.std)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,  # (N, C, H, W) uint8
    prep: Preprocessing,
    *,
    batch_size: int = 256,  # cache-sized: 1.2-1.9x faster per image than 1024 on CPU
    device: torch.device | None = None,
    tta_flip: bool = False,
    channels_last: bool = True,
    amp: bool = False,
    threads: int | None = None,
) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU; with `tta_flip` the mean over the image and its mirror.

    `amp` runs the model under bf16 autocast where that is fast (see autocast_for); off, the
    logits are fp32 throughout, as single-image predictions show them. The model runs as an
    inference copy (see inference_copy: BatchNorm folded, activations after max pooling);
    `model` itself is left as it was.

    On the CPU the batches go to `threads` worker threads (default: torch.get_num_threads()),
    each running whole batches on one core, instead of every op being split over all cores:
    no barrier after each op, so a core slowed by another process holds back only its own
    batches (1.06-1.28x more images/s on 2 shared cores, benchmarks/bench_levers.py)."""
    device = device or next(model.parameters()).device
    model = inference_copy(model, channels_last=channels_last)
    starts = range(0, images.shape[0], batch_size)

    @torch.inference_mode()
    def logits_of(start: int) -> torch.Tensor:
        batch = prepare_batch(images[start : start + batch_size], prep, device, channels_last)
        with autocast_for(device, amp):
            logits = model(batch).float()
            if tta_flip:
                logits = (logits + model(batch.flip(-1)).float()) / 2
        return logits.cpu()

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    workers = min(threads or torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    was_training = model.training
    model.eval()
    try:
        if workers > 1:
            with ThreadPoolExecutor(
                workers, initializer=torch.set_num_threads, initargs=(1,)
            ) as pool:
                chunks = list(pool.map(logits_of, starts))
        else:
            chunks = [logits_of(start) for start in starts]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, getattr(model, "num_classes", 0))
    return torch.cat(chunks)
