"""Calibrated merges (rule ``scaled``): one alpha per window, chosen on the calibration samples.

The merged projections are theta_lo + alpha * sum_{k>lo} (theta_k - theta_lo) (``merge.merge_tensor``
with rule ``scaled``): alpha = 0 is ``drop``, 1 the paper's ``sum``, 1/n the ``mean``. The paper's
sum diverges on windows of more than two layers (it adds every member's full delta), drop throws
the members away; the best point is in between and differs per window, so it is searched.

What alpha minimises is local to the window: run the merged layer on the window's ORIGINAL input
h_{lo-1} and compare with the window's original output h_hi (squared error over token rows,
position 0 left out: its massive activations would swamp the sum). The loss is reported relative
to ||h_hi - h_{lo-1}||^2, what skipping the whole window would cost, so 1.0 means "no better than
removing the window outright". Only the window's stage runs, on a few cached calibration batches.

Layout: the search itself (grid, golden section) is PURE and takes any loss callable; the stage
glue at the bottom (``fit_window_alpha``) builds the callable from a ``StageWorker``'s cached inputs
and layers, and is what ``StageWorker.fit_alpha`` runs on the stage that holds the window's lo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from slm_dist.workers.stage_worker import StageWorker

Window = tuple[int, int]  # inclusive (lo, hi) original layer indices

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...: the bracket shrinks by this per step


class AlphaSearchError(ValueError):
    """The alpha search got unusable inputs (empty grid, non-finite loss, bad window)."""


@dataclass(frozen=True)
class AlphaFit:
    """The chosen alpha of one window and every (alpha, loss) the search evaluated."""

    window: Window
    alpha: float
    loss: float  # relative: 1.0 = as bad as skipping the window
    tried: tuple[tuple[float, float], ...]  # (alpha, relative loss), in evaluation order

    def to_json(self) -> dict:
        return {"window": list(self.window), "alpha": self.alpha, "loss": self.loss,
                "tried": [[a, v] for a, v in self.tried]}


# --------------------------------------------------------------------------------------------
# Pure search
# --------------------------------------------------------------------------------------------


def alpha_grid(window_layers: int, points: int = 6) -> list[float]:
    """``points`` evenly spaced alphas on [0, 1] plus 1/n: drop, mean and sum are always tried."""
    if window_layers < 2:
        raise AlphaSearchError(f"a window has at least 2 layers, got {window_layers}")
    if points < 2:
        raise AlphaSearchError(f"the alpha grid needs at least 2 points (0 and 1), got {points}")
    return sorted({i / (points - 1) for i in range(points)} | {1.0 / window_layers})


def search_alpha(
    loss: Callable[[float], float],
    grid: Sequence[float],
    refine_steps: int = 6,
) -> tuple[float, float, list[tuple[float, float]]]:
    """Least ``loss`` over ``grid``, then golden-section steps inside the best point's neighbours.

    Returns (alpha, loss, tried). The answer is the best point evaluated, so it is never worse
    than any grid point (0, 1/n and 1 included); golden section only helps where the loss is
    unimodal between the neighbours, which a smooth loss over a fine enough grid is.
    """
    points = sorted(set(float(a) for a in grid))
    if not points:
        raise AlphaSearchError("the alpha grid is empty")
    tried: list[tuple[float, float]] = []

    def f(a: float) -> float:
        value = float(loss(a))
        if math.isnan(value):
            raise AlphaSearchError(f"the window loss is NaN at alpha={a}; the merged layer overflows "
                                   "(check the compute dtype) or the calibration inputs are broken")
        tried.append((a, value))
        return value

    values = [f(a) for a in points]
    best = min(range(len(points)), key=lambda i: (values[i], points[i]))
    a = points[max(best - 1, 0)]
    b = points[min(best + 1, len(points) - 1)]
    if refine_steps > 0 and b > a:
        # Golden section on [a, b]: keep two interior points, drop the worse side each step.
        c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(refine_steps - 1):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - GOLDEN * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + GOLDEN * (b - a)
                fd = f(d)
    alpha, value = min(tried, key=lambda t: (t[1], t[0]))
    return alpha, value, tried


def squared_error(
    out: Tensor,  # [batch, seq, hidden]
    target: Tensor,  # [batch, seq, hidden]
    skip_first: bool = True,
) -> float:
    """Sum over token rows of ||out - target||^2 in float64; position 0 left out when ``skip_first``."""
    if out.shape != target.shape:
        raise AlphaSearchError(f"output and target shapes differ: {tuple(out.shape)} vs {tuple(target.shape)}")
    start = 1 if skip_first and out.shape[1] > 1 else 0
    diff = out[:, start:].double() - target[:, start:].double()
    return float((diff * diff).sum())


# --------------------------------------------------------------------------------------------
# Stage glue: runs inside the StageWorker that holds the window's lo
# --------------------------------------------------------------------------------------------


def fit_window_alpha(
    stage: StageWorker,
    window: Window,
    batch_ids: Sequence[int],
    grid_points: int = 6,
    refine_steps: int = 6,
    skip_first: bool = True,
) -> AlphaFit:
    """Choose the window's alpha on the stage's cached calibration inputs (see the module docstring).

    The stage must hold layer lo and have cached its inputs (``calibrate(..., cache_inputs=True)``).
    Window members above the stage are read from the checkpoint, as ``run_candidate`` does; the
    window's source tensors are held while it is fitted (its layers once, in the checkpoint dtype).
    """
    from slm_dist.merge import merge_window

    lo, hi = window
    check_window_on_stage(stage, window)
    if not batch_ids:
        raise AlphaSearchError("fit_window_alpha needs at least one calibration batch id")
    source, member = window_members(stage, window)

    # The window's original input h_{lo-1} and output h_hi, per batch. Members above this stage
    # run in a scratch layer built from the checkpoint, one at a time.
    inputs, targets = [], []
    with torch.inference_mode():
        for batch_id in batch_ids:
            h = stage.cached_input(batch_id, lo)
            inputs.append((h, stage._context(h)))
        outs = [h for h, _ in inputs]
        for layer_id in range(lo, hi + 1):
            module = member(layer_id)
            outs = [stage._run_layer(module, layer_id, x, ctx) for x, (_, ctx) in zip(outs, inputs)]
            del module
        targets = outs
        base = sum(squared_error(h, t, skip_first) for (h, _), t in zip(inputs, targets))
    if not base > 0.0:
        raise AlphaSearchError(f"window {list(window)} does not change its input on these batches "
                               f"(||h_hi - h_lo-1||^2 = {base}); nothing to fit")

    def loss(alpha: float) -> float:
        merged = scratch_layer(stage, lo, merge_window(source, "scaled", stage.arch.role, alpha))
        with torch.inference_mode():
            error = sum(squared_error(stage._run_layer(merged, lo, h, ctx), t, skip_first)
                        for (h, ctx), t in zip(inputs, targets))
        return error / base

    alpha, value, tried = search_alpha(loss, alpha_grid(hi - lo + 1, grid_points), refine_steps)
    return AlphaFit(window=(lo, hi), alpha=alpha, loss=value, tried=tuple(tried))


def check_window_on_stage(stage: StageWorker, window: Window) -> None:
    lo, hi = window
    if not (stage.spec.start <= lo < stage.spec.stop) or hi <= lo or hi >= stage.spec.num_layers:
        raise AlphaSearchError(f"window {list(window)} cannot be fitted on the stage holding layers "
                               f"[{stage.spec.start}, {stage.spec.stop}): its lo must be on this stage and hi > lo")


def scratch_layer(stage: StageWorker, layer_idx: int, tensors: dict[str, Tensor]) -> torch.nn.Module:
    """A decoder layer of the stage's class holding ``tensors``, in the stage's dtype and device."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        module = stage._layer_class(stage.config, layer_idx=layer_idx)
    for name, value in tensors.items():
        set_module_tensor_to_device(module, name, stage.device, value=value, dtype=stage.dtype)
    return module.eval().requires_grad_(False)


def window_members(stage: StageWorker, window: Window) -> tuple[list[dict[str, Tensor]],
                                                                 Callable[[int], torch.nn.Module]]:
    """The window's source tensors (layers lo..hi, checkpoint dtype, held while one window is fitted)
    and ``module(layer_id)``: the stage's own layer where it holds it, else a scratch layer built
    from those tensors (as ``run_candidate`` does), one at a time so at most one copy is alive."""
    from slm_dist.checkpoint.reader import LazyReader

    lo, hi = window
    reader = LazyReader(stage.index)  # a separate reader: `loaded_keys` keeps showing the stage's own slice
    held = dict(zip(stage.layer_ids, stage.layers))
    suffixes = [name for name, _ in held[lo].named_parameters()]
    source = [{s: reader.get(stage.arch.layer_key(i, s)) for s in suffixes} for i in range(lo, hi + 1)]
    reader.close()

    def module(layer_id: int) -> torch.nn.Module:
        return held[layer_id] if layer_id in held else scratch_layer(stage, layer_id, source[layer_id - lo])

    return source, module
