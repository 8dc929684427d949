"""Fits of one merged window, run on the stage that holds the window's lo.

Both fits compare the merged layer, run on the window's ORIGINAL input h_{lo-1}, with the original
window's output h_hi on a few cached calibration batches; only that stage runs. The math is pure
and lives in ``core`` (``alpha_fit``: the alpha search; ``correction_fit``: normal equations, ridge
and cross-validation); this module collects what they need through the stage's public surface
(``LayerHost``), so it never reaches into a worker's private members.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from slm_dist.arch import ArchSpec
from slm_dist.core.alpha_fit import AlphaFit, AlphaSearchError, alpha_grid, search_alpha, squared_error
from slm_dist.core.correction_fit import (
    FOLDS,
    Batch,
    CorrectionError,
    CorrectionFit,
    check_kind,
    check_weight,
    choose_correction,
    fold_of,
    projection_prior,
    relative_row_scale,
    with_intercept,
)
from slm_dist.core.correction_sizes import screen_share
from slm_dist.core.linear_patch import PatchError, patch_matrix, rotation
from slm_dist.core.merge import merge_window
from slm_dist.core.neuron_pool import obs_select, pool_matrix, pool_weights
from slm_dist.core.replaceme import MODES, NormalEquations, cosine_map, least_squares_map
from slm_dist.core.types import Window

log = logging.getLogger(__name__)
LayerContext = Any  # what ``LayerHost.context`` returns and ``run_layer`` takes back (positions, rotary, masks)


class LayerHost(Protocol):
    """What a window fit needs from the stage it runs on (``StageWorker`` is one)."""

    arch: ArchSpec
    device: torch.device
    layer_ids: list[int]   # the decoder layers the stage holds, ascending
    num_layers: int        # of the whole model

    def cached_input(self, batch_id: int, layer_id: int | None = None) -> Tensor: ...

    def context(self, h: Tensor) -> LayerContext: ...

    def run_layer(self, layer: nn.Module, layer_id: int, h: Tensor, ctx: LayerContext) -> Tensor: ...

    def new_layer(self, layer_id: int, tensors: dict[str, Tensor]) -> nn.Module: ...

    def window_members(self, window: Window) -> tuple[list[dict[str, Tensor]], Callable[[int], nn.Module]]: ...


def check_window_on_stage(stage: LayerHost, window: Window) -> None:
    lo, hi = window
    if lo not in stage.layer_ids or hi <= lo or hi >= stage.num_layers:
        held = f"[{stage.layer_ids[0]}, {stage.layer_ids[-1] + 1})" if stage.layer_ids else "none"
        raise AlphaSearchError(f"window {list(window)} cannot be fitted on the stage holding layers {held}: its lo "
                               "must be on this stage and hi > lo")


def window_targets(stage: LayerHost, window: Window, batch_ids: Sequence[int], member: Callable[[int], nn.Module],
                   lo_outputs: list[Tensor] | None = None) -> tuple[list[tuple[Tensor, LayerContext]], list[Tensor]]:
    """Per batch, the window's original input h_{lo-1} (with its layer context) and output h_hi.
    Members above the stage run in scratch layers built from the checkpoint, one at a time. A given
    ``lo_outputs`` list receives layer lo's own outputs h_lo too (LinearPatch compares them with h_hi)."""
    lo, hi = window
    with torch.inference_mode():
        inputs = []
        for batch_id in batch_ids:
            h = stage.cached_input(batch_id, lo)
            inputs.append((h, stage.context(h)))
        outs = [h for h, _ in inputs]
        for layer_id in range(lo, hi + 1):
            module = member(layer_id)
            outs = [stage.run_layer(module, layer_id, x, ctx) for x, (_, ctx) in zip(outs, inputs)]
            if layer_id == lo and lo_outputs is not None:
                lo_outputs.extend(outs)
            del module
    return inputs, outs


def fit_window_alpha(stage: LayerHost, window: Window, batch_ids: Sequence[int],
                     grid_points: int = 6, refine_steps: int = 6, skip_first: bool = True) -> AlphaFit:
    """Rule ``scaled``: choose the window's alpha on the stage's cached calibration inputs.

    The loss of an alpha is the squared error of the merged layer's output against h_hi, relative to
    ||h_hi - h_{lo-1}||^2 (what skipping the window costs): 1.0 = no better than removing it. The
    window's source tensors are held while it is fitted (its layers once, in the checkpoint dtype).
    """
    lo, hi = window
    check_window_on_stage(stage, window)
    if not batch_ids:
        raise AlphaSearchError("fit_window_alpha needs at least one calibration batch id")
    source, member = stage.window_members(window)
    inputs, targets = window_targets(stage, window, batch_ids, member)
    with torch.inference_mode():
        base = sum(squared_error(h, t, skip_first) for (h, _), t in zip(inputs, targets))
    if not base > 0.0:
        raise AlphaSearchError(f"window {list(window)} does not change its input on these batches "
                               f"(||h_hi - h_lo-1||^2 = {base}); nothing to fit")

    def loss(alpha: float) -> float:
        merged = stage.new_layer(lo, merge_window(source, "scaled", stage.arch.role, alpha))
        with torch.inference_mode():
            error = sum(squared_error(stage.run_layer(merged, lo, h, ctx), t, skip_first)
                        for (h, ctx), t in zip(inputs, targets))
        return error / base

    alpha, value, tried = search_alpha(loss, alpha_grid(hi - lo + 1, grid_points), refine_steps)
    return AlphaFit(window=(lo, hi), alpha=alpha, loss=value, tried=tuple(tried))


def fit_window_correction(stage: LayerHost, window: Window, rule: str, alpha: float | None,
                          batch_ids: Sequence[int], skip_first: bool = True, kind: str = "linear",
                          weight: str = "relative", pool_cap: int | None = None) -> CorrectionFit:
    """Fit the ``kind`` correction of the window merged by ``rule`` (``alpha`` for scaled) on cached
    calibration inputs (``core/correction_fit.py`` says what is fitted and how it is regularised;
    ``core/neuron_pool.py`` how ``pool`` chooses its neurons first).

    The targets are the ORIGINAL window's outputs on its original inputs, as for the alpha fit. With
    ``skip_first`` position 0 is fitted but kept out of the score (``core/correction_fit.py``).
    ``weight`` relative divides each token's row (features and target) by the norm of the window's
    output at that token: weighted least squares on relative errors (merge.correction_weight).
    ``pool_cap`` (merge.pool_cap) screens a pool's candidates first (core/neuron_pool.py).
    """
    check_kind(kind)
    check_weight(weight)
    lo, hi = window
    check_window_on_stage(stage, window)
    if len(batch_ids) < 2:
        raise CorrectionError(f"the correction of window {list(window)} needs at least 2 calibration batches for "
                              f"cross-validation, got {len(batch_ids)}; raise merge.correction_batches")
    source, member = stage.window_members(window)
    tensors = merge_window(source, rule, stage.arch.role, alpha)
    inputs, targets = window_targets(stage, window, batch_ids, member)
    # pool: the plain merge's error is what its fit must beat (its prior, the chosen neurons, is another model)
    reference, chosen = None, None
    if kind == "pool":
        with torch.inference_mode():
            tensors, reference = _choose_neurons(stage, window, source, tensors, inputs, targets, skip_first, weight,
                                                  pool_cap)
        chosen = [tensors[suffix] for suffix in stage.arch.mlp_in_suffixes()]
    del source
    with torch.inference_mode(kind == "pool"):  # the pool's chosen tensors are inference tensors
        merged = stage.new_layer(lo, tensors)
    del tensors
    projection = merged.get_submodule(stage.arch.mlp_out_module)
    prior = None
    if kind != "linear":
        prior = projection_prior(projection.weight, getattr(projection, "bias", None)).to(stage.device)
    folds = min(FOLDS, len(batch_ids))
    captured: list[tuple[Tensor, Tensor]] = []

    def fold_rows(fold: int) -> Iterator[Batch]:
        """Fold ``fold``'s batches, recomputed by the merged layer: the fit asks again for every ridge
        rather than holding a fold's intermediate^2 statistics (core/correction_fit.py)."""
        hook = projection.register_forward_hook(lambda module, args, out: captured.append((args[0], out)))
        try:
            for position, ((h, ctx), target) in enumerate(zip(inputs, targets)):
                if fold_of(position, folds) != fold:
                    continue
                captured.clear()
                out = stage.run_layer(merged, lo, h, ctx)
                ((u, m),) = captured
                captured.clear()
                # The merged layer's output is h_mid + m; the window should have added r on top of h_mid.
                r = target - out + m
                del out
                features = m if kind == "linear" else with_intercept(u, prior.shape[0])
                if weight == "relative":
                    scale = relative_row_scale(target)
                    features, r = features * scale.to(features.dtype), r * scale.to(r.dtype)
                d_in, d = features.shape[-1], r.shape[-1]
                if skip_first and m.shape[1] > 1:
                    yield (features[:, 1:].reshape(-1, d_in), r[:, 1:].reshape(-1, d), features[:, 0], r[:, 0])
                else:
                    yield features.reshape(-1, d_in), r.reshape(-1, d), None, None
        finally:
            hook.remove()

    # One inference_mode around the whole fit (not inside the generator, whose mode would leak
    # across its yields): the fit's buffers and the recomputed rows are all inference tensors.
    with torch.inference_mode():
        ridge, loss, tried, matrix = choose_correction(fold_rows, folds, prior=prior, reference=reference)
    if chosen is not None and matrix is not None:
        matrix = pool_matrix(matrix, *chosen)
    return CorrectionFit(window=(lo, hi), rule=rule, alpha=alpha, ridge=ridge, loss=loss, tried=tuple(tried),
                         matrix=None if matrix is None else matrix.float().cpu(), kind=kind)


def _choose_neurons(stage: LayerHost, window: Window, source: list[dict[str, Tensor]], tensors: dict[str, Tensor],
                    inputs: list[tuple[Tensor, LayerContext]], targets: list[Tensor], skip_first: bool,
                    weight: str, cap: int | None = None) -> tuple[dict[str, Tensor], float]:
    """``pool``'s steps 1 and 2 (core/neuron_pool.py): the pool's normal equations over every batch, and
    OBS down to the architecture's width; with ``cap`` (merge.pool_cap) each other layer's neurons are
    screened first by OBS within that layer, one layer per pass over the batches. Returns the merged
    layer's tensors with the chosen gate / up rows (float32) and the prior as its down projection (the
    merged one's rows, zeros for the members' neurons), and the plain merge's (weighted) squared error on
    the ordinary rows."""
    arch, lo = stage.arch, window[0]
    gate_s, up_s = arch.mlp_in_suffixes()
    down_s = f"{arch.mlp_out_module}.weight"
    gate, up = (w.to(stage.device) for w in pool_weights(tensors, source, arch))
    width = tensors[gate_s].shape[0]
    share = screen_share(len(gate), width, cap)
    merged = stage.new_layer(lo, tensors)
    mlp = merged.get_submodule(arch.mlp_out_module.rpartition(".")[0])  # its input is the normed x
    act = getattr(mlp, "act_fn", None)
    if act is None:
        raise CorrectionError(f"merge.correction=pool needs a gated MLP with an act_fn; {type(mlp).__name__} has "
                              "none. Use merge.correction=refit")

    def equations(rows: Tensor) -> tuple[Tensor, Tensor, float]:
        """u^T u and u^T r (float64) of the pool's neurons ``rows`` over every batch (one pass), and the
        plain merge's error."""
        gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=stage.device)
        cross = torch.zeros(len(rows), tensors[down_s].shape[0], dtype=torch.float64, device=stage.device)
        g, v = (gate, up) if len(rows) == len(gate) else (gate[rows], up[rows])  # the whole pool: no copy
        error_sum = 0.0
        captured: list[tuple[Tensor, Tensor]] = []
        hook = mlp.register_forward_hook(lambda module, args, out: captured.append((args[0], out)))
        try:
            for (h, ctx), target in zip(inputs, targets):
                captured.clear()
                out = stage.run_layer(merged, lo, h, ctx)
                ((x, m),) = captured
                captured.clear()
                x = x.float()
                u = act(x @ g.T) * (x @ v.T)
                r, error = (target - out + m).float(), (out - target).float()
                if weight == "relative":
                    scale = relative_row_scale(target)
                    u, r, error = u * scale, r * scale, error * scale
                if skip_first and x.shape[1] > 1:  # position 0 is refitted later, never chosen for
                    u, r, error = u[:, 1:], r[:, 1:], error[:, 1:]
                u, r = u.reshape(-1, u.shape[-1]), r.reshape(-1, r.shape[-1])
                gram += u.T @ u  # float32 per batch, summed in float64
                cross += u.T @ r
                error_sum += float((error * error).sum())
        finally:
            hook.remove()
        return gram, cross, error_sum

    candidates = torch.arange(len(gate), device=stage.device)
    if share is not None:
        kept = [candidates[:width]]
        for block in candidates[width:].split(width):
            gram, cross, _ = equations(block)
            kept.append(block[obs_select(gram, cross, share)])
            del gram, cross
        candidates = torch.cat(kept)
        log.info("window %s: pool of %d neurons screened to %d (merge.pool_cap=%d: %d of each other layer's %d)",
                 list(window), len(gate), len(candidates), cap, share, width)
    gram, cross, plain = equations(candidates)
    if not plain > 0.0:
        raise CorrectionError(f"window {list(window)} adds nothing beyond its merged layer on these batches; "
                              "nothing to fit")
    alive = candidates[obs_select(gram, cross, width)]
    del gram, cross
    chosen = dict(tensors)
    chosen[gate_s], chosen[up_s] = gate[alive].cpu(), up[alive].cpu()
    down = torch.zeros_like(tensors[down_s])
    own = alive < width
    down[:, own.nonzero().squeeze(1).cpu()] = tensors[down_s][:, alive[own].cpu()]
    chosen[down_s] = down
    return chosen, plain


def fit_window_replaceme(stage: LayerHost, window: Window, batch_ids: Sequence[int], mode: str) -> CorrectionFit:
    """ReplaceMe (``core/replaceme.py``): the window's layers lo+1..hi removed, one map T on layer lo's
    MLP output fitted so that it adds what the window added (every token, position 0 included), by
    least squares (``mode`` lstsq, streamed normal equations) or the cosine loss (``cosine``, token
    rows kept on the host as float32). ``loss`` is the fitted map's squared error on the fitting rows
    relative to the identity's (in-sample: the paper has no held-out check)."""
    if mode not in MODES:
        raise CorrectionError(f"unknown ReplaceMe mode {mode!r}; known: {list(MODES)}")
    lo, hi = window
    check_window_on_stage(stage, window)
    if not batch_ids:
        raise CorrectionError(f"ReplaceMe's map of window {list(window)} needs at least one calibration batch")
    source, member = stage.window_members(window)
    layer = stage.new_layer(lo, merge_window(source, "drop", stage.arch.role))  # layer lo as it is
    del source
    projection = layer.get_submodule(stage.arch.mlp_out_module)
    inputs, targets = window_targets(stage, window, batch_ids, member)
    captured: list[Tensor] = []
    hook = projection.register_forward_hook(lambda module, args, out: captured.append(out))
    eq: NormalEquations | None = None
    kept: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.inference_mode():
            for (h, ctx), target in zip(inputs, targets):
                captured.clear()
                out = stage.run_layer(layer, lo, h, ctx)
                (m,) = captured
                r = target - out + m  # what the window added on top of layer lo's residual stream
                d = m.shape[-1]
                m, r = m.reshape(-1, d), r.reshape(-1, d)
                part = NormalEquations.from_rows(m, r)
                eq = part if eq is None else eq + part
                if mode == "cosine":
                    kept.append((m.float().cpu(), r.float().cpu()))
    finally:
        hook.remove()
    if mode == "lstsq":
        matrix = least_squares_map(eq)
    else:
        matrix = cosine_map(torch.cat([m for m, _ in kept]), torch.cat([r for _, r in kept]))
    identity = eq.error(None)
    loss = eq.error(matrix) / identity if identity > 0.0 else 1.0
    return CorrectionFit(window=(lo, hi), rule="drop", alpha=None, ridge=0.0, loss=loss, tried=(),
                         matrix=matrix.float().cpu(), kind=f"replaceme_{mode}")


def fit_window_patch(stage: LayerHost, window: Window, batch_ids: Sequence[int]) -> Tensor:
    """LinearPatch (``core/linear_patch.py``) for removing layers lo+1..hi: P [hidden, hidden] float32
    from the rotated magnitudes of layer lo's output and layer hi's output on the original model
    (every token of ``batch_ids``)."""
    check_window_on_stage(stage, window)
    if not batch_ids:
        raise PatchError(f"the patch of window {list(window)} needs at least one calibration batch")
    _, member = stage.window_members(window)
    lows: list[Tensor] = []
    _, outs = window_targets(stage, window, batch_ids, member, lo_outputs=lows)
    with torch.inference_mode():
        d = outs[0].shape[-1]
        rot = rotation(d).to(outs[0].device)
        before = sum((x.reshape(-1, d).double() @ rot).abs().sum(0) for x in lows)
        after = sum((x.reshape(-1, d).double() @ rot).abs().sum(0) for x in outs)
    return patch_matrix(before.cpu(), after.cpu(), rot.cpu()).float()
