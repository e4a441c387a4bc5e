"""Atomic file writes: a temporary file in the target's folder, flushed, fsynced, then os.replace."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cnnlab.errors import WriteError

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file whose content replaces `path` only once the block finishes without error.

    A crash at any instant leaves either the old file or the new one, never a torn mix.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; usual mode instead
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(path: Path, exc: OSError) -> WriteError:
    """A WriteError naming the file, the cause and the fix; the previous version is untouched."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(
            f"Disk full while writing {path}; the previous version of the file is untouched. "
            "Free some space (or write elsewhere with --project) and retry."
        )
    if exc.errno == errno.ENOENT:
        return WriteError(
            f"Cannot write {path}: the folder {path.parent} does not exist. Create it or choose "
            "another output folder."
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return WriteError(
            f"Cannot write {path}: no permission to write in {path.parent} "
            f"({exc.strerror or exc}). Choose a writable output folder (--project) or fix its "
            "permissions."
        )
    if exc.errno == errno.ENOTDIR:
        return WriteError(
            f"Cannot write {path}: {path.parent} is a file, not a folder. Choose another "
            "output folder."
        )
    return WriteError(
        f"Cannot write {path}: {exc.strerror or exc}. The previous version of the file is "
        "untouched; fix the cause and retry."
    )


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_with(path: str | Path, writer: Callable[[IO], None]) -> None:
    """Atomically write `path` through `writer(handle)`, e.g. torch.save or savefig."""
    with atomic_open(path, "wb") as handle:
        writer(handle)
