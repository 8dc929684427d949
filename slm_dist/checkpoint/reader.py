"""Read tensors by key, opening only the shard files that hold them."""

from __future__ import annotations

from pathlib import Path

# Module import, not `from safetensors import safe_open`: the latter at module level in code Ray
# ships to actors made them die at start.
import safetensors
import torch

from slm_dist.checkpoint.index import CheckpointError, CheckpointIndex


class LazyReader:
    """Tensors of one checkpoint, fetched by key. Keeps one handle per opened file; records which
    files and keys it actually touched so tests can assert a stage never read outside its slice."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._handles: dict[str, object] = {}
        self._pickles: dict[str, dict] = {}
        self.opened_files: set[str] = set()
        self.read_keys: list[str] = []

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

    def close(self) -> None:
        self._handles.clear()
        self._pickles.clear()
