"""Which output tensor comes from which source tensors: the merge's key mapping, without torch.

A plan's windows and the source checkpoint's key set become one `TensorJob` per output tensor
(copy it, or merge a window's values with a rule, then maybe correct it). No tensors here, so the
export can plan and check every shard, and a merge that only copies can run, without importing
torch; the rules themselves are in `core/merge.py`.

Windows are INCLUSIVE ``(lo, hi)`` original layer indices (the paper's notation); the merged
layer takes position ``lo``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from slm_dist.arch import ArchSpec, Role
from slm_dist.core.types import Window

RULES: tuple[str, ...] = ("reference", "sum", "mean", "drop", "scaled")
COPY = "copy"  # TensorJob.rule for a tensor that is renamed, not merged

Alpha = float | Mapping[Window, float] | None


class MergeError(ValueError):
    """A merge request that cannot be carried out as asked (bad rule, window, key set or tensors)."""


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise MergeError(f"unknown merge rule {rule!r}; known rules: {list(RULES)}")


def check_alpha(rule: str, alpha: float | None) -> None:
    if rule == "scaled":
        if alpha is None:
            raise MergeError("rule 'scaled' needs alpha (0 = drop, 1 = sum, 1/n = mean); got None")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise MergeError(f"alpha must be a finite float, got {alpha!r}")
    elif alpha is not None:
        raise MergeError(f"alpha is only used by rule 'scaled', got alpha={alpha!r} with rule {rule!r}")


def refit_rows(tensor_shape: tuple[int, ...], matrix_shape: tuple[int, ...]) -> slice | int:
    """Which rows of a refit X [d_in (+1), d] make this tensor: all d_in for the weight [d, d_in], the
    last for the bias [d]. Raises MergeError when the shapes do not belong together."""
    ok = len(matrix_shape) == 2 and len(tensor_shape) in (1, 2) and tensor_shape[0] == matrix_shape[1]
    if ok and len(tensor_shape) == 2 and matrix_shape[0] in (tensor_shape[1], tensor_shape[1] + 1):
        return slice(0, tensor_shape[1])
    if ok and len(tensor_shape) == 1 and matrix_shape[0] >= 2:
        return matrix_shape[0] - 1
    raise MergeError(f"a refit [d_in (+1 with a bias), d] replaces an output projection weight [d, d_in] (and its "
                     f"bias [d]); got refit {list(matrix_shape)} and tensor {list(tensor_shape)}")


POOL_PARTS = ("gate", "up")  # TensorJob.correction_part of a pool's input projections (arch.mlp_in_modules)


def pool_rows(part: str | None, tensor_shape: tuple[int, ...], matrix_shape: tuple[int, ...]) -> slice:
    """Which rows of a pool correction [3 * intermediate, hidden] (core/neuron_pool.py) make this tensor:
    X = the down projection transposed (part None, weight [hidden, intermediate]), then the gate rows,
    then the up rows (parts gate / up, weight [intermediate, hidden]). Raises MergeError when the shapes
    do not belong together."""
    ok = len(matrix_shape) == 2 and len(tensor_shape) == 2
    if ok and part is None and matrix_shape == (3 * tensor_shape[1], tensor_shape[0]):
        return slice(0, tensor_shape[1])
    if ok and part in POOL_PARTS and matrix_shape == (3 * tensor_shape[0], tensor_shape[1]):
        start = (1 + POOL_PARTS.index(part)) * tensor_shape[0]
        return slice(start, start + tensor_shape[0])
    raise MergeError(f"a pool correction [3 x intermediate, hidden] replaces a gated MLP's projections (down "
                     f"[hidden, intermediate], gate and up [intermediate, hidden]); got pool {list(matrix_shape)} "
                     f"and the {part or 'down'} projection {list(tensor_shape)}")


def corrected_suffixes(arch: ArchSpec, kind: str) -> dict[str, str | None]:
    """Per-layer suffix -> correction part of every tensor a correction of ``kind`` replaces or folds
    into: the MLP output projection (part None), and for ``pool`` the gate and up projections too."""
    parts: dict[str, str | None] = {suffix: None for suffix in arch.mlp_out_suffixes()}
    if kind == "pool":
        parts.update(zip(arch.mlp_in_suffixes(), POOL_PARTS))
    return parts


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor."""

    out_key: str
    source_keys: tuple[str, ...]  # 1 key = copy; several = merge over the window, bottom first
    role: Role | None  # None for non-layer tensors (embeddings, final norm, lm_head)
    rule: str  # COPY when not merged, else the merge rule
    window: Window | None
    alpha: float | None = None  # rule "scaled" only: the window's alpha
    correction: str | None = None  # the window's correction (its key), applied after the rule
    correction_part: str | None = None  # a pool correction's gate or up rows (POOL_PARTS); None: the output projection

    def __post_init__(self) -> None:
        merged = self.window is not None
        if self.correction is not None and not merged:
            raise MergeError(f"TensorJob {self.out_key!r} has a correction but no window; only merged layers have one")
        if not self.source_keys:
            raise MergeError(f"TensorJob {self.out_key!r} has no source keys")
        if self.correction_part is not None and (self.correction is None or self.correction_part not in POOL_PARTS):
            raise MergeError(f"TensorJob {self.out_key!r}: correction_part {self.correction_part!r} needs a correction "
                             f"and is one of {list(POOL_PARTS)}")
        if merged and self.rule not in RULES:
            raise MergeError(f"TensorJob {self.out_key!r} merges with unknown rule {self.rule!r}")
        if merged:
            check_alpha(self.rule, self.alpha)
        if not merged and (self.rule != COPY or len(self.source_keys) != 1):
            raise MergeError(
                f"TensorJob {self.out_key!r} has no window, so it must copy one key; "
                f"got rule {self.rule!r} and {len(self.source_keys)} keys"
            )


def validate_windows(windows: Sequence[Window], num_layers: int) -> list[Window]:
    """Windows sorted by lo, after checking each spans >= 2 layers in range and none overlap."""
    if num_layers < 1:
        raise MergeError(f"num_layers must be >= 1, got {num_layers}")
    checked = []
    for window in windows:
        if len(window) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in window):
            raise MergeError(f"a window is an inclusive pair of layer indices (lo, hi), got {window!r}")
        lo, hi = window
        if not 0 <= lo < hi < num_layers:
            raise MergeError(
                f"window {window!r} must satisfy 0 <= lo < hi < num_layers={num_layers} "
                "(inclusive indices; a window merges at least 2 layers)"
            )
        checked.append((lo, hi))
    checked.sort()
    for (lo_a, hi_a), (lo_b, hi_b) in zip(checked, checked[1:]):
        if lo_b <= hi_a:
            raise MergeError(f"windows {(lo_a, hi_a)} and {(lo_b, hi_b)} overlap; windows must be disjoint")
    return checked


def new_index_map(num_layers: int, windows: Sequence[Window]) -> list[int]:
    """``index_map[old] = new``: kept layers shift down; a window's layers all map to its lo's slot."""
    starts = {lo: hi for lo, hi in validate_windows(windows, num_layers)}
    index_map: list[int] = []
    new = 0
    old = 0
    while old < num_layers:
        hi = starts.get(old, old)
        index_map.extend([new] * (hi - old + 1))
        new += 1
        old = hi + 1
    return index_map


def rename_layer_key(key: str, index_map: Sequence[int], arch: ArchSpec) -> str:
    """``model.layers.<old>.x`` -> ``model.layers.<index_map[old]>.x``; non-layer keys unchanged."""
    split = arch.split_key(key)
    if split is None:
        return key
    layer, suffix = split
    if layer >= len(index_map):
        raise MergeError(
            f"key {key!r} names layer {layer}, but the model has {len(index_map)} layers "
            f"(0..{len(index_map) - 1}); check num_hidden_layers against the checkpoint"
        )
    return arch.layer_key(index_map[layer], suffix)


def plan_tensor_jobs(
    source_keys: Iterable[str],
    windows: Sequence[Window],
    num_layers: int,
    arch: ArchSpec,
    rule: str,
    alphas: Alpha = None,  # rule "scaled": one float, or {window: alpha} covering every window
    corrections: Mapping[Window, str] | None = None,  # window -> correction key (merge.correction)
    correction_kind: str = "linear",  # pool also replaces the gate and up projections
) -> list[TensorJob]:
    """One job per output tensor, every source key consumed by exactly one job.

    Order: non-layer keys (sorted), then layer keys sorted by (new layer, suffix), so the plan is
    a function of the key set, not of the order a reader listed it in.
    """
    check_rule(rule)
    windows = validate_windows(windows, num_layers)
    alpha_of = alpha_per_window(rule, alphas, windows)
    index_map = new_index_map(num_layers, windows)
    layers, passthrough = _group_by_layer(source_keys, num_layers, arch)
    _check_required_suffixes(layers, arch)

    jobs = [TensorJob(key, (key,), None, COPY, None) for key in sorted(passthrough)]
    window_of = {lo: (lo, hi) for lo, hi in windows}
    corrections = _corrections_per_window(corrections, windows)
    parts = corrected_suffixes(arch, correction_kind)
    members = {layer for lo, hi in windows for layer in range(lo + 1, hi + 1)}
    layer_jobs: list[tuple[int, str, TensorJob]] = []
    for layer in range(num_layers):
        if layer in members:
            continue  # consumed by the window whose bottom is below
        new = index_map[layer]
        window = window_of.get(layer)
        if window is None:
            for suffix in layers[layer]:
                job = TensorJob(arch.layer_key(new, suffix), (arch.layer_key(layer, suffix),),
                                arch.role(suffix), COPY, None)
                layer_jobs.append((new, suffix, job))
            continue
        _check_window_suffixes(window, layers, arch)
        for suffix in layers[layer]:
            sources = tuple(arch.layer_key(k, suffix) for k in range(window[0], window[1] + 1))
            correction = corrections.get(window) if suffix in parts else None
            job = TensorJob(arch.layer_key(new, suffix), sources, arch.role(suffix), rule, window, alpha_of[window],
                            correction, parts[suffix] if correction is not None else None)
            layer_jobs.append((new, suffix, job))
    layer_jobs.sort(key=lambda item: (item[0], item[1]))
    return jobs + [job for _, _, job in layer_jobs]


def _group_by_layer(
    source_keys: Iterable[str], num_layers: int, arch: ArchSpec
) -> tuple[list[set[str]], list[str]]:
    """Suffixes per layer index, and the keys outside the layer prefix."""
    layers: list[set[str]] = [set() for _ in range(num_layers)]
    passthrough: list[str] = []
    seen: set[str] = set()
    for key in source_keys:
        if key in seen:
            raise MergeError(f"source key {key!r} listed twice; every key must appear once")
        seen.add(key)
        split = arch.split_key(key)
        if split is None:
            passthrough.append(key)
            continue
        layer, suffix = split
        if layer >= num_layers:
            raise MergeError(
                f"key {key!r} names layer {layer}, but num_layers={num_layers} "
                f"(valid 0..{num_layers - 1}); check num_hidden_layers against the checkpoint"
            )
        arch.role(suffix)  # unknown suffixes fail loudly here, naming the suffix
        layers[layer].add(suffix)
    return layers, passthrough


def _check_required_suffixes(layers: Sequence[set[str]], arch: ArchSpec) -> None:
    missing = [
        arch.layer_key(layer, suffix)
        for layer, suffixes in enumerate(layers)
        for suffix in arch.required_suffixes
        if suffix not in suffixes
    ]
    if missing:
        shown = missing[:10] + ([f"... {len(missing) - 10} more"] if len(missing) > 10 else [])
        raise MergeError(
            f"checkpoint lacks tensors that every {arch.model_type!r} layer needs: {shown}. "
            "Is the checkpoint complete and the model_type right?"
        )


def _check_window_suffixes(window: Window, layers: Sequence[set[str]], arch: ArchSpec) -> None:
    """Every window member must carry exactly the bottom layer's tensors (optional biases included)."""
    lo, hi = window
    bottom = layers[lo]
    for layer in range(lo + 1, hi + 1):
        missing = sorted(bottom - layers[layer])
        extra = sorted(layers[layer] - bottom)
        if missing:
            raise MergeError(
                f"window {window} cannot merge: missing {[arch.layer_key(layer, s) for s in missing]} "
                f"that the bottom layer {lo} has"
            )
        if extra:
            raise MergeError(
                f"window {window} cannot merge: {[arch.layer_key(layer, s) for s in extra]} "
                f"has no counterpart in the bottom layer {lo}"
            )


def correction_name(window: Window) -> str:
    """The key a window's correction is stored under in a plan's corrections file."""
    return f"window.{window[0]}-{window[1]}"


def _corrections_per_window(corrections: Mapping[Window, str] | None, windows: Sequence[Window]) -> dict[Window, str]:
    given = {tuple(w): key for w, key in (corrections or {}).items()}
    stray = [w for w in given if w not in windows]
    if stray:
        raise MergeError(f"corrections name windows {stray} that are not in the plan {list(windows)}")
    return given


def alpha_per_window(rule: str, alpha: Alpha, windows: Sequence[Window]) -> dict[Window, float | None]:
    if not isinstance(alpha, Mapping):
        check_alpha(rule, alpha)
        return {window: alpha for window in windows}
    if rule != "scaled":
        raise MergeError(f"alpha is only used by rule 'scaled', got a per-window alpha with rule {rule!r}")
    given = {tuple(w): a for w, a in alpha.items()}
    missing = [w for w in windows if w not in given]
    extra = [w for w in given if w not in windows]
    if missing or extra:
        raise MergeError(
            f"per-window alpha must name exactly the windows {list(windows)}; "
            f"missing {missing}, not a window {extra}"
        )
    for a in given.values():
        check_alpha(rule, a)
    return {window: given[window] for window in windows}


def single_source(t: TensorJob) -> int | None:
    """Which window member a job copies unchanged, or None when the rule mixes them.

    Mirrors `merge.merge_tensor` (norms and `drop` keep the bottom layer, `reference` takes the top
    projection) so that those jobs copy one tensor's bytes instead of reading the whole window; the
    parity tests against `merge.merge_state_dict` for every rule keep the two in step.
    """
    if t.rule == COPY or t.role == "norm" or t.rule == "drop":
        return 0
    if t.rule == "reference":
        return len(t.source_keys) - 1
    return None
