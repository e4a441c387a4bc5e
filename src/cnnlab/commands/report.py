"""`cnnlab report RUN`: (re)write a run's self-contained report.html."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = "cnnlab report runs/train\n  cnnlab report runs/train-3"


def cmd_report(args: argparse.Namespace) -> int:
    from cnnlab.cli import out
    from cnnlab.reporting.report import write_report
    from cnnlab.training import runs

    path = write_report(runs.resolve_run_dir(args.run))
    out(f"Report saved to {path}")
    return 0


def register(command: Any) -> None:
    p = command(
        "report",
        "write report.html: summary, curves, test metrics, errors, calibration, Grad-CAM",
        cmd_report,
    )
    p.epilog = "examples:\n  " + EXAMPLES
    p.add_argument("run", help="run folder, e.g. runs/train")
