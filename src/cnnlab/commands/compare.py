"""`cnnlab compare RUN...`: a leaderboard of runs and their learning curves in one page."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXAMPLES = (
    "cnnlab compare runs\n"
    "  cnnlab compare runs/train runs/train-2 runs/train-3\n"
    "  cnnlab compare runs --out comparisons --format json"
)


def cmd_compare(args: argparse.Namespace) -> int:
    from cnnlab.cli import out
    from cnnlab.reporting.compare import compare_runs, format_leaderboard

    comparison = compare_runs(args.runs, out_dir=args.out)
    if args.format == "json":
        out(json.dumps([row.to_dict() for row in comparison.rows], indent=2))
    else:
        out(format_leaderboard(comparison.rows))
        out(f"\nLeaderboard saved to {comparison.csv_path}")
        out(f"Results saved to {comparison.html_path}")
    return 0


def register(command: Any) -> None:
    p = command(
        "compare",
        "leaderboard of runs (settings, params, time, validation and test metrics) and curves",
        cmd_compare,
    )
    p.epilog = "examples:\n  " + EXAMPLES
    p.add_argument("runs", nargs="+", help="run folders, or a folder of runs such as runs/")
    p.add_argument(
        "--out", help="folder for leaderboard.csv and compare.html (default: the runs' folder)"
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
