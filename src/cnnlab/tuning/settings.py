"""Study settings stored with the study (so remote workers need only the storage URL), samplers and pruners."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna

from cnnlab.config import MONITORS, RunConfig
from cnnlab.errors import ConfigError, did_you_mean
from cnnlab.tuning.space import SearchSpace

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
PRUNER_KEYS = ("name", "startup_trials", "warmup_epochs", "min_epochs", "reduction_factor")
SETTINGS_ATTR = "cnnlab"


@dataclass
class StudySettings:
    """Everything a worker needs to run trials: the base config, the space and the rules."""

    name: str
    base: dict[str, Any]  # RunConfig.to_dict() of the base, layers resolved when searched
    space: dict[str, Any]  # SearchSpace.to_dict()
    metric: str = "val_accuracy"
    sampler: str = "tpe"
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    trials: int = 20  # the budget: trials that reach an outcome (complete, pruned or failed)
    max_retries: int = 2  # re-runs of a trial whose worker died
    seed: int = 0
    trial_reports: bool = True  # validation evaluation files and report.html in each trial folder

    @property
    def direction(self) -> str:
        return "minimize" if self.metric.endswith("loss") else "maximize"

    def base_config(self) -> RunConfig:
        return RunConfig.from_dict(self.base, source="study base config")

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space, source=f"study {self.name} space")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StudySettings:
        return cls(**raw)

    def check(self) -> None:
        if self.metric not in MONITORS:
            raise ConfigError(
                f"metric must be one of {', '.join(MONITORS)}; got '{self.metric}'."
                f"{did_you_mean(self.metric, MONITORS)}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"sampler must be one of {', '.join(SAMPLERS)}; got '{self.sampler}'."
                f"{did_you_mean(self.sampler, SAMPLERS)}"
            )
        name = self.pruner.get("name")
        if name not in PRUNERS:
            raise ConfigError(
                f"pruner must be one of {', '.join(PRUNERS)}; got '{name}'."
                f"{did_you_mean(str(name), PRUNERS)}"
            )
        unknown = [k for k in self.pruner if k not in PRUNER_KEYS]
        if unknown:
            raise ConfigError(
                f"pruner: unknown setting '{unknown[0]}'. Allowed: {', '.join(PRUNER_KEYS)}."
            )
        for key in PRUNER_KEYS[1:]:
            value = self.pruner.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"pruner.{key} must be a whole number, got {value!r}.")
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}.")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}.")


def grid_size(space: SearchSpace) -> int:
    return math.prod(len(values) for values in space.grid().values())


def make_sampler(
    settings: StudySettings, space: SearchSpace, seed: int, parallel: bool
) -> optuna.samplers.BaseSampler:
    """TPE by default (constant liar when workers share the study), random or grid on request."""
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    startup = min(10, max(3, settings.trials // 3))  # random trials before TPE models the space
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup, constant_liar=parallel, multivariate=False
    )


def make_pruner(settings: StudySettings) -> optuna.pruners.BasePruner:
    """Median stopping or successive halving on the per-epoch validation metric; or none.

    Steps are epochs (1, 2, ...); `warmup_epochs` first epochs are never pruned.
    """
    p = settings.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.get("startup_trials", 5),
            n_warmup_steps=p.get("warmup_epochs", 1) + 1,
        )
    if p["name"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.get("min_epochs", 1), reduction_factor=p.get("reduction_factor", 3)
        )
    return optuna.pruners.NopPruner()
