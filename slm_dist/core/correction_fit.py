"""Least-squares correction of a merged window (``merge.correction: linear`` or ``refit``).

A window (lo, hi) becomes one layer at lo. Whatever the merge rule, that layer's MLP adds its output
m to the residual stream once, where the original window added hi - lo + 1 layers' worth of change.
The correction changes the MLP's output projection so that what it adds comes as close as possible
(least squares over the calibration tokens) to what the whole window added after the merged layer's
attention: r = h_hi - h_mid, with h_mid the residual stream the MLP adds to. Two families:

- ``linear``: one map T [hidden, hidden] on the output, m -> m T, folded as W' = T^T W, b' = T^T b.
  This is the linear-transform step of ReplaceMe (Shopkhoev et al. 2025) applied to every window.
- ``refit``: the projection itself, refitted on its own input u (the MLP's intermediate activations):
  u -> u X with X [intermediate (+1 for a bias), hidden], written as W' = X^T. Every T above is one
  such X (X = W^T T), so refit fits at least as well; it holds intermediate^2 statistics instead of
  hidden^2 (dryrun.py says how much). On SmolLM2 (window 12-18) it took held-out calibration NLL
  from 3.68 (linear) to 3.63 on the same 4 batches.

Either way the pruned checkpoint keeps the architecture and loads in ``transformers`` unchanged
(``merge.apply_correction``).

Overfitting is the risk, so the fit is ridge-regularised towards the plain merge (T = I, or X = the
merged weights) and the ridge is chosen by cross-validation over calibration batches; when no ridge
beats the plain merge on held-out batches, the window keeps it.

Position 0 carries the massive activations: in SmolLM2 layer 11's MLP writes vectors of norm ~2e4
there against ~30 elsewhere. A map fitted without those rows sends them anywhere (300000x the
identity's error on them, calibration NLL 3.9 -> 11.8 for window 11-17); fitted with them, it keeps
them (0.1x) at no cost elsewhere. So they are always fitted (kept as rows, a few per batch), but they
would swamp any score: the ridge is scaled and chosen on the ordinary rows, and position 0 only
vetoes a ridge whose map loses to the identity once its rows are counted.

Weighting (``merge.correction_weight``): plain least squares counts a token by its squared error, so
position 0 (error ~10^8 on SmolLM2) outweighs every other row together. ``relative`` divides each
token's row, features and target alike, by the norm of the window's output there: the fit minimises
the sum of squared errors relative to that norm, which is what the next RMSNorm sees, and stays a
closed-form ridge solve. Position 0 then counts as one token. On SmolLM2 at 10 of 30 layers (block 9-18,
which holds layer 11, the massive-activation writer) the unweighted refit lost to the plain removal at
every ridge and was dropped; the relative one took WikiText-2 perplexity from 226.5 to 134.5. At 6
layers the two tie (bench/RESULTS.md).

Memory: refit's statistics are intermediate^2 (70B: 6.1 GiB each in float64), so the fit holds one
training set's normal equations (u^T u, u^T r in float64) and one Cholesky factor of them, never a
fold's own: it asks the stage for a fold's rows again (one merged-layer forward per batch) to move
the training set from fold to fold and to score each ridge on held-out rows.

This module is the PURE half: normal equations, ridge, cross-validation. ``workers/window_fits.py``
produces the rows on the stage holding the window's lo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from slm_dist.core.correction_sizes import (  # noqa: F401 - part of this module's interface
    BASELINE_KINDS,
    CROSS_COPIES,
    FOLDS,
    GRAM_COPIES,
    KINDS,
    RIDGE_GRID,
    ROW_CHUNK,
    WEIGHTS,
    CorrectionError,
    check_fit_kind,
    check_kind,
    check_weight,
)
from slm_dist.core.types import Window


def relative_row_scale(target: Tensor) -> Tensor:
    """[..., 1] factors that turn each token's squared error into its error relative to the norm of
    ``target`` [..., hidden] at that token (the window's output there). Multiplying a row's features
    and target by it makes ordinary least squares on the rows a weighted one, weights 1/||target||^2."""
    return target.float().norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).reciprocal()


def fold_kind(kind: str) -> str:
    """How a fitted map is folded into the projection (and written to a corrections file)."""
    check_fit_kind(kind)
    return "linear" if kind in BASELINE_KINDS else kind


@dataclass(frozen=True)
class Rows:
    """A few rows kept as they are (position 0: batch-size rows per batch), not as d_in^2 statistics."""

    features: Tensor  # [n, d_in] float64
    targets: Tensor   # [n, d_out] float64

    @classmethod
    def from_rows(cls, m: Tensor, r: Tensor) -> Rows:
        _check_rows(m, r)
        return cls(m.detach().double(), r.detach().double())

    def __add__(self, other: Rows) -> Rows:
        return Rows(torch.cat([self.features, other.features]), torch.cat([self.targets, other.targets]))

    def error(self, matrix: Tensor | None) -> float:
        """sum ||m X - r||^2 over the rows (X = None: the identity)."""
        return _error(self.features, self.targets, matrix)

    def add_to(self, gram: Tensor, cross: Tensor) -> None:
        gram.addmm_(self.features.T, self.features)
        cross.addmm_(self.features.T, self.targets)


def _check_rows(m: Tensor, r: Tensor) -> None:
    if m.dim() != 2 or r.dim() != 2 or m.shape[0] != r.shape[0]:
        raise CorrectionError(f"features and targets must be [N, d_in] and [N, d_out] with one N, got "
                              f"{tuple(m.shape)} and {tuple(r.shape)}")


def _error(m: Tensor, r: Tensor, matrix: Tensor | None) -> float:
    fitted = m if matrix is None else m @ matrix
    return float(((fitted - r) ** 2).sum())


# One fold's calibration rows, batch by batch: ordinary features [n, d_in] and targets [n, d_out], and
# that batch's position-0 rows (None without skip_first). ``FoldRows(i)`` yields fold i's batches; the
# fit calls it again for every ridge (the caller recomputes them: a merged-layer forward per batch).
Batch = tuple[Tensor, Tensor, "Tensor | None", "Tensor | None"]
FoldRows = Callable[[int], Iterable[Batch]]


def _chunks(m: Tensor, r: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    _check_rows(m, r)
    for start in range(0, m.shape[0], ROW_CHUNK):
        yield m[start:start + ROW_CHUNK].double(), r[start:start + ROW_CHUNK].double()


def _accumulate(gram: Tensor, cross: Tensor, batches: Iterable[Batch], sign: float) -> None:
    """gram += sign m^T m, cross += sign m^T r over the ordinary rows of ``batches``."""
    for m, r, _, _ in batches:
        for mc, rc in _chunks(m, r):
            gram.addmm_(mc.T, mc, alpha=sign)
            cross.addmm_(mc.T, rc, alpha=sign)


def _held_out(batches: Iterable[Batch], matrix: Tensor | None) -> float:
    return sum(_error(mc, rc, matrix) for m, r, _, _ in batches for mc, rc in _chunks(m, r))


class _Solver:
    """(gram + firsts + lam I) X = cross + firsts + lam prior, in two preallocated buffers.

    The factor is made in place (LAPACK's Cholesky on the column-major view of a row-major buffer
    copies nothing) and the right-hand side is solved in place into X by two triangular solves: the
    fit holds the training statistics and one factor, GRAM_COPIES, and no solver copies (an LU solve
    copies its matrix; an eigendecomposition's workspace is two more d_in^2).
    """

    def __init__(self, gram: Tensor, cross: Tensor):
        self.factor = torch.empty_like(gram)
        self.rhs = torch.empty(cross.shape[1], cross.shape[0], dtype=cross.dtype, device=cross.device).mT

    def solve(self, gram: Tensor, cross: Tensor, firsts: Sequence[Rows], lam: float, prior: Tensor | None,
              ridge: float) -> Tensor:
        factor, rhs = self.factor, self.rhs
        factor.copy_(gram)
        rhs.copy_(cross)
        for rows in firsts:
            rows.add_to(factor, rhs)
        factor.diagonal().add_(lam)
        if prior is None:
            rhs.diagonal().add_(lam)
        else:
            rhs.add_(prior, alpha=lam)
        lower = factor.mT  # symmetric: the same matrix, column-major
        try:
            torch.linalg.cholesky(lower, out=lower)
        except RuntimeError as e:  # torch.linalg.LinAlgError: not positive definite
            raise CorrectionError(f"the correction fit is not positive definite at ridge {ridge}; check the "
                                  "compute dtype (non-finite activations?)") from e
        torch.linalg.solve_triangular(lower, rhs, upper=False, out=rhs)
        torch.linalg.solve_triangular(lower.mT, rhs, upper=True, out=rhs)
        return rhs


def choose_correction(rows: FoldRows, folds: int, grid: Sequence[float] = RIDGE_GRID, prior: Tensor | None = None,
                      reference: float | None = None
                      ) -> tuple[float | None, float, list[tuple[float, float]], Tensor | None]:
    """Cross-validated ridge: each fold is scored by the map fitted on the others (every row).

    ``rows(i)`` yields fold i's batches (``Batch``), and is called again for every ridge: the fit
    holds one training set's statistics (the total less the held-out fold), never a fold's own, and
    moves from fold i to i+1 by adding fold i's rows and taking fold i+1's away. ``prior`` is the
    plain merge (None: the identity map; refit: the merged projection's X).

    Returns (ridge, loss, tried, X): loss is the held-out error on ordinary rows relative to the
    prior's (1.0 = no better than the plain merge); a ridge whose map loses to the prior on all
    held-out rows together (position 0 included) is vetoed (its loss shows as inf). ridge and X are
    None when no ridge beats the prior held out; otherwise X is refitted on every fold. A given
    ``reference`` (an error on the same ordinary rows) replaces the prior's as what a loss is relative
    to and what a map must beat: ``pool``'s prior is its chosen neurons, but it must beat the plain merge.

    Memory: GRAM_COPIES d_in^2 and CROSS_COPIES d_in x d_out float64 (``dryrun.refit_stat_bytes``),
    plus ROW_CHUNK rows in float64.
    """
    if folds < 2:
        raise CorrectionError(f"cross-validation needs at least 2 folds of calibration batches, got {folds}; "
                              "raise merge.correction_batches")
    gram = cross = None
    traces, identity = [0.0] * folds, [0.0] * folds
    firsts: list[Rows | None] = [None] * folds
    for j in range(folds):
        for m, r, m0, r0 in rows(j):
            if gram is None:
                d_in, d_out = m.shape[-1], r.shape[-1]
                gram = torch.zeros(d_in, d_in, dtype=torch.float64, device=m.device)
                cross = torch.zeros(d_in, d_out, dtype=torch.float64, device=m.device)
                prior = None if prior is None else prior.to(gram)
            for mc, rc in _chunks(m, r):
                traces[j] += float((mc * mc).sum())
                identity[j] += _error(mc, rc, prior)
                if j != 0:  # the first training set: every fold but fold 0
                    gram.addmm_(mc.T, mc)
                    cross.addmm_(mc.T, rc)
            if m0 is not None:
                first = Rows.from_rows(m0, r0)
                firsts[j] = first if firsts[j] is None else firsts[j] + first
    if gram is None:
        raise CorrectionError("the correction fit got no rows")
    total_identity = sum(identity)
    if not total_identity > 0.0:
        raise CorrectionError("the window adds nothing beyond its merged layer on these batches; nothing to fit")
    first_identity = sum(f.error(prior) for f in firsts if f is not None)
    d_in = gram.shape[0]
    solver = _Solver(gram, cross)
    held_out, first = [0.0] * len(grid), [0.0] * len(grid)
    for i in range(folds):
        if i > 0:  # the training set of fold i-1 becomes fold i's
            _accumulate(gram, cross, rows(i - 1), 1.0)
            _accumulate(gram, cross, rows(i), -1.0)
        scale = (sum(traces) - traces[i]) / d_in  # the ridge is scaled by the training set's ordinary rows
        others = [f for j, f in enumerate(firsts) if j != i and f is not None]
        for g, ridge in enumerate(grid):
            matrix = solver.solve(gram, cross, others, ridge * scale, prior, ridge)
            held_out[g] += _held_out(rows(i), matrix)
            if firsts[i] is not None:
                first[g] += firsts[i].error(matrix)
    tried = []
    for ridge, out, out_first in zip(grid, held_out, first):
        if not math.isfinite(out) or not math.isfinite(out_first):
            raise CorrectionError(f"the correction fit is not finite at ridge {ridge}; check the compute dtype")
        # The veto: on every held-out row together the map must not lose to the plain merge. Only a
        # map that wrecks the massive rows trips it (their errors dwarf the rest).
        vetoed = out + out_first > total_identity + first_identity
        relative_to = total_identity if reference is None else reference
        tried.append((float(ridge), math.inf if vetoed else out / relative_to))
    ridge, loss = min(tried, key=lambda t: (t[1], -t[0]))  # ties: the stronger ridge
    if loss >= 1.0:
        return None, 1.0, tried, None
    _accumulate(gram, cross, rows(folds - 1), 1.0)  # every fold: the final fit
    matrix = solver.solve(gram, cross, [f for f in firsts if f is not None], ridge * sum(traces) / d_in, prior, ridge)
    return ridge, loss, tried, matrix


@dataclass(frozen=True)
class CorrectionFit:
    """The fitted correction of one merged window, and the cross-validation that chose it."""

    window: Window
    rule: str
    alpha: float | None
    ridge: float | None        # None: the plain merge won held out; the window keeps it
    loss: float                # held-out error relative to the plain merge's (1.0 = no gain)
    tried: tuple[tuple[float, float], ...]
    matrix: Tensor | None      # float32 on the CPU, None with ridge None: linear T [hidden, hidden];
                               # refit X [intermediate (+1 with a bias), hidden]
    kind: str = "linear"

    @property
    def key(self) -> CorrectionKey:
        return correction_key(self.window, self.rule, self.alpha, self.kind)

    @property
    def corrects(self) -> bool:
        """The fit beat the plain merge held out (it has a map, held or released)."""
        return self.ridge is not None

    @property
    def released(self) -> bool:
        """The map was dropped to bound memory; refitting on the same batches gives it back exactly."""
        return self.corrects and self.matrix is None

    def release(self) -> CorrectionFit:
        return replace(self, matrix=None)

    def to_json(self) -> dict:
        return {"window": list(self.window), "kind": self.kind, "ridge": self.ridge, "loss": self.loss,
                "tried": [[r, v if math.isfinite(v) else None] for r, v in self.tried]}  # None: vetoed


CorrectionKey = tuple[Window, str, "float | None", str]
# What to fit: (window, merge rule, alpha for rule scaled, correction kind)
CorrectionRequest = tuple[Window, str, "float | None", str]


def correction_key(window: Sequence[int], rule: str, alpha: float | None, kind: str = "linear") -> CorrectionKey:
    """What a correction was fitted for: the same window merged another way, or corrected by the other
    family, needs its own. Scaled with alpha 0 builds the drop layer bit for bit, so the two share one."""
    check_fit_kind(kind)
    if rule == "scaled" and alpha == 0.0:
        rule, alpha = "drop", None
    return (tuple(window), rule, None if alpha is None else float(alpha), kind)


def fold_of(position: int, folds: int) -> int:
    return position % folds


def projection_prior(weight: Tensor, bias: Tensor | None) -> Tensor:
    """Refit's plain merge as X: the projection weight [d_out, d_in] as [d_in, d_out], its bias as a
    last row (the fit then sees a constant-1 feature column), float64."""
    x = weight.detach().double().T
    return x if bias is None else torch.cat([x, bias.detach().double()[None]], dim=0)


def with_intercept(u: Tensor, width: int) -> Tensor:
    """The projection's input, with a constant-1 column when the prior has a bias row."""
    if width == u.shape[-1]:
        return u
    return torch.cat([u, torch.ones(*u.shape[:-1], 1, dtype=u.dtype, device=u.device)], dim=-1)
