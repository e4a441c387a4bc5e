"""How many CPU threads training uses: the cores that other processes leave free.

At the end of every parallel op, PyTorch's OpenMP threads wait for each other. Waiting by
spinning (libgomp's default: about 3 ms, then sleeping) keeps the small ops of a small CNN fast:
the tutorial nets train 1.2-1.45x faster per epoch than with sleeping threads, which on 2 cores are
no faster than one thread. But when another process holds one of the cores, a spinning thread
that waits for its partner there burns its own core through that process's time slices: with
one busy process beside it, training on 2 spinning threads ran 2-3x slower than on 1 thread.

So training with `threads=0` (auto) reads, twice a second, how much CPU time other processes
took on this process's cores, and runs on the cores they leave free. The count changes only when
two readings in a row ask for the same change, so a short burst elsewhere does not cost a core
for seconds. Readings cover training steps only: after each epoch the next reading starts at
the next epoch's first step, so whatever ran between (validation, checkpoints, callbacks, Keras'
turn in bench-keras) never counts as load beside training. (With half-second epochs, two
readings in a row each spanned a Keras epoch and took a core from `tiny`: 0.7-0.8 s epochs
against 0.5.) Thread counts change the order of floating-point sums, so on a busy
machine a run with threads=0 can differ in the last digits from the same run on an idle one; a
fixed `--threads N` gives bit-identical reruns.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnnlab.training.loop import Callback, Trainer

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
READING_SECONDS = 0.5
BUSY_TOLERANCE = 0.25  # of a core: other processes may take this much and we still use all


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int) -> None:
    """Use `threads` threads, or one per usable core for 0; more than cores slows small convs."""
    torch.set_num_threads(threads or usable_cores())


def busy_cpu_seconds(stat_text: str, cpus: set[int]) -> float:
    """CPU seconds `cpus` spent on anything but idling, from the text of /proc/stat.

    Busy is user + nice + system + irq + softirq + steal (a hypervisor running another guest
    on our virtual CPU takes the core away as surely as a local process)."""
    ticks = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        fields = [int(value) for value in rest.split()]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


class OtherProcessLoad:
    """Cores kept busy by other processes on this process's CPUs, between two readings.

    Busy time of those CPUs (from /proc/stat) minus this process's own CPU time, per second of
    wall time. Where /proc/stat cannot be read (not Linux), every reading is None."""

    def __init__(
        self,
        read_stat: Callable[[], str] | None = None,
        cpus: set[int] | None = None,
        own_cpu_seconds: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read_stat = read_stat or PROC_STAT.read_text
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.cpus = set(cpus)
        self.own_cpu_seconds = own_cpu_seconds
        self.clock = clock
        self.previous = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            busy = busy_cpu_seconds(self.read_stat(), self.cpus)
        except (OSError, ValueError):
            return None
        return self.clock(), busy, self.own_cpu_seconds()

    def read(self) -> float | None:
        """Cores the other processes kept busy since the previous reading (or construction)."""
        sample, previous = self._sample(), self.previous
        self.previous = sample
        if sample is None or previous is None or sample[0] <= previous[0]:
            return None
        wall = sample[0] - previous[0]
        others = (sample[1] - previous[1]) - (sample[2] - previous[2])
        return max(0.0, others / wall)


def threads_for(other_load: float, cores: int) -> int:
    """Threads that fit on the cores `other_load` leaves free; at least one.

    A core counts as taken once other processes use more than BUSY_TOLERANCE of it: a spinning
    thread that has to share its core is slower than no thread there."""
    return max(1, min(cores, math.floor(cores - other_load + BUSY_TOLERANCE)))


class ThreadGovernor(Callback):
    """Trains on the free cores only, rechecked twice a second (see the module docstring)."""

    def __init__(
        self,
        cores: int,
        load: OtherProcessLoad | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = cores
        self.load = load
        self.clock = clock
        self.threads = cores
        self.next_reading = math.inf
        self.asked: int | None = None  # what the previous reading asked for, if not `threads`
        self.restart_reading = False  # set between epochs: the next step starts a new reading

    def on_train_begin(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if trainer.device.type != "cpu":  # a GPU does the work; the CPU threads mostly wait
            return
        self.load = self.load or OtherProcessLoad(clock=self.clock)
        self.load.read()  # the baseline
        self.restart_reading = False
        self._set_threads(self.cores)
        self.next_reading = self.clock() + READING_SECONDS

    def on_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.load is None or self.next_reading == math.inf:  # not governing (GPU, or done)
            return
        now = self.clock()
        if self.restart_reading:  # the time since the last epoch's last step was not training
            self.restart_reading = False
            self.load.read()
            self.next_reading = now + READING_SECONDS
            return
        last_of_epoch = logs.get("batches") is not None and logs.get("batch") == logs["batches"]
        if last_of_epoch:
            self.restart_reading = True
            # The steps since the last reading, if they span half a reading's time or more.
            if now >= self.next_reading - READING_SECONDS / 2:
                self._read(now)
        elif now >= self.next_reading:
            self._read(now)

    def _read(self, now: float) -> None:
        assert self.load is not None
        self.next_reading = now + READING_SECONDS
        other_load = self.load.read()
        if other_load is None:
            return
        wanted, asked = threads_for(other_load, self.cores), self.asked
        self.asked = None if wanted == self.threads else wanted
        if asked is None or self.asked is None or (asked < self.threads) != (wanted < self.threads):
            return
        if wanted < self.threads:  # the smaller change of the two
            threads = max(wanted, asked)
            log.info(
                "Other processes keep %.1f of %d cores busy: training on %d thread(s) until "
                "they are free (set --threads to fix the count).",
                other_load,
                self.cores,
                threads,
            )
        else:
            threads = min(wanted, asked)
            log.info("Cores free again: training on %d threads.", threads)
        self.asked = None
        self._set_threads(threads)

    def on_train_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.next_reading = math.inf
        self._set_threads(self.cores)  # evaluation and whatever runs next get every core

    def _set_threads(self, threads: int) -> None:
        self.threads = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
