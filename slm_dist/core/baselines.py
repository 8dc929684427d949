"""The depth-pruning methods SLM is compared with, as plans built from cached statistics.

PURE: statistics in, plans out (no files, devices, Ray or logging). Every plan is a ``planner.LayerPlan``
wrapping a ``planner.MergePlan`` (windows and a merge rule), so one merge path writes every method's
checkpoint (the wrapper lives beside MergePlan: `slm-dist merge` reads a method's plan.json without torch).

Removing a set of layers is written as ``drop`` windows: a maximal run of removed layers
``a..b`` becomes the window ``(a-1, b)``, which keeps layer ``a-1`` (kept, since the run is
maximal) and removes ``a..b``. That is exact for any set that keeps layer 0. A set that removes
layer 0 has no such form (a window always keeps its bottom layer) and is refused with the reason.

Indexing: layers ``0..N-1``. Boundary ``b`` of a statistics matrix is the residual stream
between layers: ``b = 0`` is the embedding output (input of layer 0), ``b = i + 1`` the output of
layer ``i`` (as in the CKA matrix of ``planner``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from slm_dist.core.planner import LayerPlan, MergePlan, PlanError
from slm_dist.core.types import Window


def layer_plan(method: str, num_layers: int, windows: Sequence[Window], rule: str, **details: Any) -> LayerPlan:
    return LayerPlan(method, MergePlan(num_layers, tuple(windows), rule, "cka", None), details)


def removal_windows(num_layers: int, removed: Sequence[int]) -> tuple[Window, ...]:
    """``drop`` windows that remove exactly ``removed`` (each maximal run a..b -> window (a-1, b))."""
    gone = sorted(set(int(i) for i in removed))
    if gone and not (0 <= gone[0] and gone[-1] < num_layers):
        raise PlanError(f"layers to remove {gone} must lie in 0..{num_layers - 1}")
    if len(gone) >= num_layers:
        raise PlanError(f"cannot remove all {num_layers} layers")
    if gone and gone[0] == 0:
        raise PlanError(f"removing layer 0 (asked to remove {gone}) cannot be written as merge windows: a window "
                        "always keeps its bottom layer. Protect layer 0 (protect_first=1) for this method")
    windows: list[Window] = []
    for i in gone:
        if windows and windows[-1][1] == i - 1:
            windows[-1] = (windows[-1][0], i)
        else:
            windows.append((i - 1, i))
    return tuple(windows)


def removal_plan(method: str, num_layers: int, removed: Sequence[int], **details: Any) -> LayerPlan:
    return layer_plan(method, num_layers, removal_windows(num_layers, removed), "drop", **details)


def _check_count(num_layers: int, n: int, candidates: int, method: str) -> None:
    if not 0 < n <= candidates:
        raise PlanError(f"{method}: cannot remove {n} layers of a {num_layers}-layer model with {candidates} "
                        f"removable; ask for 1..{candidates}")


# ------------------------------------------------------------------------------------ ShortGPT
def shortgpt(block_influence: Sequence[float] | Tensor,  # [N]: 1 - mean cos(layer input, layer output)
             n: int, protect_first: int = 0, protect_last: int = 0) -> LayerPlan:
    """ShortGPT (Men et al. 2024): remove the ``n`` layers of lowest Block Influence (ties: lower index).

    The paper protects no layer; ``protect_first`` / ``protect_last`` keep layers at the ends out of
    the choice (layer 0 must be kept for the plan to be written, see the module docstring).
    """
    bi = [float(x) for x in torch.as_tensor(block_influence, dtype=torch.float64)]
    num_layers = len(bi)
    candidates = list(range(protect_first, num_layers - protect_last))
    _check_count(num_layers, n, len(candidates), "shortgpt")
    if any(math.isnan(bi[i]) for i in candidates):
        raise PlanError(f"shortgpt: Block Influence has NaN entries {bi}; recompute the statistics")
    chosen = sorted(sorted(candidates, key=lambda i: (bi[i], i))[:n])
    return removal_plan("shortgpt", num_layers, chosen, block_influence=bi)


# ------------------------------------------------------------------------------- angular block
def angular_distance_matrix(states: Tensor) -> Tensor:  # states: [samples, N+1, hidden] -> [N+1, N+1] float64
    """Mean over samples of arccos(cos(x_i, x_j)) / pi between every pair of boundaries.

    Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") measure it on the
    hidden state of each sequence's last token.
    """
    x = torch.nn.functional.normalize(states.double(), dim=-1)
    cos = torch.einsum("sih,sjh->sij", x, x).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(0)


def angular_block(distance: Tensor | Sequence[Sequence[float]],  # [N+1, N+1] boundary distances
                  n: int, protect_first: int = 0, protect_last: int = 0) -> LayerPlan:
    """Gromov et al.: remove the block of ``n`` consecutive layers l..l+n-1 whose input and output
    are closest, l* = argmin_l d(x^l, x^(l+n)) (ties: the lowest l)."""
    d = torch.as_tensor(distance, dtype=torch.float64)
    if d.dim() != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise PlanError(f"angular: the distance matrix must be (N+1) x (N+1), got {tuple(d.shape)}")
    num_layers = d.shape[0] - 1
    starts = list(range(protect_first, num_layers - protect_last - n + 1))
    if not 0 < n or not starts:
        raise PlanError(f"angular: no block of {n} layers fits a {num_layers}-layer model with "
                        f"protect_first={protect_first}, protect_last={protect_last}")
    scores = {l: float(d[l, l + n]) for l in starts}
    best = min(starts, key=lambda l: (scores[l], l))
    return removal_plan("angular", num_layers, range(best, best + n), block_start=best,
                        block_distance=scores[best], distances={str(l): v for l, v in scores.items()})


# ----------------------------------------------------------------------------- drop the top n
def last_layers(num_layers: int, n: int) -> LayerPlan:
    """Remove the last ``n`` layers (the final norm and head stay)."""
    _check_count(num_layers, n, num_layers - 1, "last_layers")
    return removal_plan("last_layers", num_layers, range(num_layers - n, num_layers))


# ------------------------------------------------------------------------------------- LaCo
def laco_windows(num_layers: int, n: int, window_layers: int = 4, gap_layers: int = 1,
                 protect_first: int = 1, protect_last: int = 1) -> LayerPlan:
    """LaCo-style fixed windows (Yang et al. 2024), merged by RDSC (rule ``sum``).

    Windows of ``window_layers`` consecutive layers (LaCo's C; each removes C-1) are laid from the
    top down, starting below the ``protect_last`` top layers, with ``gap_layers`` layers left
    between windows, until ``n`` layers are removed; the lowest window is shortened to hit ``n``
    exactly. LaCo itself also checks an output-similarity threshold per merge and may merge into
    an already merged layer; this baseline keeps only its fixed-window geometry and merge formula.
    """
    if window_layers < 2 or gap_layers < 0:
        raise PlanError(f"laco: window_layers must be >= 2 and gap_layers >= 0, got {window_layers}, {gap_layers}")
    if n <= 0:
        raise PlanError(f"laco: n must be >= 1, got {n}")
    windows: list[Window] = []
    hi, left = num_layers - 1 - protect_last, n
    while left > 0:
        size = min(window_layers, left + 1)
        lo = hi - size + 1
        if lo < protect_first:
            raise PlanError(f"laco: {n} layers do not fit in windows of {window_layers} with gaps of {gap_layers} "
                            f"between layers {protect_first}..{num_layers - 1 - protect_last}; ask for fewer "
                            "layers, larger windows or smaller gaps")
        windows.append((lo, hi))
        left -= size - 1
        hi = lo - 1 - gap_layers
    return layer_plan("laco", num_layers, sorted(windows), "sum", window_layers=window_layers, gap_layers=gap_layers)


# ------------------------------------------------------------------------------------- SLEB
PlanLoss = Callable[[tuple[Window, ...]], float]  # drop windows -> calibration loss, lower is better


def sleb(num_layers: int, n: int, loss: PlanLoss, protect_first: int = 1, protect_last: int = 0) -> LayerPlan:
    """SLEB (Song et al., "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
    Transformer Blocks", ICML 2024): remove ``n`` layers one at a time; at each step every remaining
    layer is removed on trial from the model pruned so far, and the one whose removal gives the lowest
    calibration loss goes (ties: the lower index).

    ``loss`` scores a removal as its ``drop`` windows (``removal_windows``); the paper's metric is the
    perplexity of the calibration text, ``compare`` passes its log (mean next-token NLL on the cached
    calibration batches, ``Backend.score_plan``), which ranks the same. Deviation: layer 0 is kept
    (``protect_first`` >= 1; a plan cannot drop it, see the module docstring); the paper may remove
    any block, which on trained models it does not pick.

    ``details["last_step"]``: every trial of the final step as [layer, loss], best first
    (``sleb_finalists`` turns the best of them into plans).
    """
    candidates = list(range(protect_first, num_layers - protect_last))
    _check_count(num_layers, n, len(candidates), "sleb")
    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    ranked: list[int] = []
    for _ in range(n):
        left = [i for i in candidates if i not in removed]
        scores = {i: float(loss(removal_windows(num_layers, [*removed, i]))) for i in left}
        if any(math.isnan(v) for v in scores.values()):
            raise PlanError(f"sleb: a trial removal scored NaN ({scores}); check the compute dtype")
        ranked = sorted(left, key=lambda i: (scores[i], i))
        removed.append(ranked[0])
        steps.append({"removed": ranked[0], "loss": scores[ranked[0]]})
    last = [[i, scores[i]] for i in ranked]
    return removal_plan("sleb", num_layers, removed, order=removed, steps=steps, last_step=last)


def sleb_finalists(num_layers: int, details: dict[str, Any], m: int) -> list[tuple[Window, ...]]:
    """The ``m`` best plans of SLEB's final step (``sleb``'s details), best first: the layers of its
    first n - 1 steps and each of the ``m`` trial removals of its last step that scored lowest. The
    first is SLEB's own plan. A later fit can change their order (``plan.rerank``): the plain removal
    that costs least is not always the one a correction repairs best."""
    if m < 1:
        raise PlanError(f"sleb_finalists: m must be >= 1, got {m}")
    kept = details["order"][:-1]
    return [removal_windows(num_layers, [*kept, layer]) for layer, _ in details["last_step"][:m]]
