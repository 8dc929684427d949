"""Byte ranges of safetensors tensors, without torch: all that a merge which only copies needs.

`ByteReader` maps just the element range asked for (never a whole file: mapped pages count in the
process's resident set while mapped, so a job touching a 5 GB shard that way would look, and under
memory pressure behave, as if it held 5 GB) and gives the ``(fd, offset)`` a kernel-side copy
needs. `reader.RowReader` builds tensor views and reads on it.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

from slm_dist.checkpoint.index import CheckpointError, TensorInfo


def element_size(info: TensorInfo, start: int, stop: int) -> int:
    """Bytes per element of ``info``, once ``[start, stop)`` is checked to be inside it."""
    numel = math.prod(info.shape)
    if info.offset < 0:
        raise CheckpointError(f"{info.key!r} in {info.file} has no byte offset (not a safetensors file)")
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"element range [{start}, {stop}) is outside {info.key!r} with {numel} elements")
    return info.nbytes // numel if numel else 1


class ByteReader:
    """Element ranges of the tensors of one checkpoint folder as bytes; one open descriptor per file.
    Counts the bytes it read."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def map_bytes(self, info: TensorInfo, start: int, stop: int) -> memoryview:
        """Elements ``[start, stop)`` of ``info``: a read-only view of the file's pages, populated in
        one call and unmapped when the last view of it goes. No copy at all.

        A range past the end of the file (truncated after indexing) is an error here, not a SIGBUS.
        """
        itemsize = element_size(info, start, stop)
        begin, length = info.offset + start * itemsize, (stop - start) * itemsize
        if length == 0:
            return memoryview(b"")
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < begin + length:
            raise self._truncated(info, begin, length)
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, begin + length - aligned, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            prot=mmap.PROT_READ, offset=aligned)
        self.bytes_read += length
        return memoryview(mapping)[begin - aligned:begin - aligned + length]

    def pread_into(self, info: TensorInfo, offset: int, view: memoryview) -> None:
        """Fill ``view`` from byte ``offset`` of ``info``'s file."""
        length = len(view)
        fd = self._fd(info.file)
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise self._truncated(info, offset, length)
            done += n
        self.bytes_read += length

    def byte_range(self, info: TensorInfo, start: int) -> tuple[int, int]:
        """(open file descriptor, byte offset) of element ``start`` of ``info``, for a kernel-side copy."""
        numel = math.prod(info.shape)
        return self._fd(info.file), info.offset + start * (info.nbytes // numel if numel else 1)

    def _truncated(self, info: TensorInfo, begin: int, length: int) -> CheckpointError:
        return CheckpointError(f"{self.root / info.file} ended early while reading {info.key!r} (wanted bytes "
                               f"{begin}..{begin + length}): the file was truncated after it was indexed. "
                               "Re-download or re-copy it.")

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            try:
                self._fds[file] = os.open(self.root / file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"cannot open {self.root / file}: {e.strerror}") from None
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ByteReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
