"""cnnlab: train, evaluate, explain and tune CNN image classifiers on PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

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
