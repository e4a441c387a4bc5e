"""Training threads follow the cores other processes leave free (cnnlab.training.cores)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from cnnlab.config import RunConfig
from cnnlab.training import cores
from cnnlab.training.cores import (
    OtherProcessLoad,
    ThreadGovernor,
    busy_cpu_seconds,
    threads_for,
    usable_cores,
)
from cnnlab.training.loop import Callback
from cnnlab.training.run import train_run

HZ = cores.os.sysconf("SC_CLK_TCK")


def proc_stat(per_cpu: dict[int, tuple[int, ...]]) -> str:
    """/proc/stat text: a summed 'cpu' line, then one line per CPU (user nice system idle
    iowait irq softirq steal guest guest_nice), then lines that are not CPUs."""
    total = [sum(column) for column in zip(*per_cpu.values(), strict=True)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{cpu} " + " ".join(map(str, ticks)) for cpu, ticks in per_cpu.items()]
    lines += ["intr 12345 0 0", "ctxt 999", "cpu_unknown 1 2 3"]
    return "\n".join(lines) + "\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_counts_our_cpus_and_every_kind_of_work_but_idling() -> None:
    text = proc_stat(
        {
            0: (10, 1, 2, 500, 7, 3, 4, 5, 0, 0),
            1: (20, 0, 0, 900, 0, 0, 0, 0, 0, 0),
            2: (1000, 0, 0, 0, 0, 0, 0, 0, 0, 0),  # not ours
        }
    )
    # user + nice + system + irq + softirq + steal; idle and iowait are not busy.
    assert busy_cpu_seconds(text, {0, 1}) == pytest.approx((25 + 20) / HZ)
    assert busy_cpu_seconds(text, {2}) == pytest.approx(1000 / HZ)
    assert busy_cpu_seconds("cpu0 5 0 0\n", {0}) == pytest.approx(5 / HZ)  # older kernels


def test_other_load_is_busy_time_minus_our_own_per_second() -> None:
    clock, own = FakeClock(), [0.0]
    ticks = {0: [0] * 10, 1: [0] * 10}
    load = OtherProcessLoad(
        read_stat=lambda: proc_stat({cpu: tuple(t) for cpu, t in ticks.items()}),
        cpus={0, 1},
        own_cpu_seconds=lambda: own[0],
        clock=clock,
    )
    clock.now += 2.0  # two seconds: cpu0 fully busy (ours), cpu1 busy half the time (theirs)
    ticks[0][0] += 2 * HZ
    ticks[1][2] += HZ
    own[0] += 2.0
    assert load.read() == pytest.approx(0.5)
    clock.now += 1.0  # a second with only our own work
    ticks[0][0] += HZ
    own[0] += 1.05  # our clock is finer than the tick count: never below zero
    assert load.read() == 0.0


def test_other_load_is_unknown_without_proc_stat() -> None:
    def missing() -> str:
        raise FileNotFoundError("/proc/stat")

    load = OtherProcessLoad(read_stat=missing, cpus={0})
    assert load.read() is None


@pytest.mark.skipif(not cores.PROC_STAT.exists(), reason="needs Linux's /proc/stat")
def test_a_busy_process_beside_us_shows_as_other_load() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        load = OtherProcessLoad()
        time.sleep(0.7)
        seen = load.read()
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.4  # a whole core, less what other tests took from it


@pytest.mark.parametrize(
    ("other_load", "cores_", "threads"),
    [(0.0, 2, 2), (0.2, 2, 2), (0.3, 2, 1), (1.0, 2, 1), (5.0, 2, 1), (1.1, 4, 3), (0.0, 1, 1)],
)
def test_threads_fit_the_cores_left_free(other_load: float, cores_: int, threads: int) -> None:
    assert threads_for(other_load, cores_) == threads


class ScriptedLoad:
    """Other-load readings in order; counts how often it was read."""

    def __init__(self, readings: list[float | None]) -> None:
        self.readings = readings
        self.reads = 0

    def read(self) -> float | None:
        self.reads += 1
        return self.readings.pop(0) if self.readings else 0.0


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def governed(governor: ThreadGovernor, clock: FakeClock, readings: int) -> list[int]:
    """The thread count after each of `readings` readings, one batch before each as well."""
    trainer = SimpleNamespace(device=torch.device("cpu"))
    seen = []
    for _ in range(readings):
        reads = governor.load.reads  # type: ignore[union-attr]
        governor.on_batch_end(trainer, {})  # type: ignore[arg-type]
        assert governor.load.reads == reads  # type: ignore[union-attr]  # not yet: too soon
        clock.now += cores.READING_SECONDS
        governor.on_batch_end(trainer, {})  # type: ignore[arg-type]
        seen.append(torch.get_num_threads())
    return seen


def test_governor_changes_threads_when_two_readings_in_a_row_agree(restore_threads, caplog) -> None:
    clock = FakeClock()
    load = ScriptedLoad([None, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.1, 0.0])  # the baseline first
    governor = ThreadGovernor(2, load, clock=clock)  # type: ignore[arg-type]
    trainer = SimpleNamespace(device=torch.device("cpu"))
    caplog.set_level(logging.INFO, logger="cnnlab.training.cores")
    governor.on_train_begin(trainer, {})  # type: ignore[arg-type]
    assert torch.get_num_threads() == 2 and load.reads == 1
    # A busy reading alone (another framework's threads spinning down) changes nothing; two
    # in a row take a core; then free, busy, free, free give it back on the last reading.
    assert governed(governor, clock, 8) == [2, 2, 2, 1, 1, 1, 1, 2]
    assert "keep 1.0 of 2 cores busy: training on 1 thread" in caplog.text
    assert "Cores free again: training on 2 threads" in caplog.text

    load.readings = [3.0, 3.0]
    assert governed(governor, clock, 2) == [2, 1]
    governor.on_train_end(trainer, {})  # type: ignore[arg-type]
    assert torch.get_num_threads() == 2  # evaluation after training gets every core


def test_governor_makes_the_smaller_of_two_agreeing_changes(restore_threads) -> None:
    clock = FakeClock()
    load = ScriptedLoad([None, 2.0, 1.0, 3.0, 3.0, 1.0, 0.0])
    governor = ThreadGovernor(4, load, clock=clock)  # type: ignore[arg-type]
    governor.on_train_begin(SimpleNamespace(device=torch.device("cpu")), {})  # type: ignore[arg-type]
    assert governed(governor, clock, 6) == [4, 3, 3, 1, 1, 3]


def test_governor_stays_out_of_gpu_training(restore_threads) -> None:
    load = ScriptedLoad([5.0, 5.0])
    clock = FakeClock()
    governor = ThreadGovernor(2, load, clock=clock)  # type: ignore[arg-type]
    trainer = SimpleNamespace(device=torch.device("cuda"))
    governor.on_train_begin(trainer, {})  # type: ignore[arg-type]
    clock.now += 10
    governor.on_batch_end(trainer, {})  # type: ignore[arg-type]
    assert load.reads == 0


class TimelineLoad:
    """Another process keeps one core busy in the `busy` (start, end) spans of a FakeClock."""

    def __init__(self, clock: FakeClock, busy: list[tuple[float, float]]) -> None:
        self.clock, self.busy, self.last = clock, busy, clock()

    def read(self) -> float | None:
        start, now = self.last, self.clock()
        self.last = now
        if now <= start:
            return None
        overlap = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self.busy)
        return overlap / (now - start)


def governed_epochs(
    governor: ThreadGovernor, clock: FakeClock, epochs: int, steps: int, pause: float
) -> list[int]:
    """The thread count after each epoch of `steps` 50 ms steps, with `pause` seconds between
    epochs (validation, another program's turn)."""
    trainer = SimpleNamespace(device=torch.device("cpu"))
    seen = []
    for _ in range(epochs):
        for batch in range(1, steps + 1):
            clock.now += 0.05
            governor.on_batch_end(trainer, {"batch": batch, "batches": steps})  # type: ignore[arg-type]
        seen.append(torch.get_num_threads())
        clock.now += pause
    return seen


@pytest.mark.parametrize("steps", [3, 9, 30])  # epochs of 0.15, 0.45 and 1.5 s
def test_governor_does_not_count_another_programs_turn_between_epochs(
    restore_threads, steps
) -> None:
    # bench-keras: a Keras epoch runs on both cores between cnnlab's epochs. Readings that
    # spanned two of those turns in a row took a core from half-second epochs.
    clock = FakeClock()
    pause, epoch = 2.5, steps * 0.05
    turns = [
        (100.0 + epoch + i * (epoch + pause), 100.0 + (i + 1) * (epoch + pause)) for i in range(8)
    ]
    governor = ThreadGovernor(2, TimelineLoad(clock, turns), clock=clock)  # type: ignore[arg-type]
    governor.on_train_begin(SimpleNamespace(device=torch.device("cpu")), {})  # type: ignore[arg-type]
    assert governed_epochs(governor, clock, 8, steps, pause) == [2] * 8


@pytest.mark.parametrize("steps", [9, 30])
def test_governor_still_sees_a_busy_neighbour_through_short_epochs(restore_threads, steps) -> None:
    clock = FakeClock()
    governor = ThreadGovernor(2, TimelineLoad(clock, [(0.0, 1e9)]), clock=clock)  # type: ignore[arg-type]
    governor.on_train_begin(SimpleNamespace(device=torch.device("cpu")), {})  # type: ignore[arg-type]
    assert governed_epochs(governor, clock, 4, steps, 2.5)[1:] == [1, 1, 1]


def busy_neighbour(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every reading says other processes keep all cores busy; returns the thread counts that
    training sets."""
    monkeypatch.setattr(cores, "READING_SECONDS", 0.0)
    monkeypatch.setattr(OtherProcessLoad, "read", lambda self: float(usable_cores()))
    threads_set: list[int] = []
    set_num_threads = torch.set_num_threads

    def record(threads: int) -> None:
        if threading.current_thread() is threading.main_thread():  # not evaluation's workers
            threads_set.append(threads)
        set_num_threads(threads)

    monkeypatch.setattr(torch, "set_num_threads", record)
    return threads_set


def train_beside_a_busy_neighbour(
    config: RunConfig, threads: int, monkeypatch: pytest.MonkeyPatch, caplog
) -> list[int]:
    """One epoch with `threads` while every reading finds all cores busy; the counts set."""
    threads_seen = busy_neighbour(monkeypatch)
    caplog.set_level(logging.INFO, logger="cnnlab.training.cores")
    train_run(config.with_overrides({"train.epochs": 1, "train.threads": threads}))
    return threads_seen


def test_training_with_auto_threads_moves_aside_for_other_processes(
    digits_config: RunConfig, monkeypatch, caplog, restore_threads
) -> None:
    threads_seen = train_beside_a_busy_neighbour(digits_config, 0, monkeypatch, caplog)
    if usable_cores() > 1:
        assert 1 in threads_seen and "training on 1 thread" in caplog.text
    assert threads_seen[-1] == usable_cores()  # all cores again after training


def test_a_fixed_thread_count_is_kept(
    digits_config: RunConfig, monkeypatch, caplog, restore_threads
) -> None:
    threads_seen = train_beside_a_busy_neighbour(digits_config, 3, monkeypatch, caplog)
    assert set(threads_seen) == {3} and "training on" not in caplog.text


def test_cores_come_back_when_training_fails(
    digits_config: RunConfig, monkeypatch, caplog, restore_threads
) -> None:
    class FailOnThirdBatch(Callback):
        def on_batch_end(self, trainer, logs) -> None:
            if logs["batch"] == 3:
                raise RuntimeError("boom")

    busy_neighbour(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        train_run(
            digits_config.with_overrides({"train.threads": 0}), callbacks=[FailOnThirdBatch()]
        )
    assert torch.get_num_threads() == usable_cores()
