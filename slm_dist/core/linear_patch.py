"""LinearPatch (Chen et al., "A Simple Linear Patch Revives Layer-Pruned Large Language Models",
NeurIPS 2025, arXiv 2505.24680; code chenxinrui-tsinghua/LinearPatch), the training-free patch.

Removing layers lo+1..hi joins layer lo's output (the residual stream h_lo) to layer hi+1, which was
trained on h_hi. The paper finds the loss comes mostly from the mismatch of activation magnitudes at
that interface, per channel, and at a few tokens with massive outliers. Its patch is one symmetric
matrix on the residual stream at the interface, P = H D H^T: H a Hadamard rotation (spreads the
outlier tokens' few huge channels over all channels, so one scale per channel suits every token) and
D = diag(d) a channel-wise scale matching the rotated activations' magnitudes:
d_j = mean_t |(h_hi H)_tj| / mean_t |(h_lo H)_tj| over the calibration tokens. h -> h P is inserted
after layer lo.

It acts on the residual stream itself, which later layers read and add to, so it cannot be folded
into a plain checkpoint's weights (the paper runs it as an extra matrix multiply): slm-dist writes the
pruned checkpoint without it and evaluates the patched model in memory (``StageSpec.patch_file``).

Deviations, said plainly: H is a Sylvester Hadamard matrix when the hidden size is a power of two;
otherwise (SmolLM2: 576 = 64 x 9) the Kronecker product of the largest Sylvester factor with an
orthonormal DCT-II of the odd rest, an orthogonal rotation that mixes every channel with every other
as a Hadamard does (a Hadamard matrix of order 576 exists, but no closed-form construction of it is
at hand). The magnitude statistic (mean absolute value) is our reading of the paper's "channel-wise
scaling that aligns activation statistics". With several removed blocks each interface gets its own
patch, fitted on the original model's activations. The paper's optional distillation of P is not done
(it is not training-free).

PURE: tensors in, tensors out; ``workers/window_fits.py`` streams the statistics on the stage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class PatchError(ValueError):
    """Unusable statistics for a patch (no tokens, a dead channel)."""


def sylvester(n: int) -> Tensor:  # [n, n] float64, entries +-1, n a power of two
    if n < 1 or n & (n - 1):
        raise PatchError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dct(n: int) -> Tensor:  # [n, n] float64 orthonormal DCT-II
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def rotation(d: int) -> Tensor:  # [d, d] float64, orthogonal
    """The normalised Hadamard matrix of order d (d a power of two), else Sylvester(2^a) x DCT(d / 2^a)."""
    power = d & -d  # the largest power of two dividing d
    h = sylvester(power) / math.sqrt(power)
    return h if power == d else torch.kron(h, dct(d // power))


def patch_matrix(before_abs: Tensor, after_abs: Tensor, h: Tensor) -> Tensor:  # -> P [d, d] float64
    """P = H diag(d) H^T from per-channel sums of |h_lo H| (``before_abs``) and |h_hi H| (``after_abs``)
    over the same tokens."""
    if before_abs.shape != after_abs.shape or before_abs.dim() != 1 or h.shape != (before_abs.numel(),) * 2:
        raise PatchError(f"patch statistics must be two [d] vectors and H [d, d]; got {tuple(before_abs.shape)}, "
                         f"{tuple(after_abs.shape)}, {tuple(h.shape)}")
    if not (before_abs > 0).all():
        raise PatchError("a rotated channel is zero on every calibration token; nothing to scale it by")
    scale = after_abs.double() / before_abs.double()
    return (h * scale[None]) @ h.T
