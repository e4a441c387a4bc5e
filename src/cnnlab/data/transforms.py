"""Whole-batch pixel transforms: channel statistics, normalisation and random shift, flip and
erasing augmentation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlab.errors import ConfigError

STATS_CHUNK = 8192  # images per chunk in channel_stats: bounds the per-channel copy


def channel_stats(
    images: torch.Tensor, chunk: int = STATS_CHUNK
) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Counts each channel's 256 pixel values (a histogram), so the sums are exact integers
    and the cost is one pass over the bytes; `chunk` images at a time bound the copy.
    """
    _check_uint8(images, "images")
    n, c = images.shape[:2]
    if n == 0:
        raise ValueError("channel_stats needs at least one image")
    counts = torch.zeros(c, 256, dtype=torch.int64, device=images.device)  # (C, 256)
    for start in range(0, n, chunk):
        part = images[start : start + chunk]  # (b, C, H, W)
        for channel in range(c):
            counts[channel] += torch.bincount(part[:, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64, device=images.device)  # (256,)
    total = counts.sum(1).double()  # (C,) pixels per channel
    mean = (counts.double() @ values) / total
    var = ((counts.double() @ values.square()) / total - mean.square()).clamp_min(0)
    return (mean / 255).tolist(), (var.sqrt() / 255).tolist()


def normalize(
    batch: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1], then (x - mean) / std per channel if given.

    The result keeps the input's memory format, so a channels_last batch stays channels_last.
    """
    _check_uint8(batch, "batch")
    x = batch.to(torch.float32).div_(255.0)  # preserve_format: same strides as the input
    if mean is None and std is None:
        return x
    if mean is None or std is None:
        raise ValueError("normalize needs both mean and std, or neither")
    c = batch.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"mean and std need {c} values (one per channel), got {len(mean)}/{len(std)}"
        )
    if any(not s > 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    return x.sub_(mean_t).div_(std_t)


@dataclass(frozen=True)
class Augment:
    """Random augmentation applied per sample to whole batches.

    shift: largest translation as a fraction of the image size, like Keras'
        width_shift_range / height_shift_range; round(shift * W) pixels across and
        round(shift * H) down, filled with zeros.
    flip: mirror left-right with probability 1/2.
    erase: probability of blanking one random rectangle of each image to zero (random erasing,
        Zhong et al. 2017, with torchvision's ranges: 2-33% of the area, aspect ratio 0.3-3.3).
    """

    shift: float = 0.0
    flip: bool = False
    erase: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not (
            isinstance(self.shift, int | float) and math.isfinite(self.shift)
        ):
            raise ConfigError(f"augmentation shift must be a number in [0, 1), got {self.shift!r}.")
        if not 0 <= self.shift < 1:
            raise ConfigError(f"augmentation shift must be in [0, 1), got {self.shift}.")
        if not isinstance(self.flip, bool):
            raise ConfigError(f"augmentation flip must be true or false, got {self.flip!r}.")
        if isinstance(self.erase, bool) or not (
            isinstance(self.erase, int | float) and 0 <= self.erase <= 1
        ):
            raise ConfigError(
                f"augmentation erase is a probability in [0, 1], got {self.erase!r}; try 0.5."
            )

    @property
    def enabled(self) -> bool:
        return self.shift > 0 or self.flip or self.erase > 0

    def pixels(self, height: int, width: int) -> tuple[int, int]:
        """Largest shift in pixels (down, across) for images of this size."""
        return round(self.shift * height), round(self.shift * width)


def augment_batch(batch: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Randomly shift, flip and/or erase part of each image of a (B, C, H, W) batch; uint8 or
    float, any device.

    The draws come from `generator` alone (which must live on the batch's device), so the
    same generator state gives the same output. Returns a new tensor in the input's memory
    format; the input is not modified.
    """
    if batch.ndim != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got shape {tuple(batch.shape)}")
    if generator.device.type != batch.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the batch is on {batch.device}; "
            "create the generator on the batch's device"
        )
    out = batch
    pad_h, pad_w = aug.pixels(batch.shape[2], batch.shape[3])
    if pad_h or pad_w:
        out = _random_shift(out, pad_h, pad_w, generator)
    if aug.flip:
        out = _random_flip(out, generator)
    if aug.erase > 0:
        out = _random_erase(out, aug.erase, generator)
    if out is batch:
        return batch.clone(memory_format=torch.preserve_format)
    return out.contiguous(memory_format=_memory_format(batch))


def _random_shift(
    batch: torch.Tensor, pad_h: int, pad_w: int, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad by (pad_h, pad_w) and crop an H x W window at a random offset per image.

    The crop is two gathers (columns, then rows) with per-image index rows: no Python loop
    over samples, and 2-4x faster on CPU than one 4-D advanced-indexing gather.
    """
    b, c, h, w = batch.shape
    device = batch.device
    dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=generator, device=device)  # (B,)
    dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=generator, device=device)  # (B,)
    out = F.pad(batch, (pad_w, pad_w, pad_h, pad_h))  # (B, C, H + 2 pad_h, W + 2 pad_w)
    if pad_w:
        cols = dx[:, None] + torch.arange(w, device=device)  # (B, W)
        out = out.gather(3, cols.view(b, 1, 1, w).expand(b, c, out.shape[2], w))
    if pad_h:
        rows = dy[:, None] + torch.arange(h, device=device)  # (B, H)
        out = out.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return out  # (B, C, H, W)


def _random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mirror = torch.rand(batch.shape[0], generator=generator, device=batch.device) < 0.5  # (B,)
    return torch.where(mirror[:, None, None, None], batch.flip(3), batch)


ERASE_AREA = (0.02, 0.33)  # fraction of the image a rectangle covers (torchvision's defaults)
ERASE_RATIO = (0.3, 1 / 0.3)  # its height / width


def _random_erase(batch: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p per image, set one random rectangle (all channels) to zero.

    Sizes come from an area fraction drawn in ERASE_AREA and a log-uniform aspect ratio in
    ERASE_RATIO, clipped to the image; positions are uniform where the rectangle fits. One
    mask for the whole batch from row and column ranges: no loop over samples.
    """
    b, _, h, w = batch.shape
    device = batch.device

    def uniform(low: float, high: float) -> torch.Tensor:  # (B,)
        return torch.rand(b, generator=generator, device=device) * (high - low) + low

    area = uniform(*ERASE_AREA) * (h * w)
    ratio = uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])).exp()
    height = (area * ratio).sqrt().round().clamp(1, h)
    width = (area / ratio).sqrt().round().clamp(1, w)
    top = (uniform(0, 1) * (h - height + 1)).floor()
    left = (uniform(0, 1) * (w - width + 1)).floor()
    chosen = torch.rand(b, generator=generator, device=device) < p
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]  # (B, H, W)
    return batch.masked_fill(mask[:, None], 0)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_uint8(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(
            f"{name} must be a uint8 (N, C, H, W) tensor, got {t.dtype} {tuple(t.shape)}"
        )
