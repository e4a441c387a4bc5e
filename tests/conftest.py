"""Shared fixtures: small deterministic data and a fast run config; caches kept inside tmp dirs."""

from __future__ import annotations

import sys

import pytest
import torch

from cnnlab.config import RunConfig
from cnnlab.data.types import ImageSet


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests never read or write the user's ~/.cache/cnnlab."""
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_pyplot_figure_left_open():
    """Every figure cnnlab draws is closed again (a tuning study draws its plots after each
    trial for hours); a test that leaves one open fails here, not in whichever test runs next."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and pyplot.get_fignums():
        left = pyplot.get_fignums()
        pyplot.close("all")
        pytest.fail(f"pyplot figures {left} were left open; close them with plt.close(fig)")


def corner_squares(n: int, size: int = 12, seed: int = 0) -> ImageSet:
    """A 4-class set: a bright square in one of the four corners on a noisy background."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        top, left = (label // 2) * half, (label % 2) * half
        images[i, :, top + 1 : top + half - 1, left + 1 : left + half - 1] = 230
    return ImageSet(images, labels.long())


@pytest.fixture
def squares() -> ImageSet:
    return corner_squares(64)


@pytest.fixture
def digits_config(tmp_path) -> RunConfig:
    """Two quick epochs of the fast net on scikit-learn's digits, run folders under tmp_path."""
    return RunConfig.from_dict(
        {
            "project": str(tmp_path / "runs"),
            "data": {"dataset": "digits", "val_split": 0.2},
            "model": {"preset": "fast"},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
        }
    )
