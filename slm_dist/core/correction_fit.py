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
beats the plain merge on held-out batches, the window keeps it. Position 0 (massive activations) is
fitted but only vetoes, see ``Fold``. The fit uses only sufficient statistics (u^T u, u^T r, ||r||^2 per
batch in float64), so a stage never holds more than one window's hidden states.

This module is the PURE half: normal equations, ridge, cross-validation. ``workers/window_fits.py``
collects the statistics on the stage holding the window's lo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from slm_dist.core.types import Window

# Ridge strengths, relative to the mean eigenvalue of m^T m (trace / hidden): scale-free.
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
FOLDS = 4  # cross-validation folds over calibration batches (fewer when there are fewer batches)
KINDS = ("linear", "refit")  # merge.correction values that fit something (and the corrections file's kinds)
# Maps fitted by `compare`'s ReplaceMe baseline (core/replaceme.py): hidden x hidden, folded as ``linear``.
BASELINE_KINDS = ("replaceme_lstsq", "replaceme_cosine")


class CorrectionError(ValueError):
    """The correction fit got unusable inputs (too few batches, mismatched shapes, a non-finite fit)."""


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise CorrectionError(f"unknown correction kind {kind!r}; known: {list(KINDS)}")


def check_fit_kind(kind: str) -> None:
    """A kind a stage can fit: the config's, or a baseline's (``BASELINE_KINDS``)."""
    if kind not in KINDS + BASELINE_KINDS:
        raise CorrectionError(f"unknown correction kind {kind!r}; known: {list(KINDS + BASELINE_KINDS)}")


def fold_kind(kind: str) -> str:
    """How a fitted map is folded into the projection (and written to a corrections file)."""
    check_fit_kind(kind)
    return "linear" if kind in BASELINE_KINDS else kind


@dataclass(frozen=True)
class NormalEquations:
    """Least-squares statistics of feature rows m [N, d_in] against targets r [N, d_out], in float64."""

    gram: Tensor    # [d_in, d_in]   m^T m
    cross: Tensor   # [d_in, d_out]  m^T r
    target: float   # sum of ||r||^2
    rows: int

    @classmethod
    def from_rows(cls, m: Tensor, r: Tensor) -> NormalEquations:
        if m.dim() != 2 or r.dim() != 2 or m.shape[0] != r.shape[0]:
            raise CorrectionError(f"features and targets must be [N, d_in] and [N, d_out] with one N, got "
                                  f"{tuple(m.shape)} and {tuple(r.shape)}")
        m, r = m.double(), r.double()
        return cls(m.T @ m, m.T @ r, float((r * r).sum()), m.shape[0])

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram + other.gram, self.cross + other.cross, self.target + other.target,
                               self.rows + other.rows)

    def __sub__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(self.gram - other.gram, self.cross - other.cross, self.target - other.target,
                               self.rows - other.rows)

    def error(self, matrix: Tensor | None) -> float:
        """sum ||m X - r||^2 over the rows, from the statistics alone (X = None: the identity)."""
        if matrix is None:
            return float(self.gram.trace() - 2.0 * self.cross.trace() + self.target)
        x = matrix.to(self.gram)
        return float(((self.gram @ x) * x).sum() - 2.0 * (self.cross * x).sum() + self.target)


def ridge_towards(eq: NormalEquations, ridge: float, scale: float | None = None,
                  prior: Tensor | None = None) -> Tensor:
    """argmin_X ||m X - r||^2 + lam ||X - prior||^2, lam = ridge * scale (default trace(m^T m) / d_in);
    prior None is the identity (square statistics). float64 [d_in, d_out]."""
    d = eq.gram.shape[0]
    lam = ridge * (float(eq.gram.trace()) / d if scale is None else scale)
    return _solve_in_place(eq.gram.clone(), eq.cross.clone(), lam, prior)


def _solve_in_place(gram: Tensor, cross: Tensor, lam: float, prior: Tensor | None) -> Tensor:
    """(gram + lam I) X = cross + lam prior, overwriting gram and cross: refit's statistics are
    intermediate^2, so the fit makes no copies of its own beyond the solver's."""
    gram.diagonal().add_(lam)
    if prior is None:
        cross.diagonal().add_(lam)
    else:
        cross.add_(prior.to(cross), alpha=lam)
    return torch.linalg.solve(gram, cross)


@dataclass(frozen=True)
class Rows:
    """A few rows kept as they are (position 0: batch-size rows per batch), not as d_in^2 statistics."""

    features: Tensor  # [n, d_in] float64
    targets: Tensor   # [n, d_out] float64

    @classmethod
    def from_rows(cls, m: Tensor, r: Tensor) -> Rows:
        if m.dim() != 2 or r.dim() != 2 or m.shape[0] != r.shape[0]:
            raise CorrectionError(f"features and targets must be [N, d_in] and [N, d_out] with one N, got "
                                  f"{tuple(m.shape)} and {tuple(r.shape)}")
        return cls(m.detach().double(), r.detach().double())

    def __add__(self, other: Rows) -> Rows:
        return Rows(torch.cat([self.features, other.features]), torch.cat([self.targets, other.targets]))

    def error(self, matrix: Tensor | None) -> float:
        """sum ||m X - r||^2 over the rows (X = None: the identity)."""
        fitted = self.features if matrix is None else self.features @ matrix.to(self.features)
        return float(((fitted - self.targets) ** 2).sum())

    def add_to(self, gram: Tensor, cross: Tensor) -> None:
        gram.addmm_(self.features.T, self.features)
        cross.addmm_(self.features.T, self.targets)


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: statistics of its ordinary token rows, and its position-0 rows.

    Position 0 carries the massive activations: in SmolLM2 layer 11's MLP writes vectors of norm
    ~2e4 there against ~30 elsewhere. A map fitted without those rows sends them anywhere (300000x
    the identity's error on them, calibration NLL 3.9 -> 11.8 for window 11-17); fitted with them, it
    keeps them (0.1x) at no cost elsewhere. So they are always fitted, but they would swamp any
    score: the ridge is scaled and chosen on the ordinary rows, and position 0 only vetoes a ridge
    whose map loses to the identity once its rows are counted.
    """

    rest: NormalEquations
    first: Rows | None = None  # None: no position-0 rows (skip_first off, or none given)

    def __add__(self, other: Fold) -> Fold:
        first = self.first if other.first is None else other.first if self.first is None else self.first + other.first
        return Fold(self.rest + other.rest, first)


def _fit(rest: NormalEquations, firsts: Sequence[Rows], ridge: float, prior: Tensor | None,
         in_place: bool) -> Tensor:
    """The ridge fit on ordinary-row statistics plus position-0 rows; the ridge is scaled by the
    ordinary rows alone. ``in_place`` consumes ``rest`` (a copy made for this fit)."""
    lam = ridge * float(rest.gram.trace()) / rest.gram.shape[0]
    gram, cross = (rest.gram, rest.cross) if in_place else (rest.gram.clone(), rest.cross.clone())
    for rows in firsts:
        rows.add_to(gram, cross)
    return _solve_in_place(gram, cross, lam, prior)


def choose_correction(folds: Sequence[Fold], grid: Sequence[float] = RIDGE_GRID, prior: Tensor | None = None
                      ) -> tuple[float | None, float, list[tuple[float, float]], Tensor | None]:
    """Cross-validated ridge: each fold is scored by the map fitted on the others (every row).

    ``prior`` is the plain merge (None: the identity map; refit: the merged projection's X).
    Returns (ridge, loss, tried, X): loss is the held-out error on ordinary rows relative to the
    prior's (1.0 = no better than the plain merge); a ridge whose map loses to the prior on all
    held-out rows together (position 0 included) is vetoed (its loss shows as inf). ridge and X are
    None when no ridge beats the prior held out; otherwise X is refitted on every fold.

    Memory: the folds' statistics, their total, one training set (the total less a fold, made per
    fit) and the solver's copy: ``dryrun.REFIT_STAT_COPIES``.
    """
    if len(folds) < 2:
        raise CorrectionError(f"cross-validation needs at least 2 folds of calibration batches, got {len(folds)}; "
                              "raise merge.correction_batches")
    total = folds[0].rest
    for f in folds[1:]:
        total = total + f.rest
    identity = sum(f.rest.error(prior) for f in folds)
    if not identity > 0.0:
        raise CorrectionError("the window adds nothing beyond its merged layer on these batches; nothing to fit")
    first_identity = sum(f.first.error(prior) for f in folds if f.first is not None)
    tried = []
    for ridge in grid:
        held_out, first = 0.0, 0.0
        for i, fold in enumerate(folds):
            others = [g.first for j, g in enumerate(folds) if j != i and g.first is not None]
            matrix = _fit(total - fold.rest, others, ridge, prior, in_place=True)
            held_out += fold.rest.error(matrix)
            if fold.first is not None:
                first += fold.first.error(matrix)
            del matrix
        if not math.isfinite(held_out) or not math.isfinite(first):
            raise CorrectionError(f"the correction fit is not finite at ridge {ridge}; check the compute dtype")
        # The veto: on every held-out row together the map must not lose to the plain merge. Only a
        # map that wrecks the massive rows trips it (their errors dwarf the rest).
        vetoed = held_out + first > identity + first_identity
        tried.append((float(ridge), math.inf if vetoed else held_out / identity))
    ridge, loss = min(tried, key=lambda t: (t[1], -t[0]))  # ties: the stronger ridge
    if loss >= 1.0:
        return None, 1.0, tried, None
    firsts = [f.first for f in folds if f.first is not None]
    return ridge, loss, tried, _fit(total, firsts, ridge, prior, in_place=True)


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
