"""The dataset registry: names, facts of every source, digits, and the real Fashion-MNIST."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets  # imported here so its ~1 s import is not charged to one test

from cnnlab.data import DATASETS, DatasetSource, get_source, list_datasets, load_dataset
from cnnlab.data.registry import DEBIAN_FASHION_MNIST_DIR
from cnnlab.errors import DataError

DEBIAN_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_lists_the_builtin_sources_sorted() -> None:
    names = [source.name for source in list_datasets()]
    assert names == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]
    assert sorted(DATASETS) == names


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_source_states_consistent_facts(name: str, tmp_path: Path) -> None:
    source = DATASETS[name]
    assert isinstance(source, DatasetSource) and source.name == name
    height, width, channels = source.image_shape
    assert height == width and channels in (1, 3)
    assert len(set(source.classes)) == len(source.classes) in (10, 100)
    assert source.num_train > source.num_test > 0
    assert source.description
    missing = source.missing_files(tmp_path / "empty")
    assert isinstance(missing, list) and source.available(tmp_path / "empty") == (not missing)
    for remote in source.storage.remote:
        assert len(remote.sha256) == 64 and all(url.endswith(remote.name) for url in remote.urls)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_sources_without_local_files_refuse_offline(name: str, tmp_path: Path) -> None:
    source = get_source(name)
    assert not source.available(tmp_path)
    with pytest.raises(DataError, match=f"Dataset '{name}' was not found"):
        source.load(tmp_path, download=False)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(DataError) as info:
        get_source("fashon-mnist")
    assert str(info.value) == (
        "Unknown dataset 'fashon-mnist'. Did you mean 'fashion-mnist'? "
        "Available: cifar10, cifar100, digits, fashion-mnist, mnist."
    )
    with pytest.raises(DataError, match=r"Unknown dataset 'imagenet'\. Available: cifar10"):
        load_dataset("imagenet")


def test_names_forgive_case_and_underscores() -> None:
    assert get_source("Fashion_MNIST").name == "fashion-mnist"
    assert get_source(" CIFAR10 ").name == "cifar10"


def test_digits_shapes_ranges_classes_and_fixed_split() -> None:
    dataset = load_dataset("digits", download=False)
    source = get_source("digits")
    assert dataset.classes == tuple(str(d) for d in range(10))
    assert tuple(dataset.train.images.shape) == (source.num_train, 1, 8, 8) == (1437, 1, 8, 8)
    assert tuple(dataset.test.images.shape) == (source.num_test, 1, 8, 8) == (360, 1, 8, 8)
    assert dataset.val is None
    assert int(dataset.train.images.min()) == 0 and int(dataset.train.images.max()) == 255
    assert "stratified 20%" in source.description and "seed 0" in source.description
    # every pixel is round(v * 255 / 16) of scikit-learn's 0..16 values, none lost or duplicated
    raw = sklearn.datasets.load_digits()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)
    images = np.concatenate([dataset.train.images.numpy(), dataset.test.images.numpy()])[:, 0]
    labels = np.concatenate([dataset.train.labels.numpy(), dataset.test.labels.numpy()])
    order = np.lexsort(images.reshape(len(images), -1).T)
    want = np.lexsort(expected.reshape(len(expected), -1).T)
    np.testing.assert_array_equal(images[order], expected[want])
    np.testing.assert_array_equal(labels[order], raw.target[want])
    # the test split is stratified (each class 35 to 37 of 360) and identical on every load
    assert set(np.bincount(dataset.test.labels.numpy()).tolist()) <= {35, 36, 37}
    again = load_dataset("digits")
    assert bool((again.test.images == dataset.test.images).all())


def test_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    if not all((DEBIAN_FASHION_MNIST_DIR / name).is_file() for name in DEBIAN_SHA256):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for name, digest in DEBIAN_SHA256.items():
        assert hashlib.sha256((DEBIAN_FASHION_MNIST_DIR / name).read_bytes()).hexdigest() == digest
    source = get_source("fashion-mnist")
    assert source.available(None) and source.missing_files(None) == []
    dataset = source.load(download=False)
    assert tuple(dataset.train.images.shape) == (60_000, 1, 28, 28)
    assert tuple(dataset.test.images.shape) == (10_000, 1, 28, 28)
    assert dataset.train.labels.bincount().tolist() == [6000] * 10
    assert dataset.test.labels.bincount().tolist() == [1000] * 10
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"
    assert dataset.notes["source"] == str(DEBIAN_FASHION_MNIST_DIR)
