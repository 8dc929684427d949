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

from slm_dist.arch import get_arch
from slm_dist.checkpoint.folder import CheckpointError, inside, read_config, read_json_object
from slm_dist.core.planner import layers_for_param_ratio, max_layers_removed

__all__ = ["CheckpointError", "CheckpointIndex", "TensorInfo", "open_index", "read_safetensors_header"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# bytes per element of safetensors dtype names
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
    """The JSON header of one .safetensors file, checked entry by entry and against the file's size."""
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
            header = json.loads(f.read(header_len).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a safetensors file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header. Re-download or re-copy it.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object). Re-download or re-copy it.")
    for key, meta in header.items():
        if key != "__metadata__":
            _check_entry(path, key, meta)
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the "
                              f"file has {size}. Re-download or re-copy it.")
    return header


def _check_entry(path: Path, key: str, meta) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, a byte range that matches it."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt header: {key!r} {why}. Re-download or re-copy it.")

    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"has fields {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}, not dtype, shape "
                  "and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}, not one of {sorted(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        # A header whose byte range disagrees with its shape would make every read of this tensor wrong.
        raise bad(f"is {dtype}{shape} ({expected} bytes) but spans {offsets[1] - offsets[0]} bytes")


def _tensor_infos(root: Path, file: str) -> dict[str, TensorInfo]:
    header = read_safetensors_header(root / file)
    data_start = 8 + _header_len(root / file)
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        infos[key] = TensorInfo(key=key, file=file, dtype=meta["dtype"], shape=tuple(meta["shape"]),
                                nbytes=end - begin, offset=data_start + begin)
    return infos


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def read_weight_map(root: Path, name: str) -> dict[str, str]:
    """An index file's ``weight_map``: tensor name -> shard file, every shard confined to ``root``."""
    path = root / name
    data = read_json_object(inside(root, name, f"{root}"))
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path} has no weight_map (an object of tensor name -> shard file); regenerate the "
                              "index or re-download it")
    first_key: dict[str, str] = {}  # each shard resolved once: a 70B index names a few files thousands of times
    for key, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: weight_map[{key!r}] is {file!r}, not a file name")
        first_key.setdefault(file, key)
    for file, key in first_key.items():
        inside(root, file, f"{path}: weight_map[{key!r}]")
    return weight_map


def open_index(root: Path, allow_pickle: bool = False) -> CheckpointIndex:
    """Map every tensor of a checkpoint folder to its file, dtype, shape and size, from headers only."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} is a file, not a folder: point at the Hugging Face model folder")
    config = read_config(root)
    if (root / SAFETENSORS_INDEX).is_file():
        weight_map = read_weight_map(root, SAFETENSORS_INDEX)
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
        inside(root, SAFETENSORS_SINGLE, f"{root}")
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
        files = sorted(set(read_weight_map(root, PICKLE_INDEX).values()))
    else:
        files = [PICKLE_SINGLE]
    tensors = {}
    for f in files:
        path = inside(root, f, f"{root}")
        if not path.is_file():
            raise CheckpointError(f"{root} index names missing file {f}")
        try:
            # weights_only: the unpickler builds tensors and plain containers only, never arbitrary objects
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file, reported as such
            raise CheckpointError(f"{path} does not load as a PyTorch weights file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); re-download it or convert the "
                                  "model to safetensors") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        for key, t in state.items():
            dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype, str(t.dtype))
            tensors[key] = TensorInfo(key, f, dtype, tuple(t.shape), t.numel() * t.element_size())
    return CheckpointIndex(root, config, tensors, tuple(files), "pickle")


def layer_params(index: CheckpointIndex) -> tuple[int, int]:
    """(all parameters, parameters of one decoder layer) from shapes alone."""
    arch = get_arch(index.model_type)
    total = per_layer = 0
    for key, info in index.tensors.items():
        numel = math.prod(info.shape)
        total += numel
        split = arch.split_key(key)
        if split is not None and split[0] == 0:
            per_layer += numel
    return total, per_layer


def layers_for_ratio(index: CheckpointIndex, ratio: float, protect_first: int, protect_last: int,
                     max_window: int | None) -> int:
    """The layer count nearest ``ratio`` of all parameters; an error when no plan can remove it."""
    total, per_layer = layer_params(index)
    return layers_for_param_ratio(
        total, per_layer, ratio, max_layers_removed(index.num_layers, protect_first, protect_last, max_window))
