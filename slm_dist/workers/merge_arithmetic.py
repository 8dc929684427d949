"""The torch half of the merge worker: output tensors that a rule or a correction computes.

`merge_worker.MergeWorker` copies every tensor it can as bytes and hands the rest here; it imports
this module only for a shard job that computes something, so a merge that only copies (rules
`drop` and `reference` without corrections) never imports torch. Memory stays within
``memory_bytes`` whatever the tensor: every rule is elementwise, so merging elements [a, b) of a
window gives elements [a, b) of the merged tensor, bit for bit, and each block goes straight to
the `ShardWriter`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from slm_dist.checkpoint.corrections import correction_slice, kind_of, read_correction
from slm_dist.checkpoint.index import TensorInfo, open_index
from slm_dist.checkpoint.reader import LazyReader, RowReader, torch_dtype
from slm_dist.checkpoint.writer import ShardWriter
from slm_dist.core.merge import merge_tensor
from slm_dist.core.merge_jobs import MergeError, TensorJob, pool_rows, refit_rows

# Merge arithmetic runs on slices this long: with their float32 temporaries they stay in a core's L2
# cache. On the 2-core test machine that made the `sum` rule ~6x faster than whole 5632 x 2048 tensors.
MERGE_ELEMENTS = 64 * 1024


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch runs single-threaded while shard jobs run in threads: the jobs are the parallelism, and
    intra-op threads on the cache-sized merge slices only add synchronisation (100x slower on the
    2-core test machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TensorArithmetic:
    """Writes the output tensors of one shard job that are not plain byte copies."""

    def __init__(self, source_dir: Path, allow_pickle: bool, memory_bytes: int, corrections_file: str | None):
        self.source_dir = Path(source_dir)
        self.allow_pickle = allow_pickle
        self.memory_bytes = memory_bytes
        self.corrections_file = corrections_file  # the plan's corrections (merge.correction=linear | refit | pool)
        self._pickle_reader: LazyReader | None = None

    def open_reader(self) -> RowReader:
        return RowReader(self.source_dir)

    def write_tensor(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo],
                     block: int) -> None:
        """``t`` from ``sources`` (the members it reads), ``block`` source elements at a time."""
        if t.correction is not None:
            self._write_corrected(writer, reader, t, sources)
            return
        numel = math.prod(sources[0].shape)
        for a in range(0, max(numel, 1), block):
            b = min(a + block, numel)
            window = [self._read(reader, s, a, b) for s in sources]
            if len(window) == 1:  # a pickle source's copy: its bytes do not sit in a safetensors file
                writer.write(t.out_key, window[0])
            else:
                # Merge and write cache-sized slices: each result is hashed and written while still hot.
                for c in range(0, b - a, MERGE_ELEMENTS):
                    d = min(c + MERGE_ELEMENTS, b - a)
                    writer.write(t.out_key, merge_tensor([w[c:d] for w in window], t.role, t.rule, t.alpha,
                                                         keys=t.source_keys))
            del window  # unmaps the source blocks now: a job maps at most one block per window member

    def _write_corrected(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo]) -> None:
        """A projection of the window's MLP with its correction (``merge.apply_correction``): the output
        projection for every kind, the gate and up projections too for ``pool``."""
        kind = kind_of(self._corrections_path(t.correction))
        if kind == "refit":
            self._write_refit(writer, t, sources[0])
        elif kind == "pool":
            self._write_pool(writer, t, sources[0])
        else:
            self._write_linear(writer, reader, t, sources)

    def _write_refit(self, writer: ShardWriter, t: TensorJob, source: TensorInfo) -> None:
        """X^T (the weight) or X's last row (the bias), read from the corrections file in output row
        blocks (column blocks of X) within ``memory_bytes``; the merged source is not needed at all."""
        dtype = torch_dtype(source.dtype)
        with correction_slice(self._corrections_path(t.correction), t.correction) as view:
            shape = tuple(view.get_shape())
            try:
                rows = refit_rows(source.shape, shape)
            except MergeError as err:
                raise ValueError(f"the correction {t.correction!r} in {self.corrections_file} does not fit "
                                 f"{t.out_key}: {err}; the corrections belong to another model") from None
            if isinstance(rows, int):
                writer.write(t.out_key, view[rows:rows + 1, :].reshape(-1).to(dtype))
                return
            out_rows, width = source.shape[0], rows.stop
            block = max(1, min(out_rows, self.memory_bytes // (2 * width * 4)))
            for r0 in range(0, out_rows, block):
                r1 = min(r0 + block, out_rows)
                writer.write(t.out_key, view[:width, r0:r1].T.contiguous().to(dtype).reshape(-1))

    def _write_pool(self, writer: ShardWriter, t: TensorJob, source: TensorInfo) -> None:
        """A pool correction's rows for this projection (``merge_jobs.pool_rows``): the output projection as
        X^T, the gate or up projection as stored, in row blocks within ``memory_bytes``."""
        dtype = torch_dtype(source.dtype)
        with correction_slice(self._corrections_path(t.correction), t.correction) as view:
            try:
                rows = pool_rows(t.correction_part, source.shape, tuple(view.get_shape()))
            except MergeError as err:
                raise ValueError(f"the correction {t.correction!r} in {self.corrections_file} does not fit "
                                 f"{t.out_key}: {err}; the corrections belong to another model") from None
            out_rows, width = source.shape[0], source.shape[1]
            block = max(1, min(out_rows, self.memory_bytes // (2 * width * 4)))
            for r0 in range(0, out_rows, block):
                r1 = min(r0 + block, out_rows)
                if t.correction_part is None:  # X [intermediate, hidden] holds the weight transposed
                    part = view[rows.start:rows.stop, r0:r1].T.contiguous()
                else:
                    part = view[rows.start + r0:rows.start + r1, :]
                writer.write(t.out_key, part.to(dtype).reshape(-1))

    def _write_linear(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo]) -> None:
        """T^T W for the window's MLP output projection (``merge.apply_correction``), in output row blocks.

        Rows [r0, r1) of T^T W need every row of W, so each output block (accumulated in float32) reads
        and merges W again, one source row block at a time: memory stays within ``memory_bytes``
        whatever the tensor, at the price of reading it (output rows / block rows) times.
        """
        matrix = read_correction(self._corrections_path(t.correction), t.correction)
        rows = sources[0].shape[0]
        cols = math.prod(sources[0].shape[1:])  # 1 for a bias
        if tuple(matrix.shape) != (rows, rows):
            raise ValueError(f"the correction {t.correction!r} in {self.corrections_file} is {list(matrix.shape)}, "
                             f"but {t.out_key} has {rows} output rows: the corrections belong to another model")
        half = self.memory_bytes // 2
        rows_out = max(1, min(rows, half // (cols * 4)))
        itemsize = sources[0].nbytes // max(math.prod(sources[0].shape), 1)
        rows_in = max(1, min(rows, half // (cols * (itemsize * len(sources) + 4))))
        for r0 in range(0, rows, rows_out):
            r1 = min(r0 + rows_out, rows)
            acc = torch.zeros(r1 - r0, cols, dtype=torch.float32)
            dtype = None
            for e0 in range(0, rows, rows_in):
                e1 = min(e0 + rows_in, rows)
                blocks = [self._read(reader, s, e0 * cols, e1 * cols) for s in sources]
                w = blocks[0] if len(blocks) == 1 else merge_tensor(blocks, t.role, t.rule, t.alpha, keys=t.source_keys)
                dtype = w.dtype
                acc += matrix[e0:e1, r0:r1].T @ w.float().view(e1 - e0, cols)
                del blocks, w
            writer.write(t.out_key, acc.to(dtype).reshape(-1))

    def _corrections_path(self, key: str) -> str:
        if self.corrections_file is None:
            raise ValueError(f"the shard job needs the correction {key!r} but no corrections file was given")
        return self.corrections_file

    def _read(self, reader: RowReader, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        if info.offset >= 0:
            return reader.map_flat(info, a, b)
        # Opt-in pickle source (model.allow_pickle): torch.load maps the whole file; elements come from it.
        if self._pickle_reader is None:
            self._pickle_reader = LazyReader(open_index(self.source_dir, allow_pickle=self.allow_pickle))
        return self._pickle_reader.get(info.key).reshape(-1)[a:b]
