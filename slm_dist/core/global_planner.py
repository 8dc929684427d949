"""Global window search: the disjoint windows anywhere in the model that remove exactly k layers
at the least total cost, found by exact dynamic programming over the cached statistics.

Pure: tensors, lists and loss callables in, windows out. No files, devices, Ray or logging.

Why not the sliding rule: it grows windows greedily from the top, and on small models the top
layers are the fragile ones, so a layer target drags windows into them. Here every window
[lo..hi] (inclusive, the paper's notation; the merged layer sits at lo) gets a cost read from
the statistics, costs add over windows, and the DP returns the plan with the least total cost
(``plan_windows_global``) or the ``count`` cheapest distinct plans (``best_plans``). The
output-verified refinement (planning.PlanSearch.global_windows) measures a shortlist drawn from every cost
(``candidate_plans``: each cost's best plans and its best single block, ``best_block``; ranked by
``rank_plans``) and climbs from the best one (``local_search`` over ``neighbour_plans``); only the
loss callables it passes in run forward passes.

Window costs (0 for a window that changes nothing). With ``drop`` the window emits
layer lo's output h_lo where the model had h_hi, so what a window loses is how far h_lo is from
h_hi; a merged layer emits something in between, so the same quantities bound it:

- ``cka_drop``: 1 - CKA(h_lo, h_hi), matrix indices lo+1 and hi+1. Pairs across the whole
  window, so it sees drift that per-layer scores add up only approximately.
- ``cka_window``: 1 - the least CKA among the window's input and outputs (matrix indices
  lo..hi+1): the paper's admissibility criterion as a cost.
- ``block_influence``: sum of Block Influence (1 - cos(input, output)) of the removed layers
  lo+1..hi. Window sets reach every set of removable layers, so the least-cost plan removes the
  k removable layers of least Block Influence: ShortGPT's plan, within protect_first/last.
- ``angular``: the same sum with angular distance arccos(cos)/pi.
- ``measured``: the same sum with each layer's MEASURED damage: how much the calibration loss
  rises when that layer alone is removed (one forward pass per layer, from the layer upward on
  cached inputs). The statistics above are proxies; this is the thing itself, up to interactions
  between removed layers, which the refinement then measures for the shortlisted plans.

CKA matrix indices: 0 is the embedding output h_{-1}, i+1 the output h_i of layer i.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slm_dist.core.planner import PlanError, _check_max_window, _check_protect, _max_removable
from slm_dist.core.types import Window

COSTS: tuple[str, ...] = ("cka_drop", "cka_window", "block_influence", "angular", "measured")
STATISTIC_COSTS: tuple[str, ...] = COSTS[:4]  # the costs that need no forward pass


@dataclass(frozen=True)
class ScoredPlan:
    """Windows (ascending, disjoint) and their total cost under one cost table."""

    windows: tuple[Window, ...]
    cost: float

    @property
    def layers_removed(self) -> int:
        return sum(hi - lo for lo, hi in self.windows)


# --------------------------------------------------------------------------------------------
# Window costs from the statistics
# --------------------------------------------------------------------------------------------


def window_costs(
    cost: str,
    cka: Tensor | None = None,  # [N+1, N+1], row 0 = embedding output
    block_influence: Tensor | None = None,  # [N]
    angular_distance: Tensor | None = None,  # [N]
    measured: Tensor | None = None,  # [N]: loss increase when layer l alone is removed; inf = not removable
) -> Tensor:  # [N, N] float64; entry [lo, hi] (hi > lo) is the cost of window [lo..hi], elsewhere nan
    """The cost of every window [lo..hi] under the named cost (see the module docstring)."""
    if cost not in COSTS:
        raise PlanError(f"unknown window cost {cost!r}; known costs: {list(COSTS)}")
    if cost in ("cka_drop", "cka_window"):
        if cka is None:
            raise PlanError(f"window cost {cost!r} needs the CKA matrix (similarity.json 'cka')")
        m = _square(cka, "cka")
        m = torch.minimum(m, m.T)  # a pair is one number: float noise must not make it order-dependent
        n = m.shape[0] - 1
        out = torch.full((n, n), math.nan, dtype=torch.float64)
        for lo in range(n):
            least = float(m[lo, lo + 1])  # the one pair among matrix indices lo..lo+1
            for hi in range(lo + 1, n):
                # Extend the window by output hi+1: its pairs with every earlier index lo..hi.
                least = min(least, float(m[lo:hi + 1, hi + 1].min()))
                out[lo, hi] = 1.0 - (float(m[lo + 1, hi + 1]) if cost == "cka_drop" else least)
        return out
    per_layer = {"block_influence": block_influence, "angular": angular_distance, "measured": measured}[cost]
    if per_layer is None:
        raise PlanError(f"window cost {cost!r} needs the per-layer {cost.replace('_', ' ')} values")
    v = torch.as_tensor(per_layer, dtype=torch.float64)
    if v.dim() != 1 or len(v) < 1 or v.isnan().any() or (v == -math.inf).any():
        raise PlanError(f"{cost} must be a vector of numbers (or +inf: never removed), one per layer, "
                        f"got {v.tolist()}")
    n = len(v)
    out = torch.full((n, n), math.nan, dtype=torch.float64)
    for lo in range(n):
        total = 0.0
        for hi in range(lo + 1, n):
            total += float(v[hi])  # removed layers lo+1..hi
            out[lo, hi] = total
    return out


def removable_layer_ids(num_layers: int, protect_first: int = 1, protect_last: int = 1) -> range:
    """Layers some window can remove: a window's lo >= protect_first is kept, its hi <= N-1-protect_last."""
    _check_protect(num_layers, protect_first, protect_last)
    return range(protect_first + 1, num_layers - protect_last)


def _square(m: Tensor | Sequence[Sequence[float]], name: str) -> Tensor:
    t = torch.as_tensor(m, dtype=torch.float64)
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise PlanError(f"{name} must be a square (N+1) x (N+1) matrix with N >= 1, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise PlanError(f"{name} has non-finite entries; the statistics are broken: recompute them")
    return t


# --------------------------------------------------------------------------------------------
# Exact search
# --------------------------------------------------------------------------------------------


def plan_windows_global(
    costs: Tensor | Sequence[Sequence[float]],  # [N, N]: costs[lo][hi] for window [lo..hi]
    layers_removed: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> ScoredPlan:
    """The disjoint windows removing exactly ``layers_removed`` layers with the least total cost."""
    return best_plans(costs, layers_removed, 1, protect_first, protect_last, max_window)[0]


def best_plans(
    costs: Tensor | Sequence[Sequence[float]],  # [N, N]: costs[lo][hi] for window [lo..hi]
    layers_removed: int,
    count: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> list[ScoredPlan]:
    """The ``count`` cheapest distinct window sets removing exactly ``layers_removed`` layers, cheapest first.

    Windows lie in the mergeable layers [protect_first, N - protect_last), span 2..max_window
    layers, and do not overlap. DP over (next undecided layer i, layers removed so far r): from
    (i, r) either layer i stays alone, or a window [i..j] starts there and leads to
    (j+1, r + j - i). Each state keeps its ``count`` cheapest prefixes: a plan whose prefix is not
    among them loses to ``count`` plans that share its suffix, so the final list is exact.
    Cost O(N * max_window * k * count). A window with cost +inf is never chosen; NaN is an error.
    Equal costs are ordered by layout (at the first layer where two plans differ, the one that leaves
    it alone first), so results are deterministic.
    """
    table = _cost_rows(costs)
    n = len(table)
    k = _int(layers_removed, "layers_removed")
    count = _int(count, "count")
    if count < 1:
        raise PlanError(f"count must be >= 1 (how many plans to return), got {count}")
    _check_protect(n, protect_first, protect_last)
    _check_max_window(max_window)
    if k < 0:
        raise PlanError(f"layers_removed must be >= 0, got {k}")
    most = _max_removable(n, protect_first, protect_last, max_window)
    if k > most:
        mergeable = max(n - protect_first - protect_last, 0)
        cap = "" if max_window is None else f", and max_window={max_window} caps each window's layers"
        raise PlanError(
            f"cannot remove {k} layers: at most {most} can be removed. The model has {n} layers, {mergeable} of "
            f"them mergeable (protect_first={protect_first}, protect_last={protect_last}), every window keeps "
            f"one layer{cap}. Ask for at most {most}, or protect fewer layers")
    first, stop = protect_first, n - protect_last  # mergeable layers: [first, stop)
    width = (stop - first) if max_window is None else max_window

    # states[i][r]: up to `count` entries (cost, layout, windows), cheapest first. `layout` is one
    # symbol per decided layer (0 alone, 1 window start, 2 inside): prefixes at one state cover the
    # same layers, so comparing layouts never depends on what the suffix appends.
    Entry = tuple[float, tuple[int, ...], tuple[Window, ...]]
    states: list[dict[int, list[Entry]]] = [dict() for _ in range(stop + 1)]
    states[first][0] = [(0.0, (), ())]
    for i in range(first, stop):
        for r, entries in sorted(states[i].items()):
            _offer(states[i + 1], r, [(c, lay + (0,), w) for c, lay, w in entries], count)
            for j in range(i + 1, min(i + width, stop)):
                removed = r + j - i
                if removed > k:
                    break
                c_ij = table[i][j]
                if c_ij == math.inf:
                    continue
                extended = [(c + c_ij, lay + (1,) + (2,) * (j - i), w + ((i, j),)) for c, lay, w in entries]
                _offer(states[j + 1], removed, extended, count)
    final = states[stop].get(k, [])
    if not final:
        raise PlanError(
            f"no plan removes exactly {k} layers: every window that could do it has cost +inf (forbidden). "
            "Allow more windows (finite costs) or ask for fewer layers")
    return [ScoredPlan(windows, cost) for cost, _, windows in final]


def _offer(state: dict[int, list], r: int, entries: list, count: int) -> None:
    merged = sorted(state.get(r, []) + entries, key=lambda e: (e[0], e[1]))
    state[r] = merged[:count]


def _cost_rows(costs: Tensor | Sequence[Sequence[float]]) -> list[list[float]]:
    t = torch.as_tensor(costs, dtype=torch.float64)
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 1:
        raise PlanError(f"window costs must be a square N x N table (entry [lo, hi] = cost of window "
                        f"[lo..hi]), got shape {tuple(t.shape)}")
    n = t.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    bad = (upper & (t.isnan() | (t == -math.inf))).nonzero()
    if len(bad):
        lo, hi = bad[0].tolist()
        raise PlanError(f"window cost [{lo}, {hi}] is {t[lo, hi].item()}; costs must be numbers or +inf "
                        "(forbidden window): the statistics behind them are broken, recompute them")
    return t.tolist()


def _int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PlanError(f"{name} must be an integer, got {value!r}") from None


# --------------------------------------------------------------------------------------------
# Candidates for the output-verified refinement
# --------------------------------------------------------------------------------------------


def best_block(
    costs: Tensor | Sequence[Sequence[float]],  # [N, N]: costs[lo][hi] for window [lo..hi]
    layers_removed: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> ScoredPlan | None:
    """The least-cost plan that removes ``layers_removed`` layers in ONE window (a contiguous block),
    or None when no single window may (max_window, protected layers, k = 0, only +inf costs).
    Ties: the lowest window."""
    table = _cost_rows(costs)
    k = _int(layers_removed, "layers_removed")
    _check_protect(len(table), protect_first, protect_last)
    _check_max_window(max_window)
    if k < 1 or (max_window is not None and k + 1 > max_window):
        return None
    stop = len(table) - protect_last  # the window [lo..lo+k] must end below the protected top
    options = [(table[lo][lo + k], lo) for lo in range(protect_first, stop - k) if table[lo][lo + k] != math.inf]
    if not options:
        return None
    cost, lo = min(options)
    return ScoredPlan(((lo, lo + k),), cost)


BLOCK_SUFFIX = " (one block)"


def candidate_plans(
    cost_tables: dict[str, Tensor],  # cost name -> [N, N] window costs
    layers_removed: int,
    count: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> list[tuple[str, ScoredPlan]]:
    """Up to ``count`` distinct plans drawn from several costs: every cost's best plan, then every
    cost's best one-block plan, then every cost's second best, third best, ...; duplicates dropped.

    Costs disagree most about which windows matter (CKA sees representational drift, Block
    Influence per-layer change), and no statistic predicts the damage reliably, so the refinement
    gets every cost's best plan before any cost's second best (round robin). Costs add over
    windows but damage does not: removing a contiguous block often costs less than its layers'
    costs summed, so the sums favour many small windows. Each cost's best single block (the shape
    Gromov et al. choose) is offered right after the best plans, so the measured ranking sees both
    shapes. Each entry names the cost that proposed it ("<cost> (one block)" for a block).
    """
    if count < 1:
        raise PlanError(f"count must be >= 1, got {count}")
    ranked = {name: best_plans(table, layers_removed, count, protect_first, protect_last, max_window)
              for name, table in cost_tables.items()}
    blocks = {name + BLOCK_SUFFIX: best_block(table, layers_removed, protect_first, protect_last, max_window)
              for name, table in cost_tables.items()}
    tiers = [{name: plans[0] for name, plans in ranked.items()}, blocks]
    tiers += [{name: plans[rank] for name, plans in ranked.items() if rank < len(plans)} for rank in range(1, count)]
    out: list[tuple[str, ScoredPlan]] = []
    seen: set[tuple[Window, ...]] = set()
    for tier in tiers:
        for name, plan in tier.items():
            if plan is not None and plan.windows not in seen and len(out) < count:
                seen.add(plan.windows)
                out.append((name, plan))
    return out


@dataclass(frozen=True)
class RankedPlan:
    """A candidate after the output-verified refinement: who proposed it, its cost there, its measured loss."""

    windows: tuple[Window, ...]
    proposed_by: str
    cost: float
    loss: float  # lower is better (calibration NLL, or 1 - cosine)

    def to_json(self) -> dict:
        return {"windows": [list(w) for w in self.windows], "proposed_by": self.proposed_by, "cost": self.cost,
                "loss": self.loss}


def rank_plans(
    candidates: Sequence[tuple[str, ScoredPlan]],
    loss: Callable[[tuple[Window, ...]], float],  # measured on the calibration samples; lower is better
) -> list[RankedPlan]:
    """Candidates ordered by measured loss (ties: statistics order). The statistics only shortlist;
    what the forward passes measure decides, since no statistic predicts compounded damage exactly."""
    if not candidates:
        raise PlanError("no candidate plans to rank")
    ranked = []
    for order, (name, plan) in enumerate(candidates):
        value = float(loss(plan.windows))
        if math.isnan(value):
            raise PlanError(f"the measured loss of plan {[list(w) for w in plan.windows]} is NaN: the candidate model "
                            "overflows; try another merge rule or check the compute dtype")
        ranked.append((value, order, RankedPlan(plan.windows, name, plan.cost, value)))
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))]


# --------------------------------------------------------------------------------------------
# Local search around the best plan
# --------------------------------------------------------------------------------------------


def windows_removing(layers: Sequence[int]) -> tuple[Window, ...]:
    """The windows whose ``drop`` removes exactly ``layers``: each maximal run a..b is window [a-1..b]."""
    out: list[Window] = []
    for layer in sorted(set(layers)):
        if out and out[-1][1] == layer - 1:
            out[-1] = (out[-1][0], layer)
        else:
            out.append((layer - 1, layer))
    return tuple(out)


def neighbour_plans(
    windows: Sequence[Window],
    num_layers: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
    layer_cost: Sequence[float] | None = None,  # [N]: predicted damage of removing each layer alone
) -> list[tuple[Window, ...]]:
    """Plans one swap away: one removed layer kept, one kept layer removed (the same count).

    A plan is the set of layers its windows remove (window [lo..hi] removes lo+1..hi), so every
    window set is reachable by swaps, and shifting a window or handing a layer from one window to
    another is one swap. With ``layer_cost`` the swaps come cheapest predicted change first
    (cost of the layer added minus cost of the layer given back), so a search with a small budget
    measures the promising ones; without it, nearest swaps first. Plans that break max_window or
    the protected layers are left out. Deterministic order.
    """
    _check_protect(num_layers, protect_first, protect_last)
    _check_max_window(max_window)
    removable = range(protect_first + 1, num_layers - protect_last)
    removed = {layer for lo, hi in windows for layer in range(lo + 1, hi + 1)}
    if not removed <= set(removable):
        raise PlanError(f"windows {[list(w) for w in windows]} remove layers outside the removable "
                        f"{protect_first + 1}..{num_layers - protect_last - 1}")
    cap = math.inf if max_window is None else max_window
    moves = []
    for out in sorted(removed):
        for into in removable:
            if into in removed:
                continue
            plan = windows_removing((removed - {out}) | {into})
            if any(hi - lo + 1 > cap for lo, hi in plan):
                continue
            predicted = 0.0 if layer_cost is None else float(layer_cost[into]) - float(layer_cost[out])
            moves.append((predicted, abs(into - out), out, into, plan))
    moves.sort(key=lambda m: m[:4])
    return [plan for *_, plan in moves]


def local_search(
    start: tuple[Window, ...],
    loss: Callable[[tuple[Window, ...]], float],  # lower is better
    neighbours: Callable[[tuple[Window, ...]], list[tuple[Window, ...]]],
    max_evals: int,
    known: dict[tuple[Window, ...], float] | None = None,  # plans already measured (not re-measured)
) -> tuple[tuple[Window, ...], float, list[tuple[tuple[Window, ...], float]]]:
    """First-improvement hill climbing: measure neighbours in order, move to the first that is better,
    stop at a plan no neighbour beats or after ``max_evals`` new measurements.

    Returns (best plan, its loss, every new (plan, loss) in measurement order).
    """
    known = dict(known or {})
    best = tuple(start)
    best_loss = known[best] if best in known else float(loss(best))
    known[best] = best_loss
    measured: list[tuple[tuple[Window, ...], float]] = []
    moved = True
    while moved and len(measured) < max_evals:
        moved = False
        for plan in neighbours(best):
            if plan in known:
                continue  # measured before: not better than the plan we moved on from
            if len(measured) >= max_evals:
                break
            value = float(loss(plan))
            known[plan] = value
            measured.append((plan, value))
            if value < best_loss:
                best, best_loss, moved = plan, value, True
                break
    return best, best_loss, measured
