"""The search space: YAML distributions over dotted run-config keys and layer arguments."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnlab.config import RunConfig
from cnnlab.errors import ConfigError, did_you_mean

KINDS = ("float", "uniform", "loguniform", "int", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
SPACE_KEYS = ("params", "metric", "sampler", "pruner")
LAYER_PREFIX = "model.layers."
# Layer names that mean the same layer (Keras' aliases).
_LAYER_ALIASES = {"maxpool2d": "maxpooling2d", "avgpool2d": "averagepooling2d"}

Scalar = None | bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One searched setting: a dotted path and its distribution (float, int or categorical)."""

    path: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Scalar, ...] = ()

    def distribution(self) -> Any:
        """The matching optuna distribution."""
        from optuna import distributions as d

        if self.kind == "categorical":
            return d.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return d.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid_values(self) -> list[Scalar]:
        """The values a grid search visits: the choices, or low..high by step."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            raise ConfigError(
                f"Grid search needs a finite set of values, but '{self.path}' is a continuous "
                "range. Give it a `step` or `choices`, or use --sampler tpe or random."
            )
        step = self.step or 1
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [float(v) for v in values]

    def contains(self, value: Any) -> bool:
        """Whether `value` is a point of this distribution (used to enqueue the base config)."""
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step:
            offset = (value - self.low) / self.step
            return abs(offset - round(offset)) < 1e-9
        return True

    def sample_values(self) -> list[Scalar]:
        """Values that must all fit the run config: every choice, or both ends of the range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """Parameters to search plus optional study settings given in the same file."""

    params: tuple[Param, ...]
    metric: str | None = None
    sampler: str | None = None
    pruner: dict[str, Any] | None = None
    source: str = "space"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Search space file {path} does not exist. Check the --space path.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "space") -> SearchSpace:
        """Read {params: {path: spec}, metric?, sampler?, pruner?} (or just {path: spec})."""
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(f"{source}: expected a mapping with `params:`; see {_EXAMPLE}")
        if "params" not in raw:
            raw = {"params": dict(raw)}
        unknown = [k for k in raw if k not in SPACE_KEYS]
        if unknown:
            raise ConfigError(
                f"{source}: unknown key '{unknown[0]}'.{did_you_mean(str(unknown[0]), SPACE_KEYS)}"
                f" Allowed: {', '.join(SPACE_KEYS)}."
            )
        params_raw = raw["params"]
        if not isinstance(params_raw, Mapping) or not params_raw:
            raise ConfigError(f"{source}: `params` must map setting paths to ranges; {_EXAMPLE}")
        params = tuple(
            parse_param(str(path), spec, f"{source}: params.{path}")
            for path, spec in params_raw.items()
        )
        pruner = raw.get("pruner")
        if isinstance(pruner, str):
            pruner = {"name": pruner}
        if pruner is not None and not isinstance(pruner, Mapping):
            raise ConfigError(f"{source}: pruner must be a name or a mapping with `name:`.")
        return cls(
            params=params,
            metric=raw.get("metric"),
            sampler=raw.get("sampler"),
            pruner=dict(pruner) if pruner is not None else None,
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data that from_dict reads back (stored with the study)."""
        params: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                params[p.path] = {"type": "categorical", "choices": list(p.choices)}
            else:
                spec: dict[str, Any] = {"type": p.kind, "low": p.low, "high": p.high}
                if p.log:
                    spec["log"] = True
                if p.step is not None:
                    spec["step"] = p.step
                params[p.path] = spec
        return {"params": params}

    @property
    def names(self) -> list[str]:
        return [p.path for p in self.params]

    # ------------------------------------------------------------------ use
    def distributions(self) -> dict[str, Any]:
        return {p.path: p.distribution() for p in self.params}

    def grid(self) -> dict[str, list[Scalar]]:
        return {p.path: p.grid_values() for p in self.params}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an optuna trial for one value per parameter."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "categorical":
                values[p.path] = trial.suggest_categorical(p.path, list(p.choices))
            elif p.kind == "int":
                values[p.path] = trial.suggest_int(
                    p.path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
                )
            else:
                values[p.path] = trial.suggest_float(p.path, p.low, p.high, step=p.step, log=p.log)
        return values

    def apply(self, config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
        """`config` with the values set: dotted config keys, and layer arguments by path."""
        plain = {k: v for k, v in values.items() if not k.startswith(LAYER_PREFIX)}
        layered = {k: v for k, v in values.items() if k.startswith(LAYER_PREFIX)}
        if layered:
            layers = set_layer_args(config.model.layers, layered)
            plain = {**plain, "model.layers": layers}
        return config.with_overrides(plain) if plain else config

    def baseline(self, config: RunConfig) -> dict[str, Any]:
        """The base config's own values of the parameters that lie inside the space."""
        found: dict[str, Any] = {}
        for p in self.params:
            try:
                value = read_path(config, p.path)
            except ConfigError:
                continue
            if p.contains(value):
                found[p.path] = value
        return found

    def check(self, config: RunConfig) -> None:
        """Raise ConfigError unless every value of every parameter fits `config`."""
        for p in self.params:
            for value in p.sample_values():
                try:
                    self.apply(config, {p.path: value})
                except ConfigError as exc:
                    raise ConfigError(
                        f"{self.source}: parameter '{p.path}' = {value!r} does not fit the base "
                        f"config: {exc}"
                    ) from None


_EXAMPLE = (
    "e.g.\n  params:\n    train.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n"
    "    train.optimizer: [adam, sgd]\n"
    "    model.layers.0.Conv2D.filters: {type: int, low: 16, high: 64, step: 16}"
)


def parse_param(path: str, spec: Any, where: str) -> Param:
    """One parameter from YAML: a list (categorical) or {type, low, high, log, step, choices}."""
    if not path or path.startswith(".") or path.endswith("."):
        raise ConfigError(f"{where}: '{path}' is not a dotted setting path like train.lr.")
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a list of choices or a mapping; {_EXAMPLE}")
    unknown = [k for k in spec if k not in PARAM_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{unknown[0]}'.{did_you_mean(str(unknown[0]), PARAM_KEYS)} "
            f"Allowed: {', '.join(PARAM_KEYS)}."
        )
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in KINDS:
        raise ConfigError(
            f"{where}: type must be one of {', '.join(KINDS)}; got {kind!r}."
            f"{did_you_mean(str(kind), KINDS)}"
        )
    if kind == "categorical":
        return _categorical(path, spec, where)
    low, high = _number(spec.get("low"), where, "low"), _number(spec.get("high"), where, "high")
    log = kind == "loguniform" or bool(spec.get("log", False))
    step = spec.get("step")
    step = None if step is None else _number(step, where, "step")
    if not low < high:
        raise ConfigError(f"{where}: low must be below high; got low={low}, high={high}.")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0; got low={low}.")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be positive and cannot be combined with log.")
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: an int range needs whole low and high; got {low}, {high}.")
        if step is not None and not float(step).is_integer():
            raise ConfigError(f"{where}: an int step must be whole; got {step}.")
        return Param(path, "int", int(low), int(high), log, None if step is None else int(step))
    return Param(path, "float", float(low), float(high), log, step)


def _categorical(path: str, spec: Mapping[str, Any], where: str) -> Param:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: categorical needs a non-empty list of choices.")
    for choice in choices:
        if not (choice is None or isinstance(choice, bool | int | float | str)):
            raise ConfigError(
                f"{where}: choices must be numbers, strings, booleans or null; got {choice!r}. "
                "For a kernel size give one number (3 means 3x3)."
            )
    extra = [k for k in ("low", "high", "log", "step") if k in spec]
    if extra:
        raise ConfigError(f"{where}: '{extra[0]}' does not apply to a categorical parameter.")
    return Param(path, "categorical", choices=tuple(choices))


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML reads 1e-3 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------- layer paths
def parse_layer_path(path: str) -> tuple[int, str, str]:
    """'model.layers.0.Conv2D.filters' -> (0, 'Conv2D', 'filters'); negative indices allowed."""
    parts = path[len(LAYER_PREFIX) :].split(".")
    if len(parts) != 3:
        raise ConfigError(
            f"'{path}': a layer argument path is model.layers.INDEX.LAYER.ARGUMENT, "
            "e.g. model.layers.0.Conv2D.filters."
        )
    index, layer, arg = parts
    try:
        number = int(index)
    except ValueError:
        raise ConfigError(f"'{path}': '{index}' is not a layer index (0, 1, ... or -1).") from None
    return number, layer, arg


def _layer_key(name: str) -> str:
    lower = name.lower()
    return _LAYER_ALIASES.get(lower, lower)


def set_layer_args(layers: Sequence[Any] | None, values: Mapping[str, Any]) -> list[Any]:
    """A copy of the layer list with each `model.layers.I.Layer.arg` set to its value."""
    if not layers:
        raise ConfigError(
            "Layer parameters (model.layers...) need the model's layer list; "
            "the base config has none resolved."
        )
    result = copy.deepcopy(list(layers))
    for path, value in values.items():
        index, name, arg = parse_layer_path(path)
        if not -len(result) <= index < len(result):
            raise ConfigError(
                f"'{path}': layer index {index} is out of range; the model has "
                f"{len(result)} layers (0..{len(result) - 1})."
            )
        layer = result[index]
        kind, args = _layer_parts(layer)
        if _layer_key(kind) != _layer_key(name):
            raise ConfigError(
                f"'{path}': layer {index} is {kind}, not {name}. Layers: "
                f"{', '.join(f'{i}:{_layer_parts(item)[0]}' for i, item in enumerate(result))}."
            )
        result[index] = {kind: {**args, arg: value}}
    return result


def _layer_parts(layer: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(layer, str):
        return layer, {}
    if isinstance(layer, Mapping) and len(layer) == 1:
        kind, args = next(iter(layer.items()))
        return str(kind), dict(args or {})
    raise ConfigError(f"Cannot read layer {layer!r}; expected {{Name: {{arguments}}}}.")


def read_path(config: RunConfig, path: str) -> Any:
    """The current value at a dotted path (config key or layer argument)."""
    if path.startswith(LAYER_PREFIX):
        index, name, arg = parse_layer_path(path)
        layers = list(config.model.layers or [])
        if not -len(layers) <= index < len(layers):
            raise ConfigError(f"'{path}': no layer {index}.")
        kind, args = _layer_parts(layers[index])
        if _layer_key(kind) != _layer_key(name) or arg not in args:
            raise ConfigError(f"'{path}': not set in the base config.")
        value = args[arg]
        if isinstance(value, list | tuple) and value and all(v == value[0] for v in value):
            return value[0]  # kernel_size [3, 3] is the point 3 of the space
        return value
    node: Any = config.to_dict()
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"'{path}': no such setting.")
        node = node[key]
    return node
