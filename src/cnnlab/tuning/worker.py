"""A tuning worker process: `python -m cnnlab.tuning.worker` (started by `cnnlab tune --workers N`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cnnlab.errors import CnnlabError

STORAGE_ENV = "CNNLAB_TUNE_STORAGE"  # the storage URL travels in the environment, not in `ps`


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnlab.tuning.worker")
    parser.add_argument("--name", required=True, help="study name")
    parser.add_argument("--trial-root", required=True, help="folder for trial run folders")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--deadline", type=float, help="stop claiming trials after (epoch s)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--parallel", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"[worker {args.index}] %(message)s", stream=sys.stderr
    )
    for noisy in ("matplotlib", "PIL", "optuna", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    url = os.environ.get(STORAGE_ENV)
    if not url:
        print(f"error: set {STORAGE_ENV} to the study's storage URL", file=sys.stderr)
        return 2
    from cnnlab.tuning.study import run_worker

    try:
        run_worker(
            url,
            args.name,
            Path(args.trial_root),
            heartbeat=args.heartbeat,
            index=args.index,
            deadline=args.deadline,
            threads=args.threads,
            parallel=args.parallel,
        )
    except KeyboardInterrupt:
        return 130
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
