"""Helpers shared by the benchmark scripts: machine facts, medians and a plain-text table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cnnlab_command() -> list[str]:
    """The `cnnlab` entry point of the interpreter running this script (the project's venv)."""
    script = Path(sys.executable).with_name("cnnlab")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cnnlab.cli import main; sys.exit(main())"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_line() -> str:
    """Which bf16 hardware cnnlab's autocast runs on here (cnnlab.inference.cpu_bf16_hardware)."""
    from cnnlab.inference import cpu_bf16_hardware

    hardware = cpu_bf16_hardware()
    if hardware is None:
        return "bf16 in hardware: no (fp32)"
    return f"bf16 in hardware: {hardware}" + (", no AMX" if hardware != "AMX" else "")


def machine_line() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}, {cores} cores, {bf16_line()}, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average {load:.1f}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """'mean ± std (min-max)' of a few numbers."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g} ({min(values):.4g}-{max(values):.4g})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, readable as plain text too."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(cmd: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
