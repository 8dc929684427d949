"""This process's resident host memory, as Linux reports it (/proc; 0 elsewhere).

No Ray, no torch: stage actors (``distributed``) put these in their reports, and the benchmarks
read them.
"""

from __future__ import annotations

import os


def rss_bytes() -> int:
    """Resident memory of this process now."""
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
