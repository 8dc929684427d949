"""Merge rules over tensors, and the corrections folded into a merged layer.

PURE: torch only. No files, no logging, no Ray. The merge worker reads tensors by key, hands
them here, and writes what comes back; ``merge_state_dict`` is the in-memory path for tests and
small models. Which tensors a plan merges (the key mapping) is `core/merge_jobs.py`, without torch.

Every rule sees one tensor name's values across a window, bottom layer first:
``[theta_lo, theta_lo+1, ..., theta_hi]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from slm_dist.arch import ArchSpec, Role
from slm_dist.core.merge_jobs import (
    Alpha,
    MergeError,
    alpha_per_window,
    check_alpha,
    check_rule,
    correction_name,
    plan_tensor_jobs,
    pool_rows,
    refit_rows,
    validate_windows,
)
from slm_dist.core.types import Window

# --------------------------------------------------------------------------------------------
# Rules over tensors
# --------------------------------------------------------------------------------------------


def merge_tensor(
    tensors: Sequence[Tensor],  # window values of one tensor name, bottom layer first; same shape
    role: Role,
    rule: str,
    alpha: float | None = None,
    *,
    keys: Sequence[str] | None = None,  # names of `tensors`, only to make errors point at them
) -> Tensor:  # same shape and dtype as the inputs; a fresh contiguous tensor
    """Merge one tensor name over a window with ``rule``.

    Norms (and q/k norms) are always taken from the bottom layer: the merged layer sits at
    position lo, and its normalisation scales are what the residual stream there expects.
    """
    check_rule(rule)
    check_alpha(rule, alpha)
    _check_window_tensors(tensors, keys)
    if role not in ("projection", "norm"):
        raise MergeError(f"role must be 'projection' or 'norm', got {role!r}")

    bottom, top = tensors[0], tensors[-1]
    if role == "norm" or rule == "drop":
        return _fresh(bottom)
    if rule == "reference":
        # The published SLM/LaCo loop updates the merged layer in place
        # (merged += theta_k - merged), which telescopes to the top layer's weights.
        return _fresh(top)
    if rule == "sum":
        return _scaled_delta(tensors, 1.0, keys)
    if rule == "mean":
        # theta_lo + (1/n) sum_k (theta_k - theta_lo) == mean_k theta_k; going through the same
        # formula keeps "mean" bit-identical to "scaled" with alpha = 1/n.
        return _scaled_delta(tensors, 1.0 / len(tensors), keys)
    assert rule == "scaled" and alpha is not None  # check_rule / check_alpha above
    return _scaled_delta(tensors, float(alpha), keys)


def merge_window(
    layers: Sequence[Mapping[str, Tensor]],  # one {suffix: tensor} per window layer, bottom first
    rule: str,
    roles: Callable[[str], Role],  # suffix -> role, e.g. ArchSpec.role
    alpha: float | None = None,
) -> dict[str, Tensor]:  # suffix -> merged tensor, in the bottom layer's order
    """Merge every tensor of a window's layers; all layers must carry the same suffixes."""
    if len(layers) == 0:
        raise MergeError("merge_window got no layers; a window holds at least one layer")
    bottom = layers[0]
    for position, layer in enumerate(layers[1:], start=1):
        missing = sorted(set(bottom) - set(layer))
        extra = sorted(set(layer) - set(bottom))
        if missing or extra:
            raise MergeError(
                f"window layer {position} (0 = bottom) has different tensors than the bottom layer: "
                f"missing {missing}, extra {extra}. Every layer of a window must carry the same tensors."
            )
    return {
        suffix: merge_tensor(
            [layer[suffix] for layer in layers],
            roles(suffix),
            rule,
            alpha,
            keys=[f"window layer {i}: {suffix}" for i in range(len(layers))],
        )
        for suffix in bottom
    }


def _scaled_delta(tensors: Sequence[Tensor], alpha: float, keys: Sequence[str] | None) -> Tensor:
    """theta_lo + alpha * sum_{k>lo} (theta_k - theta_lo), accumulated in float32 or wider.

    Computing in the low source precision would round every partial sum (bf16 keeps 8 bits of
    mantissa); float32 from the original weights, cast back once, rounds only at the end.
    """
    source_dtype = tensors[0].dtype
    if not source_dtype.is_floating_point:
        raise MergeError(
            f"cannot merge non-floating tensors arithmetically: dtype {source_dtype} "
            f"({_describe(keys, len(tensors))}). Only float weights are merged."
        )
    work_dtype = torch.promote_types(source_dtype, torch.float32)
    base = tensors[0].to(work_dtype)  # may alias the input: only read below
    # The same sums as `base + alpha * sum_k (theta_k - base)` written plainly, in place: each
    # `theta_k - base` is promoted on the fly (no upcast copy of theta_k), one scratch buffer serves
    # every member. Half the memory passes; the merge stage's `sum` runs on this loop.
    delta = torch.sub(tensors[1], base) if len(tensors) > 1 else torch.zeros_like(base)
    scratch = torch.empty_like(delta) if len(tensors) > 2 else None
    for theta in tensors[2:]:
        delta.add_(torch.sub(theta, base, out=scratch))
    if alpha != 1.0:
        delta.mul_(alpha)
    merged = delta.add_(base)  # base + alpha * delta; a new tensor, inputs untouched
    return merged.to(source_dtype).contiguous()


def _fresh(t: Tensor) -> Tensor:
    """A contiguous copy: outputs must not alias inputs that a caller could modify later."""
    return t.clone(memory_format=torch.contiguous_format)


def _check_window_tensors(tensors: Sequence[Tensor], keys: Sequence[str] | None) -> None:
    if len(tensors) == 0:
        raise MergeError("merge_tensor got no tensors; a window holds at least one layer")
    if keys is not None and len(keys) != len(tensors):
        raise MergeError(f"got {len(keys)} keys for {len(tensors)} tensors")
    for attr in ("shape", "dtype", "device"):
        seen = [getattr(t, attr) for t in tensors]
        if any(s != seen[0] for s in seen):
            names = keys if keys is not None else [f"tensor {i}" for i in range(len(tensors))]
            listing = ", ".join(f"{n}: {_fmt(s)}" for n, s in zip(names, seen))
            raise MergeError(
                f"tensors of one window must share {attr}, got {listing}. "
                "Convert the checkpoint to one dtype / check the layers are the same architecture."
            )


def _fmt(value: object) -> str:
    return str(tuple(value)) if isinstance(value, torch.Size) else str(value)


def _describe(keys: Sequence[str] | None, n: int) -> str:
    return ", ".join(keys) if keys is not None else f"{n} tensors"


def apply_correction(tensor: Tensor, matrix: Tensor, kind: str = "linear", part: str | None = None) -> Tensor:
    """Fold a window's correction (core/correction_fit.py) into its MLP output projection.

    ``linear``: T [d, d]; the layer then adds m T where it added m: weight [d, d_in] -> T^T W, bias
    [d] -> T^T b. ``refit``: X [d_in (+1), d] replaces the projection: weight -> X[:d_in]^T, bias ->
    X[d_in] (X has that last row only when the projection has a bias). ``pool`` [3 d_in, d]: the
    output projection as refit's X from its first d_in rows, and (``part`` gate / up) the input
    projections' rows after them (core/neuron_pool.py). Computed in float32 (float64 inputs stay
    float64) and returned in the tensor's dtype, a fresh tensor.
    """
    if kind == "refit":
        return _refitted(tensor, matrix)
    if kind == "pool":
        picked = matrix[pool_rows(part, tuple(tensor.shape), tuple(matrix.shape))]
        picked = picked.T if part is None else picked
        return picked.to(device=tensor.device, dtype=tensor.dtype).contiguous()
    if kind != "linear":
        raise MergeError(f"unknown correction kind {kind!r}; known: linear, refit, pool")
    d = matrix.shape[0]
    if matrix.dim() != 2 or matrix.shape[1] != d or tensor.dim() not in (1, 2) or tensor.shape[0] != d:
        raise MergeError(f"a correction [{d}, {d}] applies to an output projection with {d} output rows; got "
                         f"correction {tuple(matrix.shape)} and tensor {tuple(tensor.shape)}")
    work = torch.promote_types(tensor.dtype, torch.float32)
    out = matrix.to(device=tensor.device, dtype=work).T @ tensor.to(work)
    return out.to(tensor.dtype).contiguous()


def _refitted(tensor: Tensor, matrix: Tensor) -> Tensor:
    picked = matrix[refit_rows(tuple(tensor.shape), tuple(matrix.shape))]
    picked = picked.T if picked.dim() == 2 else picked  # X[:d_in] is the weight transposed; X[d_in] the bias
    return picked.to(device=tensor.device, dtype=tensor.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# In-memory reference path
# --------------------------------------------------------------------------------------------


def merge_state_dict(
    state_dict: Mapping[str, Tensor],
    windows: Sequence[Window],
    num_layers: int,
    arch: ArchSpec,
    rule: str,
    alpha: Alpha = None,  # for "scaled": one float, or {window: float} covering every window
    corrections: Mapping[Window, Tensor] | None = None,  # window -> its correction (merge.correction)
    correction_kind: str = "linear",
) -> dict[str, Tensor]:
    """The pruned state dict, every tensor a fresh copy (tests and small models)."""
    matrices = {tuple(w): t for w, t in (corrections or {}).items()}
    jobs = plan_tensor_jobs(state_dict.keys(), windows, num_layers, arch, rule, alpha,
                            {w: correction_name(w) for w in matrices}, correction_kind)
    alphas = alpha_per_window(rule, alpha, validate_windows(windows, num_layers))
    out: dict[str, Tensor] = {}
    for job in jobs:
        if job.window is None:
            out[job.out_key] = _fresh(state_dict[job.source_keys[0]])
            continue
        assert job.role is not None  # layer tensors always have a role
        tensors = [state_dict[key] for key in job.source_keys]
        out[job.out_key] = merge_tensor(tensors, job.role, job.rule, alphas[job.window], keys=job.source_keys)
        if job.correction is not None:
            out[job.out_key] = apply_correction(out[job.out_key], matrices[job.window], correction_kind,
                                                job.correction_part)
    return out

