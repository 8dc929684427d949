"""Writes one output shard: reads only the source bytes that shard needs, merges, streams them out.

A plain class; `export.write_export` calls `write_shard` in threads (`cluster.backend: local`)
and `distributed` runs it as Ray tasks. Memory is bounded by `memory_bytes`, whatever the
shard or model size: each output tensor is produced in blocks of elements (every rule is
elementwise, so merging elements [a, b) of the window gives elements [a, b) of the merged tensor,
bit for bit) from source blocks mapped one at a time, and each block goes straight to a
`ShardWriter`, which never holds a shard.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import torch

from slm_dist.checkpoint.corrections import correction_slice, kind_of, read_correction
from slm_dist.checkpoint.export import ShardJob, ShardResult, WorkerSettings
from slm_dist.checkpoint.index import TensorInfo, open_index
from slm_dist.checkpoint.reader import TORCH_DTYPES, LazyReader, RowReader
from slm_dist.checkpoint.writer import ShardWriter, TensorEntry
from slm_dist.core.merge import COPY, MergeError, TensorJob, merge_tensor, refit_rows

DEFAULT_MEMORY_BYTES = 256 * 1024**2
MAX_READ_BYTES = 64 * 1024**2   # bigger reads do not copy faster, they only hold more memory
# Merge arithmetic runs on slices this long: with their float32 temporaries they stay in a core's L2
# cache. On the 2-core test machine that made the `sum` rule ~6x faster than whole 5632 x 2048 tensors.
MERGE_ELEMENTS = 64 * 1024


class MergeWorker:
    def __init__(self, source_dir: str, allow_pickle: bool = False, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 corrections_file: str | None = None):
        if memory_bytes < 1:
            raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
        self.source_dir = Path(source_dir)
        self.allow_pickle = allow_pickle
        self.memory_bytes = memory_bytes
        self.corrections_file = corrections_file  # the plan's linear corrections (merge.correction=linear)
        self._pickle_reader: LazyReader | None = None

    def write_shard(self, out_dir: str, job: ShardJob) -> ShardResult:
        """Write ``job.name`` under ``out_dir`` (temporary name, fsync, rename); returns its hash record and costs."""
        start = time.perf_counter()
        infos = {info.key: info for info in job.sources}
        entries = [TensorEntry(t.out_key, infos[t.source_keys[0]].dtype, infos[t.source_keys[0]].shape)
                   for t in job.tensors]
        with RowReader(self.source_dir) as reader, ShardWriter(Path(out_dir) / job.name, entries) as writer:
            for t in job.tensors:
                self._write_tensor(writer, reader, t, [infos[k] for k in t.source_keys])
            record = writer.finish()
            bytes_read = reader.bytes_read
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return ShardResult(record, bytes_read, time.perf_counter() - start, peak, os.getpid())

    def _write_tensor(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo]) -> None:
        chosen = single_source(t)
        if chosen is not None:  # a copy, or a rule that keeps one window member as it is
            sources = [sources[chosen]]
        if t.correction is not None:
            self._write_corrected(writer, reader, t, sources)
            return
        numel = math.prod(sources[0].shape)
        block = elements_per_block(sources[0], len(sources), self.memory_bytes)
        for a in range(0, max(numel, 1), block):
            b = min(a + block, numel)
            window = [self._read(reader, s, a, b) for s in sources]
            if len(window) == 1:
                mapped = sources[0].offset >= 0 and b > a  # bytes that sit as they are in a safetensors file
                writer.write(t.out_key, window[0], source=reader.byte_range(sources[0], a) if mapped else None)
            else:
                # Merge and write cache-sized slices: each result is hashed and written while still hot.
                for c in range(0, b - a, MERGE_ELEMENTS):
                    d = min(c + MERGE_ELEMENTS, b - a)
                    writer.write(t.out_key, merge_tensor([w[c:d] for w in window], t.role, t.rule, t.alpha,
                                                         keys=t.source_keys))
            del window  # unmaps the source blocks now: a job maps at most one block per window member

    def _write_corrected(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo]) -> None:
        """The window's MLP output projection with its correction (``merge.apply_correction``)."""
        if self._correction_kind(t.correction) == "refit":
            self._write_refit(writer, t, sources[0])
        else:
            self._write_linear(writer, reader, t, sources)

    def _write_refit(self, writer: ShardWriter, t: TensorJob, source: TensorInfo) -> None:
        """X^T (the weight) or X's last row (the bias), read from the corrections file in output row
        blocks (column blocks of X) within ``memory_bytes``; the merged source is not needed at all."""
        dtype = TORCH_DTYPES[source.dtype]
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

    def _write_linear(self, writer: ShardWriter, reader: RowReader, t: TensorJob, sources: list[TensorInfo]) -> None:
        """T^T W for the window's MLP output projection (``merge.apply_correction``), in output row blocks.

        Rows [r0, r1) of T^T W need every row of W, so each output block (accumulated in float32) reads
        and merges W again, one source row block at a time: memory stays within ``memory_bytes``
        whatever the tensor, at the price of reading it (output rows / block rows) times.
        """
        matrix = self._correction(t.correction)
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

    def _correction_kind(self, key: str) -> str:
        return kind_of(self._corrections_path(key))

    def _correction(self, key: str) -> torch.Tensor:
        return read_correction(self._corrections_path(key), key)

    def _read(self, reader: RowReader, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        if info.offset >= 0:
            return reader.map_flat(info, a, b)
        # Opt-in pickle source (model.allow_pickle): torch.load maps the whole file; elements come from it.
        if self._pickle_reader is None:
            self._pickle_reader = LazyReader(open_index(self.source_dir, allow_pickle=self.allow_pickle))
        return self._pickle_reader.get(info.key).reshape(-1)[a:b]


def write_shard_job(settings: WorkerSettings, job: ShardJob) -> ShardResult:
    """One export shard job, as both backends run it (threads here, Ray tasks there): the same bytes."""
    worker = MergeWorker(settings.source_dir, settings.allow_pickle, settings.memory_bytes, settings.corrections_file)
    return worker.write_shard(settings.out_dir, job)


def single_source(t: TensorJob) -> int | None:
    """Which window member a job copies unchanged, or None when the rule mixes them.

    Mirrors `merge.merge_tensor` (norms and `drop` keep the bottom layer, `reference` takes the top
    projection) so that those jobs read one tensor instead of the whole window; the parity tests
    against `merge.merge_state_dict` for every rule keep the two in step.
    """
    if t.rule == COPY or t.role == "norm" or t.rule == "drop":
        return 0
    if t.rule == "reference":
        return len(t.source_keys) - 1
    return None


def elements_per_block(info: TensorInfo, num_sources: int, memory_bytes: int) -> int:
    """Elements per block so that what a job maps at once stays within ``memory_bytes``.

    A job maps one block of each source tensor it reads (one for a copy, every window member for a
    merge); the float32 merge work and the merged result live in cache-sized slices of
    ``MERGE_ELEMENTS``, a fixed ~2 MiB whatever the tensor. Blocks stop at ``MAX_READ_BYTES``.
    """
    numel = math.prod(info.shape)
    if numel == 0:
        return 1
    itemsize = info.nbytes // numel
    per_source = min(memory_bytes // num_sources, MAX_READ_BYTES)
    return max(1, min(numel, per_source // itemsize))
