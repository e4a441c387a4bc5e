"""Shared fixtures: small deterministic data and a fast run config; caches kept inside tmp dirs."""

from __future__ import annotations

import sys

import pytest
import torch

from cnnlab import native
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


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (the native build of the C kernels then takes its paths)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)
    except OSError:
        return False


@pytest.fixture(scope="session")
def kernels_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache folder for the kernel builds of this session: each is compiled once."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(params=["native", "portable"])
def kernels(request, kernels_cache, monkeypatch: pytest.MonkeyPatch):
    """The compiled kernels; skips where none can be built. Every test runs twice on an AVX-512
    CPU: with the AVX-512 code paths and with the portable ones that other CPUs take (built with
    -mno-avx512f)."""
    portable = request.param == "portable"
    if portable and not has_avx512():
        pytest.skip("no AVX-512 here: the native build already takes the portable paths")
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(kernels_cache))
    if portable:
        monkeypatch.setenv("CNNLAB_CFLAGS", "-mno-avx512f")
    native.library.cache_clear()
    try:
        if native.library() is None:
            pytest.skip("no C compiler here: the kernels cannot be built")
        yield
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@pytest.fixture
def bf16_kernels(kernels):
    """The native build where it has the bf16 conv-pool kernel (AVX512-BF16)."""
    from cnnlab.models import fused

    if not fused.bf16_conv_pool_built():
        pytest.skip("this build has no bf16 conv-pool kernel (no AVX512-BF16): no bf16 chains")


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch):
    """Run the block without the kernel (the PyTorch modules), restoring the cache afterwards."""
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    native.library.cache_clear()
    yield
    monkeypatch.delenv("CNNLAB_NATIVE")
    native.library.cache_clear()


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
