"""`cnnlab check PATH`: the dataset check of an image folder, with optional quarantine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLES = (
    "cnnlab check ~/photos\n"
    "  cnnlab check ~/photos --format json > check.json\n"
    "  cnnlab check ~/photos --quarantine ~/photos-quarantine\n"
    "  cnnlab check ~/photos --fast"
)


def cmd_check(args: argparse.Namespace) -> int:
    from cnnlab.cli import out
    from cnnlab.data.check import check_folder, quarantine

    report = check_folder(
        Path(args.path),
        near_duplicates=not args.no_near_duplicates,
        min_size=args.min_size,
        max_aspect=args.max_aspect,
        fast=args.fast,
    )
    moved = quarantine(report, Path(args.quarantine)) if args.quarantine else []
    if args.format == "json":
        body = report.to_dict()
        body["quarantined"] = [[str(src), str(dst)] for src, dst in moved]
        out(json.dumps(body, indent=2))
    else:
        out(report.to_text())
        for src, dst in moved:
            out(f"moved {src} -> {dst}")
        if moved:
            out(f"Quarantined {len(moved)} files into {args.quarantine} (nothing was deleted).")
    return 0 if report.ok else 1


def register(command: Any) -> None:
    p = command(
        "check",
        "check an image folder: counts, imbalance, broken files, duplicates, leakage, sizes",
        cmd_check,
    )
    p.epilog = (
        "exit status: 0 when the folder is usable as it is, 1 when the check found unusable "
        "files, leakage or label conflicts, 2 on bad input.\n\nexamples:\n  " + EXAMPLES
    )
    p.add_argument("path", help="a folder with one sub-folder per class (or train/val/test)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--quarantine", metavar="DIR", help="move unusable files here (never deletes)")
    p.add_argument("--fast", action="store_true", help="headers only: the check train runs")
    p.add_argument(
        "--no-near-duplicates",
        action="store_true",
        help="skip the perceptual-hash search (the slowest part)",
    )
    p.add_argument("--min-size", type=int, default=16, help="flag images smaller than this (px)")
    p.add_argument(
        "--max-aspect",
        type=float,
        default=4.0,
        help="flag images with a longer/shorter side ratio beyond this",
    )
