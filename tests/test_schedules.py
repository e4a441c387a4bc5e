import math
from itertools import pairwise

import pytest

from cnnlab.config import ScheduleConfig
from cnnlab.training.schedules import lr_at


def test_constant() -> None:
    assert lr_at(500, 1000, 0.1, ScheduleConfig()) == 0.1


def test_exponential_matches_keras_formula() -> None:
    schedule = ScheduleConfig(name="exponential", decay_rate=0.5, decay_steps=100)
    assert lr_at(150, 1000, 1.0, schedule) == pytest.approx(0.5**1.5)
    stair = ScheduleConfig(name="exponential", decay_rate=0.5, decay_steps=100, staircase=True)
    assert lr_at(150, 1000, 1.0, stair) == pytest.approx(0.5)
    assert lr_at(199, 1000, 1.0, stair) == pytest.approx(0.5)
    assert lr_at(200, 1000, 1.0, stair) == pytest.approx(0.25)


def test_cosine_runs_from_base_to_min() -> None:
    schedule = ScheduleConfig(name="cosine", min_lr=0.01)
    assert lr_at(0, 100, 1.0, schedule) == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, schedule) == pytest.approx(0.505)
    assert lr_at(100, 100, 1.0, schedule) == pytest.approx(0.01)


def test_onecycle_warms_up_then_anneals() -> None:
    schedule = ScheduleConfig(name="onecycle", warmup=0.2)
    values = [lr_at(step, 100, 1.0, schedule) for step in range(101)]
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 20
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in pairwise(values[:21]))
    assert all(a >= b for a, b in pairwise(values[20:]))
    assert not any(math.isnan(v) for v in values)
