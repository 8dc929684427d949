"""Numbers for slm_dist.similarity: hand-computed values, reference formulas, CKA properties."""

from __future__ import annotations

import math
import random

import pytest
import torch

from slm_dist.core.similarity import (
    HsicAccumulator,
    SimilarityError,
    angular_distance,
    block_influence,
    cka_from_hsic,
    gram,
    hsic_matrix,
    hsic_unbiased,
    layer_representation,
    linear_cka_full,
    minibatch_cka,
    sample_token_index,
)

KERNELS = ["linear", "rbf"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layers(n: int, d: int, num_layers: int, seed: int) -> list[torch.Tensor]:
    """A toy 'network': each layer a residual update of the last, so layers are related but differ."""
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = [x]
    for _ in range(num_layers - 1):
        w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        out.append(out[-1] + torch.tanh(out[-1] @ w))
    return out


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------- hand-computed HSIC


def test_hsic_hand_computed_n4():
    # K~ = L~ has ones at (0,1) and (1,0) only. tr(K~L~) = 2, 1'K~1 = 2, 1'K~L~1 = |K~1|^2 = 2.
    # n = 4: HSIC = [2 + 2*2/(3*2) - 2/2*2] / (4*1) = (2/3)/4 = 1/6.
    k = torch.zeros(4, 4, dtype=torch.float64)
    k[0, 1] = k[1, 0] = 1.0
    k += torch.diag(torch.tensor([5.0, 6.0, 7.0, 8.0], dtype=torch.float64))  # diagonal is ignored
    assert hsic_unbiased(k, k) == pytest.approx(1 / 6, rel=1e-14)
    assert hsic_matrix(k[None])[0, 0].item() == pytest.approx(1 / 6, rel=1e-14)


def test_hsic_of_constant_kernel_is_zero():
    # All-ones kernel (a constant layer under rbf): K~ = 11' - I, and the three terms cancel exactly.
    for n in (4, 7, 20):
        ones = torch.ones(n, n, dtype=torch.float64)
        assert abs(hsic_unbiased(ones, ones)) < 1e-12
        # hsic_matrix detects the constant kernel and returns exactly 0, not roundoff, for its
        # row and column (CKA divides by the diagonal).
        x = torch.randn(n, 3, generator=_gen(n), dtype=torch.float64)
        h = hsic_matrix(torch.stack([gram(x, "linear"), 2.5 * ones]))
        assert h[1].tolist() == [0.0, 0.0] and h[:, 1].tolist() == [0.0, 0.0]
        k = gram(x, "linear")
        assert h[0, 0].item() == pytest.approx(hsic_unbiased(k, k), rel=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_hsic_matrix_equals_pairwise_reference(kernel):
    layers = _layers(n=23, d=9, num_layers=5, seed=1)
    grams = torch.stack([gram(x, kernel) for x in layers])
    got = hsic_matrix(grams)
    assert got.dtype == torch.float64 and got.shape == (5, 5)
    scale = got.diagonal().abs().max().item()
    for i in range(5):
        for j in range(5):
            ref = hsic_unbiased(grams[i], grams[j])
            assert got[i, j].item() == pytest.approx(ref, rel=1e-10, abs=1e-12 * scale)


def test_hsic_matrix_uses_transpose_in_trace_term():
    # tr(K L) = sum_ij K_ij L_ji: with non-symmetric inputs the batched form must still agree.
    g = _gen(2)
    grams = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    got = hsic_matrix(grams)
    for i in range(3):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(hsic_unbiased(grams[i], grams[j]), rel=1e-10)


def test_unbiased_hsic_independent_near_zero_self_positive():
    g = _gen(3)
    n, d = 300, 40
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    h = hsic_matrix(torch.stack([gram(x, "linear"), gram(y, "linear")]))
    # E[HSIC_1] = 0 for independent X, Y; the estimator's noise is a few % of the self terms.
    assert h[0, 0] > 0 and h[1, 1] > 0
    assert abs(h[0, 1].item()) < 0.05 * math.sqrt(h[0, 0].item() * h[1, 1].item())
    # The biased (plain) CKA is far from 0 on the same independent data when d/n is not tiny:
    # the reason minibatch CKA uses the unbiased estimator.
    x2, y2 = x[:30], y[:30]
    assert linear_cka_full(x2, y2) > 0.5
    unbiased = minibatch_cka([[x2, y2]], "linear")[0, 1].item()
    assert abs(unbiased) < 0.3


# ------------------------------------------------------------------------------- kernels


def test_linear_gram_in_float32_keeps_cka_to_float64_precision():
    # Products in float32 (several times faster than float64 on CPU); a massive-activation column
    # (as real hidden states have) is the hard case for single precision.
    x = torch.randn(64, 576, generator=_gen(4))
    y = x + 0.5 * torch.randn(64, 576, generator=_gen(5))
    x[:, 7] *= 300.0
    y[:, 7] *= 300.0
    got = gram(x, "linear")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x.double() @ x.double().T, rtol=1e-5, atol=1e-3)
    grams = torch.stack([gram(x, "linear"), gram(y, "linear")])
    exact = torch.stack([x.double() @ x.double().T, y.double() @ y.double().T])
    assert abs(cka_from_hsic(hsic_matrix(grams))[0, 1] - cka_from_hsic(hsic_matrix(exact))[0, 1]) < 1e-6


def test_rbf_gram_hand_computed_median():
    # Points 0, 1, 3: squared distances 1, 9, 4 -> median 4 = sigma^2 -> K_ij = exp(-d_ij / 8).
    x = torch.tensor([[0.0], [1.0], [3.0]])
    k = gram(x, "rbf")
    expected = torch.exp(
        -torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]], dtype=torch.float64) / 8.0
    )
    torch.testing.assert_close(k, expected, rtol=1e-12, atol=1e-12)
    # A duplicate row adds a zero distance that the heuristic ignores: squared distances are
    # {0, 1, 9, 1, 9, 4}; positive ones {1, 1, 4, 9, 9}, median 4 again.
    k_dup = gram(torch.tensor([[0.0], [1.0], [3.0], [0.0]]), "rbf")
    assert k_dup[0, 1].item() == pytest.approx(math.exp(-1 / 8), rel=1e-12)
    assert k_dup[0, 3].item() == 1.0


def test_rbf_gram_constant_layer_is_all_ones():
    assert torch.equal(gram(torch.full((5, 3), 2.5), "rbf"), torch.ones(5, 5, dtype=torch.float64))


def test_rbf_gram_is_scale_and_rotation_invariant():
    x = torch.randn(12, 6, generator=_gen(5), dtype=torch.float64)
    q = _orthogonal(6, 6)
    torch.testing.assert_close(gram(37.0 * x @ q, "rbf"), gram(x, "rbf"), rtol=1e-9, atol=1e-12)


def test_unknown_kernel_and_bad_shape():
    with pytest.raises(SimilarityError, match="unknown kernel 'cosine'"):
        gram(torch.zeros(4, 2), "cosine")  # type: ignore[arg-type]
    with pytest.raises(SimilarityError, match=r"\[n, features\]"):
        gram(torch.zeros(2, 4, 2), "linear")


# ---------------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_of_identical_layers_is_one_and_symmetric(kernel):
    batches = []
    for b in range(3):
        layers = _layers(n=16, d=8, num_layers=3, seed=10 + b)
        batches.append([layers[0], layers[1], layers[0].clone(), layers[2]])
    cka = minibatch_cka(batches, kernel)
    assert cka.dtype == torch.float64
    torch.testing.assert_close(cka, cka.T, rtol=0, atol=0)
    torch.testing.assert_close(cka.diagonal(), torch.ones(4, dtype=torch.float64))
    assert cka[0, 2].item() == pytest.approx(1.0, abs=1e-12)
    assert cka[0, 1].item() < 0.999  # distinct layers are not trivially 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_invariant_to_rotation_and_isotropic_scaling(kernel):
    batches, transformed = [], []
    q = _orthogonal(8, 7)
    for b in range(3):
        x, y, z = _layers(n=20, d=8, num_layers=3, seed=20 + b)
        batches.append([x, y, z])
        transformed.append([x @ q, 0.01 * y, 250.0 * z @ q])
    torch.testing.assert_close(
        minibatch_cka(transformed, kernel), minibatch_cka(batches, kernel), rtol=1e-9, atol=1e-9
    )


def test_cka_is_not_invariant_to_anisotropic_scaling():
    # Shows the invariance test can fail: stretching one axis changes linear CKA.
    x, y = _layers(n=40, d=6, num_layers=2, seed=8)
    stretch = torch.ones(6, dtype=torch.float64)
    stretch[0] = 30.0
    a = minibatch_cka([[x, y]], "linear")[0, 1]
    b = minibatch_cka([[x * stretch, y]], "linear")[0, 1]
    assert abs(a - b) > 1e-3


def test_linear_cka_full_matches_feature_space_formula():
    g = _gen(9)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(30, 7, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 7, generator=g, dtype=torch.float64) + 0.5 * noise
    xc, yc = x - x.mean(0), y - y.mean(0)
    fro = torch.linalg.norm
    literal = (fro(yc.T @ xc) ** 2 / (fro(xc.T @ xc) * fro(yc.T @ yc))).item()
    assert linear_cka_full(x, y) == pytest.approx(literal, rel=1e-12)
    assert linear_cka_full(x, x) == pytest.approx(1.0, rel=1e-12)


def test_minibatch_cka_approaches_plain_cka_for_a_large_batch():
    # The biased and unbiased estimators differ by O(1/n): on one batch of 2000 rows they agree.
    g = _gen(10)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(4, 4, generator=g, dtype=torch.float64)) + 0.3 * noise
    unbiased = minibatch_cka([[x, y]], "linear")[0, 1].item()
    assert unbiased == pytest.approx(linear_cka_full(x, y), abs=5e-3)


def test_cka_from_hsic_hand_computed_and_symmetrized():
    s = torch.tensor([[4.0, 1.0], [3.0, 9.0]], dtype=torch.float64)  # off-diagonal averaged: 2
    cka = cka_from_hsic(s)
    expected = torch.tensor([[1.0, 2 / 6], [2 / 6, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cka, expected, rtol=1e-15, atol=0)


def test_cka_from_hsic_constant_layer_names_index():
    s = torch.tensor([[4.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
    with pytest.raises(SimilarityError, match=r"layer index \[1\]"):
        cka_from_hsic(s)
    # Through the whole path: a constant layer under rbf has HSIC exactly 0 -> same error.
    x = torch.randn(8, 3, generator=_gen(11))
    with pytest.raises(SimilarityError, match=r"index \[1\]"):
        minibatch_cka([[x, torch.ones(8, 3), x * 2]], "rbf")


def test_n_below_4_is_an_error_with_the_fix():
    with pytest.raises(SimilarityError, match=r"n=3.*bigger batch.*more tokens"):
        hsic_matrix(torch.ones(2, 3, 3))
    with pytest.raises(SimilarityError, match=r"n=3"):
        hsic_unbiased(torch.ones(3, 3), torch.ones(3, 3))


# --------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("kernel", KERNELS)
def test_streaming_accumulator_equals_minibatch_cka(kernel):
    num_batches, num_layers = 6, 4
    batches = [_layers(n=10 + b, d=7, num_layers=num_layers, seed=30 + b) for b in range(num_batches)]
    expected = minibatch_cka(batches, kernel)

    acc = HsicAccumulator(num_layers)
    order = list(range(num_batches))
    random.Random(0).shuffle(order)
    hsic_of = {b: hsic_matrix(torch.stack([gram(x, kernel) for x in batches[b]])) for b in order}
    for b in order:
        assert acc.add(b, hsic_of[b]) is True
    # A retried batch (same id) counts once, even if its numbers came out different.
    assert acc.add(order[2], hsic_of[order[2]] * 5) is False

    assert acc.num_batches == num_batches
    assert acc.batch_ids == list(range(num_batches))
    torch.testing.assert_close(acc.cka(), expected, rtol=1e-12, atol=1e-12)


def test_accumulator_sums_are_float64_for_float32_and_bf16_inputs():
    x = torch.randn(2, 6, 4, 8, generator=_gen(12))  # [batches, batch, seq, hidden]
    for dtype in (torch.float32, torch.bfloat16):
        acc = HsicAccumulator(2)
        for b in range(2):
            reps = [layer_representation(h.to(dtype), "sample") for h in (x[b], 2 * x[b])]
            grams = torch.stack([gram(r, "linear") for r in reps])
            h = hsic_matrix(grams.to(dtype))
            assert grams.dtype == torch.float64 and h.dtype == torch.float64
            acc.add(b, h.to(dtype))  # even a low-precision report is summed in float64
        assert acc.sums.dtype == torch.float64 and acc.cka().dtype == torch.float64


def test_accumulator_state_dict_roundtrip_and_merge():
    g = _gen(13)
    hs = [torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    a, b = HsicAccumulator(3), HsicAccumulator(3)
    a.add(0, hs[0])
    a.add(2, hs[2])
    b.add(1, hs[1])
    b.add(3, hs[3])

    restored = HsicAccumulator.from_state_dict(a.state_dict())
    assert restored.batch_ids == [0, 2] and restored.num_layers == 3
    torch.testing.assert_close(restored.sums, hs[0] + hs[2], rtol=0, atol=0)
    assert restored.add(2, hs[2]) is False  # dedupe survives a checkpoint

    a.merge(b)
    assert a.batch_ids == [0, 1, 2, 3]
    torch.testing.assert_close(a.sums, hs[0] + hs[1] + hs[2] + hs[3], rtol=1e-15, atol=1e-15)
    with pytest.raises(SimilarityError, match=r"batch ids \[1, 3\]"):
        a.merge(b)


def test_accumulator_sums_is_a_copy_and_rejects_bad_input():
    acc = HsicAccumulator(2)
    acc.add(0, torch.eye(2))
    acc.sums.add_(100.0)
    torch.testing.assert_close(acc.sums, torch.eye(2, dtype=torch.float64))
    with pytest.raises(SimilarityError, match=r"batch 1: .*shape \(3, 3\), expected \(2, 2\)"):
        acc.add(1, torch.eye(3))
    with pytest.raises(SimilarityError, match="batch 2: HSIC matrix has NaN"):
        acc.add(2, torch.full((2, 2), float("nan")))
    assert acc.batch_ids == [0]
    with pytest.raises(SimilarityError, match="no batches"):
        HsicAccumulator(2).cka()


# ------------------------------------------------------------------- representations, tokens


def test_sample_token_index_deterministic_and_shared():
    a = sample_token_index(4, 16, 20, seed=7, batch_id=3)
    b = sample_token_index(4, 16, 20, seed=7, batch_id=3)
    assert torch.equal(a, b)
    assert a.dtype == torch.int64 and a.shape == (20,)
    assert not torch.equal(a, sample_token_index(4, 16, 20, seed=7, batch_id=4))
    assert not torch.equal(a, sample_token_index(4, 16, 20, seed=8, batch_id=3))
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 20  # sorted, no repeats


def test_sample_token_index_skip_first_and_cap():
    idx = sample_token_index(3, 5, 1000, seed=0, batch_id=0)  # 15 rows, 3 are position 0
    assert idx.tolist() == [r for r in range(15) if r % 5 != 0]
    idx_all = sample_token_index(3, 5, 1000, seed=0, batch_id=0, skip_first=False)
    assert idx_all.tolist() == list(range(15))
    for batch_id in range(20):
        idx = sample_token_index(8, 32, 50, seed=1, batch_id=batch_id)
        assert not bool((idx % 32 == 0).any())
    with pytest.raises(SimilarityError, match="seq_len=1"):
        sample_token_index(4, 1, 8, seed=0, batch_id=0)


def test_layer_representation_shapes_and_rows():
    hidden = torch.randn(3, 5, 4, generator=_gen(14)).to(torch.bfloat16)
    sample = layer_representation(hidden, "sample")
    assert sample.shape == (3, 20) and sample.dtype == torch.float32
    torch.testing.assert_close(sample[1], hidden[1].float().reshape(-1), rtol=0, atol=0)

    idx = torch.tensor([1, 7, 14])
    token = layer_representation(hidden, "token", idx)
    assert token.shape == (3, 4) and token.dtype == torch.float32
    # row r is (batch r // seq, position r % seq)
    torch.testing.assert_close(token[1], hidden[1, 2].float(), rtol=0, atol=0)
    torch.testing.assert_close(token[2], hidden[2, 4].float(), rtol=0, atol=0)


def test_layer_representation_errors():
    hidden = torch.zeros(2, 3, 4)
    with pytest.raises(SimilarityError, match="needs token_index.*sample_token_index"):
        layer_representation(hidden, "token")
    with pytest.raises(SimilarityError, match="max 6, but hidden has 6 token rows"):
        layer_representation(hidden, "token", torch.tensor([0, 6]))
    with pytest.raises(SimilarityError, match="unknown unit 'word'"):
        layer_representation(hidden, "word")  # type: ignore[arg-type]
    with pytest.raises(SimilarityError, match=r"\[batch, seq, hidden\]"):
        layer_representation(torch.zeros(6, 4), "sample")


# ------------------------------------------------------------------ block influence, angle


def test_block_influence_identical_and_orthogonal():
    h = torch.randn(2, 6, 8, generator=_gen(15))
    total, count = block_influence(h, h.clone())
    assert count == 2 * 5  # position 0 of each sequence left out
    assert 1 - total / count == pytest.approx(0.0, abs=1e-6)  # float32 statistics

    # Orthogonal rows: h_in on the first half of the features, h_out on the second half.
    h_in = torch.zeros(2, 6, 8)
    h_out = torch.zeros(2, 6, 8)
    h_in[..., :4] = torch.randn(2, 6, 4, generator=_gen(16))
    h_out[..., 4:] = torch.randn(2, 6, 4, generator=_gen(17))
    total, count = block_influence(h_in, h_out, skip_first=False)
    assert count == 12 and 1 - total / count == pytest.approx(1.0, abs=1e-6)


def test_block_influence_hand_computed_and_skip_first():
    # seq of 2: position 0 has cos -1 (opposite), position 1 has cos 0.6 ((3,4).(1,0)/5 = 0.6).
    h_in = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    h_out = torch.tensor([[[-2.0, 0.0], [1.0, 0.0]]]).to(torch.bfloat16)
    # float32 statistics for float32 / bf16 hidden states
    assert block_influence(h_in, h_out) == (pytest.approx(0.6, rel=1e-6), 1)
    assert block_influence(h_in, h_out, skip_first=False) == (pytest.approx(-0.4, rel=1e-6), 2)
    # angular: arccos(-1)/pi = 1, arccos(0.6)/pi
    total, count = angular_distance(h_in, h_out, skip_first=False)
    assert count == 2 and total == pytest.approx(1.0 + math.acos(0.6) / math.pi, rel=1e-6)


def test_angular_distance_identical_and_orthogonal():
    h = torch.randn(3, 4, 5, generator=_gen(18), dtype=torch.float64)
    total, count = angular_distance(h, 3.0 * h)
    assert count == 9 and total == pytest.approx(0.0, abs=1e-12)
    # float32 input: the atan2 form keeps a near-zero angle near zero (arccos(cos) would give ~1e-4)
    h32 = h.float()
    total, count = angular_distance(h32, 3.0 * h32 + 1e-4 * torch.randn(3, 4, 5, generator=_gen(19)))
    exact, _ = angular_distance(h, 3.0 * h + 1e-4 * torch.randn(3, 4, 5, generator=_gen(19)).double())
    assert total == pytest.approx(exact, rel=1e-3, abs=1e-7)
    h_in = torch.zeros(1, 3, 2)
    h_out = torch.zeros(1, 3, 2)
    h_in[..., 0] = 1.0
    h_out[..., 1] = -2.0
    assert angular_distance(h_in, h_out) == (pytest.approx(1.0), 2)  # 2 rows x 1/2


def test_block_influence_shape_mismatch():
    with pytest.raises(SimilarityError, match=r"\(1, 2, 3\) and \(1, 2, 4\)"):
        block_influence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
