"""Layer similarity: kernels, unbiased HSIC, minibatch CKA, Block Influence.

Pure tensor math (torch only): no files, no logging, no Ray. Stages call ``layer_representation``
and ``gram`` on their own layers, the reducer sums ``hsic_matrix`` over batches in an
``HsicAccumulator`` and turns the sums into CKA.

Why minibatch CKA (Nguyen et al. 2021, "Do Wide and Deep Networks Learn the Same Things?"):
the unbiased HSIC_1 estimator (Song et al. 2012) has no O(1/n) bias, so per-batch HSIC values
can be *summed* over batches and CKA formed once at the end:

    CKA(i, j) = sum_b HSIC(K_i^b, K_j^b) / sqrt(sum_b HSIC(K_i^b, K_i^b) * sum_b HSIC(K_j^b, K_j^b))

The sums are additive, so they reduce centrally, dedupe by batch id and checkpoint. All
statistics are float64: activations arrive in bf16, and HSIC is a difference of large terms.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from torch import Tensor

Kernel = Literal["linear", "rbf"]
Unit = Literal["sample", "token"]

KERNELS: tuple[str, ...] = ("linear", "rbf")
UNITS: tuple[str, ...] = ("sample", "token")

# Gram products are accumulated over feature chunks of about this many float64 elements, so a
# sample-unit representation (batch x seq*hidden: 8 x 16M for a 70B model) is never copied to
# float64 whole.
_CHUNK_ELEMENTS = 1 << 24


class SimilarityError(ValueError):
    """Bad input to a similarity computation (shape, size, kernel, or a degenerate layer)."""


# --------------------------------------------------------------------------------------------
# Representations and shared token sampling
# --------------------------------------------------------------------------------------------


def layer_representation(
    hidden: Tensor,  # [batch, seq, hidden]
    unit: Unit,
    token_index: Tensor | None = None,  # int64 [m], rows of hidden.reshape(-1, hidden)
) -> Tensor:  # float32, [batch, seq*hidden] (sample) or [m, hidden] (token)
    """The rows a layer's kernel is built from, as float32.

    ``sample``: each sequence flattened, every position included (as the reference SLM analysis
    does), so the kernel compares whole sequences. ``token``: the token rows picked by
    ``sample_token_index``; every stage must use the same indices so kernels of layers on
    different stages compare the same tokens. ``token_index`` is ignored for ``sample``.
    """
    if hidden.dim() != 3:
        raise SimilarityError(
            f"hidden must be [batch, seq, hidden], got shape {tuple(hidden.shape)}; "
            "pass one layer's output for one batch."
        )
    batch, seq, width = hidden.shape
    if unit == "sample":
        return hidden.reshape(batch, seq * width).float()
    if unit == "token":
        if token_index is None:
            raise SimilarityError(
                "unit='token' needs token_index (the shared token rows of this batch); "
                "build it with sample_token_index(batch_size, seq_len, num_tokens, seed, batch_id)."
            )
        if token_index.dim() != 1 or token_index.dtype not in (torch.int64, torch.int32):
            raise SimilarityError(
                f"token_index must be a 1-D integer tensor, got shape {tuple(token_index.shape)} "
                f"and dtype {token_index.dtype}."
            )
        rows = batch * seq
        if token_index.numel() and (int(token_index.min()) < 0 or int(token_index.max()) >= rows):
            raise SimilarityError(
                f"token_index out of range: min {int(token_index.min())}, max "
                f"{int(token_index.max())}, but hidden has {rows} token rows (batch {batch} x "
                f"seq {seq}); build the index with this batch's batch_size and seq_len."
            )
        flat = hidden.reshape(rows, width)
        return flat[token_index.to(device=hidden.device, dtype=torch.int64)].float()
    raise SimilarityError(f"unknown unit {unit!r}; expected one of {UNITS}.")


def _generator_seed(seed: int, batch_id: int) -> int:
    """A 63-bit seed from (seed, batch_id), the same in every process.

    A hash rather than arithmetic like ``seed * K + batch_id``, which collides across pairs;
    Python's ``hash()`` is salted per process, so it would break cross-stage agreement.
    """
    digest = hashlib.blake2b(f"slm-dist:{seed}:{batch_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_token_index(
    batch_size: int,
    seq_len: int,
    num_tokens: int,
    seed: int,
    batch_id: int,
    skip_first: bool = True,
) -> Tensor:  # int64 [m], sorted, rows of the flattened [batch*seq] token axis
    """Token rows to build token-unit kernels from, identical on every stage for (seed, batch_id).

    Drawn without replacement by a CPU ``torch.Generator`` seeded from a hash of
    (seed, batch_id), then sorted. With ``skip_first`` the first position of every sequence
    (rows at multiples of ``seq_len``) is left out: its massive activations dominate a linear
    kernel and make every layer look alike. m = min(num_tokens, rows available).
    """
    if batch_size < 1 or seq_len < 1 or num_tokens < 1:
        raise SimilarityError(
            f"batch_size, seq_len and num_tokens must be >= 1, got batch_size={batch_size}, "
            f"seq_len={seq_len}, num_tokens={num_tokens}."
        )
    rows = torch.arange(batch_size * seq_len, dtype=torch.int64)
    if skip_first:
        rows = rows[rows % seq_len != 0]
    if rows.numel() == 0:
        raise SimilarityError(
            f"no token rows left: seq_len={seq_len} with skip_first=True drops every row; "
            "use longer sequences or skip_first=False."
        )
    generator = torch.Generator(device="cpu").manual_seed(_generator_seed(seed, batch_id))
    m = min(num_tokens, rows.numel())
    picked = rows[torch.randperm(rows.numel(), generator=generator)[:m]]
    return picked.sort().values


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _linear_gram64(x: Tensor) -> Tensor:  # x [n, f] -> [n, n] float64
    """X X^T in float64, converting feature chunks so a wide x is never copied whole."""
    n, f = x.shape
    out = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, f, step):
        chunk = x[:, start : start + step].to(torch.float64)
        out.addmm_(chunk, chunk.T)
    return out


def rbf_bandwidth_sq(sq_dist: Tensor) -> float:  # sq_dist [n, n] -> sigma^2
    """Median heuristic, as in Kornblith et al. 2019 (sigma = median pairwise distance).

    sigma^2 = the median of the *positive* squared distances over distinct pairs i < j
    (``torch.median``: the lower middle value for an even count). The diagonal zeros, and zeros
    from duplicate rows, are left out so they cannot pull the bandwidth towards 0. Since
    scaling x by c scales every squared distance by c^2, the kernel is scale invariant.
    Returns 0.0 when every distance is zero (a constant layer).
    """
    n = sq_dist.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    pairs = sq_dist[iu[0], iu[1]]
    pairs = pairs[pairs > 0]
    if pairs.numel() == 0:
        return 0.0
    return float(pairs.median())


def gram(x: Tensor, kernel: Kernel) -> Tensor:  # x [n, features] -> [n, n] float64
    """Kernel matrix of the rows of x, returned in float64.

    ``linear``: K = X X^T, products in float32 (float64 for float64 input). ``rbf`` (distances in float64: they cancel): K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)) with sigma^2 from
    ``rbf_bandwidth_sq`` (per call, i.e. per batch and layer). A constant layer under rbf gives
    the all-ones kernel, whose unbiased HSIC is exactly 0.
    """
    if x.dim() != 2:
        raise SimilarityError(
            f"gram expects x of shape [n, features], got {tuple(x.shape)}; "
            "build it with layer_representation."
        )
    if kernel == "linear":
        # float32 products, float64 result: stages ship Grams as float32 anyway, and float64
        # matmuls cost several times the forward pass on CPUs (half of it on narrow models).
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return (x @ x.T).double()
    if kernel == "rbf":
        dots = _linear_gram64(x)
        sq_norms = dots.diagonal()
        sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * dots).clamp_(min=0.0)
        sq_dist.fill_diagonal_(0.0)
        sigma_sq = rbf_bandwidth_sq(sq_dist)
        if sigma_sq == 0.0:
            return torch.ones_like(sq_dist)
        return torch.exp(-sq_dist / (2.0 * sigma_sq))
    raise SimilarityError(f"unknown kernel {kernel!r}; expected one of {KERNELS}.")


# --------------------------------------------------------------------------------------------
# Unbiased HSIC and CKA
# --------------------------------------------------------------------------------------------


def _check_sample_count(n: int) -> None:
    if n < 4:
        raise SimilarityError(
            f"unbiased HSIC needs at least 4 rows per batch (it divides by n(n-3)), got n={n}; "
            "use a bigger batch (unit='sample') or more tokens per batch (unit='token')."
        )


def hsic_matrix(grams: Tensor) -> Tensor:  # grams [L, n, n] -> [L, L] float64
    """Unbiased HSIC_1 (Song et al. 2012) for every pair of the L kernels, in one batch.

    With K~ = K with its diagonal set to 0:
        HSIC(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
    All pairs at once: tr(K~ L~) = <vec K~, vec L~^T> is one matmul of the flattened kernels,
    1'K~L~1 = (K~'1) . (L~1) one matmul of the column- and row-sum vectors, 1'K~1 their totals.
    """
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise SimilarityError(
            f"hsic_matrix expects grams of shape [layers, n, n], got {tuple(grams.shape)}; "
            "stack one gram(...) per layer, all on the same batch rows."
        )
    num_layers, n, _ = grams.shape
    _check_sample_count(n)
    k = grams.to(torch.float64).clone()
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(num_layers, n * n)
    flat_t = k.transpose(1, 2).reshape(num_layers, n * n)
    trace_term = flat @ flat_t.T  # [L, L]: tr(K~_i K~_j)
    row_sums = k.sum(dim=2)  # [L, n]: K~ 1
    col_sums = k.sum(dim=1)  # [L, n]: K~' 1
    totals = row_sums.sum(dim=1)  # [L]: 1' K~ 1
    cross_term = col_sums @ row_sums.T  # [L, L]: 1' K~_i K~_j 1
    hsic = (
        trace_term
        + torch.outer(totals, totals) / ((n - 1) * (n - 2))
        - (2.0 / (n - 2)) * cross_term
    ) / (n * (n - 3))
    # A constant kernel (a dead layer, or identical rows) has HSIC exactly 0 with every kernel,
    # but the three terms above cancel only to roundoff (~1e-17), which CKA would then divide
    # by. Zero those rows so cka_from_hsic reports the layer instead of returning noise.
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    off_max = k.masked_fill(eye, -math.inf).amax(dim=(1, 2))
    off_min = k.masked_fill(eye, math.inf).amin(dim=(1, 2))
    constant = off_max == off_min
    hsic[constant, :] = 0.0
    hsic[:, constant] = 0.0
    return hsic


def hsic_unbiased(k: Tensor, l: Tensor) -> float:  # k, l [n, n]
    """The unbiased HSIC_1 formula for one pair, written out term by term (a test reference)."""
    if k.shape != l.shape or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise SimilarityError(
            f"hsic_unbiased expects two [n, n] kernels of equal shape, got {tuple(k.shape)} "
            f"and {tuple(l.shape)}."
        )
    n = k.shape[0]
    _check_sample_count(n)
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k_tilde = k.to(torch.float64).masked_fill(eye, 0.0)
    l_tilde = l.to(torch.float64).masked_fill(eye, 0.0)
    ones = torch.ones(n, 1, dtype=torch.float64, device=k.device)
    trace = torch.trace(k_tilde @ l_tilde)
    totals = (ones.T @ k_tilde @ ones) * (ones.T @ l_tilde @ ones) / ((n - 1) * (n - 2))
    cross = (2.0 / (n - 2)) * (ones.T @ k_tilde @ l_tilde @ ones)
    return float((trace + totals - cross) / (n * (n - 3)))


def cka_from_hsic(hsic_sum: Tensor) -> Tensor:  # [L, L] float64 -> [L, L] float64
    """CKA(i, j) = S_ij / sqrt(S_ii S_jj) from HSIC summed over batches; symmetrized.

    A non-positive diagonal means a layer whose kernel carries no signal (a constant layer, or
    too few batches to beat the estimator's noise): an error naming the layer, never NaN in the
    matrix. The unbiased estimator does not enforce Cauchy-Schwarz, so off-diagonal values can
    exceed 1 by estimator noise; they are left as is, not clipped.
    """
    if hsic_sum.dim() != 2 or hsic_sum.shape[0] != hsic_sum.shape[1]:
        raise SimilarityError(f"hsic_sum must be a square [L, L] matrix, got {tuple(hsic_sum.shape)}.")
    s = hsic_sum.to(torch.float64)
    s = (s + s.T) / 2.0
    diag = s.diagonal()
    bad = [i for i, v in enumerate(diag.tolist()) if not v > 0.0]
    if bad:
        raise SimilarityError(
            f"HSIC(K_i, K_i) must be > 0, got {[diag[i].item() for i in bad[:8]]} at layer "
            f"index {bad[:8]}; a constant (or dead) representation has no CKA. Check that layer's "
            "output, or add batches if the value is a tiny negative from estimator noise."
        )
    return s / torch.sqrt(torch.outer(diag, diag))


class HsicAccumulator:
    """Streaming float64 sums of per-batch HSIC matrices, deduplicated by batch id.

    A retried batch is reported twice but counts once: ``add`` ignores a known batch id and
    returns False. ``state_dict`` holds plain values so a reducer can checkpoint and resume.
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise SimilarityError(f"num_layers must be >= 1, got {num_layers}.")
        self._num_layers = num_layers
        self._sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self._batch_ids: set[int] = set()

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def batch_ids(self) -> list[int]:
        return sorted(self._batch_ids)

    @property
    def num_batches(self) -> int:
        return len(self._batch_ids)

    @property
    def sums(self) -> Tensor:  # [L, L] float64, a copy
        return self._sums.clone()

    def add(self, batch_id: int, hsic: Tensor) -> bool:  # hsic [L, L]
        """Add one batch's HSIC matrix; False (and nothing added) if batch_id was already added."""
        shape = (self._num_layers, self._num_layers)
        if tuple(hsic.shape) != shape:
            raise SimilarityError(
                f"batch {batch_id}: HSIC matrix has shape {tuple(hsic.shape)}, expected {shape}; "
                "every stage must report all layers of the model for the same batch."
            )
        if not bool(torch.isfinite(hsic).all()):
            raise SimilarityError(
                f"batch {batch_id}: HSIC matrix has NaN/inf entries; it would poison every later "
                "sum. Check the hidden states of that batch (overflow in fp16?)."
            )
        batch_id = int(batch_id)
        if batch_id in self._batch_ids:
            return False
        self._sums += hsic.detach().to(device="cpu", dtype=torch.float64)
        self._batch_ids.add(batch_id)
        return True

    def cka(self) -> Tensor:  # [L, L] float64
        if not self._batch_ids:
            raise SimilarityError("no batches accumulated yet; add at least one batch before cka().")
        return cka_from_hsic(self._sums)

    def merge(self, other: HsicAccumulator) -> None:
        """Add another accumulator's batches (e.g. from a second reducer); overlaps are an error."""
        if other.num_layers != self._num_layers:
            raise SimilarityError(
                f"cannot merge accumulators with {other.num_layers} and {self._num_layers} layers."
            )
        overlap = self._batch_ids & set(other.batch_ids)
        if overlap:
            raise SimilarityError(
                f"cannot merge: batch ids {sorted(overlap)[:8]} are in both accumulators "
                f"({len(overlap)} in all); the same batch would count twice."
            )
        self._sums += other.sums
        self._batch_ids |= set(other.batch_ids)

    def state_dict(self) -> dict[str, object]:
        return {"num_layers": self._num_layers, "batch_ids": self.batch_ids, "sums": self.sums}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> HsicAccumulator:
        sums = torch.as_tensor(state["sums"], dtype=torch.float64)
        num_layers = int(state.get("num_layers", sums.shape[0]))  # type: ignore[arg-type]
        if tuple(sums.shape) != (num_layers, num_layers):
            raise SimilarityError(
                f"state 'sums' has shape {tuple(sums.shape)}, expected ({num_layers}, {num_layers})."
            )
        batch_ids = [int(b) for b in state["batch_ids"]]  # type: ignore[attr-defined]
        if len(set(batch_ids)) != len(batch_ids):
            raise SimilarityError(f"state 'batch_ids' has duplicates: {batch_ids}.")
        acc = cls(num_layers)
        acc._sums = sums.clone()
        acc._batch_ids = set(batch_ids)
        return acc


def minibatch_cka(
    representations: list[list[Tensor]],  # [batch][layer] -> [n_b, features]
    kernel: Kernel,
) -> Tensor:  # [L, L] float64
    """Minibatch CKA over all batches at once (the non-streaming reference for tests/benchmarks)."""
    if not representations:
        raise SimilarityError("minibatch_cka needs at least one batch of representations.")
    num_layers = len(representations[0])
    total = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    for b, layers in enumerate(representations):
        if len(layers) != num_layers:
            raise SimilarityError(
                f"batch {b} has {len(layers)} layers, batch 0 has {num_layers}; every batch needs all."
            )
        grams = torch.stack([gram(x, kernel) for x in layers])
        total += hsic_matrix(grams).cpu()
    return cka_from_hsic(total)


def linear_cka_full(x: Tensor, y: Tensor) -> float:  # x [n, f], y [n, g]
    """Plain (biased) linear CKA of one batch: ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F), columns centered.

    Computed through the n x n centered Grams (||Y'X||_F^2 = <X X', Y Y'>_F), the same number
    without forming f x f matrices when the features are wide.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise SimilarityError(
            f"linear_cka_full expects x [n, f] and y [n, g] with the same rows, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    xc = x.to(torch.float64)
    yc = y.to(torch.float64)
    xc = xc - xc.mean(dim=0, keepdim=True)
    yc = yc - yc.mean(dim=0, keepdim=True)
    kx = xc @ xc.T
    ky = yc @ yc.T
    cross = (kx * ky).sum()
    return float(cross / (torch.linalg.norm(kx) * torch.linalg.norm(ky)))


# --------------------------------------------------------------------------------------------
# Per-layer input/output similarity (ShortGPT Block Influence, angular distance)
# --------------------------------------------------------------------------------------------


_NEAR_PARALLEL = 1.0 - 1e-3  # above this cosine, arccos amplifies float32 rounding: use the stable form


def _row_angles(h_in: Tensor, h_out: Tensor, skip_first: bool) -> tuple[Tensor, Tensor]:
    """(cos, angle in radians) of (h_in_t, h_out_t) for every token row, float64 [rows] each.

    Products in float32 chunks (float64 for float64 input; hidden may be bf16 and wide): float64
    copies of every hidden state cost a large share of a narrow model's forward. The angle is
    arccos(cos), except for nearly parallel rows, where arccos turns float32 rounding into 1e-4
    errors: those get 2 atan2(|u - v|, |u + v|) of the unit vectors. One pass feeds both Block
    Influence and angular distance (``input_output_similarity``).
    """
    if h_in.shape != h_out.shape or h_in.dim() != 3:
        raise SimilarityError(
            f"h_in and h_out must both be [batch, seq, hidden] of the same shape, got "
            f"{tuple(h_in.shape)} and {tuple(h_out.shape)}."
        )
    if skip_first:
        h_in, h_out = h_in[:, 1:], h_out[:, 1:]
    width = h_in.shape[-1]
    a_rows = h_in.reshape(-1, width)
    b_rows = h_out.reshape(-1, width)
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    dtype = torch.float64 if torch.float64 in (h_in.dtype, h_out.dtype) else torch.float32
    tiny = torch.finfo(dtype).tiny
    cosines, angles = [], []
    for start in range(0, a_rows.shape[0], step):
        a = a_rows[start : start + step].to(dtype)
        b = b_rows[start : start + step].to(dtype)
        na = torch.linalg.vector_norm(a, dim=1).clamp_min(tiny)
        nb = torch.linalg.vector_norm(b, dim=1).clamp_min(tiny)
        cos = (torch.linalg.vecdot(a, b) / (na * nb)).clamp_(-1.0, 1.0).double()
        angle = torch.arccos(cos)
        near = (cos > _NEAR_PARALLEL).nonzero().squeeze(1)
        if near.numel():
            u, v = a[near] / na[near, None], b[near] / nb[near, None]
            angle[near] = 2.0 * torch.atan2(torch.linalg.vector_norm(u - v, dim=1),
                                            torch.linalg.vector_norm(u + v, dim=1)).double()
        cosines.append(cos)
        angles.append(angle)
    if not cosines:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    return torch.cat(cosines), torch.cat(angles)


def input_output_similarity(
    h_in: Tensor,  # [batch, seq, hidden], a layer's input
    h_out: Tensor,  # [batch, seq, hidden], its output
    skip_first: bool = True,
) -> tuple[float, float, int]:  # (sum of cosines, sum of angle/pi, token rows)
    """Block Influence and angular distance sums from one pass (see the two below)."""
    cos, angle = _row_angles(h_in, h_out, skip_first)
    return float(cos.sum()), float(angle.sum() / math.pi), int(cos.numel())


def block_influence(
    h_in: Tensor,  # [batch, seq, hidden], the layer's input
    h_out: Tensor,  # [batch, seq, hidden], the layer's output
    skip_first: bool = True,
) -> tuple[float, int]:  # (sum of cosines, token rows)
    """ShortGPT's statistic as additive sums: BI = 1 - sum / count over all batches.

    Returned as (sum, count) so stages and the reducer sum over batches before dividing. A zero
    row has cosine 0. With skip_first, position 0 of each sequence is left out (count 0 when
    seq_len is 1).
    """
    cos_sum, _, count = input_output_similarity(h_in, h_out, skip_first)
    return cos_sum, count


def angular_distance(
    h_in: Tensor,  # [batch, seq, hidden]
    h_out: Tensor,  # [batch, seq, hidden]
    skip_first: bool = True,
) -> tuple[float, int]:  # (sum of arccos(cos)/pi, token rows)
    """Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): arccos(cos)/pi
    per token row, in [0, 1], as (sum, count); the mean is sum / count."""
    _, angular_sum, count = input_output_similarity(h_in, h_out, skip_first)
    return angular_sum, count
