"""Verified, atomic downloads of dataset files into the cnnlab cache folder."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cnnlab.errors import DataError
from cnnlab.fileio import atomic_open

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # read/write/hash granularity of a download
DEFAULT_TIMEOUT_S = 60.0  # per socket operation, not for the whole file
USER_AGENT = "cnnlab-dataset-download"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def cache_root() -> Path:
    """Root of the dataset cache: $CNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab."""
    override = os.environ.get("CNNLAB_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cnnlab"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def fetch(url: str, dest: Path, sha256: str, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download `url` to `dest`, verify its SHA-256, and only then move it into place.

    The bytes go to a temporary file in dest's folder, are flushed and fsynced, checked,
    and renamed over `dest` with os.replace, so `dest` is either absent or complete and
    verified. On any failure the temporary file is removed and a DataError says why.
    Works for http(s):// and file:// URLs.
    """
    expected = sha256.lower()
    if not _SHA256_RE.match(expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write into {dest.parent}: {exc}") from exc
    with atomic_open(dest, "wb") as out:  # raising inside the block leaves nothing behind
        actual = _download_into(url, out, dest, timeout)
        if actual != expected:
            raise DataError(
                f"checksum mismatch for {url}: expected SHA-256 {expected}, got {actual}. "
                "The download is corrupt or the mirror serves a different file; nothing was saved."
            )
    logger.info("Saved %s (SHA-256 verified)", dest)
    return dest


def _download_into(url: str, out: BinaryIO, dest: Path, timeout: float) -> str:
    """Stream the URL into `out`; return the hex SHA-256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    hasher = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            logger.info("Downloading %s to %s", url, dest)
            with _progress(total, dest.name) as advance:
                while chunk := response.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"could not download {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"could not download {url} to {dest}: {exc}") from exc
    return hasher.hexdigest()


@contextmanager
def _progress(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """A byte counter: a tqdm bar when stderr is a terminal, otherwise a log line per quarter."""
    if sys.stderr.isatty():
        with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            yield bar.update
        return
    done = 0
    logged_quarter = 0

    def advance(n: int) -> None:
        nonlocal done, logged_quarter
        done += n
        quarter = 4 * done // total if total else 0
        if logged_quarter < quarter < 4:
            logger.info("%s: %d%% (%d of %d bytes)", label, 25 * quarter, done, total)
            logged_quarter = quarter

    yield advance
    logger.info("%s: %d bytes received", label, done)
