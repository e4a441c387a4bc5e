"""cnnlab: train, evaluate, explain and tune CNN image classifiers on PyTorch."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# OpenMP threads that sleep instead of spinning while they wait. On a busy machine (other
# jobs on the same cores) spinning threads make every parallel op wait a scheduler slice:
# training ran 3x slower with 2 spinning threads than with 1; passive threads are as fast as
# 1 thread there and use both cores when they are free. Must be set before torch loads; an
# OMP_WAIT_POLICY of the user's own wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cnnlab.api import Run, evaluate, make_config, predict, summary, train
from cnnlab.config import RunConfig, load_config

__all__ = [
    "Run",
    "RunConfig",
    "__version__",
    "evaluate",
    "load_config",
    "make_config",
    "predict",
    "summary",
    "train",
]
