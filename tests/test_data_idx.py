"""IDX reading and the MNIST / Fashion-MNIST sources, on tiny IDX files the tests write."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data.idx import read_idx
from cnnlab.data.registry import get_source
from cnnlab.errors import DataError

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, type_code: int | None = None) -> bytes:
    """Serialise an array the way the MNIST files are: 00 00 type ndim, big-endian dims, data."""
    code = TYPE_CODES[array.dtype] if type_code is None else type_code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_idx_dataset(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> dict:
    """Four IDX files of 28x28 images whose first pixel encodes the image's index."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        labels = (np.arange(n) % 10).astype(np.uint8)
        image_name, label_name = FILES[split]
        suffix = ".gz" if gz else ""
        write(folder / (image_name + suffix), idx_bytes(images), gz)
        write(folder / (label_name + suffix), idx_bytes(labels), gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(root))
    return root


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_read_idx_round_trips_raw_and_gzip(tmp_path: Path, gz: bool, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write(tmp_path / "a-file-with-no-telling-name", idx_bytes(array), gz)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype)  # native byte order
    np.testing.assert_array_equal(got, array)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    raw_named_gz = write(tmp_path / "labels.gz", idx_bytes(array), gz=False)
    gz_named_raw = write(tmp_path / "labels-idx1-ubyte", idx_bytes(array), gz=True)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x08\x03\x00\x00" + b"\x00" * 20, "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00", "not an IDX file"),
    ],
)
def test_read_idx_rejects_bad_headers(
    tmp_path: Path, payload: bytes, message: str, gz: bool
) -> None:
    path = write(tmp_path / "bad", payload, gz)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_truncated_and_oversized_data(tmp_path: Path, gz: bool) -> None:
    full = idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))
    truncated = write(tmp_path / "short", full[:-7], gz)
    short_message = "truncated data" if gz else "data size mismatch"  # raw: known from file size
    with pytest.raises(DataError, match=short_message) as info:
        read_idx(truncated)
    assert str(truncated) in str(info.value)
    padded = write(tmp_path / "long", full + b"\x00", gz)
    with pytest.raises(DataError, match="data size mismatch"):
        read_idx(padded)


def test_read_idx_rejects_damaged_gzip_and_absent_file(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="damaged gzip stream"):
        read_idx(damaged)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "absent")


def test_read_idx_refuses_absurd_shape_without_allocating(tmp_path: Path) -> None:
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31)
    path = write(tmp_path / "huge", header + b"\x00" * 16, gz=True)
    with pytest.raises(DataError, match="impossible shape"):
        read_idx(path)


# ---------------------------------------------------------------- IDX sources


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loads_from_data_dir_itself(tmp_path: Path, cache: Path, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path / "here", gz=gz)
    source = get_source("mnist")
    assert source.missing_files(tmp_path / "here") == []
    assert source.available(tmp_path / "here")
    dataset = source.load(tmp_path / "here", download=False)
    assert dataset.name == "mnist"
    assert dataset.classes == tuple("0123456789")
    assert tuple(dataset.train.images.shape) == (12, 1, 28, 28)
    assert tuple(dataset.test.images.shape) == (6, 1, 28, 28)
    np.testing.assert_array_equal(dataset.train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(dataset.test.labels.numpy(), arrays["test"][1])
    assert dataset.notes["source"] == str(tmp_path / "here")


def test_fashion_mnist_loads_from_data_dir_subfolder_and_cache(tmp_path: Path, cache: Path) -> None:
    write_idx_dataset(tmp_path / "data" / "fashion-mnist", n_train=10)
    source = get_source("fashion-mnist")
    dataset = source.load(tmp_path / "data", download=False)
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[-1] == "Ankle boot"
    assert len(dataset.train) == 10
    write_idx_dataset(cache / "mnist", n_train=8)
    assert len(get_source("mnist").load(download=False).train) == 8


def test_mixed_raw_and_gzip_files_load(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "mixed"
    write_idx_dataset(folder, gz=True)
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw)
    assert len(get_source("mnist").load(folder, download=False).test) == 6


def _corrupt(folder: Path, name: str, array: np.ndarray, type_code: int | None = None) -> None:
    write(folder / f"{name}.gz", idx_bytes(array, type_code), gz=True)


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("train-labels-idx1-ubyte", np.zeros(11, np.uint8), "12 images but .* 11 labels"),
        ("train-labels-idx1-ubyte", np.full(12, 10, np.uint8), "label 10 outside the class range"),
        ("train-images-idx3-ubyte", np.zeros((12, 28, 27), np.uint8), "28x27, expected 28x28"),
        ("train-images-idx3-ubyte", np.zeros((12, 784), np.uint8), "3 dimensions"),
        ("train-images-idx3-ubyte", np.zeros((12, 28, 28), np.float32), "unsigned-byte"),
        ("t10k-labels-idx1-ubyte", np.zeros((6, 1), np.uint8), "1 dimension"),
    ],
)
def test_idx_source_validation_names_the_file(
    tmp_path: Path, cache: Path, name: str, array: np.ndarray, message: str
) -> None:
    write_idx_dataset(tmp_path)
    _corrupt(tmp_path, name, array)
    with pytest.raises(DataError, match=message) as info:
        get_source("mnist").load(tmp_path, download=False)
    assert name in str(info.value)


def test_offline_message_lists_missing_files_places_and_fix(tmp_path: Path, cache: Path) -> None:
    partial = tmp_path / "partial"
    write_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    source = get_source("mnist")
    assert source.missing_files(partial) == ["t10k-labels-idx1-ubyte.gz"]
    assert not source.available(partial)
    with pytest.raises(DataError) as info:
        source.load(partial, download=False)
    message = str(info.value)
    assert "missing t10k-labels-idx1-ubyte.gz" in message
    for place in (partial, partial / "mnist", cache / "mnist"):
        assert f"  {place} (" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz" in message
    assert f"into {cache / 'mnist'}" in message
    assert "download=False" in message


def test_fashion_mnist_offline_message_suggests_debian_package(tmp_path: Path, cache: Path) -> None:
    source = get_source("fashion-mnist")
    elsewhere = tmp_path / "no-debian-here"
    source = dataclasses.replace(
        source, storage=dataclasses.replace(source.storage, system_dirs=(elsewhere,))
    )
    assert len(source.missing_files(None)) == 4
    with pytest.raises(DataError) as info:
        source.load(download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert f"  {elsewhere} (no such folder)" in message
    assert "train-images-idx3-ubyte.gz" in message
