"""Read tensors by key, opening only the shard files that hold them."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

# Module import, not `from safetensors import safe_open`: the latter at module level in code Ray
# ships to actors made them die at start.
import safetensors
import torch

from slm_dist.checkpoint.index import CheckpointError, CheckpointIndex, TensorInfo
from slm_dist.checkpoint.mapped import ByteReader, element_size


class LazyReader:
    """Tensors of one checkpoint, fetched by key. Keeps one handle per opened file; records which
    files and keys it actually touched so tests can assert a stage never read outside its slice."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._handles: dict[str, object] = {}
        self._pickles: dict[str, dict] = {}
        self.opened_files: set[str] = set()
        self.read_keys: list[str] = []
        self._rows: RowReader | None = None  # pread-based reads for read_into
        self._staging: torch.Tensor | None = None  # read_into's reused host buffer (uint8)

    def _handle(self, file: str):
        if file not in self._handles:
            path = Path(self.index.root) / file
            try:
                self._handles[file] = safetensors.safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot open {path}: {e}") from None
            self.opened_files.add(file)
        return self._handles[file]

    def get(self, key: str) -> torch.Tensor:
        info = self.index.tensors.get(key)
        if info is None:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.index.root}")
        self.read_keys.append(key)
        if self.index.format == "pickle":
            if info.file not in self._pickles:
                self._pickles[info.file] = torch.load(Path(self.index.root) / info.file, map_location="cpu",
                                                      mmap=True, weights_only=True)
                self.opened_files.add(info.file)
            return self._pickles[info.file][key]
        try:
            return self._handle(info.file).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {key!r} from {Path(self.index.root) / info.file}: {e}") from None

    def read_into(self, key: str, out: torch.Tensor, chunk_bytes: int = 16 << 20) -> torch.Tensor:
        """Copy tensor ``key`` into ``out`` (any device; float dtypes cast), a bounded chunk at a time.

        The point is the peak: reading a whole bf16 tensor and then casting it holds both copies,
        and safe_open's mapped pages count as resident besides. A host tensor of the stored dtype
        is read straight into; otherwise the bytes pass through one staging buffer of at most
        ``chunk_bytes``, kept for the reader's life and reused by every tensor. (A buffer per
        tensor is freed after each one; glibc then raises its mmap threshold and serves the next
        buffers and weights from a heap that keeps the freed ones: a stage loaded 1.35x its weights.)
        """
        info = self.index.tensors.get(key)
        if info is None:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.index.root}")
        if tuple(out.shape) != tuple(info.shape):
            raise CheckpointError(f"tensor {key!r} in {Path(self.index.root) / info.file} has shape "
                                  f"{list(info.shape)}, the model expects {list(out.shape)}: config.json and "
                                  "the weights disagree")
        if self.index.format == "pickle" or info.offset < 0:
            out.copy_(self.get(key))
            return out
        self.read_keys.append(key)
        self.opened_files.add(info.file)
        if self._rows is None:
            self._rows = RowReader(Path(self.index.root))
        numel = math.prod(info.shape)
        stored = torch_dtype(info.dtype)
        flat = out.view(-1)
        if out.device.type == "cpu" and out.dtype == stored:
            self._rows.read_flat(info, 0, numel, out=flat)  # nothing to cast: no buffer at all
            return out
        step = max(1, chunk_bytes // max(1, info.nbytes // max(numel, 1)))
        buf = self._staging_buffer(stored, min(step, numel))
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            flat[start:stop].copy_(self._rows.read_flat(info, start, stop, out=buf))
        return out

    def _staging_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging[:nbytes].view(dtype)

    def close(self) -> None:
        self._staging = None
        self._handles.clear()
        self._pickles.clear()
        if self._rows is not None:
            self._rows.close()
            self._rows = None


# safetensors dtype name -> torch dtype, for the raw reader below
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise CheckpointError(f"safetensors dtype {name!r} is not supported; known: {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def num_rows(info: TensorInfo) -> int:
    """Rows along dim 0; a 0-d tensor counts as one row."""
    return info.shape[0] if info.shape else 1


class RowReader(ByteReader):
    """Element or row ranges of safetensors tensors as torch tensors, one bounded range at a time:
    - `read_flat` preads into a buffer the caller owns (pass ``out`` to reuse one: fresh pages cost a
      fault each, a reused buffer is already resident), or into a fresh tensor;
    - `map_flat` is `map_bytes` as a tensor: a read-only view of the page cache, no copy.
    """

    def read_flat(self, info: TensorInfo, start: int, stop: int, out: torch.Tensor | None = None
                  ) -> torch.Tensor:  # [stop - start] in info's dtype
        """Elements ``[start, stop)`` of ``info`` in row-major order; into ``out[:stop - start]`` if given."""
        itemsize = element_size(info, start, stop)
        dtype = torch_dtype(info.dtype)
        length = (stop - start) * itemsize
        if out is None:
            buf = torch.empty(length, dtype=torch.uint8)
        else:
            if out.dtype != dtype or not out.is_contiguous() or out.numel() < stop - start:
                raise ValueError(f"out buffer for {info.key!r} must be a contiguous {dtype} tensor of at least "
                                 f"{stop - start} elements, got {out.dtype} with {out.numel()}")
            buf = out.view(-1)[:stop - start].view(torch.uint8)
        self.pread_into(info, info.offset + start * itemsize, memoryview(buf.numpy()))
        return buf.view(dtype)

    def map_flat(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:  # [stop - start], read-only
        """Elements ``[start, stop)`` of ``info`` as a view of the file's pages. Never write to it."""
        dtype = torch_dtype(info.dtype)
        data = self.map_bytes(info, start, stop)
        if not len(data):
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": the view is only read
            return torch.frombuffer(data, dtype=torch.uint8).view(dtype)

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:  # [stop - start, *shape[1:]]
        """Rows ``[start, stop)`` of ``info`` in its own dtype (the whole tensor for a 0-d one)."""
        rows = num_rows(info)
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"row range [{start}, {stop}) is outside {info.key!r} with {rows} rows")
        if not info.shape:
            return self.read_flat(info, 0, 1).reshape(())
        per_row = math.prod(info.shape[1:])
        return self.read_flat(info, start * per_row, stop * per_row).reshape(stop - start, *info.shape[1:])

    def __enter__(self) -> "RowReader":
        return self


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one small safetensors file (an adapter, not a model shard: those go through
    ``LazyReader`` by key)."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path))
