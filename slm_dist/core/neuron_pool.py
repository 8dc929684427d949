"""``merge.correction: pool``: the merged layer's MLP rebuilt from the best neurons of the whole window.

``refit`` keeps the merged layer's own MLP neurons and refits their output projection so that the
layer adds what the whole window added. ``pool`` first lets the merged layer choose its neurons: the
candidates are its own and every window member's (gate and up rows, each member's RMSNorm gain folded
into them so that the merged layer's norm serves all: g_k x / rms = (g_k / g_lo) * (g_lo x / rms)),
computed on the merged layer's input. The fit then

1. accumulates the normal equations of the whole pool (features u = act(x G^T) * (x U^T), targets the
   window's residual r, rows weighted as ``merge.correction_weight`` says);
2. removes candidates by Optimal Brain Surgeon's rule on that least-squares problem until the
   architecture's width is left: removing feature i and refitting the others raises the error by
   ||X_i||^2 / [(G + lam I)^-1]_ii (X the ridge solution), in chunks of the pool, re-solving after each;
3. refits the output projection on the chosen neurons exactly as ``refit`` does (cross-validated ridge
   towards the merged projection's own rows, zeros for the members' neurons).

``merge.pool_cap`` c screens the pool first, so that step 2 solves a (c x intermediate)^2 problem
instead of the whole window's: the merged layer's own neurons stay, and each other layer keeps its
best (c - 1) x intermediate / (other layers) by the same OBS on that layer's neurons alone (its own
intermediate^2 equations, one layer at a time). On SmolLM2 (block 13-18, 64 samples,
bench/probe_neuron_pool.py) c = 3 gave WikiText-2 51.83 against the whole pool's 50.85 and refit's
56.96; screening by each neuron's gain alone (no pool^2 statistics at all) kept little of the gain
(53.35 at c = 3): correlated neurons each look useful alone.

The result keeps the architecture (intermediate_size unchanged): the merged layer's gate, up and down
projections are replaced. Stored as one matrix [3 * intermediate, hidden]: X (the down projection
transposed), then the gate rows, then the up rows (``merge_jobs.pool_rows``).

On SmolLM2-135M, block 13-18 removed (bench/probe_neuron_pool.py, in memory): WikiText-2 perplexity
54.76 with ``refit`` and 48.58 with the pool cut back to 1536 neurons at 256 calibration samples (56.96
and 50.85 at 64; the whole 10752-neuron pool, wider than the architecture allows, 48.27 there). The
neurons kept: ~610 of the host layer's, 89-287 of each member's (the top one the most).

Memory: the pool's statistics are (window layers x intermediate)^2 float64, POOL_GRAM_COPIES at the
selection's peak (the equations, the copy of the features left and its factor or inverse), on the
window's stage: 0.9 GiB each for SmolLM2's 7-layer windows (3.1 GiB in all, dryrun.pool_stat_bytes), but
~420 GiB each (~1.3 TB) for a 70B model's 8-layer window, which the dry run refuses. With ``pool_cap`` 3
the peak is about 3 x (3 x intermediate)^2: ~54 GiB in all for an 8-layer window at intermediate 14336
(8B), ~217 GiB at 28672 (70B: use ``refit`` there).

PURE: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from slm_dist.arch import ArchSpec
from slm_dist.core.correction_sizes import CHUNKS, CorrectionError

SELECT_RIDGE = 1e-3  # the selection's ridge, times the mean diagonal of the pool's normal equations


def pool_weights(merged: Mapping[str, Tensor], members: Sequence[Mapping[str, Tensor]], arch: ArchSpec
                 ) -> tuple[Tensor, Tensor]:
    """Gate and up rows of every candidate neuron [pool, hidden] float32: the merged layer's own first
    (pool index i < intermediate is its neuron i), then each member's not already among them, its norm
    gain folded in. A channel where the merged layer's gain is 0 carries nothing to any neuron."""
    gate_s, up_s = arch.mlp_in_suffixes()
    check_no_bias(merged, arch)
    g_merged = merged[arch.mlp_norm].float()
    safe = torch.where(g_merged == 0, torch.ones_like(g_merged), g_merged)
    gates, ups = [merged[gate_s].float()], [merged[up_s].float()]
    for layer in members:
        if torch.equal(layer[gate_s], merged[gate_s]) and torch.equal(layer[up_s], merged[up_s]) \
                and torch.equal(layer[arch.mlp_norm], merged[arch.mlp_norm]):
            continue  # the merged layer's own neurons (rule drop keeps lo's)
        ratio = torch.where(g_merged == 0, torch.zeros_like(g_merged), layer[arch.mlp_norm].float() / safe)
        gates.append(layer[gate_s].float() * ratio)
        ups.append(layer[up_s].float() * ratio)
    return torch.cat(gates), torch.cat(ups)


def check_no_bias(tensors: Mapping[str, Tensor], arch: ArchSpec) -> None:
    biased = [f"{m}.bias" for m in (*arch.mlp_in_modules, arch.mlp_out_module) if f"{m}.bias" in tensors]
    if biased:
        raise CorrectionError(f"merge.correction=pool rebuilds gated MLPs without biases; this model has {biased}. "
                              "Use merge.correction=refit")


def obs_select(gram: Tensor, cross: Tensor, keep: int, ridge: float = SELECT_RIDGE, chunks: int = CHUNKS) -> Tensor:
    """The ``keep`` pool features (sorted indices) that OBS keeps for min ||u X - r||^2 + lam ||X||^2.

    ``gram`` u^T u [pool, pool] and ``cross`` u^T r [pool, d] (float64). Each step solves the ridge
    problem on the features left, then drops those whose removal (with the others refitted) costs the
    least, ||X_i||^2 / [(G + lam I)^-1]_ii; ``chunks`` steps in all. lam is ``ridge`` times the mean
    diagonal of ``gram``.
    """
    size = gram.shape[0]
    if gram.shape != (size, size) or cross.shape[0] != size:
        raise CorrectionError(f"obs_select needs gram [n, n] and cross [n, d], got {tuple(gram.shape)} and "
                              f"{tuple(cross.shape)}")
    if not 0 < keep <= size:
        raise CorrectionError(f"obs_select keeps between 1 and {size} features, got {keep}")
    lam = ridge * float(gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    step = max(1, math.ceil((size - keep) / max(chunks, 1)))
    alive = torch.arange(size, device=gram.device)
    while len(alive) > keep:
        g = gram[alive][:, alive]
        g.diagonal().add_(lam)
        try:
            factor = torch.linalg.cholesky(g)
        except RuntimeError as e:
            raise CorrectionError("the pool's normal equations are not positive definite; check the compute dtype "
                                  "(non-finite activations?)") from e
        del g
        inverse = torch.cholesky_inverse(factor)
        del factor
        x = inverse @ cross[alive]
        cost = (x * x).sum(dim=1) / inverse.diagonal()
        del inverse, x
        drop = min(step, len(alive) - keep)
        survivors = torch.argsort(cost, descending=True, stable=True)[:len(alive) - drop]
        alive = alive[torch.sort(survivors).values]
    return alive


def pool_matrix(down_t: Tensor, gate: Tensor, up: Tensor) -> Tensor:
    """[3 * intermediate, hidden] float32: X (down projection transposed), gate rows, up rows."""
    if not down_t.shape == gate.shape == up.shape:
        raise CorrectionError(f"a pool correction needs X, gate and up of one shape [intermediate, hidden], got "
                              f"{tuple(down_t.shape)}, {tuple(gate.shape)}, {tuple(up.shape)}")
    return torch.cat([down_t.float(), gate.float(), up.float()]).cpu().contiguous()
