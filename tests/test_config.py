from pathlib import Path

import pytest

from cnnlab.config import RunConfig, load_config
from cnnlab.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path: Path) -> None:
    config = RunConfig()
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_nested_values_are_read_and_ints_become_floats() -> None:
    config = RunConfig.from_dict(
        {"train": {"lr": 1, "schedule": {"name": "exponential", "decay_rate": "0.9"}}}
    )
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.schedule.decay_rate == 0.9


def test_unknown_key_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch'.*Did you mean 'epochs'"):
        RunConfig.from_dict({"train": {"epoch": 3}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": "ten"}}, r"train.epochs must be an integer, got 'ten'"),
        ({"train": {"epochs": 0}}, r"train.epochs must be positive.*--epochs"),
        ({"train": {"batch_size": -4}}, r"batch_size must be positive"),
        ({"train": {"optimizer": "adamm"}}, r"Did you mean 'adam'"),
        ({"train": {"early_stopping": {"enabled": "yes"}}}, r"must be true or false"),
        ({"data": {"val_split": 1.5}}, r"val_split must be in \[0, 1\)"),
        ({"data": {"augment": {"erase": 2}}}, r"erase is a probability in \[0, 1\].*0.5"),
        ({"data": []}, r"expected a mapping"),
        ({"name": "a/b"}, r"plain folder name"),
    ],
)
def test_bad_values_are_rejected_with_the_setting_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)


def test_overrides_use_dotted_keys() -> None:
    config = RunConfig().with_overrides({"train.lr": 0.05, "data.augment.flip": True})
    assert config.train.lr == 0.05 and config.data.augment.flip is True


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    informational = tmp_path / "info.yaml"
    informational.write_text("environment: {torch: x}\ntrain: {epochs: 3}\n")
    assert load_config(informational).train.epochs == 3


def test_augmentation_flags_reach_the_config() -> None:
    from cnnlab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--augment", "--erase", "0.5"])
    augment = config_from_args(args).data.augment
    assert (augment.shift, augment.flip, augment.erase) == (0.1, True, 0.5)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_repeated_set_options_all_apply(command: str) -> None:
    from cnnlab.cli import build_parser, parse_set

    argv = [command, "--set", "train.lr=0.01", "train.epochs=3", "--set", "data.val_split=0"]
    args = build_parser().parse_args(argv)
    assert parse_set(args.set) == {"train.lr": 0.01, "train.epochs": 3, "data.val_split": 0}


def test_repeated_set_options_reach_the_train_config() -> None:
    from cnnlab.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--set", "train.lr=0.01", "--set", "seed=7"])
    config = config_from_args(args)
    assert (config.train.lr, config.seed) == (0.01, 7)
