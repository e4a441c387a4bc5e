"""Learning-rate schedules as pure functions of the optimisation step."""

from __future__ import annotations

import math

from cnnlab.config import ScheduleConfig


def lr_at(step: int, total_steps: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate for optimisation step `step` (0-based) of `total_steps`.

    `plateau` follows `constant` here; its reductions are a separate multiplier kept by the loop.
    """
    name = schedule.name
    if name in ("constant", "plateau"):
        return base_lr
    if name == "exponential":  # Keras ExponentialDecay
        periods = step / schedule.decay_steps
        if schedule.staircase:
            periods = math.floor(periods)
        return base_lr * schedule.decay_rate**periods
    progress = min(step / max(total_steps, 1), 1.0)  # 0 -> 1 over training
    if name == "cosine":
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    if name == "onecycle":  # linear warm-up from base/25, then cosine down to min_lr
        warm = schedule.warmup
        start = base_lr / 25
        if warm > 0 and progress < warm:
            return start + (base_lr - start) * progress / warm
        down = (progress - warm) / max(1 - warm, 1e-12)
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * down))
    raise ValueError(f"unknown schedule {name!r}")
