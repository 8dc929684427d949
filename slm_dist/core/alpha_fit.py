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

This module is the PURE half: the search (grid, golden section) over any loss callable.
``workers/window_fits.py`` builds that callable from a stage's cached inputs and layers, on the
stage that holds the window's lo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from slm_dist.core.types import Window

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
