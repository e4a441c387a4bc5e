"""CIFAR-10/100 python batches read through a restricted unpickler, from the tar.gz or its folder."""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cnnlab.errors import DataError

CIFAR_IMAGE_SHAPE = (3, 32, 32)  # (C, H, W); a row of b"data" is R plane, G plane, B plane
_ROW_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where a CIFAR variant keeps its batches and which keys hold labels and class names."""

    archive: str  # the tar.gz as published
    folder: str  # the folder inside the archive (and after extraction)
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10_LAYOUT = CifarLayout(
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
)
CIFAR100_LAYOUT = CifarLayout(
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
)


@dataclass(frozen=True)
class CifarArrays:
    """Decoded CIFAR splits as numpy arrays."""

    train_images: np.ndarray  # (N, 3, 32, 32) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, 3, 32, 32) uint8
    test_labels: np.ndarray  # (M,) int64
    classes: tuple[str, ...]


# ---------------------------------------------------------------- restricted unpickling


def _codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What protocol-2 pickles written by Python 3 use for bytes; only latin-1 is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1", errors)


def _numpy_attr(name: str, *modules: str) -> Any:
    """The first of numpy's `modules` (numpy 2 name first) that imports and has `name`."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy provides no {name} in {modules}")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what numpy arrays need, and plain containers."""
    reconstruct = _numpy_attr("_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray")
    scalar = _numpy_attr("scalar", "numpy._core.multiarray", "numpy.core.multiarray")
    frombuffer = _numpy_attr("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
        for kind in (set, frozenset, bytearray, complex):
            allowed[(module, kind.__name__)] = kind
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays, lists, dicts, strings and numbers, and nothing else.

    CIFAR batches are Python 2 pickles, hence encoding="bytes"; any other global (a
    function, a class) raises DataError before it can be called.
    """

    def __init__(self, file: IO[bytes], source_name: str) -> None:
        super().__init__(file, encoding="bytes")
        self.source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        target = _allowed_globals().get((module, name))
        if target is None:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.source_name}: CIFAR batches "
                "hold only plain data; the file may be malicious"
            )
        return target


def load_cifar_batch(fileobj: IO[bytes], source_name: str) -> dict[str, Any]:
    """Unpickle one CIFAR batch safely; keys come back as str whether stored as bytes or str."""
    try:
        obj = RestrictedUnpickler(fileobj, source_name).load()
    except DataError:
        raise
    except Exception as exc:  # a restricted pickle can only fail by being malformed
        raise DataError(
            f"{source_name}: not a readable CIFAR batch ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{source_name}: expected a dict, found {type(obj).__name__}.")
    batch: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if not isinstance(key, str):
            raise DataError(f"{source_name}: unexpected key {key!r} (CIFAR keys are strings).")
        batch[key] = value
    return batch


# ---------------------------------------------------------------- whole datasets


def read_cifar(location: Path, layout: CifarLayout, num_classes: int) -> CifarArrays:
    """Read every batch of a CIFAR variant from its tar.gz or from the folder holding the batches."""
    if location.is_dir():
        batches = _read_folder(location, layout)
    else:
        batches = _read_archive(location, layout)
    names = _class_names(batches[layout.meta_file], layout, num_classes)
    train_images, train_labels = _stack(batches, layout.train_files, layout, num_classes)
    test_images, test_labels = _stack(batches, layout.test_files, layout, num_classes)
    return CifarArrays(train_images, train_labels, test_images, test_labels, names)


_Batches = dict[str, tuple[dict[str, Any], str]]  # file name -> (batch, where it came from)


def _read_folder(folder: Path, layout: CifarLayout) -> _Batches:
    missing = [name for name in layout.files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing CIFAR batch files {', '.join(missing)}.")
    batches: _Batches = {}
    for name in layout.files:
        path = folder / name
        try:
            with path.open("rb") as f:
                batches[name] = (load_cifar_batch(f, str(path)), str(path))
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc}).") from exc
    return batches


def _read_archive(archive: Path, layout: CifarLayout) -> _Batches:
    """Read members in archive order: one pass of decompression, nothing written to disk."""
    wanted = {f"{layout.folder}/{name}": name for name in layout.files}
    batches: _Batches = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or name in batches:
                    continue
                origin = f"{archive}:{member.name}"
                stream = tar.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise DataError(f"{origin}: not a regular file inside the archive.")
                with stream:
                    payload = stream.read()  # a damaged archive fails here, not mid-unpickle
                batches[name] = (load_cifar_batch(io.BytesIO(payload), origin), origin)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: damaged or unreadable archive ({exc}).") from exc
    missing = [member for member, name in wanted.items() if name not in batches]
    if missing:
        raise DataError(f"{archive}: the archive lacks {', '.join(missing)}.")
    return batches


def _field(batch: dict[str, Any], key: str, origin: str) -> Any:
    if key not in batch:
        found = ", ".join(sorted(batch)) or "none"
        raise DataError(f"{origin}: missing key '{key}' (found: {found}).")
    return batch[key]


def _class_names(entry: tuple[dict[str, Any], str], layout: CifarLayout, n: int) -> tuple[str, ...]:
    batch, origin = entry
    raw = _field(batch, layout.names_key, origin)
    names = tuple(_text(v) for v in raw) if isinstance(raw, list | tuple) else ()
    if len(names) != n or not all(isinstance(v, str) and v for v in names):
        raise DataError(f"{origin}: '{layout.names_key}' must list {n} class names.")
    return names


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _stack(
    batches: _Batches, files: tuple[str, ...], layout: CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        batch, origin = batches[name]
        data = _field(batch, "data", origin)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
            raise DataError(f"{origin}: 'data' must be a uint8 (N, {_ROW_BYTES}) array, got {got}.")
        if data.shape[1] != _ROW_BYTES:
            raise DataError(
                f"{origin}: wrong data length: rows hold {data.shape[1]} bytes, expected "
                f"{_ROW_BYTES} (3 x 32 x 32)."
            )
        label_array = _labels(_field(batch, layout.label_key, origin), origin, layout.label_key)
        if len(label_array) != len(data):
            raise DataError(
                f"{origin}: {len(data)} images but {len(label_array)} labels in "
                f"'{layout.label_key}'."
            )
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= num_classes):
            bad = label_array[(label_array < 0) | (label_array >= num_classes)][0]
            raise DataError(f"{origin}: label {bad} outside the class range 0..{num_classes - 1}.")
        images.append(data)
        labels.append(label_array)
    stacked = np.concatenate(images).reshape(-1, *CIFAR_IMAGE_SHAPE)  # (N, 3, 32, 32)
    return stacked, np.concatenate(labels)


def _labels(raw: Any, origin: str, key: str) -> np.ndarray:
    try:
        array = np.asarray(raw)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: '{key}' is not a list of integers.") from exc
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{origin}: '{key}' must be a flat list of integers.")
    return array.astype(np.int64)
