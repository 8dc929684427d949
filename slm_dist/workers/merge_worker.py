"""Writes one output shard: reads only the source tensors that shard needs, merges, writes.

A plain class; the Ray backend runs `write_shard` as tasks. It never holds more than one output
shard plus the window being merged.
"""

from __future__ import annotations

from pathlib import Path

from slm_dist.checkpoint.index import open_index
from slm_dist.checkpoint.reader import LazyReader
from slm_dist.checkpoint.writer import FileRecord, write_safetensors
from slm_dist.merge import merge_tensor


class MergeWorker:
    def __init__(self, source_dir: str, allow_pickle: bool = False):
        self.index = open_index(Path(source_dir), allow_pickle=allow_pickle)

    def write_shard(self, out_dir: str, job) -> FileRecord:
        """`job` is an `export.ShardJob`; returns the written file's sha256 and size."""
        reader = LazyReader(self.index)
        tensors = {}
        for t in job.tensors:
            sources = [reader.get(k) for k in t.source_keys]
            if len(sources) == 1 and t.window is None:
                tensors[t.out_key] = sources[0]
            else:
                tensors[t.out_key] = merge_tensor(sources, t.role, t.rule, keys=t.source_keys)
        record = write_safetensors(Path(out_dir) / job.name, tensors)
        reader.close()
        return record
