"""ReplaceMe's linear transform (Shopkhoev et al., "ReplaceMe: Network Simplification via Depth
Pruning and Transformer Block Linearization", NeurIPS 2025, arXiv 2505.02819; code mts-ai/ReplaceMe).

ReplaceMe removes one block of layers i+1..i+n (chosen by the angular distance of Gromov et al. on
the last token, ``baselines.angular_block``) and replaces it by one linear map T [hidden, hidden] on
the MLP output of layer i, folded into that layer's down projection (W' = T^T W). With M the MLP
output of layer i, Y the residual stream it is added to (layer i's attention output plus input)
and L the original output of layer i+n, T is fitted on calibration tokens so that M T + Y matches L,
i.e. M T matches the target R = L - Y:

- ``lstsq``: T = argmin ||M T - R||^2 over every token (the paper's closed form, no ridge: its
  ``alpha: 0`` default). Computed here from the streamed normal equations M^T M, M^T R (identical to
  a least-squares solve on the rows when M has full column rank; ``least_squares_map`` falls back to
  the pseudo-inverse otherwise).
- ``cosine``: T = argmin mean_tokens (1 - cos(M T, R)), optimised from the identity with Adam
  (learning rate 1e-4, minibatches of 1024 tokens, 10 epochs over the calibration tokens: the
  settings of the authors' ``adam_method``). Scale-free: position 0's massive activations do not
  dominate it as they dominate the least-squares fit.

Deviations, said plainly: the calibration text is slm-dist's (the demo's Wikipedia text, as for
every method of ``compare``), not SlimOrca; the cosine fit keeps its token rows in host memory
(float32, hidden x 2 per token) as the authors' code does, while the least-squares fit streams
statistics. Both fit on the whole token rows, position 0 included, as the paper does.

PURE: tensors in, tensors out. ``workers/window_fits.py`` collects M and R on the stage holding
layer i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slm_dist.core.correction_fit import CorrectionError

MODES = ("lstsq", "cosine")
COSINE_LR = 1e-4
COSINE_BATCH = 1024
COSINE_EPOCHS = 10



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

    def error(self, matrix: Tensor | None) -> float:
        """sum ||m X - r||^2 over the rows, from the statistics alone (X = None: the identity)."""
        if matrix is None:
            return float(self.gram.trace() - 2.0 * self.cross.trace() + self.target)
        x = matrix.to(self.gram)
        return float(((self.gram @ x) * x).sum() - 2.0 * (self.cross * x).sum() + self.target)


def least_squares_map(eq: NormalEquations) -> Tensor:  # -> T [d_in, d_out] float64
    """argmin_T ||M T - R||^2 from M^T M and M^T R (no ridge, as the paper)."""
    try:
        return torch.linalg.solve(eq.gram, eq.cross)
    except RuntimeError:  # singular M^T M (fewer tokens than channels, dead channels): the minimum-norm solution
        return torch.linalg.pinv(eq.gram, hermitian=True) @ eq.cross


def cosine_loss(fitted: Tensor, target: Tensor) -> Tensor:
    """mean over rows of 1 - cos(fitted_row, target_row)."""
    return 1.0 - torch.nn.functional.cosine_similarity(fitted, target, dim=-1, eps=1e-8).mean()


def cosine_map(m: Tensor, r: Tensor, epochs: int = COSINE_EPOCHS, batch_size: int = COSINE_BATCH,
               lr: float = COSINE_LR, seed: int = 0) -> Tensor:  # m [N, d], r [N, d] -> T [d, d] float32
    """ReplaceMe's cosine mode: Adam from T = I on shuffled minibatches of token rows."""
    if m.dim() != 2 or r.dim() != 2 or m.shape[0] != r.shape[0] or m.shape[1] != r.shape[1]:
        raise CorrectionError(f"the cosine fit needs rows m and r of one shape [N, hidden], got {tuple(m.shape)} "
                              f"and {tuple(r.shape)}")
    m, r = m.float(), r.float()
    transform = torch.eye(m.shape[1], dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([transform], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(m.shape[0], generator=generator)
            for start in range(0, m.shape[0], batch_size):
                rows = order[start:start + batch_size]
                optimizer.zero_grad()
                loss = cosine_loss(m[rows] @ transform, r[rows])
                loss.backward()
                optimizer.step()
    out = transform.detach()
    if not torch.isfinite(out).all():
        raise CorrectionError("the cosine fit diverged (non-finite map); check the compute dtype")
    return out
