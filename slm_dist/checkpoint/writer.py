"""Write a sharded safetensors checkpoint safely.

Every file is written under a temporary name, fsynced and renamed, so a crash never leaves a
half-written file under a final name. The index goes last: a folder without it is visibly
unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    bytes: int


def shard_name(k: int, n: int) -> str:
    """1-based shard ``k`` of ``n``: ``model-00002-of-00005.safetensors``."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"merge.max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def sha256_file(path: Path, chunk_bytes: int = 16 * 1024**2) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                      ) -> FileRecord:
    """Write one shard atomically; returns its sha256 and size."""
    import safetensors.torch

    path = Path(path)
    tmp = partial_name(path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                metadata={"format": "pt", **(metadata or {})})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    record = FileRecord(path.name, sha256_file(tmp), tmp.stat().st_size)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return record


def write_json(path: Path, obj) -> FileRecord:
    path = Path(path)
    tmp = partial_name(path)
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return FileRecord(path.name, hashlib.sha256(data).hexdigest(), len(data))


def write_index(out_dir: Path, weight_map: Mapping[str, str], total_size: int) -> FileRecord:
    return write_json(Path(out_dir) / INDEX_NAME, {"metadata": {"total_size": total_size},
                                                   "weight_map": dict(sorted(weight_map.items()))})


def write_manifest(out_dir: Path, records: Sequence[FileRecord], extra: Mapping | None = None) -> FileRecord:
    files = {r.name: {"sha256": r.sha256, "bytes": r.bytes} for r in sorted(records, key=lambda r: r.name)}
    return write_json(Path(out_dir) / MANIFEST_NAME, {**(extra or {}), "files": files})


def verify_manifest(folder: Path) -> list[str]:
    """Problems found re-hashing every file the manifest lists (empty list = all good)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return [f"{path} is missing: the folder was not finished by slm-dist"]
    problems = []
    for name, entry in json.loads(path.read_text())["files"].items():
        f = folder / name
        if not f.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(f) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
