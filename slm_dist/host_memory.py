"""This process's host memory: what is resident, and how glibc's allocator hands freed memory back.

No Ray, no torch: the stage actors (``distributed``) and the benchmarks read these.

Why a stage fixes the mmap threshold: glibc serves a large allocation with its own mmap and
returns it to the OS on free, but after freeing such a block it RAISES the threshold to that
block's size (up to 32 MiB), so the next activations of a few MiB come from the heap instead.
A stage's forward passes allocate and free such tensors thousands of times; in the heap they
fragment it and stay resident. Measured on a SmolLM2-135M stage (513 MiB of float32 weights):
resident memory grew by 110-136 MiB over six calibration batches with the dynamic threshold and
by 7 MiB with it fixed at 128 KiB, at the same speed within noise (bench/RESULTS.md, issue 3).
Setting the threshold once (``mallopt(M_MMAP_THRESHOLD)``) also turns the dynamic raise off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 << 20  # glibc refuses larger values on 64-bit hosts (HEAP_MAX_SIZE / 2)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, for good (no dynamic raise).

    Process-wide: call it in a process that is yours (a stage actor), not inside a user's program.
    Returns False where the C library is not glibc (the setting does not exist there).
    """
    if not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap threshold must be in (0, {MAX_MMAP_THRESHOLD}] bytes, got {nbytes}")
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def shared_rss_bytes() -> int:
    """Resident shared-memory pages of this process now (RssShmem), e.g. Ray's object store mapped in.

    Arguments and results of large objects live in the node's shared object store; the pages an
    actor touched there count in its RSS while mapped, though they are the store's, not the actor's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
