"""host_memory: a fixed mmap threshold gives freed activation-sized blocks back to the OS.

Each case runs in its own interpreter: the setting is process-wide and one-way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slm_dist import host_memory

# Allocate and free a 4 MiB block once (with glibc's dynamic threshold this raises the threshold
# to 4 MiB), then the same size again: how much of it does the free hand back?
PROBE = """
import json, sys
from slm_dist import host_memory
if sys.argv[1] == "fixed":
    assert host_memory.fix_mmap_threshold(128 << 10)
size = 4 << 20
block = bytearray(size); del block
block = bytearray(size)
held = host_memory.rss_bytes()
del block
print(json.dumps({"returned": held - host_memory.rss_bytes()}))
"""


def returned_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["returned"]


@pytest.mark.skipif(host_memory._glibc() is None or host_memory.rss_bytes() == 0, reason="needs glibc and /proc")
def test_fixed_threshold_returns_freed_blocks_that_the_dynamic_one_keeps():
    assert returned_bytes("fixed") >= 3 << 20
    assert returned_bytes("dynamic") < 1 << 20  # the contrast: glibc's default keeps it in the heap


def test_threshold_out_of_range_is_refused():
    with pytest.raises(ValueError, match="mmap threshold"):
        host_memory.fix_mmap_threshold(0)
    with pytest.raises(ValueError, match="mmap threshold"):
        host_memory.fix_mmap_threshold(64 << 20)
