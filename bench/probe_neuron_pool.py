"""Probe (issue 19): merge a removed block's MLPs into the layer before it by choosing neurons, in memory.

    python bench/probe_neuron_pool.py [--samples 64] [--remove 13-18]

An idea test, not a method of slm-dist. `refit` keeps the host layer's own 1536 MLP neurons and refits
their output projection to reproduce what the whole block added. Here the host's MLP first gets every
neuron of the block's MLPs as well (each computed on the host's input, its own RMSNorm gain folded into
its gate and up rows, so one norm serves all), the output projection of that pool is fitted the same way
(ridge towards the host's own projection, rows weighted by 1 / ||target||), and then the pool is cut back
to the host's width by Optimal Brain Surgeon's rule on the least-squares problem: removing feature i
and refitting the rest raises the error by ||X_i||^2 / [G^-1]_ii. The checkpoint keeps its architecture:
the host's gate, up and down projections are rows of the pool.

Variants, each scored by perplexity (the first 8 windows of 512 tokens of WikiText-2 and PTB test):
- ``refit``: the host's own neurons (probe_after_cut.py's baseline);
- ``pool, all``: the whole pool kept (a wider MLP than the architecture allows: an upper bound);
- ``pool, OBS``: the pool pruned back to the host's width in chunks, then refitted.

Options the thirteenth session tried (none helped; bench/RESULTS.md): ``--block N`` (exact OBS, N features a
step, the inverse downdated by Woodbury's identity), ``--host above`` (the layer after the block takes the
neurons), ``--attention attention|whole`` (the host's attention first keeps the best key-value groups of its
own and the block's attentions, by group OBS). The fourteenth session's (none helped either): ``--seq 512``
(longer calibration pieces), ``--sweep`` (the output projection at every ridge, scored by calibration NLL
and by the texts), ``--select-ridge``, ``--independent`` (each block fitted on the dense model's inputs, as the
stages do, instead of the model corrected so far); for scale, ``--cap N`` with ``--cap-keep-host`` or
``--cap-by member`` (the pool screened to N neurons before OBS; OBS within each member kept most of the gain,
now ``merge.pool_cap``). The fifteenth session's: ``--host both`` (worse on both texts). The sixteenth
session's (none helped): ``--round-bf16`` (the fitted MLPs rounded as a bf16 checkpoint stores them: no
change), ``--bias`` (an intercept on the host's down projection), ``--transport RIDGE`` (each member's
neurons see the host's input mapped to their own depth's by least squares), ``--radial BETA`` (each row's
error along its own target direction weighted BETA: 0 and 2 both worse than the plain fit's 1), ``--gains N``
(the RMSNorm gains of the N layers after the host refitted in closed form to reproduce the dense layers'
projections: a tie at N = 3); ``--lean`` keeps only the dense states the fits read, for 512 samples. The
seventeenth session's: ``--channel-metric fisher|direction`` (OBS weighs each residual channel's error by how
much the dense NLL's gradient looks at it; the fit after the choice is unchanged): no gain. Every report also
gives the perplexity of the held-out calibration pieces (what a search ranking corrected plans would use):
at k=10 it ranks SLEB's last-step candidates, once fitted, unlike their plain removals do.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
import torch.nn.functional as F
from probe_after_cut import BATCH, RIDGES, SEQ, Probe, perplexity, removed_layers, setup

log = logging.getLogger("probe_neuron_pool")


@torch.no_grad()
def widen(host, members, transports=None) -> None:
    """The host layer's MLP takes every member layer's neurons after its own (gains folded in; with
    ``transports``, each member's rows also see the host's normalized input mapped to its own)."""
    g_host = host.post_attention_layernorm.weight
    gates, ups, downs = [host.mlp.gate_proj.weight], [host.mlp.up_proj.weight], [host.mlp.down_proj.weight]
    for m, layer in enumerate(members):
        g = layer.post_attention_layernorm.weight
        if transports is None:
            fold = torch.diag(g / g_host)
        else:  # rows act on g_host * n(mid_host); want g * T n(mid_host)
            fold = (g[:, None] * transports[m].float()) / g_host[None, :]
        gates.append(layer.mlp.gate_proj.weight @ fold)
        ups.append(layer.mlp.up_proj.weight @ fold)
        downs.append(torch.zeros_like(layer.mlp.down_proj.weight))
    set_mlp(host, torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1))


def set_mlp(host, gate, up, down, bias=None) -> None:
    width, hidden = gate.shape
    mlp = host.mlp
    mlp.gate_proj = torch.nn.Linear(hidden, width, bias=False)
    mlp.up_proj = torch.nn.Linear(hidden, width, bias=False)
    mlp.down_proj = torch.nn.Linear(width, hidden, bias=bias is not None)
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data, mlp.down_proj.weight.data = gate, up, down
    if bias is not None:
        mlp.down_proj.bias.data = bias


def normalized(x, norm):
    """An RMSNorm's input normalized without its gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


@torch.no_grad()
def transports(probe: Probe, host: int, block: list[int], ridge: float = 1e-3) -> list[torch.Tensor]:
    """``--transport``: for each member layer i, the least-squares map T_i with n(mid_i) ~ T_i n(mid_host)
    over the dense model's training rows (n: RMSNorm without its gain, mid: a layer's input to its MLP's
    norm), ridge towards the identity: the member's neurons then see an estimate of their own input."""
    dense, seen, hooks = probe.dense, {}, []
    for i in [host] + block:
        norm = dense.model.layers[i].post_attention_layernorm
        hooks.append(norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, normalized(a[0], m))))
    split = len(probe.calibration) - probe.held_out
    xx = xy = None
    try:
        for k in range(0, split, BATCH):
            dense(probe.calibration[k:k + BATCH])
            x = seen[host].reshape(-1, seen[host].shape[-1]).double()
            ys = torch.cat([seen[i].reshape(-1, x.shape[-1]).double() for i in block], dim=1)
            xx = x.T @ x if xx is None else xx + x.T @ x
            xy = x.T @ ys if xy is None else xy + x.T @ ys
    finally:
        for h in hooks:
            h.remove()
    hidden = len(xx)
    lam = ridge * xx.diagonal().mean()
    eye = torch.eye(hidden, dtype=xx.dtype)
    maps = torch.linalg.solve(xx + lam * eye, xy + lam * eye.repeat(1, len(block)))  # [hidden, members*hidden]
    out = [maps[:, m * hidden:(m + 1) * hidden].T for m in range(len(block))]
    for i, t in zip(block, out):
        log.info("transport to layer %d: ||T - I||_F / sqrt(d) %.3f", i, float((t - eye).norm() / hidden ** 0.5))
    return out


def partial_out_last(gram, cross):
    """The normal equations of every feature but the last (the intercept), with the last one refitted for
    every choice of the others: the Schur complement, so OBS chooses neurons given the intercept."""
    g_nb, g_bb = gram[:-1, -1:], gram[-1, -1]
    return gram[:-1, :-1] - g_nb @ g_nb.T / g_bb, cross[:-1] - g_nb @ cross[-1:] / g_bb


class NormalEquations:
    """u^T u and u^T r of the training rows; the held-out rows kept apart for choosing a ridge."""

    def __init__(self, keep_rows: bool = False):
        self.gram = self.cross = None
        self.held_u, self.held_r, self.held_d = [], [], []
        self.keep_rows = keep_rows
        self.rows_u, self.rows_r, self.rows_d = [], [], []

    def add(self, u, r, held: bool, direction=None) -> None:
        if held:
            self.held_u.append(u)
            self.held_r.append(r)
            self.held_d.append(direction)
            return
        if self.keep_rows:
            self.rows_u.append(u)
            self.rows_r.append(r)
            self.rows_d.append(direction)
        if self.gram is None:
            self.gram, self.cross = u.T @ u, u.T @ r
        else:
            self.gram.addmm_(u.T, u)
            self.cross.addmm_(u.T, r)

    def result(self):
        return self.gram, self.cross, torch.cat(self.held_u), torch.cat(self.held_r)

    def directions(self):
        """Training rows (u, r, unit target direction) and the held-out directions: ``--radial``'s fit."""
        return (torch.cat(self.rows_u), torch.cat(self.rows_r), torch.cat(self.rows_d), torch.cat(self.held_d))


@torch.no_grad()
def statistics(probe: Probe, model, j: int, independent: bool = False, bias: bool = False,
               keep_rows: bool = False):
    """Normal equations of the training batches and the held-out rows, layer j's (widened) MLP: on the
    pruned model as corrected so far, or (``independent``) on the dense model's inputs, as the stages fit."""
    layer, seen = model.model.layers[j], {}
    run = probe.dense if independent else model  # the host's attention is the dense layer's: the same mid
    depth = probe.kept[j] if independent else j
    hook = run.model.layers[depth].post_attention_layernorm.register_forward_hook(
        lambda m, a, out: seen.update(mid=a[0]))
    layers = run.model.layers
    equations = NormalEquations(keep_rows)
    split = len(probe.calibration) - probe.held_out
    try:
        run.model.layers = layers[:depth + 1]
        for b, k in enumerate(range(0, len(probe.calibration), BATCH)):
            run.model(probe.calibration[k:k + BATCH])
            mid = seen["mid"]
            x = layer.post_attention_layernorm(mid)
            u = F.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
            target = probe.dense_states[b][probe.target_depth(j)]
            weight = 1.0 / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            if bias:  # a constant feature last: the down projection's intercept
                u = torch.cat([u, torch.ones_like(u[..., :1])], dim=-1)
            u = (u * weight).reshape(-1, u.shape[-1]).double()
            r = ((target - mid) * weight).reshape(-1, mid.shape[-1]).double()
            direction = (target * weight).reshape(-1, mid.shape[-1]).double() if keep_rows else None
            equations.add(u, r, k >= split, direction)
    finally:
        run.model.layers = layers
        hook.remove()
    if keep_rows:
        return equations.result(), equations.directions()
    return equations.result()


def radial_cross(rows_u, rows_r, rows_d, x, beta: float, chunk: int = 4096):
    """The shift of u^T r that makes a plain least-squares fit weigh each row's error along its own target
    direction d beta times its error across d (the next RMSNorm removes a row's scale, so to first order only
    the error across d matters). beta <= 1: the radial part is down-weighted, targets move by (1 - beta)(d.e) d;
    beta > 1: the cross part is (by 1 / beta, the objective scaled by 1 / beta), targets move by
    (1 - 1 / beta)(e - (d.e) d). Either step is a contraction, so the block coordinate descent converges."""
    out = torch.zeros_like(x)
    for k in range(0, len(rows_u), chunk):
        u, r, d = rows_u[k:k + chunk], rows_r[k:k + chunk], rows_d[k:k + chunk]
        e = u @ x - r
        radial = (e * d).sum(dim=1, keepdim=True) * d
        move = (1 - beta) * radial if beta <= 1 else (1 - 1 / beta) * (e - radial)
        out += u.T @ move
    return out


def radial_error(u, r, d, x, beta: float) -> float:
    """The held-out error with its radial part weighted beta (scaled by 1 / beta when beta > 1, as the fit)."""
    e = u @ x - r
    radial = float(((e * d).sum(dim=1) ** 2).sum())
    total = float((e ** 2).sum())
    return total - (1 - beta) * radial if beta <= 1 else total - (1 - 1 / beta) * (total - radial)


def radial_fit(gram, cross, rows, held, prior, beta: float, iterations: int, ridges=None):
    """``--radial``: the ridge fit of ``ridge_fit`` by block coordinate descent on the error with its radial part
    weighted by beta (each step: targets moved along their directions, then the same normal equations solved
    again), the ridge chosen by that held-out error."""
    rows_u, rows_r, rows_d = rows
    held_u, held_r, held_d = held
    scale, eye = gram.diagonal().mean(), torch.eye(len(gram), dtype=gram.dtype)
    best, best_error, best_ridge = prior, radial_error(held_u, held_r, held_d, prior, beta), None
    plain = best_error
    for ridge in ridges or RIDGES:
        factor = torch.linalg.cholesky(gram + ridge * scale * eye)
        x = torch.cholesky_solve(cross + ridge * scale * prior, factor)
        for _ in range(iterations):
            x = torch.cholesky_solve(cross + radial_cross(rows_u, rows_r, rows_d, x, beta) + ridge * scale * prior,
                                     factor)
        if (error := radial_error(held_u, held_r, held_d, x, beta)) < best_error:
            best, best_error, best_ridge = x, error, ridge
    log.info("radial (beta %g) held-out error %.4g -> %.4g (ridge %s, %d features)", beta, plain, best_error,
             best_ridge, len(gram))
    return best, best_ridge


def ridge_fit(gram, cross, held_u, held_r, prior):
    """The ridge (towards ``prior``) with the lowest held-out error, and its map."""
    scale = gram.diagonal().mean()
    best, best_error, best_ridge = prior, float(((held_u @ prior - held_r) ** 2).sum()), None
    plain = best_error
    eye = torch.eye(len(gram), dtype=gram.dtype)
    for ridge in RIDGES:
        x = torch.linalg.solve(gram + ridge * scale * eye, cross + ridge * scale * prior)
        if (error := float(((held_u @ x - held_r) ** 2).sum())) < best_error:
            best, best_error, best_ridge = x, error, ridge
    log.info("held-out error %.4g -> %.4g (ridge %s, %d features)", plain, best_error, best_ridge, len(gram))
    return best, best_ridge


def screen(gram, cross, cap: int, host: int = 0) -> torch.Tensor:
    """``--cap``: the ``cap`` features (sorted indices) with the largest gain alone, ||u_i^T r||^2 / u_i^T u_i:
    what a stage could compute streaming (the diagonal and the cross products, no pool x pool matrix), so that
    OBS then runs on a cap x cap problem. ``host``: the first ``host`` features (the host's own) always stay."""
    gain = (cross ** 2).sum(dim=1) / gram.diagonal().clamp_min(1e-30)
    gain[:host] = math.inf
    return torch.sort(torch.argsort(gain, descending=True)[:cap]).values


def screen_by_member(gram, cross, cap: int, width: int, ridge: float, chunk: int) -> torch.Tensor:
    """``--cap N --cap-by member``: the host's own features, then each member's best (cap - width) / members
    by OBS on that member's features alone (a width x width problem each, as refit's): a screen whose memory
    does not grow with the window."""
    members = len(gram) // width - 1
    each = (cap - width) // members
    kept = [torch.arange(width)]
    for k in range(1, members + 1):
        idx = torch.arange(k * width, (k + 1) * width)
        kept.append(idx[obs_keep(gram[idx][:, idx], cross[idx], each, ridge, chunk)])
    return torch.cat(kept)


def channel_metric(probe: Probe, depth: int, kind: str) -> torch.Tensor:
    """``--channel-metric``: how much the dense model's calibration NLL looks at each residual channel at
    ``depth``, from d NLL / d h over the training pieces. ``fisher``: mean of (||target|| g_c)^2 (the rows are
    relative, so an error of e in them moves the NLL by ||target|| g . e to first order); ``direction``: mean of
    g_c^2 / ||g||^2 (which channels, every token counted alike). Scaled to mean 1."""
    total = None
    for states in probe.dense_gradients(len(probe.calibration) - probe.held_out):
        h = states[depth]
        g = h.grad.detach().double().reshape(-1, h.shape[-1])
        if kind == "fisher":
            g = g * h.detach().double().reshape(-1, h.shape[-1]).norm(dim=-1, keepdim=True)
        else:
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        total = (g ** 2).sum(0) if total is None else total + (g ** 2).sum(0)
    metric = total / total.mean()
    order = torch.argsort(metric, descending=True).tolist()
    log.info("channel metric (%s) at depth %d: largest %s, smallest %s", kind, depth,
             [(c, round(float(metric[c]), 2)) for c in order[:5]], [(c, round(float(metric[c]), 3)) for c in order[-3:]])
    return metric


def obs_keep(gram, cross, keep: int, ridge: float, chunk: int) -> torch.Tensor:
    """Indices of ``keep`` features chosen by OBS backward elimination, ``chunk`` at a time."""
    alive = torch.arange(len(gram))
    scale = gram.diagonal().mean()
    while len(alive) > keep:
        g = gram[alive][:, alive]
        inverse = torch.linalg.inv(g + ridge * scale * torch.eye(len(alive), dtype=g.dtype))
        x = inverse @ cross[alive]
        cost = (x ** 2).sum(dim=1) / inverse.diagonal()
        drop = min(chunk, len(alive) - keep)
        order = torch.argsort(cost)
        alive = alive[torch.sort(order[drop:]).values]
        log.info("OBS: %d features left", len(alive))
    return alive


def obs_downdate(gram, cross, keep: int, ridge: float, block: int) -> torch.Tensor:
    """As obs_keep, ``block`` features at a time, the inverse downdated (Woodbury) instead of recomputed."""
    alive = torch.arange(len(gram))
    m = gram.clone()
    m.diagonal().add_(ridge * gram.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(m))
    del m
    x = inverse @ cross
    while len(alive) > keep:
        cost = (x * x).sum(dim=1) / inverse.diagonal()
        drop = min(block, len(alive) - keep)
        order = torch.argsort(cost)
        gone, stay = order[:drop], torch.sort(order[drop:]).values
        p_ab = inverse[stay][:, gone]
        solve = torch.linalg.solve(inverse[gone][:, gone], torch.cat([p_ab.T, x[gone]], dim=1))
        inverse = inverse[stay][:, stay] - p_ab @ solve[:, :len(stay)]
        x = x[stay] - p_ab @ solve[:, len(stay):]
        alive = alive[stay]
        if len(alive) % 1024 < block:
            log.info("OBS downdate: %d features left", len(alive))
    return torch.sort(alive).values


@torch.no_grad()
def widen_attention(host, members) -> int:
    """The host's attention takes every member's heads after its own (input-norm gains folded into their
    q, k, v columns; o_proj columns zero for now). Returns the width of one key-value group's output."""
    g_host = host.input_layernorm.weight
    attn = host.self_attn
    parts = {name: [getattr(attn, name).weight] for name in ("q_proj", "k_proj", "v_proj")}
    for layer in members:
        ratio = (layer.input_layernorm.weight / g_host)[None, :]
        for name in parts:
            parts[name].append(getattr(layer.self_attn, name).weight * ratio)
    group = attn.head_dim * (attn.q_proj.weight.shape[0] // attn.k_proj.weight.shape[0])
    for name, weights in parts.items():
        weight = torch.cat(weights)
        setattr(attn, name, torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        getattr(attn, name).weight.data = weight
    width = attn.q_proj.weight.shape[0]
    o_proj = torch.nn.Linear(width, attn.o_proj.weight.shape[0], bias=False)
    o_proj.weight.data = torch.cat([attn.o_proj.weight,
                                    torch.zeros(attn.o_proj.weight.shape[0], width - attn.o_proj.weight.shape[1])], 1)
    attn.o_proj = o_proj
    return group


@torch.no_grad()
def attention_statistics(probe: Probe, model, j: int, window: list[int], whole: bool = False):
    """Normal equations of layer j's (widened) attention context against the dense window's summed
    attention outputs (``whole``: the window's whole change of the residual stream), rows weighted by
    1 / ||dense target||; the held-out rows apart."""
    layer, seen, dense_out = model.model.layers[j], {}, []
    hook = layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.update(ctx=a[0]))
    in_hook = layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.update(inp=a[0]))
    dense_hooks = [probe.dense.model.layers[i].self_attn.register_forward_hook(
        lambda m, a, out: dense_out.append(out[0] if isinstance(out, tuple) else out)) for i in window]
    layers, dense_layers = model.model.layers, probe.dense.model.layers
    equations = NormalEquations()
    split = len(probe.calibration) - probe.held_out
    try:
        model.model.layers = layers[:j + 1]
        probe.dense.model.layers = dense_layers[:window[-1] + 1]
        for b, k in enumerate(range(0, len(probe.calibration), BATCH)):
            model.model(probe.calibration[k:k + BATCH])
            dense_out.clear()
            probe.dense.model(probe.calibration[k:k + BATCH])
            target = probe.dense_states[b][probe.target_depth(j)]
            weight = 1.0 / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            u = (seen["ctx"] * weight).reshape(-1, seen["ctx"].shape[-1]).double()
            r = ((target - seen["inp"] if whole else sum(dense_out)) * weight).reshape(-1, target.shape[-1]).double()
            equations.add(u, r, k >= split)
    finally:
        model.model.layers, probe.dense.model.layers = layers, dense_layers
        hook.remove()
        in_hook.remove()
        for h in dense_hooks:
            h.remove()
    return equations.result()


def group_obs(gram, cross, group: int, keep: int, ridge: float) -> list[int]:
    """Key-value groups (``group`` consecutive features each) kept by OBS, one removed per step: removing
    group g and refitting the rest costs tr(X_g^T [P_gg]^-1 X_g), P the regularised inverse."""
    alive = list(range(len(gram) // group))
    scale = gram.diagonal().mean()
    while len(alive) > keep:
        idx = torch.cat([torch.arange(g * group, (g + 1) * group) for g in alive])
        inverse = torch.linalg.inv(gram[idx][:, idx] + ridge * scale * torch.eye(len(idx), dtype=gram.dtype))
        x = inverse @ cross[idx]
        costs = []
        for n in range(len(alive)):
            s = slice(n * group, (n + 1) * group)
            costs.append(float(torch.trace(x[s].T @ torch.linalg.solve(inverse[s, s], x[s]))))
        alive.pop(min(range(len(alive)), key=costs.__getitem__))
    return alive


@torch.no_grad()
def pool_attention(probe: Probe, model, j: int, block: list[int], originals, ridge: float,
                   whole: bool = False) -> None:
    """Layer j's attention rebuilt from the best key-value groups of its own and the block's layers."""
    host = model.model.layers[j]
    attn = host.self_attn
    q_rows, hidden = attn.q_proj.weight.shape[0], attn.o_proj.weight.shape[0]
    kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim  # the host's key-value groups: 0 .. kv_heads - 1
    own_o = attn.o_proj.weight.detach().double().T.clone()
    group = widen_attention(host, [originals[i] for i in block])
    window = [block[0] - 1] + block
    gram, cross, held_u, held_r = attention_statistics(probe, model, j, window, whole)
    kept = group_obs(gram, cross, group, kv_heads, ridge)
    log.info("attention: kept key-value groups %s (the host's are 0-%d)", kept, kv_heads - 1)
    cols = torch.cat([torch.arange(g * group, (g + 1) * group) for g in kept])
    kv_rows = torch.cat([torch.arange(g * attn.head_dim, (g + 1) * attn.head_dim) for g in kept])
    prior = torch.zeros(len(cols), hidden, dtype=torch.float64)
    for n, g in enumerate(kept):
        if g < kv_heads:
            prior[n * group:(n + 1) * group] = own_o[g * group:(g + 1) * group]
    x, _ = ridge_fit(gram[cols][:, cols], cross[cols], held_u[:, cols], held_r, prior)
    for name, rows in (("q_proj", cols), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        w = getattr(attn, name).weight[rows].clone()
        setattr(attn, name, torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
        getattr(attn, name).weight.data = w
    attn.o_proj = torch.nn.Linear(len(cols), hidden, bias=False)
    attn.o_proj.weight.data = x.T.float().contiguous()
    assert attn.q_proj.weight.shape[0] == q_rows


@torch.no_grad()
def refit_gain(probe: Probe, model, j: int, which: str, ridge: float) -> None:
    """``--gains``: pruned layer j's RMSNorm gain (``which``: the attention's or the MLP's) refitted so that the
    projections reading it (q, k, v or gate, up), on the pruned model's rows, reproduce the dense layer's on
    the dense model's rows:
    with n the pruned model's normalized input (no gain), m the dense model's, M = W^T W over the projections,
    minimize sum_t ||W (g' * n_t) - W (g * m_t)||^2: g' = (M o sum n n^T + lam I)^-1 ((M o sum n m^T) g + lam g)
    (o: elementwise), a hidden-sized closed form, ridge towards the layer's own gain."""
    depth = probe.kept[j]
    layer, dense_layer = model.model.layers[j], probe.dense.model.layers[depth]
    if which == "attention":
        norm, dense_norm = layer.input_layernorm, dense_layer.input_layernorm
        projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    else:
        norm, dense_norm = layer.post_attention_layernorm, dense_layer.post_attention_layernorm
        projections = (layer.mlp.gate_proj, layer.mlp.up_proj)
    w = torch.cat([p.weight for p in projections]).double()
    gram_w = w.T @ w
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, a, out: seen.update(n=a[0])),
             dense_norm.register_forward_hook(lambda m, a, out: seen.update(m=a[0]))]
    split = len(probe.calibration) - probe.held_out
    nn_ = nm = None
    layers, dense_layers = model.model.layers, probe.dense.model.layers
    try:
        model.model.layers, probe.dense.model.layers = layers[:j + 1], dense_layers[:depth + 1]
        for k in range(0, split, BATCH):
            batch = probe.calibration[k:k + BATCH]
            model.model(batch)
            probe.dense.model(batch)
            n = normalized(seen["n"], norm).reshape(-1, w.shape[1]).double()
            m = normalized(seen["m"], dense_norm).reshape(-1, w.shape[1]).double()
            nn_ = n.T @ n if nn_ is None else nn_ + n.T @ n
            nm = n.T @ m if nm is None else nm + n.T @ m
    finally:
        model.model.layers, probe.dense.model.layers = layers, dense_layers
        for h in hooks:
            h.remove()
    g = dense_norm.weight.double()
    a = gram_w * nn_
    lam = ridge * a.diagonal().mean()
    new = torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), (gram_w * nm) @ g + lam * g)
    log.info("layer %d (dense %d) %s gain refitted: relative change %.3f", j, depth, which,
             float((new - g).norm() / g.norm()))
    norm.weight.copy_(new.float())


def sweep_ridges(probe: Probe, model, host, rows, gram, cross, prior, evals) -> None:
    """``--sweep``: the kept neurons' output projection at every ridge, each scored by the NLL of the held-out
    calibration pieces and by the evaluation texts: does the calibration loss pick the ridge the texts would?"""
    held = probe.calibration[-probe.held_out:]
    scale, eye = gram.diagonal().mean(), torch.eye(len(gram), dtype=gram.dtype)
    for ridge in RIDGES + (3.0, 10.0, 30.0):
        x = torch.linalg.solve(gram + ridge * scale * eye, cross + ridge * scale * prior)
        set_mlp(host, *rows, x.T.float().contiguous())
        scores = {name: perplexity(model, w) for name, w in evals.items()}
        log.info("sweep ridge %-6g calibration held-out ppl %.3f  %s", ridge, perplexity(model, held),
                 "  ".join(f"{n} {v:.2f}" for n, v in scores.items()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--remove", default="13-18")
    parser.add_argument("--chunk", type=int, default=1024, help="features removed per OBS step")
    parser.add_argument("--attention", choices=("attention", "whole"),
                        help="pool the attention too: the host keeps the best key-value groups of the block's, "
                             "fitted to the block's summed attention outputs or to its whole residual change")
    parser.add_argument("--host", choices=("below", "above", "both"), default="below",
                        help="the layer whose MLP takes the block's neurons: the one below the block, above it, or "
                             "both (below first, then above on the corrected model, each fitted to the dense "
                             "stream at its own depth)")
    parser.add_argument("--block", type=int, default=0, help="downdate the inverse, this many features a step")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per calibration piece")
    parser.add_argument("--select-ridge", type=float, default=1e-3)
    parser.add_argument("--skip-all", action="store_true", help="do not score the whole pool")
    parser.add_argument("--cap", type=int, default=0,
                        help="screen the pool down to this many features by their gain alone before OBS")
    parser.add_argument("--cap-keep-host", action="store_true", help="the screen keeps the host's own neurons")
    parser.add_argument("--cap-by", choices=("gain", "member"), default="gain",
                        help="screen by each feature's gain alone, or by OBS within each member layer")
    parser.add_argument("--independent", action="store_true",
                        help="fit every block on the dense model's inputs (as the stages do), not the corrected model's")
    parser.add_argument("--transport", type=float, default=None, metavar="RIDGE",
                        help="each member's neurons see the host's normalized input mapped by least squares to the "
                             "member's own (ridge towards the identity, times the mean diagonal)")
    parser.add_argument("--lean", action="store_true",
                        help="keep the dense hidden states of the blocks' target depths only (memory for more samples)")
    parser.add_argument("--round-bf16", action="store_true",
                        help="also score each variant with its fitted MLPs rounded to bfloat16 (as a bf16 checkpoint "
                             "stores them)")
    parser.add_argument("--gains", type=int, default=0, metavar="N",
                        help="after each variant's fits, refit the RMSNorm gains of the N layers after each host "
                             "(attention's, then MLP's) to reproduce the dense layers' projections")
    parser.add_argument("--gain-ridge", type=float, default=1e-3)
    parser.add_argument("--radial", type=float, default=None, metavar="BETA",
                        help="fit with each row's error along its target direction weighted by BETA (0: only the "
                             "error across it counts, what the next RMSNorm sees to first order; 1: the plain fit)")
    parser.add_argument("--radial-iterations", type=int, default=6)
    parser.add_argument("--bias", action="store_true",
                        help="the host's down projection gets an intercept (a Llama with mlp_bias), fitted with it")
    parser.add_argument("--channel-metric", choices=("fisher", "direction"), default=None,
                        help="OBS chooses the neurons with each residual channel's error weighted by how much the "
                             "dense NLL looks at it (d NLL / d h at the target depth; the fit after it is unchanged)")
    parser.add_argument("--sweep", action="store_true",
                        help="score the kept neurons' fit at every ridge by calibration NLL and by the texts")
    args = parser.parse_args()
    if args.attention and args.host != "below":
        parser.error("--attention pools into the layer below the block only")
    if args.lean and args.host != "below":
        parser.error("--lean keeps the states the layer below each block fits to: use it with --host below")
    if args.bias and args.radial is not None:
        parser.error("--bias and --radial do not combine (the intercept is partialled out of the plain fit only)")
    torch.set_num_threads(2)
    blocks = removed_layers(args.remove)
    probe, evals, dense = setup(args.samples, blocks, args.seq)
    held_pieces = probe.calibration[-probe.held_out:]
    dense["calibration held-out"] = perplexity(probe.dense, held_pieces)
    if args.lean:
        needed = {probe.target_depth(probe.kept.index(b[0] - 1)) for b in blocks}
        probe.dense_states = [[h if d in needed else None for d, h in enumerate(states)]
                              for states in probe.dense_states]

    def report(label, model, start):
        # The held-out calibration pieces too (no fit saw them; they chose the ridges): what a plan search
        # that scores corrected candidates on calibration text would rank by.
        scores = {"calibration held-out": perplexity(model, held_pieces)}
        scores.update((name, perplexity(model, w)) for name, w in evals.items())
        log.info("%-12s %s (%.0f s)", label, "  ".join(f"{n} {v:.2f} ({v / dense[n]:.2f}x dense)"
                                                      for n, v in scores.items()), time.time() - start)

    for variant in ("refit",) + (() if args.skip_all else ("pool, all",)) + ("pool, OBS",):
        start, model = time.time(), probe.pruned(0.0, blocks)
        originals = probe.load().model.layers
        sides = ("below", "above") if args.host == "both" else (args.host,)
        for block, side in ((b, s) for b in blocks for s in sides):  # in turn, on the model as corrected so far
            below = side == "below" or block[-1] + 1 >= probe.num_layers
            j = probe.kept.index(block[0] - 1) if below else probe.kept.index(block[-1] + 1)
            host = model.model.layers[j]
            width = host.mlp.down_proj.weight.shape[1]
            if variant != "refit" and args.attention:
                pool_attention(probe, model, j, block, originals, args.select_ridge, args.attention == "whole")
            if variant != "refit":
                maps = transports(probe, probe.kept[j], block, args.transport) if args.transport is not None else None
                widen(host, [originals[i] for i in block], maps)
            stats = statistics(probe, model, j, args.independent, args.bias, keep_rows=args.radial is not None)
            if args.radial is not None:
                (gram, cross, held_u, held_r), (rows_u, rows_r, rows_d, held_d) = stats
            else:
                gram, cross, held_u, held_r = stats
            cross_plain = cross
            prior = torch.zeros_like(cross)
            prior[:width] = originals[probe.kept[j]].mlp.down_proj.weight.detach().double().T
            x, ridge = ridge_fit(gram, cross, held_u, held_r, prior)
            if args.radial is not None:
                if variant == "pool, OBS":  # the selection sees the targets moved by the whole pool's radial fit
                    x, _ = radial_fit(gram, cross, (rows_u, rows_r, rows_d), (held_u, held_r, held_d), prior,
                                      args.radial, args.radial_iterations, ridges=(ridge,))
                    cross = cross + radial_cross(rows_u, rows_r, rows_d, x, args.radial)
                else:
                    x, ridge = radial_fit(gram, cross, (rows_u, rows_r, rows_d), (held_u, held_r, held_d), prior,
                                          args.radial, args.radial_iterations)
            if args.bias:
                pool_width = len(gram) - 1
                with_bias = lambda idx: torch.cat([idx, torch.tensor([pool_width])])  # noqa: E731
                neurons_gram, neurons_cross = partial_out_last(gram, cross)
            else:
                with_bias = lambda idx: idx  # noqa: E731
                neurons_gram, neurons_cross = gram, cross
            if variant == "pool, OBS":
                gram_all, cross_all = gram, cross
                gram, cross = neurons_gram, neurons_cross
                if not args.cap:
                    screened = torch.arange(len(gram))
                elif args.cap_by == "member":
                    screened = screen_by_member(gram, cross, args.cap, width, args.select_ridge, args.chunk)
                else:
                    screened = screen(gram, cross, args.cap, width if args.cap_keep_host else 0)
                g, c = gram[screened][:, screened], cross[screened]
                if args.channel_metric:  # a channel metric M: ||E||_M^2 = ||E M^(1/2)||^2, so scale the columns
                    c = c * channel_metric(probe, probe.target_depth(j), args.channel_metric).sqrt()
                alive = screened[obs_downdate(g, c, width, args.select_ridge, args.block) if args.block else
                                 obs_keep(g, c, width, args.select_ridge, args.chunk)]
                log.info("kept per layer: %s", torch.bincount(alive // width).tolist())
                gate, up = host.mlp.gate_proj.weight[alive].clone(), host.mlp.up_proj.weight[alive].clone()
                if args.sweep:
                    sweep_ridges(probe, model, host, (gate, up), gram[alive][:, alive], cross[alive],
                                 prior[alive], evals)
                fit = with_bias(alive)
                if args.radial is not None:
                    x, ridge = radial_fit(gram_all[fit][:, fit], cross_plain[fit],
                                          (rows_u[:, fit], rows_r, rows_d), (held_u[:, fit], held_r, held_d),
                                          prior[fit], args.radial, args.radial_iterations)
                else:
                    x, ridge = ridge_fit(gram_all[fit][:, fit], cross_all[fit], held_u[:, fit], held_r, prior[fit])
                bias = x[-1].float().contiguous() if args.bias else None
                set_mlp(host, gate, up, x[:width].T.float().contiguous(), bias)
            elif args.bias:
                set_mlp(host, host.mlp.gate_proj.weight.data, host.mlp.up_proj.weight.data,
                        x[:-1].T.float().contiguous(), x[-1].float().contiguous())
            else:
                host.mlp.down_proj.weight.data = x.T.float().contiguous()
        report(variant, model, start)
        if args.gains:
            for block in blocks:
                j = probe.kept.index(block[0] - 1)
                for jj in range(j + 1, min(j + 1 + args.gains, len(probe.kept))):
                    refit_gain(probe, model, jj, "attention", args.gain_ridge)
                    refit_gain(probe, model, jj, "mlp", args.gain_ridge)
            report(variant + f" +gains {args.gains}", model, start)
        if args.round_bf16:
            with torch.no_grad():
                for p in model.model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
            report(variant + " bf16", model, start)


if __name__ == "__main__":
    main()
