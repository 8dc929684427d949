"""Writes one output shard: reads only the source bytes that shard needs, merges, streams them out.

A plain class; `run_jobs_in_threads` calls `write_shard` in threads (`cluster.backend: local`)
and `backends/ray.py` runs it as Ray tasks. Memory is bounded by `memory_bytes`, whatever the
shard or model size: each output tensor is produced in blocks of elements from source blocks
mapped one at a time, and each block goes straight to a `ShardWriter`, which never holds a shard.

A tensor that comes out as it went in (a copy, a norm, or what `drop` and `reference` keep) moves
as bytes, file to file in the kernel; the tensors a rule or a correction computes go to
`merge_arithmetic`, the one module here that needs torch. A job with nothing to compute does not
import it: `slm-dist merge` of a `drop` plan starts without torch's ~1.3 s import.
"""

from __future__ import annotations

import math
import os
import resource
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from slm_dist.checkpoint.export import OnDone, ShardJob, ShardResult, WorkerSettings, copied_source
from slm_dist.checkpoint.index import TensorInfo
from slm_dist.checkpoint.mapped import ByteReader
from slm_dist.checkpoint.writer import ShardWriter, TensorEntry
from slm_dist.core.merge_jobs import single_source

DEFAULT_MEMORY_BYTES = 256 * 1024**2
MAX_READ_BYTES = 64 * 1024**2   # bigger reads do not copy faster, they only hold more memory


class MergeWorker:
    def __init__(self, source_dir: str, allow_pickle: bool = False, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 corrections_file: str | None = None):
        if memory_bytes < 1:
            raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
        self.source_dir = Path(source_dir)
        self.allow_pickle = allow_pickle
        self.memory_bytes = memory_bytes
        self.corrections_file = corrections_file  # the plan's corrections (merge.correction=linear | refit)

    def write_shard(self, out_dir: str, job: ShardJob) -> ShardResult:
        """Write ``job.name`` under ``out_dir`` (temporary name, fsync, rename); returns its hash record and costs."""
        start = time.perf_counter()
        infos = {info.key: info for info in job.sources}
        entries = [TensorEntry(t.out_key, infos[t.source_keys[0]].dtype, infos[t.source_keys[0]].shape)
                   for t in job.tensors]
        arithmetic = None
        if not copies_only(job):
            arithmetic = _arithmetic().TensorArithmetic(self.source_dir, self.allow_pickle, self.memory_bytes,
                                                        self.corrections_file)
        reader = arithmetic.open_reader() if arithmetic else ByteReader(self.source_dir)
        with reader, ShardWriter(Path(out_dir) / job.name, entries, page_offset=job.page_offset) as writer:
            for t in job.tensors:
                source = copied_source(t, infos)
                if source is not None:
                    self._copy(writer, reader, t.out_key, source, elements_per_block(source, 1, self.memory_bytes))
                    continue
                sources = [infos[k] for k in t.source_keys]
                chosen = single_source(t)
                if chosen is not None:  # a rule that keeps one window member, corrected or from a pickle
                    sources = [sources[chosen]]
                block = elements_per_block(sources[0], len(sources), self.memory_bytes)
                arithmetic.write_tensor(writer, reader, t, sources, block)
            record = writer.finish()
            bytes_read = reader.bytes_read
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return ShardResult(record, bytes_read, time.perf_counter() - start, peak, os.getpid())

    @staticmethod
    def _copy(writer: ShardWriter, reader: ByteReader, key: str, info: TensorInfo, block: int) -> None:
        """``info``'s bytes as they sit in the source file: kernel-copied, hashed from the mapped pages."""
        numel = math.prod(info.shape)
        for a in range(0, max(numel, 1), block):
            b = min(a + block, numel)
            data = reader.map_bytes(info, a, b)
            writer.write_bytes(key, data, source=reader.byte_range(info, a) if b > a else None)
            del data  # unmaps the block now


def _arithmetic() -> ModuleType:
    """`merge_arithmetic`, imported on first need: torch is a third of a short merge's wall time."""
    from slm_dist.workers import merge_arithmetic

    return merge_arithmetic


def copies_only(job: ShardJob) -> bool:
    """Whether every tensor of ``job`` is a byte copy of one source tensor (nothing to compute)."""
    infos = {info.key: info for info in job.sources}
    return all(copied_source(t, infos) is not None for t in job.tensors)


def write_shard_job(settings: WorkerSettings, job: ShardJob) -> ShardResult:
    """One export shard job, as both backends run it (threads here, Ray tasks there): the same bytes."""
    worker = MergeWorker(settings.source_dir, settings.allow_pickle, settings.memory_bytes, settings.corrections_file)
    return worker.write_shard(settings.out_dir, job)


def elements_per_block(info: TensorInfo, num_sources: int, memory_bytes: int) -> int:
    """Elements per block so that what a job maps at once stays within ``memory_bytes``.

    A job maps one block of each source tensor it reads (one for a copy, every window member for a
    merge); the float32 merge work and the merged result live in cache-sized slices of
    ``merge_arithmetic.MERGE_ELEMENTS``, a fixed ~2 MiB whatever the tensor. Blocks stop at ``MAX_READ_BYTES``.
    """
    numel = math.prod(info.shape)
    if numel == 0:
        return 1
    itemsize = info.nbytes // numel
    per_source = min(memory_bytes // num_sources, MAX_READ_BYTES)
    return max(1, min(numel, per_source // itemsize))


def run_jobs_in_threads(jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int,
                        on_done: OnDone) -> None:
    """Shard jobs on up to ``max_parallel`` threads of this process (file I/O, hashing and torch
    kernels release the GIL): `cluster.backend: local`'s shard runner. After a failure no new job
    starts; running ones finish and count. Torch, when a job computes, runs single-threaded meanwhile.

    When some jobs compute, torch's import (about a second) runs on a thread of its own while the
    jobs that only copy go first; a computing job starts once it is done. On the 4.2 GB `sum` merge of
    bench_merge.py that import had been a second of the stage with nothing else running.
    """
    computes = {job.name for job in jobs if not copies_only(job)}
    if not computes:
        _run_in_threads(jobs, lambda job: write_shard_job(settings, job), max_parallel, on_done)
        return
    ordered = sorted(jobs, key=lambda job: job.name in computes)  # stable: copies first, each group in plan order
    torch_settings = ExitStack()  # entered on the import thread, left here once every job is over

    def import_torch() -> None:
        torch_settings.enter_context(_arithmetic().single_threaded_torch())

    def run(job: ShardJob) -> ShardResult:
        if job.name in computes:
            torch_ready.result()  # re-raises a failed import in the job that needed it
        return write_shard_job(settings, job)

    with torch_settings, ThreadPoolExecutor(1, thread_name_prefix="import-torch") as importer:
        torch_ready = importer.submit(import_torch)
        _run_in_threads(ordered, run, max_parallel, on_done)


def _run_in_threads(jobs: Sequence[ShardJob], run: Callable[[ShardJob], ShardResult], max_parallel: int,
                    on_done: OnDone) -> None:
    if max_parallel == 1:
        for job in jobs:
            on_done(job, run(job))
        return
    queue = list(jobs)
    error: BaseException | None = None
    with ThreadPoolExecutor(max_parallel, thread_name_prefix="merge") as pool:
        running: dict[Future, ShardJob] = {}
        while queue or running:
            while queue and error is None and len(running) < max_parallel:
                job = queue.pop(0)
                running[pool.submit(run, job)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    on_done(job, future.result())
                except BaseException as e:  # noqa: BLE001 - re-raised below, after running jobs settle
                    error = error or e
    if error is not None:
        raise error
