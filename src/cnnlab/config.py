"""Run configuration: frozen dataclasses for data, model and training settings, validated, with a YAML round trip."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cnnlab.errors import ConfigError, did_you_mean

OPTIMIZERS = ("adam", "adamw", "adamax", "sgd", "rmsprop")
SCHEDULES = ("constant", "exponential", "cosine", "onecycle", "plateau")
MONITORS = ("val_loss", "val_accuracy", "val_macro_f1", "val_balanced_accuracy")
RESIZE_MODES = ("stretch", "crop", "pad")
COLOR_MODES = ("grayscale", "rgb")
BALANCE_MODES = ("none", "weights", "sampler")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_PRESET = "fast"  # the model trained when a config names neither a preset nor layers


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentation; off by default, like a plain Keras tutorial."""

    shift: float = 0.0  # max translation as a fraction of width/height (Keras width_shift_range)
    flip: bool = False  # random horizontal flip
    erase: float = 0.0  # probability of zeroing a random rectangle of each image (random erasing)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and preprocessed."""

    dataset: str = "fashion-mnist"  # a registry name; ignored when `path` is set
    path: str | None = None  # a folder of images, one sub-folder per class
    data_dir: str | None = None  # where dataset files are looked for first
    val_split: float | None = 0.1  # fraction of train held out for validation
    val_size: int | None = None  # or an absolute count (overrides val_split)
    test_split: float = 0.1  # folder datasets without a test/ folder only
    standardize: bool = False  # per-channel mean/std after rescaling to [0, 1]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: list[int] | None = None  # folder datasets: [H, W]
    color_mode: str | None = None  # folder datasets: grayscale | rgb
    resize: str = "stretch"  # folder datasets: stretch | crop | pad
    splits_file: str | None = None  # folder datasets: reuse a splits.csv
    limit: int | None = None  # use only the first N training images (quick experiments)


@dataclass(frozen=True)
class ModelConfig:
    """A preset name, or an explicit Keras-style layer list (which wins when both are set)."""

    preset: str | None = None  # None and no layers: the default preset, DEFAULT_PRESET
    layers: list[Any] | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; every schedule is a pure function of the step (plateau adds a scale)."""

    name: str = "constant"
    decay_rate: float = 0.96  # exponential: lr * decay_rate ** (step / decay_steps)
    decay_steps: int = 1000  # exponential: steps per decay period
    staircase: bool = False  # exponential: decay in whole periods
    warmup: float = 0.25  # onecycle: fraction of training spent warming up
    min_lr: float = 0.0  # cosine / onecycle floor, plateau floor
    factor: float = 0.5  # plateau: multiply lr by this when the monitor stalls
    patience: int = 2  # plateau: epochs without improvement before reducing


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the monitored validation metric stops improving (Keras EarlyStopping)."""

    enabled: bool = True
    patience: int = 5  # epochs without improvement
    min_delta: float = 0.0  # smallest change that counts as improvement
    restore_best: bool = True  # end with the best weights, not the last


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, loss, schedule and loop settings."""

    # The default recipe (benchmarks/, README "Performance"): the `fast` preset, AdamW with a
    # one-cycle schedule, label smoothing, batch 128 (faster per image than 256-512 on CPU).
    # With fast's whitened first layer a high peak lr pays: on Fashion-MNIST (seed 0, 6 epochs)
    # lr 3e-3 / 5e-3 / 8e-3 / 1.2e-2 gave 92.58 / 93.04 / 93.37 / 93.37%, and 5 epochs at 8e-3
    # 93.38%.
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 8e-3  # peak learning rate (one-cycle warms up to it from lr / 25)
    momentum: float = 0.9  # sgd / rmsprop
    nesterov: bool = False  # sgd
    weight_decay: float = 0.05  # decoupled (AdamW): each step shrinks weights by lr * weight_decay
    label_smoothing: float = 0.1
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="onecycle"))
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    monitor: str = "val_loss"  # metric for early stopping, best checkpoint, plateau
    balance: str = "none"  # none | weights | sampler, for skewed classes
    checkpoint_every_steps: int = 0  # also write last.ckpt every N steps (0: only per epoch)
    checkpoint_every_minutes: float = 0.0  # also write last.ckpt every N minutes (0: off)
    eval_batch_size: int = 256  # 1.2-1.9x more images/s than 1024 on CPU (cache-sized batches)
    tta_flip: bool = False  # average predictions over the image and its mirror at evaluation
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # CPU threads (0: the cores other processes leave free, checked 2x a second)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays off on long GPU runs)
    amp: bool = True  # bf16 autocast on CUDA and bf16 CPUs (AMX, AVX512-BF16): train and eval


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to repeat a run."""

    name: str = "train"  # run folder name; auto-numbered: train, train-2, ...
    project: str = "runs"  # parent folder of run folders
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "config") -> RunConfig:
        """Build and validate; errors name the source (a file) and the dotted setting."""
        try:
            config = _build(cls, raw, "")
            validate(config)
        except ConfigError as exc:
            if source in ("config", "overrides"):
                raise
            raise ConfigError(f"{source}: {exc}") from exc
        return config

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """Return a copy with dotted keys replaced, e.g. {"train.lr": 0.01}; validated."""
        merged = self.to_dict()
        for dotted, value in overrides.items():
            set_dotted(merged, dotted, value)
        return RunConfig.from_dict(merged, source="overrides")


# Keys a saved config.yaml carries for people to read; they are not settings.
INFORMATIONAL_KEYS = ("environment",)

T = TypeVar("T")


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree["a"]["b"] = value for dotted == "a.b", creating dicts as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def load_config(path: str | Path) -> RunConfig:
    """Read a run config from YAML, with errors that name the file and the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist. Check the path.")
    if path.is_dir():
        hint = path / "config.yaml"
        extra = f" Did you mean {hint}?" if hint.exists() else ""
        raise ConfigError(f"{path} is a folder, not a YAML config file.{extra}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}. Fix the syntax and retry.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a UTF-8 text file; a config must be YAML text.") from exc
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k not in INFORMATIONAL_KEYS}
    return RunConfig.from_dict(raw, source=str(path))


def _build(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where or 'the config'}: expected a mapping of settings (key: value lines), "
            f"got {type(raw).__name__} {_short(raw)}."
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            section = f" in {where}" if where else ""
            raise ConfigError(
                f"unknown setting '{key}'{section}.{did_you_mean(str(key), known)} "
                f"Allowed: {', '.join(sorted(known))}."
            )
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        non_none = [o for o in options if o is not type(None)]
        return _coerce(non_none[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value


def _choice(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{where} must be one of {', '.join(allowed)}; got '{value}'.{did_you_mean(value, allowed)}"
        )


def _positive(value: float, where: str, flag: str) -> None:
    if value <= 0:
        raise ConfigError(f"{where} must be positive, got {value}. Set {flag} to a value above 0.")


def validate(config: RunConfig) -> None:
    """Check value ranges and choices; raises ConfigError naming the setting and the fix."""
    d, t, s = config.data, config.train, config.train.schedule
    _positive(t.epochs, "train.epochs", "--epochs")
    _positive(t.batch_size, "train.batch_size", "--batch-size")
    _positive(t.eval_batch_size, "train.eval_batch_size", "train.eval_batch_size")
    _positive(t.lr, "train.lr", "--lr")
    _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    _choice(s.name, SCHEDULES, "train.schedule.name")
    _choice(t.monitor, MONITORS, "train.monitor")
    _choice(t.balance, BALANCE_MODES, "train.balance")
    _choice(t.device, DEVICES, "train.device")
    _choice(d.resize, RESIZE_MODES, "data.resize")
    if d.color_mode is not None:
        _choice(d.color_mode, COLOR_MODES, "data.color_mode")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}.")
    if t.weight_decay < 0 or t.momentum < 0:
        raise ConfigError("train.weight_decay and train.momentum must not be negative.")
    if t.threads < 0:
        raise ConfigError(f"train.threads must be 0 (auto) or positive, got {t.threads}.")
    if d.val_split is not None and not 0.0 <= d.val_split < 1.0:
        raise ConfigError(
            f"data.val_split must be in [0, 1), got {d.val_split}. Try --val-split 0.1."
        )
    if d.val_size is not None and d.val_size < 1:
        raise ConfigError(f"data.val_size must be at least 1, got {d.val_size}.")
    if not 0.0 <= d.test_split < 1.0:
        raise ConfigError(f"data.test_split must be in [0, 1), got {d.test_split}.")
    if d.limit is not None and d.limit < 2:
        raise ConfigError(f"data.limit must be at least 2 images, got {d.limit}.")
    if not 0.0 <= d.augment.shift < 0.5:
        raise ConfigError(f"data.augment.shift must be in [0, 0.5), got {d.augment.shift}.")
    if not 0.0 <= d.augment.erase <= 1.0:
        raise ConfigError(
            f"data.augment.erase is a probability in [0, 1], got {d.augment.erase}. Try 0.5."
        )
    if d.image_size is not None and (
        len(d.image_size) != 2 or not all(isinstance(v, int) and v > 0 for v in d.image_size)
    ):
        raise ConfigError(f"data.image_size must be [height, width], got {d.image_size}.")
    _positive(s.decay_steps, "train.schedule.decay_steps", "--decay-steps")
    _positive(s.decay_rate, "train.schedule.decay_rate", "--decay-rate")
    if not 0.0 < s.factor < 1.0:
        raise ConfigError(f"train.schedule.factor must be in (0, 1), got {s.factor}.")
    if not 0.0 <= s.warmup < 1.0:
        raise ConfigError(f"train.schedule.warmup must be in [0, 1), got {s.warmup}.")
    if t.early_stopping.patience < 0 or s.patience < 0:
        raise ConfigError("patience values must be 0 or more epochs.")
    if t.checkpoint_every_steps < 0 or t.checkpoint_every_minutes < 0:
        raise ConfigError("checkpoint intervals must be 0 (off) or positive.")
    if not config.name or "/" in config.name or config.name in (".", ".."):
        raise ConfigError(f"run name '{config.name}' must be a plain folder name.")


__all__ = [
    "AugmentConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "replace",
    "set_dotted",
]
