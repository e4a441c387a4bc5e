"""CIFAR batches through the restricted unpickler, from folders and tar.gz archives the tests write."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data.cifar import CIFAR10_LAYOUT, CIFAR100_LAYOUT, CifarLayout, load_cifar_batch
from cnnlab.data.registry import CIFAR10_CLASSES, CIFAR100_CLASSES, get_source
from cnnlab.errors import DataError

PER_BATCH = 3  # images per batch file


def batch_dict(layout: CifarLayout, n: int, offset: int, num_classes: int) -> dict:
    """A batch with the real key layout (bytes keys, as the Python 2 originals have)."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(offset, offset + n)  # red channel, top-left pixel: image number
    data[:, 1024] = 7  # green plane starts at byte 1024
    batch = {
        b"batch_label": b"training batch",
        layout.label_key.encode(): [int((offset + i) % num_classes) for i in range(n)],
        b"data": data,
        b"filenames": [f"img_{offset + i}.png".encode() for i in range(n)],
    }
    if layout is CIFAR100_LAYOUT:
        batch[b"coarse_labels"] = [0] * n
    return batch


def meta_dict(layout: CifarLayout, classes: tuple[str, ...]) -> dict:
    meta = {layout.names_key.encode(): [c.encode() for c in classes], b"num_vis": 3072}
    if layout is CIFAR100_LAYOUT:
        meta[b"coarse_label_names"] = [b"aquatic_mammals"]
    return meta


def cifar_files(layout: CifarLayout, classes: tuple[str, ...], protocol: int = 2) -> dict:
    """File name -> pickled bytes for every file of a tiny CIFAR variant."""
    files, offset = {}, 0
    for name in (*layout.train_files, *layout.test_files):
        files[name] = pickle.dumps(batch_dict(layout, PER_BATCH, offset, len(classes)), protocol)
        offset += PER_BATCH
    files[layout.meta_file] = pickle.dumps(meta_dict(layout, classes), protocol)
    return files


def write_folder(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return folder


def write_tar(path: Path, layout: CifarLayout, files: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{layout.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(root))
    return root


VARIANTS = [
    ("cifar10", CIFAR10_LAYOUT, CIFAR10_CLASSES),
    ("cifar100", CIFAR100_LAYOUT, CIFAR100_CLASSES),
]


@pytest.mark.parametrize("form", ["tar", "folder", "batches-dir"])
@pytest.mark.parametrize(("name", "layout", "classes"), VARIANTS)
def test_cifar_loads_from_archive_or_folder(
    tmp_path: Path, cache: Path, name: str, layout: CifarLayout, classes: tuple, form: str
) -> None:
    files = cifar_files(layout, classes)
    data_dir = tmp_path / "data"
    if form == "tar":
        write_tar(data_dir / layout.archive, layout, files)
    elif form == "folder":
        write_folder(data_dir / layout.folder, files)
    else:  # data_dir is the extracted batches folder itself
        data_dir = write_folder(tmp_path / layout.folder, files)
    source = get_source(name)
    assert source.missing_files(data_dir) == []
    dataset = source.load(data_dir, download=False)
    n_train = PER_BATCH * len(layout.train_files)
    assert tuple(dataset.train.images.shape) == (n_train, 3, 32, 32)
    assert tuple(dataset.test.images.shape) == (PER_BATCH, 3, 32, 32)
    assert dataset.classes == classes
    # rows are R, G, B planes: the marker bytes land in channel 0 / channel 1 at (0, 0)
    assert dataset.train.images[:, 0, 0, 0].tolist() == list(range(n_train))
    assert bool((dataset.train.images[:, 1, 0, 0] == 7).all())
    assert dataset.train.labels.tolist() == [i % len(classes) for i in range(n_train)]
    assert dataset.test.labels.tolist() == [(n_train + i) % len(classes) for i in range(PER_BATCH)]


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_batches_with_str_keys_and_any_protocol_are_read(protocol: int) -> None:
    batch = {"data": np.ones((2, 3072), np.uint8), "labels": np.array([1, 2]), "n": np.int64(5)}
    got = load_cifar_batch(io.BytesIO(pickle.dumps(batch, protocol)), "mem")
    assert set(got) == {"data", "labels", "n"}
    np.testing.assert_array_equal(got["data"], batch["data"])
    assert got["n"] == 5


class WritesMarker:
    """Unpickling this calls exec, which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload_class", [WritesMarker, RunsShell])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, payload_class: type) -> None:
    marker = tmp_path / "marker"
    evil = pickle.dumps({b"data": payload_class(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        load_cifar_batch(io.BytesIO(evil), "evil_batch")
    assert "evil_batch" in str(info.value) and "may be malicious" in str(info.value)
    assert not marker.exists()


def test_malicious_batch_inside_an_archive_names_the_member(tmp_path: Path, cache: Path) -> None:
    marker = tmp_path / "marker"
    files = cifar_files(CIFAR10_LAYOUT, CIFAR10_CLASSES)
    files["data_batch_3"] = pickle.dumps({b"data": WritesMarker(marker)}, protocol=2)
    write_tar(tmp_path / CIFAR10_LAYOUT.archive, CIFAR10_LAYOUT, files)
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.exec from .*data_batch_3"):
        get_source("cifar10").load(tmp_path, download=False)
    assert not marker.exists()


def test_codecs_encode_is_limited_to_latin1() -> None:
    sneaky = b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00base64\x86R."
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_cifar_batch(io.BytesIO(sneaky), "sneaky")


def test_garbage_and_non_dict_pickles_are_data_errors() -> None:
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_cifar_batch(io.BytesIO(b"\x00not a pickle"), "garbage")
    with pytest.raises(DataError, match="expected a dict"):
        load_cifar_batch(io.BytesIO(pickle.dumps([1, 2])), "a_list")


def _broken(key: str, value: object) -> dict:
    batch = batch_dict(CIFAR10_LAYOUT, PER_BATCH, 0, 10)
    if value is None:
        del batch[key.encode()]
    else:
        batch[key.encode()] = value
    return batch


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_broken("data", None), "missing key 'data'"),
        (_broken("labels", None), "missing key 'labels'"),
        (_broken("data", np.zeros((PER_BATCH, 3000), np.uint8)), "wrong data length"),
        (_broken("data", np.zeros((PER_BATCH, 3072), np.float32)), "must be a uint8"),
        (_broken("labels", [0, 1]), "3 images but 2 labels"),
        (_broken("labels", [0, 1, 10]), "label 10 outside the class range"),
        (_broken("labels", [0, -1, 2]), "label -1 outside the class range"),
        (_broken("labels", ["a", "b", "c"]), "flat list of integers"),
    ],
)
def test_cifar_validation_names_file_and_problem(
    tmp_path: Path, cache: Path, batch: dict, message: str
) -> None:
    files = cifar_files(CIFAR10_LAYOUT, CIFAR10_CLASSES)
    files["data_batch_2"] = pickle.dumps(batch, protocol=2)
    folder = write_folder(tmp_path / CIFAR10_LAYOUT.folder, files)
    with pytest.raises(DataError, match=message) as info:
        get_source("cifar10").load(tmp_path, download=False)
    assert str(folder / "data_batch_2") in str(info.value)


def test_meta_with_wrong_class_count_is_rejected(tmp_path: Path, cache: Path) -> None:
    files = cifar_files(CIFAR10_LAYOUT, CIFAR10_CLASSES)
    files["batches.meta"] = pickle.dumps(meta_dict(CIFAR10_LAYOUT, CIFAR10_CLASSES[:9]), 2)
    write_tar(tmp_path / CIFAR10_LAYOUT.archive, CIFAR10_LAYOUT, files)
    with pytest.raises(DataError, match=r"batches\.meta: 'label_names' must list 10 class names"):
        get_source("cifar10").load(tmp_path, download=False)


def test_archive_lacking_a_member_and_damaged_archive(tmp_path: Path, cache: Path) -> None:
    files = cifar_files(CIFAR10_LAYOUT, CIFAR10_CLASSES)
    del files["data_batch_4"]
    archive = write_tar(tmp_path / "a" / CIFAR10_LAYOUT.archive, CIFAR10_LAYOUT, files)
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_4"):
        get_source("cifar10").load(archive.parent, download=False)
    damaged = tmp_path / "b" / CIFAR10_LAYOUT.archive
    damaged.parent.mkdir()
    damaged.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="damaged or unreadable archive") as info:
        get_source("cifar10").load(damaged.parent, download=False)
    assert str(damaged) in str(info.value)


def test_incomplete_extracted_folder_reports_missing_batches(tmp_path: Path, cache: Path) -> None:
    files = cifar_files(CIFAR100_LAYOUT, CIFAR100_CLASSES)
    del files["test"]
    write_folder(tmp_path / CIFAR100_LAYOUT.folder, files)
    source = get_source("cifar100")
    assert source.missing_files(tmp_path) == ["cifar-100-python/test"]
    with pytest.raises(DataError) as info:
        source.load(tmp_path, download=False)
    message = str(info.value)
    assert "missing cifar-100-python/test" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message


# ---------------------------------------------------------------- the Python 2 byte layout


def _py2_str(raw: bytes) -> bytes:
    """SHORT_BINSTRING / BINSTRING: how Python 2 pickles `str`, read back as bytes."""
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<I", len(raw)) + raw


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled opcode by opcode as Python 2 + numpy wrote the original CIFAR files."""
    n, row = data.shape
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
        b"(K\x03" + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + b"K\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"K\x00\x85" + _py2_str(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        b"(K\x01"
        + _py2_int(n)
        + _py2_int(row)
        + b"\x86"
        + dtype  # state: version, shape, dtype
        + b"\x89"
        + _py2_str(data.tobytes())
        + b"tb"  # not Fortran-ordered, raw bytes; BUILD
    )
    label_list = b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
    return b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + label_list + b"u."


def test_python2_pickle_layout_is_read() -> None:
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    batch = load_cifar_batch(io.BytesIO(py2_batch_pickle(data, [3, 9])), "py2_batch")
    assert batch["labels"] == [3, 9]
    assert batch["data"].dtype == np.uint8
    np.testing.assert_array_equal(batch["data"], data)
