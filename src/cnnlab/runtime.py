"""Process-wide settings that make PyTorch on CPUs faster, applied once when cnnlab loads."""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def reuse_freed_memory(limit_bytes: int = 256 << 20) -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of giving it back.

    By default glibc serves allocations over 128 KiB-32 MiB with mmap and returns them with
    munmap, and trims the heap whenever its free top grows past a few MiB. A training step
    allocates and frees the same activations every time, so every step then page-faults its
    activations in again: 500-1,000 faults a step, 1.3x slower `tiny` steps and 1.05-1.1x slower
    `fast` ones on this project's machine (benchmarks in README "Performance"). Here
    allocations up to `limit_bytes` come from the heap and up to `limit_bytes` of freed memory
    stays with the process. Returns whether it applied: not on other platforms or C
    libraries, and not when the user set glibc's own malloc variables.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_MALLOC_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, limit_bytes)
    )
