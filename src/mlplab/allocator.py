"""glibc's malloc, set to keep the memory that each training step and val pass frees and allocates again.

A step's activations and gradients, and a val pass's (5000 x 200 floats: 4 MB a layer), are freed and
allocated again every time. With glibc's defaults the heap gives its free top back to the OS once more than
M_TRIM_THRESHOLD lies free there (128 KiB at first, raised as glibc meets larger blocks), and the next
allocation faults every 4 KiB page of it in again, zeroed by the kernel: thousands of page faults in a val
pass, and as many in some training epochs, in the kit's processes and in plain PyTorch loops alike.
`keep_freed_memory` raises that threshold, so that freed memory stays in the heap for the next step (the
reuse PyTorch's CPU performance tuning guide gets from jemalloc or tcmalloc). The process's peak memory is
higher by what the heap keeps instead of giving back (measured in the README, Performance). Blocks of
M_MMAP_THRESHOLD or more (the training split's tensor) are still mapped and unmapped on their own, so that
freeing the training split (mlplab.data's teardown) gives its memory back.

Nothing here imports torch: scripts/bench.py's plain-PyTorch floor calls it too, so that its ratio compares
the kit with a loop that runs under the same allocator settings.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameters (glibc's <malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 1 << 30  # free bytes at the heap's top before it is given back: more than any step frees
MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own moving threshold (64-bit), which setting it stops
# What a user sets to choose the allocator's behaviour themselves; the kit then leaves it alone
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Sets glibc's trim and mmap thresholds for this process (see the module docs); returns whether it did.

    It does nothing outside Linux, under another C library, or where one of USER_SETTINGS is in the
    environment (a user's own malloc settings, or jemalloc/tcmalloc preloaded).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process
        libc.gnu_get_libc_version  # glibc's own: musl's mallopt has other parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # setting either fixes both: glibc stops moving them at run time once one is set, so the mmap threshold is
    # set where glibc's own would end up after freeing large blocks, not left where it happens to be now
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
