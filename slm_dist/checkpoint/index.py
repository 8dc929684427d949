"""What a checkpoint folder holds, read from headers only (no tensor data is loaded).

A safetensors file starts with an 8-byte little-endian header length and a JSON header giving
every tensor's dtype, shape and byte range, so the whole map of a 140 GB checkpoint costs a few
kilobytes of reads. The same headers let us catch a truncated shard before any work starts.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# bytes per element of safetensors dtype names
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or not something we can read; says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: str            # file name relative to the checkpoint folder
    dtype: str           # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = -1     # absolute byte offset of the data in `file`; -1 when unknown (pickle)


@dataclass(frozen=True)
class CheckpointIndex:
    root: Path
    config: dict
    tensors: dict[str, TensorInfo]   # key -> info, in file order
    files: tuple[str, ...]
    format: str                      # "safetensors" | "pickle"

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def files_for(self, keys) -> list[str]:
        return sorted({self.tensors[k].file for k in keys})

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): no safetensors header. Re-download or re-copy it.")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 512 * 1024**2:
                raise CheckpointError(f"{path} is truncated or not a safetensors file (header says {header_len} bytes, "
                                      f"file has {size}). Re-download or re-copy it.")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header. Re-download or re-copy it.") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the "
                              f"file has {size}. Re-download or re-copy it.")
    return header


def _tensor_infos(root: Path, file: str) -> dict[str, TensorInfo]:
    header = read_safetensors_header(root / file)
    data_start = 8 + _header_len(root / file)
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        itemsize = DTYPE_BYTES.get(meta["dtype"])
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            # A header whose byte range disagrees with its shape would make every read of this tensor wrong.
            raise CheckpointError(f"{root / file} has a corrupt header: {key!r} is {meta['dtype']}{list(shape)} "
                                  f"({math.prod(shape) * itemsize} bytes) but spans {end - begin} bytes. "
                                  "Re-download or re-copy it.")
        infos[key] = TensorInfo(key=key, file=file, dtype=meta["dtype"], shape=shape, nbytes=end - begin,
                                offset=data_start + begin)
    return infos


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{root} has no config.json: point model.path at a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def open_index(root: Path, allow_pickle: bool = False) -> CheckpointIndex:
    """Map every tensor of a checkpoint folder to its file, dtype, shape and size, from headers only."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist")
    config = _read_config(root)
    if (root / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((root / SAFETENSORS_INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{root / SAFETENSORS_INDEX} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{root / SAFETENSORS_INDEX} names {len(missing)} missing file(s): {missing[:3]}. "
                                  "The download or copy is incomplete: fetch those shards again.")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(_tensor_infos(root, f))
        for key, f in weight_map.items():
            if key not in tensors or tensors[key].file != f:
                raise CheckpointError(f"{root / SAFETENSORS_INDEX} maps {key!r} to {f}, but that file does not hold it")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{root} shards hold tensors the index does not list, e.g. {extra[:3]}: "
                                  "the index is stale; regenerate it")
        return CheckpointIndex(root, config, tensors, tuple(files), "safetensors")
    if (root / SAFETENSORS_SINGLE).is_file():
        tensors = _tensor_infos(root, SAFETENSORS_SINGLE)
        return CheckpointIndex(root, config, tensors, (SAFETENSORS_SINGLE,), "safetensors")
    if (root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise CheckpointError(f"{root} holds only pickle (.bin) weights, which can run arbitrary code when loaded. "
                                  "Convert it to safetensors, or opt in with model.allow_pickle=true if you trust it.")
        return _open_pickle_index(root, config)
    raise CheckpointError(f"{root} holds no model.safetensors or {SAFETENSORS_INDEX}: not a Hugging Face "
                          "safetensors checkpoint")


def _open_pickle_index(root: Path, config: dict) -> CheckpointIndex:
    import torch  # only for the opt-in pickle path

    if (root / PICKLE_INDEX).is_file():
        weight_map = json.loads((root / PICKLE_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [PICKLE_SINGLE]
    tensors = {}
    for f in files:
        if not (root / f).is_file():
            raise CheckpointError(f"{root} index names missing file {f}")
        state = torch.load(root / f, map_location="cpu", mmap=True, weights_only=True)
        for key, t in state.items():
            dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype, str(t.dtype))
            tensors[key] = TensorInfo(key, f, dtype, tuple(t.shape), t.numel() * t.element_size())
    return CheckpointIndex(root, config, tensors, tuple(files), "pickle")
