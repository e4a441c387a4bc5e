"""The exceptions cnnlab raises for bad input: each carries a message that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CnnlabError(Exception):
    """Base of every error caused by the user's input or environment (the CLI exits with code 2)."""


class ConfigError(CnnlabError):
    """A run configuration, a YAML file or a command-line value is invalid."""


class DataError(CnnlabError):
    """A dataset is missing, malformed or unreadable."""


class ModelSpecError(CnnlabError):
    """A model spec names an unknown layer or argument, or does not fit the data."""


class CheckpointError(CnnlabError):
    """A run folder, checkpoint or weights file is missing, corrupt or unsafe."""


class WriteError(CnnlabError):
    """An output file cannot be written (read-only folder, disk full, missing folder)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> str:
    """Message for an unknown registry name: what was received, the nearest match, what is allowed."""
    allowed = sorted(choices)
    return f"Unknown {kind} '{name}'.{did_you_mean(name, allowed)} Available: {', '.join(allowed)}."
