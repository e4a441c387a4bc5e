"""Atomic file writes: a temporary file in the target's folder, flushed, fsynced, then os.replace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cnnlab.errors import CnnlabError


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file whose content replaces `path` only once the block finishes without error.

    A crash at any instant leaves either the old file or the new one, never a torn mix.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError as exc:
        raise CnnlabError(f"Cannot write {path}: folder {path.parent} does not exist.") from exc
    except PermissionError as exc:
        raise CnnlabError(
            f"Cannot write {path}: no permission to create files in {path.parent}. "
            "Choose another output folder or fix its permissions."
        ) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise CnnlabError(
                f"Disk full while writing {path}; the previous version is untouched. "
                "Free some space and retry."
            ) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
