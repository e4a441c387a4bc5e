"""Process-wide runtime settings: glibc keeps freed memory, so steps do not page-fault."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and frees a 40 MiB tensor 20 times (over glibc's largest automatic mmap threshold,
# so by default each one is a fresh mmap) and prints the page faults of the last 19.
FAULTS = """
import resource, torch
{setup}
torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's mallopt only",
)


def _faults(setup: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    done = subprocess.run(
        [sys.executable, "-c", FAULTS.format(setup=setup)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


@linux_glibc
def test_importing_cnnlab_stops_large_tensors_from_page_faulting_every_time():
    pages_per_tensor = (40 << 20) // 4096
    assert _faults("") > 10 * pages_per_tensor  # glibc's default: mmap and fault each time
    assert _faults("import cnnlab") <= 2 * pages_per_tensor  # heap memory, reused


@linux_glibc
def test_the_users_own_malloc_settings_win():
    assert _faults("import cnnlab", MALLOC_TRIM_THRESHOLD_="131072") > 10 * (40 << 20) // 4096
