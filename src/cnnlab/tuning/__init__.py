"""Hyperparameter tuning with Optuna: search spaces, studies over processes and machines, records."""

from __future__ import annotations

from cnnlab.tuning.space import Param, SearchSpace
from cnnlab.tuning.study import TuneResult, finish, join, tune

__all__ = ["Param", "SearchSpace", "TuneResult", "finish", "join", "tune"]
