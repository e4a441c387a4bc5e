"""Strict reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or raw."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cnnlab.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 8  # the format allows up to 255; real files use 1 (labels) or 3 (images)

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file into a native-endian array; gzip is detected by its magic bytes.

    Every defect is a DataError naming the file: a bad magic number or type code, a
    dimension count of 0, a payload shorter or longer than the header declares, or a
    damaged gzip stream.
    """
    path = Path(path)
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read_stream(stream, path, payload_size=None)
            payload_size = os.fstat(raw.fileno()).st_size
            return _read_stream(raw, path, payload_size=payload_size)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: damaged gzip stream ({exc}); download the file again.") from exc
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found.") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc}).") from exc


def _read_stream(stream: BinaryIO, path: Path, payload_size: int | None) -> np.ndarray:
    """Parse header and payload from an open stream; payload_size is the raw file size if known."""
    header = stream.read(4)
    if len(header) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(header)} bytes).")
    zero0, zero1, type_code, ndim = header
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{path}: not an IDX file (magic number {header.hex()}; IDX files start with "
            "00 00 <type> <dims>)."
        )
    if type_code not in IDX_DTYPES:
        allowed = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{type_code:02X} (allowed: {allowed}).")
    if not 1 <= ndim <= _MAX_DIMS:
        raise DataError(
            f"{path}: IDX header declares {ndim} dimensions (expected 1 to {_MAX_DIMS})."
        )
    dims_raw = stream.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header (expected {ndim} dimension sizes).")
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    header_size = 4 + 4 * ndim
    if payload_size is not None and payload_size - header_size != expected:
        raise DataError(
            f"{path}: data size mismatch: header declares shape {shape} ({expected} bytes) but the "
            f"file holds {payload_size - header_size} bytes after the header (truncated or "
            "corrupt file)."
        )
    try:
        data = np.empty(shape, dtype=dtype)
    except (MemoryError, ValueError) as exc:
        raise DataError(f"{path}: header declares an impossible shape {shape}.") from exc
    got = _read_into(stream, data)
    if got != expected:
        raise DataError(
            f"{path}: truncated data: header declares shape {shape} ({expected} bytes) but only "
            f"{got} bytes follow."
        )
    if stream.read(1):
        raise DataError(
            f"{path}: data size mismatch: more bytes follow the {expected} that shape {shape} "
            "declares."
        )
    return data.astype(dtype.newbyteorder("="), copy=False)


def _read_into(stream: BinaryIO, out: np.ndarray) -> int:
    """Fill `out` from the stream without an intermediate copy; return the bytes read."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    filled = 0
    while filled < len(view):
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    return filled
