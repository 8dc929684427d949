"""Pure: split decoder layers into contiguous, balanced stage slices that fit each stage's memory."""

from __future__ import annotations

import math
from typing import Sequence


class PartitionError(ValueError):
    pass


def _fits(layer_bytes: Sequence[int], num_stages: int, cap: int, fixed: Sequence[int]) -> list[tuple[int, int]] | None:
    """Greedy fill: with every stage holding at most ``cap`` bytes, return slices or None."""
    slices, start, stage, used = [], 0, 0, fixed[0]
    for i, b in enumerate(layer_bytes):
        if used + b > cap:
            if i == start or stage + 1 >= num_stages:
                return None
            slices.append((start, i))
            start, stage = i, stage + 1
            used = fixed[stage]
            if used + b > cap:
                return None
        used += b
    slices.append((start, len(layer_bytes)))
    return slices if len(slices) <= num_stages else None


def partition_layers(layer_bytes: Sequence[int], num_stages: int, budget_bytes: int | None = None,
                     first_extra_bytes: int = 0, last_extra_bytes: int = 0) -> list[tuple[int, int]]:
    """Half-open ``[start, stop)`` slices, one per stage, minimising the largest stage.

    ``first_extra_bytes`` / ``last_extra_bytes`` are what the first stage (embeddings) and the last
    (final norm, lm_head) hold besides layers. With ``budget_bytes`` set, a model that cannot fit is
    refused before anything loads, with the bytes needed, the bytes available and the stage count
    that would fit.
    """
    n = len(layer_bytes)
    if n == 0:
        raise PartitionError("the model has no decoder layers")
    if num_stages < 1:
        raise PartitionError(f"cluster.num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise PartitionError(f"cluster.num_stages={num_stages} is more than the model's {n} layers; "
                             f"use at most {n} stages")
    fixed = [0] * num_stages
    fixed[0] += first_extra_bytes
    fixed[-1] += last_extra_bytes
    total = sum(layer_bytes) + first_extra_bytes + last_extra_bytes
    if budget_bytes is not None:
        slices = _fits(layer_bytes, num_stages, budget_bytes, fixed)
        if slices is None:
            would_fit = stages_needed(layer_bytes, budget_bytes, first_extra_bytes, last_extra_bytes)
            fit_msg = (f"{would_fit} stages of this size would fit" if would_fit else
                       "no number of stages fits: a single layer plus the embeddings exceeds one stage")
            raise PartitionError(
                f"the model needs {total / 2**30:.2f} GiB ({total} bytes) of weights but {num_stages} stage(s) of "
                f"{budget_bytes / 2**30:.2f} GiB give {num_stages * budget_bytes / 2**30:.2f} GiB "
                f"(largest layer {max(layer_bytes)} bytes); {fit_msg}. Raise cluster.num_stages or the memory per stage.")
    # Binary search the smallest cap that still fits in num_stages slices.
    lo = max(max(layer_bytes) + max(fixed), math.ceil(total / num_stages))
    hi = total
    best = _fits(layer_bytes, num_stages, hi, fixed)
    while lo < hi:
        mid = (lo + hi) // 2
        found = _fits(layer_bytes, num_stages, mid, fixed)
        if found is not None:
            best, hi = found, mid
        else:
            lo = mid + 1
    best = _fits(layer_bytes, num_stages, lo, fixed) or best
    return _spread(best, num_stages)


def _spread(slices: list[tuple[int, int]], num_stages: int) -> list[tuple[int, int]]:
    """Greedy filling can use fewer stages than asked; split the largest slices so every stage works."""
    slices = list(slices)
    while len(slices) < num_stages:
        k = max(range(len(slices)), key=lambda i: slices[i][1] - slices[i][0])
        a, b = slices[k]
        if b - a < 2:
            break
        mid = (a + b) // 2
        slices[k:k + 1] = [(a, mid), (mid, b)]
    return slices


def stages_needed(layer_bytes: Sequence[int], budget_bytes: int, first_extra_bytes: int = 0,
                  last_extra_bytes: int = 0) -> int | None:
    """Fewest stages of ``budget_bytes`` that hold the model, or None if no count does."""
    for k in range(1, len(layer_bytes) + 1):
        fixed = [0] * k
        fixed[0] += first_extra_bytes
        fixed[-1] += last_extra_bytes
        if _fits(layer_bytes, k, budget_bytes, fixed) is not None:
            return k
    return None
