"""Verified, atomic downloads over file:// URLs, and a source filling its cache from mirrors."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data import download
from cnnlab.data.download import cache_root, fetch
from cnnlab.data.registry import RemoteFile, get_source
from cnnlab.errors import DataError


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, bytes]:
    payload = bytes(range(256)) * 40
    source = tmp_path / "server" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(payload)
    return source, payload


def test_fetch_file_url_verifies_and_places_file(tmp_path: Path, published) -> None:
    source, payload = published
    dest = tmp_path / "cache" / "sub" / "file.bin"
    assert fetch(source.as_uri(), dest, sha256(payload).upper()) == dest
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temp file left


def test_fetch_wrong_checksum_leaves_nothing_behind(tmp_path: Path, published) -> None:
    source, payload = published
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(DataError, match="checksum mismatch") as info:
        fetch(source.as_uri(), dest, "0" * 64)
    assert sha256(payload) in str(info.value)  # says what it got
    assert source.as_uri() in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_fetch_wrong_checksum_keeps_a_previous_good_file(tmp_path: Path, published) -> None:
    source, _ = published
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(DataError):
        fetch(source.as_uri(), dest, "1" * 64)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "server"]


def test_fetch_unreachable_url_is_a_data_error(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x.gz"
    with pytest.raises(DataError, match="could not download"):
        fetch((tmp_path / "absent.gz").as_uri(), dest, "2" * 64)
    assert list(dest.parent.iterdir()) == []


def test_fetch_rejects_malformed_checksum(tmp_path: Path, published) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch(published[0].as_uri(), tmp_path / "x", "abc")


def test_fetch_logs_progress_when_not_a_terminal(
    tmp_path: Path, published, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, payload = published
    monkeypatch.setattr(download, "CHUNK_BYTES", 1024)  # 10 chunks: 25/50/75% logged once each
    caplog.set_level(logging.INFO, logger="cnnlab.data.download")
    fetch(source.as_uri(), tmp_path / "f.bin", sha256(payload))
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith(f"Downloading {source.as_uri()}")
    assert [m.split(" (")[0] for m in messages if "%" in m] == [
        "f.bin: 25%",
        "f.bin: 50%",
        "f.bin: 75%",
    ]
    assert "f.bin: 10240 bytes received" in messages
    assert messages[-1].endswith("(SHA-256 verified)")


def test_fetch_draws_a_progress_bar_on_a_terminal(
    tmp_path: Path, published, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    source, payload = published
    monkeypatch.setattr(download, "CHUNK_BYTES", 1024)
    fetch(source.as_uri(), tmp_path / "f.bin", sha256(payload))
    assert "f.bin" in terminal.getvalue() and "100%" in terminal.getvalue()


def test_cache_root_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("CNNLAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "cnnlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "cnnlab"


# ---------------------------------------------------------------- a source downloading its files


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.tobytes())


@pytest.fixture
def mirror(tmp_path: Path) -> dict[str, bytes]:
    """A local 'server' folder holding tiny MNIST files under their published names."""
    rng = np.random.default_rng(1)
    files = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(10, dtype=np.uint8)),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte.gz": _idx(np.array([1, 2, 3, 4], dtype=np.uint8)),
    }
    for name, payload in files.items():
        (tmp_path / "mirror").mkdir(exist_ok=True)
        (tmp_path / "mirror" / name).write_bytes(payload)
    return files


def _mnist_served_from(urls_for, files: dict[str, bytes]):
    source = get_source("mnist")
    remote = tuple(RemoteFile(n, sha256(p), urls_for(n)) for n, p in files.items())
    return dataclasses.replace(source, storage=dataclasses.replace(source.storage, remote=remote))


def test_source_downloads_missing_files_into_cache(
    tmp_path: Path, mirror: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    source = _mnist_served_from(lambda n: ((tmp_path / "mirror" / n).as_uri(),), mirror)
    assert not source.available(None)
    dataset = source.load(download=True)
    assert len(dataset.train) == 10 and dataset.test.labels.tolist() == [1, 2, 3, 4]
    cached = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(mirror)
    assert source.available(None)
    assert dataset.notes["source"] == str(cached)


def test_source_falls_back_to_next_mirror(
    tmp_path: Path, mirror: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "bad").mkdir()
    for name in mirror:
        (tmp_path / "bad" / name).write_bytes(b"tampered")
    urls = lambda n: ((tmp_path / "bad" / n).as_uri(), (tmp_path / "mirror" / n).as_uri())  # noqa: E731
    dataset = _mnist_served_from(urls, mirror).load()
    assert len(dataset.test) == 4
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache" / "mnist").iterdir())


def test_failed_download_reports_reason_and_what_is_missing(
    tmp_path: Path, mirror: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "mirror" / "t10k-labels-idx1-ubyte.gz").unlink()
    source = _mnist_served_from(lambda n: ((tmp_path / "mirror" / n).as_uri(),), mirror)
    with pytest.raises(DataError) as info:
        source.load()
    message = str(info.value)
    assert "missing t10k-labels-idx1-ubyte.gz." in message
    assert "Download failed: could not download" in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    # the three files that did arrive stay cached, verified, for the next attempt
    assert len(list((tmp_path / "cache" / "mnist").iterdir())) == 3
