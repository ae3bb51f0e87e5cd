"""mlplab.allocator: with glibc, memory freed by one step is there for the next, without page faults."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mlplab.allocator import USER_SETTINGS, keep_freed_memory

# A 12 MB block (three layers of a val pass's activations, 5000 x 200 floats each) allocated, written and freed,
# again and again, in a child process (mallopt is per process). The child first sets glibc to give back all
# free memory at the heap's top on every free (trim threshold 0): the worst case of its default, moving
# thresholds, which do so some of the time, depending on what was freed before. It prints whether
# keep_freed_memory applied, then the page faults of five rounds after a first one.
ROUNDS = textwrap.dedent("""
    import ctypes, resource, sys
    from mlplab.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 0)
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def one_round(size=12 << 20):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
    one_round()
    before = faults()
    for _ in range(5):
        one_round()
    print(kept, faults() - before)
""")

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
glibc_only = pytest.mark.skipif(not GLIBC, reason="mlplab.allocator sets glibc's malloc only")


def faults_after_warm_up(mode: str, **settings: str) -> tuple[bool, int]:
    """Runs ROUNDS in a child whose environment has no malloc settings but `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS} | settings
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    kept, faults = result.stdout.split()
    return kept == "True", int(faults)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = faults_after_warm_up("keep")
    assert kept
    assert faults < 5  # 5 rounds x 3072 pages (or 6 huge pages), were the block given back each time
    _, faults_by_default = faults_after_warm_up("default")
    assert faults_by_default >= 5  # without it, the block is given back and faulted in again every round


@glibc_only
def test_a_users_own_malloc_settings_are_left_alone():
    kept, _ = faults_after_warm_up("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not kept


def test_it_says_whether_it_applied():
    assert keep_freed_memory() is (GLIBC and not any(name in os.environ for name in USER_SETTINGS))
