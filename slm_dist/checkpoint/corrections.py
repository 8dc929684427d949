"""The file beside plan.json that holds a plan's corrections (``merge.correction: linear | refit | pool``).

One float32 tensor per corrected window, keyed ``merge.correction_name(window)``: linear T [hidden,
hidden], refit X [intermediate (+1), hidden], or pool [3 x intermediate, hidden] (X, then the chosen
gate and up rows: core/neuron_pool.py); the metadata says which (``kind``, linear when
absent). Windows whose fit kept the plain merge have no entry. The plan records the file's path and
sha256, and the export checks both before it writes a byte.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from slm_dist.checkpoint.writer import sha256_file
from slm_dist.core.correction_sizes import KINDS, check_kind
from slm_dist.core.merge_jobs import correction_name
from slm_dist.core.planner import MergePlan, PlanError
from slm_dist.core.types import Window

if TYPE_CHECKING:  # the export checks a plan's corrections file without importing torch
    from torch import Tensor

FILE_NAME = "corrections.safetensors"


def save_corrections(path: Path, matrices: Mapping[Window, Tensor], kind: str = "linear") -> str:
    """Write the corrections (temporary name, then rename) and return the file's sha256."""
    import safetensors.torch  # the module: see checkpoint/reader.py

    check_kind(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({correction_name(w): t.detach().float().cpu().contiguous()
                                 for w, t in sorted(matrices.items())}, str(tmp), metadata={"kind": kind})
    tmp.replace(path)
    return sha256_file(path)


def kind_of(path: Path | str) -> str:
    """Which correction family the file holds (its metadata ``kind``; files without one are linear)."""
    import safetensors  # the module: see checkpoint/reader.py

    with safetensors.safe_open(str(path), framework="pt") as f:
        kind = (f.metadata() or {}).get("kind", "linear")
    if kind not in KINDS:
        raise PlanError(f"{path} holds corrections of kind {kind!r}, which this slm-dist does not know "
                        f"(known: {list(KINDS)}); re-run the plan stage")
    return kind


def checked_windows(plan: MergePlan, hidden_size: int) -> dict[Window, str]:
    """Window -> key of each correction in the plan's file, after checking the file is the one the
    plan was made with, names only the plan's windows and holds maps of the model's hidden size
    (linear [hidden, hidden]; refit [intermediate (+1), hidden]; pool [3 x intermediate, hidden])."""
    if plan.corrections is None:
        return {}
    import safetensors  # the module: see checkpoint/reader.py

    path = Path(plan.corrections)
    if not path.is_file():
        raise PlanError(f"the plan's corrections file {path} is missing; re-run the plan stage (it writes "
                        f"{FILE_NAME} beside plan.json)")
    if sha256_file(path) != plan.corrections_sha256:
        raise PlanError(f"{path} changed since the plan was made (sha256 differs from plan.json); re-run the plan "
                        "stage rather than merge with corrections that belong to another plan")
    names = {correction_name(w): w for w in plan.windows}
    kind = kind_of(path)
    out = {}
    with safetensors.safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key not in names:
                raise PlanError(f"{path} holds {key!r}, which is not a window of the plan {list(plan.windows)}")
            shape = list(f.get_slice(key).get_shape())
            if len(shape) != 2 or shape[1] != hidden_size or (kind == "linear" and shape[0] != hidden_size) \
                    or (kind == "pool" and shape[0] % 3):
                raise PlanError(f"{path}: {key} is {shape}, but the model's hidden size is {hidden_size}: "
                                "the corrections belong to another model")
            out[names[key]] = key
    return out


def matrix_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every correction in the file (headers only)."""
    import safetensors  # the module: see checkpoint/reader.py

    with safetensors.safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def load_corrections(plan: MergePlan, hidden_size: int) -> dict[Window, Tensor]:
    """Every correction of the plan as float32 tensors (checked as ``checked_windows`` does)."""
    import safetensors  # the module: see checkpoint/reader.py

    keys = checked_windows(plan, hidden_size)
    with safetensors.safe_open(str(plan.corrections), framework="pt") as f:
        return {w: f.get_tensor(key).float() for w, key in keys.items()}


def read_correction(path: Path | str, key: str) -> Tensor:
    """One correction of the file as float32 (a merge job reads the one its tensor needs)."""
    import safetensors  # the module: see checkpoint/reader.py

    with safetensors.safe_open(str(path), framework="pt") as f:
        if key not in f.keys():
            raise PlanError(f"{path} has no correction {key!r}; regenerate the plan")
        return f.get_tensor(key).float()


@contextmanager
def correction_slice(path: Path | str, key: str) -> Iterator:
    """A lazy view of one correction: ``view.get_shape()``, and ``view[a:b, c:d]`` reads those elements
    only (a refit's projection is written in row blocks without the whole map in memory)."""
    import safetensors  # the module: see checkpoint/reader.py

    with safetensors.safe_open(str(path), framework="pt") as f:
        if key not in f.keys():
            raise PlanError(f"{path} has no correction {key!r}; regenerate the plan")
        yield f.get_slice(key)


# ------------------------------------------------------------------------- LinearPatch patches
PATCH_FILE_NAME = "patches.safetensors"


def save_patches(path: Path, patches: Mapping[int, Tensor]) -> str:
    """LinearPatch's residual-stream patches, keyed by the PRUNED model's layer they follow
    (``layer.<index>``); the file's sha256. They are not folded into any weight (core/linear_patch.py)."""
    import safetensors.torch  # the module: see checkpoint/reader.py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    safetensors.torch.save_file({f"layer.{i}": p.detach().float().cpu().contiguous()
                                 for i, p in sorted(patches.items())}, str(tmp), metadata={"kind": "linear_patch"})
    tmp.replace(path)
    return sha256_file(path)


def load_patches(path: Path | str, hidden_size: int) -> dict[int, Tensor]:
    """Layer index (pruned model) -> patch [hidden, hidden] float32, checked."""
    import safetensors  # the module: see checkpoint/reader.py

    out = {}
    with safetensors.safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("kind") != "linear_patch":
            raise PlanError(f"{path} is not a LinearPatch file (metadata kind linear_patch); regenerate it")
        for key in f.keys():
            prefix, _, index = key.partition(".")
            t = f.get_tensor(key).float()
            if prefix != "layer" or not index.isdigit() or tuple(t.shape) != (hidden_size, hidden_size):
                raise PlanError(f"{path}: entry {key!r} of shape {tuple(t.shape)} is not layer.<index> "
                                f"[{hidden_size}, {hidden_size}]; regenerate it")
            out[int(index)] = t
    return out
