"""Statistics -> merge plan: which runs of consecutive layers fold into one layer.

Pure: takes a similarity matrix (or a scoring callable) and returns windows and a
``MergePlan``. No files, devices, Ray or logging here.

Layers are ``0..N-1``. Windows are INCLUSIVE ``(lo, hi)`` pairs of original layer indices
because that is the paper's notation (and what ``plan.json`` stores); the merged layer of a
window sits at position ``lo``. Code outside this module should convert to half-open ranges
(``range(lo, hi + 1)``) as soon as it iterates.

The CKA matrix is ``(N+1) x (N+1)``: index 0 is the embedding output h_{-1}, index ``i+1`` the
output h_i of layer ``i``. So the input of layer ``l`` is matrix index ``l`` and its output is
matrix index ``l+1``; window ``[lo..hi]`` touches matrix indices ``lo..hi+1``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from slm_dist.core.types import Window

if TYPE_CHECKING:  # torch only where a matrix is read: `plan --dry-run` counts layers without it
    from torch import Tensor

MERGE_RULES: tuple[str, ...] = ("reference", "sum", "mean", "drop", "scaled")
CRITERIA: tuple[str, ...] = ("cka", "output")

Decision = Literal["grow", "commit", "slide", "stop"]
Scorer = Callable[[Sequence[Window], Window], float]

_JSON_KEYS = ("num_layers_before", "num_layers_after", "windows", "rule", "criterion", "threshold", "index_map",
              "alphas", "corrections", "details")  # "details": free-form provenance (trace, search target); ignored when parsing


class PlanError(ValueError):
    """A plan, its inputs or a requested target is inconsistent; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# MergePlan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """Disjoint windows of consecutive layers, each folded into the layer at its ``lo``."""

    num_layers_before: int
    windows: tuple[tuple[int, int], ...]  # disjoint, sorted ascending, each hi > lo, inclusive
    rule: str  # merge rule, carried through to merge.py: "reference" | "sum" | "mean" | "drop" | "scaled"
    criterion: str  # "cka" | "output"
    threshold: float | None  # None for a plan written by hand (or found by the global search)
    alphas: tuple[float, ...] | None = None  # rule "scaled" only: one alpha per window, in window order
    # merge.correction=linear: the safetensors file holding each corrected window's map T
    # (core/correction_fit.py; keys merge.correction_name), and its sha256 so a changed file is noticed.
    corrections: str | None = None
    corrections_sha256: str | None = None

    def __post_init__(self) -> None:
        n = _as_int(self.num_layers_before, "num_layers_before")
        if n < 1:
            raise PlanError(f"num_layers_before must be >= 1, got {n}")
        windows = _normalize_windows(self.windows)
        # Coerce lists from JSON into the hashable, immutable form the dataclass promises.
        object.__setattr__(self, "num_layers_before", n)
        object.__setattr__(self, "windows", windows)
        _check_windows(windows, n)
        if self.rule not in MERGE_RULES:
            raise PlanError(f"unknown merge rule {self.rule!r}; known rules: {list(MERGE_RULES)}")
        if self.criterion not in CRITERIA:
            raise PlanError(f"unknown criterion {self.criterion!r}; known criteria: {list(CRITERIA)}")
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))
            _check_threshold(self.threshold)
        object.__setattr__(self, "alphas", _check_alphas(self.alphas, self.rule, windows))
        if (self.corrections is None) != (self.corrections_sha256 is None):
            raise PlanError("a plan's corrections need both the file and its sha256 (plan.json \"corrections\": "
                            "{\"file\": ..., \"sha256\": ...}); regenerate the plan")
        if self.corrections is not None and not windows:
            raise PlanError("a plan without windows has nothing to correct; drop its \"corrections\"")

    @property
    def alpha_map(self) -> dict[tuple[int, int], float] | None:
        """Window -> alpha for rule "scaled" (what merge.plan_tensor_jobs takes), else None."""
        return None if self.alphas is None else dict(zip(self.windows, self.alphas))

    @property
    def layers_removed(self) -> int:
        return sum(hi - lo for lo, hi in self.windows)

    @property
    def num_layers_after(self) -> int:
        return self.num_layers_before - self.layers_removed

    @property
    def index_map(self) -> list[int]:
        """Old layer i -> index of the new layer that carries it (a whole window maps to one index)."""
        window_lo = {layer: lo for lo, hi in self.windows for layer in range(lo, hi + 1)}
        mapping: list[int] = []
        new = -1
        for old in range(self.num_layers_before):
            if window_lo.get(old, old) == old:  # first layer of a window, or a layer left alone
                new += 1
            mapping.append(new)
        return mapping

    @property
    def new_to_old(self) -> list[int]:
        """New layer j -> the old layer whose position it takes (the window's lo, or itself)."""
        inner = {layer for lo, hi in self.windows for layer in range(lo + 1, hi + 1)}
        return [old for old in range(self.num_layers_before) if old not in inner]

    def window_of(self, old_layer: int) -> tuple[int, int] | None:
        if not 0 <= old_layer < self.num_layers_before:
            raise PlanError(
                f"layer {old_layer} is outside the model: valid layers are 0..{self.num_layers_before - 1}"
            )
        for lo, hi in self.windows:
            if lo <= old_layer <= hi:
                return (lo, hi)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers_before": self.num_layers_before,
            "num_layers_after": self.num_layers_after,
            "windows": [[lo, hi] for lo, hi in self.windows],
            "rule": self.rule,
            "criterion": self.criterion,
            "threshold": self.threshold,
            "index_map": self.index_map,
            **({"alphas": list(self.alphas)} if self.alphas is not None else {}),
            **({"corrections": {"file": self.corrections, "sha256": self.corrections_sha256}}
               if self.corrections is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MergePlan:
        """Rebuild and re-validate a plan; the derived fields stored in ``d`` must agree."""
        unknown = sorted(set(d) - set(_JSON_KEYS))
        if unknown:
            raise PlanError(f"plan JSON has unknown keys {unknown}; expected only {list(_JSON_KEYS)}")
        missing = [k for k in ("num_layers_before", "windows", "rule", "criterion", "threshold") if k not in d]
        if missing:
            raise PlanError(f"plan JSON is missing keys {missing}; it needs {list(_JSON_KEYS)}")
        plan = cls(
            num_layers_before=d["num_layers_before"],
            windows=d["windows"],
            rule=d["rule"],
            criterion=d["criterion"],
            threshold=d["threshold"],
            alphas=d.get("alphas"),
            **_corrections_from_json(d.get("corrections")),
        )
        if "num_layers_after" in d and d["num_layers_after"] != plan.num_layers_after:
            raise PlanError(
                f"plan JSON says num_layers_after={d['num_layers_after']} but its windows "
                f"{[list(w) for w in plan.windows]} leave {plan.num_layers_after} of {plan.num_layers_before} "
                "layers; the file was edited by hand or is corrupt: regenerate it with `slm-dist plan`"
            )
        if "index_map" in d and list(d["index_map"]) != plan.index_map:
            raise PlanError(
                f"plan JSON index_map {list(d['index_map'])} does not match its windows "
                f"{[list(w) for w in plan.windows]}, which give {plan.index_map}; regenerate it with `slm-dist plan`"
            )
        return plan


@dataclass(frozen=True)
class LayerPlan:
    """A baseline's plan (core/baselines.py, `slm-dist compare`): a ``MergePlan`` (windows and rule, what the
    export stage writes) named after the method that chose it.

    ``MergePlan.criterion`` only admits SLM's criteria, so the wrapped plan carries a
    placeholder there; every reader goes through this wrapper, whose ``criterion`` and
    ``to_json`` name the method. Other attributes (windows, rule, new_to_old, ...) are the plan's.
    """

    method: str                          # "shortgpt" | "angular" | "laco" | "last_layers" | "sleb" | "replaceme_*"
    plan: MergePlan
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def __getattr__(self, name: str) -> Any:
        if name in ("plan", "method", "details"):  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.plan, name)

    @property
    def criterion(self) -> str:
        return self.method

    @property
    def threshold(self) -> None:
        return None  # no similarity threshold: baselines pick layers by rank or position

    @property
    def removed(self) -> tuple[int, ...]:
        """Original layers that no longer have a layer of their own (the upper members of windows)."""
        return tuple(i for lo, hi in self.plan.windows for i in range(lo + 1, hi + 1))

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "criterion": self.method, "threshold": None, "method": self.method,
                "removed": list(self.removed), "details": self.details}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerPlan:
        """The plan ``to_json`` wrote (a `compare` method's plan.json), re-validated, so that `slm-dist merge`
        can build any compared method's checkpoint from its folder."""
        method = d.get("method")
        if not isinstance(method, str) or not method or d.get("criterion") != method:
            raise PlanError(f"a baseline's plan JSON names its method twice (\"method\" and \"criterion\"), got "
                            f"method={method!r}, criterion={d.get('criterion')!r}; regenerate it with `slm-dist compare`")
        details = d.get("details", {})
        if not isinstance(details, dict):
            raise PlanError(f"a baseline's plan JSON \"details\" must be an object, got {details!r}")
        inner = {k: v for k, v in d.items() if k not in ("method", "removed", "criterion")}
        plan = cls(method, MergePlan.from_json({**inner, "criterion": "cka"}), details)
        if "removed" in d and list(d["removed"]) != list(plan.removed):
            raise PlanError(f"a baseline's plan JSON says removed={list(d['removed'])} but its windows "
                            f"{[list(w) for w in plan.windows]} remove {list(plan.removed)}; the file was edited "
                            "by hand or is corrupt: regenerate it with `slm-dist compare`")
        return plan


def plan_from_json(d: Any) -> MergePlan | LayerPlan:
    """A stored plan (plan.json, a manifest's "plan"), re-validated: a `slm-dist compare` method's
    ``LayerPlan`` where it names its method, else a ``MergePlan``."""
    if isinstance(d, dict) and "method" in d:
        return LayerPlan.from_json(d)
    return MergePlan.from_json(d)


def _corrections_from_json(value: Any) -> dict[str, str | None]:
    if value is None:
        return {}
    if not isinstance(value, dict) or sorted(value) != ["file", "sha256"] or not all(
            isinstance(v, str) for v in value.values()):
        raise PlanError(f"plan JSON \"corrections\" must be {{\"file\": <path>, \"sha256\": <hex>}}, got {value!r}")
    return {"corrections": value["file"], "corrections_sha256": value["sha256"]}


def _check_alphas(alphas: Any, rule: str, windows: Sequence[Window]) -> tuple[float, ...] | None:
    if rule != "scaled":
        if alphas is not None:
            raise PlanError(f"alphas are only used by rule 'scaled', got alphas={alphas!r} with rule {rule!r}")
        return None
    if alphas is None or len(alphas) != len(windows):
        raise PlanError(f"rule 'scaled' needs one alpha per window: {len(windows)} windows "
                        f"{[list(w) for w in windows]}, got alphas={alphas!r}; fit them (merge.rule=scaled in "
                        "`slm-dist run`) or write them into plan.json")
    out = []
    for window, alpha in zip(windows, alphas):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise PlanError(f"alpha of window {list(window)} must be a finite number, got {alpha!r}")
        out.append(float(alpha))
    return tuple(out)


def _as_int(value: Any, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{name} must be an integer, got {value!r}") from None


def _normalize_windows(windows: Any) -> tuple[tuple[int, int], ...]:
    out = []
    for w in windows:
        if len(w) != 2:
            raise PlanError(f"each window must be a pair [lo, hi], got {list(w)!r}")
        out.append((_as_int(w[0], "window lo"), _as_int(w[1], "window hi")))
    return tuple(out)


def _check_windows(windows: Sequence[Window], num_layers: int) -> None:
    prev: Window | None = None
    for lo, hi in windows:
        if hi <= lo:
            raise PlanError(
                f"window [{lo}, {hi}] must span at least two layers (hi > lo, inclusive); "
                "a one-layer window merges nothing: leave it out"
            )
        if lo < 0 or hi >= num_layers:
            raise PlanError(f"window [{lo}, {hi}] is outside the model's layers 0..{num_layers - 1}")
        if prev is not None and lo <= prev[1]:
            raise PlanError(
                f"windows must be sorted ascending and disjoint, but [{prev[0]}, {prev[1]}] is followed by "
                f"[{lo}, {hi}]; sort them by lo and merge or split the overlapping ones"
            )
        prev = (lo, hi)


# --------------------------------------------------------------------------------------------
# Shared validation
# --------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    # `not (0 < t <= 1)` also rejects NaN.
    if not (0.0 < threshold <= 1.0):
        raise PlanError(
            f"threshold must be in (0, 1] (similarities above it merge; 1 merges nothing), got {threshold}"
        )


def _check_protect(num_layers: int, protect_first: int, protect_last: int) -> None:
    if num_layers < 1:
        raise PlanError(f"num_layers must be >= 1, got {num_layers}")
    if protect_first < 0 or protect_last < 0:
        raise PlanError(
            f"protect_first and protect_last must be >= 0, got protect_first={protect_first}, "
            f"protect_last={protect_last}"
        )
    if protect_first + protect_last > num_layers:
        raise PlanError(
            f"protect_first={protect_first} + protect_last={protect_last} protects more than the "
            f"{num_layers} layers the model has; lower them"
        )


def _check_max_window(max_window: int | None) -> None:
    if max_window is not None and max_window < 2:
        raise PlanError(
            f"max_window must be >= 2 layers (a window keeps one layer of its max_window), got {max_window}; "
            "use None for no cap"
        )


def sleb_trials(num_layers: int, n: int, protect_first: int = 1, protect_last: int = 0) -> int:
    """Trial removals SLEB's greedy (core/baselines.py ``sleb``) scores: every layer left, at each of its
    ``n`` steps. Here, torch-free, for the dry run."""
    removable = max(num_layers - protect_first - protect_last, 0)
    return sum(removable - i for i in range(min(n, removable)))


def max_layers_removed(num_layers: int, protect_first: int = 1, protect_last: int = 1,
                       max_window: int | None = None) -> int:
    """The most layers any plan can remove. M mergeable layers in windows of at most ``max_window``
    layers (None: no cap) need ceil(M / max_window) windows, and each window keeps one layer."""
    _check_protect(num_layers, protect_first, protect_last)
    _check_max_window(max_window)
    return _max_removable(num_layers, protect_first, protect_last, max_window)


def _max_removable(num_layers: int, protect_first: int, protect_last: int, max_window: int | None) -> int:
    mergeable = num_layers - protect_first - protect_last
    if mergeable < 2:
        return 0
    if max_window is None:
        return mergeable - 1
    return mergeable - math.ceil(mergeable / max_window)


# --------------------------------------------------------------------------------------------
# CKA criterion (the default)
# --------------------------------------------------------------------------------------------


def _cka_rows(cka: Tensor | Sequence[Sequence[float]]) -> list[list[float]]:
    """Validated float64 matrix as nested lists (element access in the planning loops is faster than on a tensor)."""
    import torch

    m = torch.as_tensor(cka, dtype=torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise PlanError(
            f"the CKA matrix must be square (N+1) x (N+1) with N >= 1 layers (row 0 = embedding output), "
            f"got shape {tuple(m.shape)}"
        )
    bad = (~torch.isfinite(m)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise PlanError(
            f"the CKA matrix has {len(bad)} non-finite entries, first at [{i}, {j}] = {m[i, j].item()}; "
            "the similarity statistics are broken (too few calibration samples, or overflow): recompute them"
        )
    # A pair is one number; if float noise made the matrix asymmetric, the stricter value decides.
    return torch.minimum(m, m.T).tolist()


def _window_min_table(s: list[list[float]]) -> list[list[float]]:
    """table[a][b] = min of s[i][j] over a <= i < j <= b (inf when a == b).

    Window [lo..hi] is admissible iff table[lo][hi+1] > T. Every pair in a..b either avoids a,
    avoids b, or is (a, b) itself, hence the O(size^2) recurrence.
    """
    size = len(s)
    table = [[math.inf] * size for _ in range(size)]
    for span in range(1, size):
        for a in range(size - span):
            b = a + span
            table[a][b] = min(table[a + 1][b], table[a][b - 1], s[a][b])
    return table


def _slide(
    table: list[list[float]],
    num_layers: int,
    threshold: float,
    protect_first: int,
    protect_last: int,
    max_window: int | None,
) -> list[Window]:
    """The sliding rule of DESIGN.md, top-down; windows come back sorted ascending."""
    windows: list[Window] = []
    hi = num_layers - 1 - protect_last
    while hi - 1 >= protect_first:
        lo = hi
        # Grow while [lo-1..hi] is admissible: every pair among matrix indices lo-1..hi+1 > T.
        while (
            lo - 1 >= protect_first
            and (max_window is None or hi - lo + 2 <= max_window)
            and table[lo - 1][hi + 1] > threshold
        ):
            lo -= 1
        if lo < hi:
            # [lo-1..hi] failed (or hit the floor / the cap): commit [lo..hi], the failing layer
            # lo-1 becomes the top of the next window.
            windows.append((lo, hi))
            hi = lo - 1
        else:
            hi -= 1  # even [hi-1..hi] failed: slide down one layer
    windows.reverse()
    return windows


def plan_windows_cka(
    cka: Tensor | Sequence[Sequence[float]],  # [N+1, N+1], row 0 = embedding output
    threshold: float,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> list[tuple[int, int]]:
    """Windows by the sliding rule: every pair among a window's input and outputs has CKA > threshold.

    Start at hi = N-1-protect_last and grow lo downward while admissible; a failing layer ends
    the window (committed if it has >= 2 layers) and starts the next one; a window still open
    at the bottom (lo == protect_first) is committed. ``max_window`` caps a window's layers.
    """
    _check_threshold(threshold)
    _check_max_window(max_window)
    rows = _cka_rows(cka)
    num_layers = len(rows) - 1
    _check_protect(num_layers, protect_first, protect_last)
    return _slide(_window_min_table(rows), num_layers, threshold, protect_first, protect_last, max_window)


# --------------------------------------------------------------------------------------------
# Threshold search and parameter targets
# --------------------------------------------------------------------------------------------


def search_threshold(
    cka: Tensor | Sequence[Sequence[float]],  # [N+1, N+1]
    target_layers_removed: int,
    protect_first: int = 1,
    protect_last: int = 1,
    max_window: int | None = None,
) -> tuple[float, list[tuple[int, int]]]:
    """The highest threshold whose plan removes exactly ``target_layers_removed`` layers, and that plan.

    A plan only changes where the threshold crosses a matrix value, so for T in [v_prev, v) the
    plan is constant; the candidates are the largest float below each distinct value v (the
    highest T of its interval, exact in float64) and 1.0. The removed count is not monotone in T
    (a failing pair can split one long window into two shorter ones), so every candidate is tried.
    """
    k = _as_int(target_layers_removed, "target_layers_removed")
    _check_max_window(max_window)
    rows = _cka_rows(cka)
    num_layers = len(rows) - 1
    _check_protect(num_layers, protect_first, protect_last)
    if k < 0:
        raise PlanError(f"target_layers_removed must be >= 0, got {k}")
    most = _max_removable(num_layers, protect_first, protect_last, max_window)
    if k > most:
        mergeable = num_layers - protect_first - protect_last
        cap = "" if max_window is None else f", and max_window={max_window} caps each window's layers"
        raise PlanError(
            f"cannot remove {k} layers: at most {most} can be removed. The model has {num_layers} layers, "
            f"{mergeable} of them mergeable (protect_first={protect_first}, protect_last={protect_last}), "
            f"every window keeps one layer{cap}. Ask for at most {most}, or protect fewer layers"
        )

    table = _window_min_table(rows)
    values = {v for i, row in enumerate(rows) for j, v in enumerate(row) if i < j}
    candidates = {1.0} | {t for t in (math.nextafter(v, -math.inf) for v in values) if 0.0 < t <= 1.0}
    best: dict[int, tuple[float, list[Window]]] = {}  # removed count -> (highest threshold, plan)
    for t in sorted(candidates, reverse=True):
        windows = _slide(table, num_layers, t, protect_first, protect_last, max_window)
        removed = sum(hi - lo for lo, hi in windows)
        best.setdefault(removed, (t, windows))
        if removed == k:
            return t, windows

    below = max((c for c in best if c < k), default=None)
    above = min((c for c in best if c > k), default=None)
    nearby = [f"{c} layers at threshold {best[c][0]!r}" for c in (below, above) if c is not None]
    raise PlanError(
        f"no threshold removes exactly {k} layers with this similarity matrix (N={num_layers}, "
        f"protect_first={protect_first}, protect_last={protect_last}, max_window={max_window}); "
        f"nearest reachable: {'; '.join(nearby)}. Ask for one of those layer counts "
        f"(all reachable: {sorted(best)})"
    )


def layers_for_param_ratio(
    total_params: int, params_per_layer: int, target_ratio: float, max_removable: int
) -> int:
    """Layer count whose removal is nearest ``target_ratio`` of ALL parameters (ties: fewer layers)."""
    if total_params <= 0 or params_per_layer <= 0 or params_per_layer > total_params:
        raise PlanError(
            f"need 0 < params_per_layer <= total_params, got params_per_layer={params_per_layer}, "
            f"total_params={total_params}"
        )
    if max_removable < 0:
        raise PlanError(f"max_removable must be >= 0, got {max_removable}")
    if not (0.0 < target_ratio < 1.0):
        raise PlanError(
            f"target_ratio is the fraction of all parameters to remove and must be in (0, 1), got {target_ratio}"
        )
    layer_ratio = params_per_layer / total_params
    wanted = target_ratio * total_params  # parameters to remove
    low = int(wanted // params_per_layer)
    k = low if abs(low * params_per_layer - wanted) <= abs((low + 1) * params_per_layer - wanted) else low + 1
    if k > max_removable:
        raise PlanError(
            f"target_ratio={target_ratio} needs about {k} layers ({layer_ratio:.4g} of the parameters each), "
            f"but at most {max_removable} can be removed, i.e. a ratio of {max_removable * layer_ratio:.4g}; "
            f"ask for at most {max_removable * layer_ratio:.4g} or protect fewer layers"
        )
    if k == 0:
        raise PlanError(
            f"target_ratio={target_ratio} is less than half a layer ({layer_ratio:.4g} of the parameters each), "
            f"so no layer would be removed; ask for at least {layer_ratio:.4g}"
        )
    return k


# --------------------------------------------------------------------------------------------
# Published-code criterion (criterion: output)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceStep:
    """One scorer call of the published loop and what the loop did with its score."""

    committed: tuple[tuple[int, int], ...]  # windows merged before this call, ascending
    trial: tuple[int, int]  # inclusive; lo == hi means "no extra merge" (see plan_windows_output)
    score: float
    decision: Decision


def plan_windows_output(
    num_layers: int,
    score: Scorer,
    threshold: float,
    protect_first: int = 1,
    protect_last: int = 1,
) -> tuple[list[tuple[int, int]], list[TraceStep]]:
    """The authors' released merge loop, transcribed exactly, quirks included.

    Source matched: compressionOrg/SLM-a-sliding-layer-merging-method, ``SLM.py`` (the
    ``while low_lay >= 0`` loop; ``ablation.py`` has the same control flow), derived from LaCo.
    Their variables map as ``high_lay -> hi``, ``low_lay -> lo``, ``THRESHOLD -> threshold``,
    ``cal_sim(original, merged)`` -> ``score(committed, trial)``::

        high_lay = N - 2; low_lay = high_lay - 1
        while low_lay >= 0:
            sim = cal_sim(merge(model, low_lay, high_lay))      # model holds committed merges
            if sim > T:                   low_lay -= 1                          # grow
            elif low_lay + 1 != high_lay: model = merge(model, low_lay + 1, high_lay)
                                          high_lay = low_lay                    # commit
            else:                         high_lay -= 1; low_lay -= 1           # slide

    ``score(committed, trial)`` must return the mean over calibration samples of the cosine
    between the final-norm hidden state of (original model with ``committed`` windows and
    ``trial`` merged) and that of the original model: always against the original (cumulative).
    ``committed`` is a tuple, ascending, so it can key a cache.

    Quirks kept on purpose (they change which windows come out):
    - After a commit the next trial is ``(lo, lo)``: a one-layer "window" that merges nothing, so
      the scorer re-scores the committed model alone (one extra forward pass per commit; scorers
      must accept lo == hi). That model scored > T two calls earlier, so it passes and growth resumes.
    - When a passing window reaches the floor the loop ends and that pending window is DROPPED,
      never committed (decision "stop"). Layer protect_first-1 (layer 0 by default) takes part
      in trials but can never be committed, which is how the authors protect layer 0.
    - A NaN score compares False and is treated as a failure, as in their code.

    ``protect_first=1, protect_last=1`` is the published setting; other values move the two
    ends (start hi = N-1-protect_last, loop while lo >= protect_first-1).
    """
    _check_threshold(threshold)
    _check_protect(num_layers, protect_first, protect_last)
    if protect_first < 1:
        raise PlanError(
            f"the published loop needs protect_first >= 1, got {protect_first}: its bottom window is "
            "always dropped, so it cannot merge the first layer; use criterion 'cka' to merge layer 0"
        )
    floor = protect_first - 1  # their `while low_lay >= 0`
    committed: list[Window] = []
    trace: list[TraceStep] = []
    hi = num_layers - 1 - protect_last
    lo = hi - 1
    while lo >= floor:
        before = tuple(sorted(committed))
        trial = (lo, hi)
        value = float(score(before, trial))
        decision: Decision
        if value > threshold:
            decision = "grow" if lo - 1 >= floor else "stop"
            lo -= 1
        elif lo + 1 != hi:
            if lo == hi:
                # Their code would "commit" the empty window [lo+1..lo] and re-score the same
                # model forever; a deterministic scorer cannot get here.
                previous = trace[-2].score  # the passing trial that became the commit
                raise PlanError(
                    f"the scorer returned {value} <= threshold {threshold} for the committed windows "
                    f"{list(before)} alone, but the same model scored {previous} > threshold two calls "
                    "earlier; the published loop would repeat this call forever. Make the scorer "
                    "deterministic (same calibration batches, eval mode, deterministic kernels)"
                )
            decision = "commit"
            committed.append((lo + 1, hi))
            hi = lo
        else:
            decision = "slide"
            hi -= 1
            lo -= 1
        trace.append(TraceStep(committed=before, trial=trial, score=value, decision=decision))
    return sorted(committed), trace
