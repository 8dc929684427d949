"""Least-squares corrections (merge.correction=linear|refit): the math against direct computation,
cross-validation that keeps the identity when there is nothing to learn, the stage's corrected layer
against the in-memory merge, the streamed export against ``merge_state_dict`` and a transformers load,
and the plan file checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slm_dist.arch import get_arch
from slm_dist.checkpoint.corrections import checked_windows, kind_of, load_corrections, save_corrections
from slm_dist.checkpoint.export import ExportError, plan_export, write_export
from slm_dist.checkpoint.index import open_index
from slm_dist.core.alpha_fit import squared_error
from slm_dist.core.correction_fit import (
    RIDGE_GRID,
    CorrectionError,
    choose_correction,
    correction_key,
    projection_prior,
)
from slm_dist.core.merge import apply_correction, merge_state_dict
from slm_dist.core.merge_jobs import MergeError, correction_name
from slm_dist.core.planner import MergePlan, PlanError
from slm_dist.workers.merge_worker import run_jobs_in_threads
from slm_dist.workers.stage_worker import StageSpec, StageWorker
from tests.test_calibrated_merge import hf_hidden, state_dict

LLAMA = get_arch("llama")


def rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------- pure math
def batches_of(folds):
    """choose_correction's row source over raw folds: one batch (m, r, m0, r0) or a list of them each."""
    folds = [f if isinstance(f, list) else [f] for f in folds]
    return (lambda i: iter(folds[i])), len(folds)


def choose(folds, **kwargs):
    source, n = batches_of(folds)
    return choose_correction(source, n, **kwargs)


def old_choose(folds, grid=RIDGE_GRID, prior=None):
    """The implementation this one replaced (7 copies of d_in^2: every fold's normal equations, their
    total, a training set and an LU solve), written directly: the reference for equality."""
    folds = [f if isinstance(f, list) else [f] for f in folds]
    stats = []
    for batches in folds:
        m = torch.cat([b[0] for b in batches]).double()
        r = torch.cat([b[1] for b in batches]).double()
        f0 = [b for b in batches if b[2] is not None]
        first = (torch.cat([b[2] for b in f0]).double(), torch.cat([b[3] for b in f0]).double()) if f0 else None
        stats.append((m.T @ m, m.T @ r, float((r * r).sum()), first))
    gram_t, cross_t = sum(s[0] for s in stats), sum(s[1] for s in stats)
    eye = None if prior is None else prior

    def error(g, c, t, x):
        x = torch.eye(g.shape[0], dtype=torch.float64) if x is None else x
        return float(((g @ x) * x).sum() - 2.0 * (c * x).sum() + t)

    def rows_error(first, x):
        m, r = first
        return float((((m if x is None else m @ x) - r) ** 2).sum())

    def fit(g, c, firsts, lam):
        g, c = g.clone(), c.clone()
        for m, r in firsts:
            g += m.T @ m
            c += m.T @ r
        g.diagonal().add_(lam)
        if prior is None:
            c.diagonal().add_(lam)
        else:
            c += lam * prior
        return torch.linalg.solve(g, c)

    identity = sum(error(g, c, t, eye) for g, c, t, _ in stats)
    first_identity = sum(rows_error(s[3], eye) for s in stats if s[3] is not None)
    tried = []
    for ridge in grid:
        held, first = 0.0, 0.0
        for i, (g, c, t, f) in enumerate(stats):
            train_g = gram_t - g
            lam = ridge * float(train_g.trace()) / g.shape[0]
            x = fit(train_g, cross_t - c, [s[3] for j, s in enumerate(stats) if j != i and s[3] is not None], lam)
            held += error(g, c, t, x)
            first += rows_error(f, x) if f is not None else 0.0
        tried.append((ridge, math.inf if held + first > identity + first_identity else held / identity))
    ridge, loss = min(tried, key=lambda t: (t[1], -t[0]))
    if loss >= 1.0:
        return None, 1.0, tried, None
    lam = ridge * float(gram_t.trace()) / gram_t.shape[0]
    return ridge, loss, tried, fit(gram_t, cross_t, [s[3] for s in stats if s[3] is not None], lam)


def assert_same_fit(new, old, rel=1e-6):
    assert new[0] == old[0]
    assert new[1] == pytest.approx(old[1], rel=rel)
    for (r1, v1), (r2, v2) in zip(new[2], old[2]):
        assert r1 == r2 and (v1 == v2 == math.inf or v1 == pytest.approx(v2, rel=rel))
    if old[3] is None:
        assert new[3] is None
    else:
        assert float((new[3] - old[3]).norm() / old[3].norm()) < rel


def test_ridge_runs_from_least_squares_to_the_identity():
    m = rows(80, 5, 3)
    r = m @ (torch.eye(5, dtype=torch.float64) + rows(5, 5, 5)) + 0.01 * rows(80, 5, 4)  # a map worth fitting
    folds = [(m[i::4], r[i::4], None, None) for i in range(4)]
    lstsq = torch.linalg.lstsq(m, r).solution
    assert torch.allclose(choose(folds, grid=(1e-12,))[3], lstsq, atol=1e-8)
    with pytest.raises(CorrectionError, match=r"one N"):
        choose([(m, r[:40], None, None)] * 2)


def test_the_fit_equals_the_old_implementation_on_random_data():
    """Same ridge, losses and map (1e-6 relative) as the 7-copy implementation it replaced, square
    and rectangular, with and without a prior, position-0 rows and several batches per fold."""
    g = torch.Generator().manual_seed(21)
    for d_in, d_out, prior in [(8, 8, None), (24, 6, torch.randn(24, 6, generator=g, dtype=torch.float64))]:
        planted = (torch.eye(8, dtype=torch.float64) if prior is None else prior) \
            + 0.3 * torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
        folds = []
        for _ in range(4):
            fold = []
            for _ in range(3):
                m = torch.randn(30, d_in, generator=g)  # float32 rows, as a stage gives them
                r = m.double() @ planted + 0.5 * torch.randn(30, d_out, generator=g, dtype=torch.float64)
                m0 = 20 * torch.randn(2, d_in, generator=g)
                fold.append((m, r.float(), m0, (m0.double() @ planted).float()))
            folds.append(fold)
        new, old = choose(folds, prior=prior), old_choose(folds, prior=prior)
        assert new[0] is not None
        assert_same_fit(new, old)
        blind = [[(m, r, None, None) for m, r, _, _ in fold] for fold in folds]
        assert_same_fit(choose(blind, prior=prior), old_choose(blind, prior=prior))


def test_the_fit_holds_two_gram_copies(monkeypatch):
    """The d_in^2 float64 buffers alive at the fit's peak: the training statistics and one factor."""
    import slm_dist.core.correction_fit as cf

    seen = []
    real_solve = cf._Solver.solve

    def counting(self, gram, *args):
        import gc
        squares = {t.untyped_storage().data_ptr() for t in gc.get_objects() if type(t) is torch.Tensor
                   and t.dim() == 2 and t.shape == gram.shape and t.dtype == torch.float64}
        seen.append(len(squares))
        return real_solve(self, gram, *args)

    monkeypatch.setattr(cf._Solver, "solve", counting)
    d = 16
    folds = [(torch.randn(40, d), torch.randn(40, 3), None, None) for _ in range(4)]
    choose(folds, prior=torch.zeros(d, 3, dtype=torch.float64), grid=(0.1,))
    assert seen and max(seen) == cf.GRAM_COPIES


def test_cross_validation_recovers_a_planted_map():
    planted = torch.eye(8, dtype=torch.float64) + 0.5 * rows(8, 8, 5)
    folds = []
    for seed in range(4):
        m = rows(200, 8, 10 + seed)
        folds.append((m, m @ planted + 0.01 * rows(200, 8, 20 + seed), None, None))
    ridge, loss, tried, matrix = choose(folds)
    assert ridge is not None and loss < 0.01 and len(tried) > 3
    assert torch.allclose(matrix, planted, atol=0.02)


def test_cross_validation_keeps_the_identity_when_there_is_nothing_to_learn():
    # r = m + noise: the identity is the truth, any fitted map only learns the noise of its folds.
    folds = []
    for seed in range(4):
        m = rows(12, 8, 30 + seed)
        folds.append((m, m + rows(12, 8, 40 + seed), None, None))
    ridge, loss, tried, matrix = choose(folds, grid=(1e-6, 1e-4))
    assert (ridge, loss, matrix) == (None, 1.0, None)
    assert all(v >= 1.0 for _, v in tried)
    with pytest.raises(CorrectionError, match="at least 2 folds"):
        choose(folds[:1])


def test_massive_position_zero_rows_are_kept_by_the_fit_but_do_not_pick_the_ridge():
    """SmolLM2's layer 11 writes norm-2e4 vectors at position 0: a map fitted on the other rows alone
    sends them anywhere (and broke the model); fitted with them, it keeps them."""
    planted = torch.eye(8, dtype=torch.float64) + 0.5 * rows(8, 8, 50)
    massive = torch.zeros(8, dtype=torch.float64)
    massive[3] = 2e4
    folds, blind = [], []
    for seed in range(4):
        m = rows(200, 8, 60 + seed)
        r = m @ planted + 0.01 * rows(200, 8, 70 + seed)
        m0 = massive + rows(4, 8, 80 + seed)
        folds.append((m, r, m0, m0 + rows(4, 8, 90 + seed)))  # the window keeps them as they are
        blind.append((m, r, None, None))
    ridge, loss, _, matrix = choose(folds)
    _, _, _, blind_matrix = choose(blind)
    assert ridge is not None and loss < 0.15  # 0.08: the planted map, bent a little by the massive rows
    assert torch.allclose(massive @ matrix, massive, rtol=1e-3, atol=2.0)  # kept, to within noise
    assert not torch.allclose(massive @ blind_matrix, massive, rtol=0.1, atol=100.0)  # what went wrong before
    # A map that would wreck held-out position-0 rows is vetoed, whatever it gains elsewhere: here
    # one fold's massive rows want the opposite of what the others teach.
    flipped = [(folds[0][0], folds[0][1], massive[None] + rows(4, 8, 99), -massive[None] + rows(4, 8, 98))] + folds[1:]
    vetoed = choose(flipped, grid=(1e-3,))
    assert vetoed[2] == [(1e-3, float("inf"))] and vetoed[3] is None


def test_cross_validation_equals_direct_fits_on_the_raw_rows():
    """Every fold's held-out error, from statistics and kept position-0 rows, against a ridge solved
    directly on the other folds' raw rows (ordinary and position 0), towards a prior."""
    g = torch.Generator().manual_seed(11)
    prior = torch.randn(6, 4, generator=g, dtype=torch.float64)
    raw = []
    for _ in range(3):
        m, r = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
        m0, r0 = 50 * torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
        raw.append((m, r, m0, r0))
    _, _, tried, _ = choose(raw, grid=(0.1, 10.0), prior=prior)
    identity = sum(float(((m @ prior - r) ** 2).sum()) for m, r, _, _ in raw)
    for ridge, loss in tried:
        held_out = 0.0
        for i, (m, r, _, _) in enumerate(raw):
            train = [x for j, x in enumerate(raw) if j != i]
            mt, rt = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
            lam = ridge * float((mt * mt).sum()) / 6  # scaled by the ordinary rows alone
            mt, rt = torch.cat([mt, *(t[2] for t in train)]), torch.cat([rt, *(t[3] for t in train)])
            x = torch.linalg.solve(mt.T @ mt + lam * torch.eye(6, dtype=torch.float64), mt.T @ rt + lam * prior)
            held_out += float(((m @ x - r) ** 2).sum())
        assert loss == pytest.approx(held_out / identity, rel=1e-9)


def test_correction_key_shares_scaled_alpha_zero_with_drop():
    assert correction_key((2, 4), "scaled", 0.0) == correction_key([2, 4], "drop", None)
    assert correction_key((2, 4), "scaled", 0.5) != correction_key((2, 4), "drop", None)
    assert correction_key((2, 4), "drop", None, "refit") != correction_key((2, 4), "drop", None, "linear")
    with pytest.raises(CorrectionError, match="unknown correction kind"):
        correction_key((2, 4), "drop", None, "affine")


def test_apply_correction_folds_the_map_into_the_projection():
    g = torch.Generator().manual_seed(6)
    weight, bias, x = torch.randn(4, 7, generator=g), torch.randn(4, generator=g), torch.randn(3, 7, generator=g)
    t = torch.randn(4, 4, generator=g)
    # The layer then adds (x W^T + b) T where it added x W^T + b.
    folded = x @ apply_correction(weight, t).T + apply_correction(bias, t)
    assert torch.allclose(folded, (x @ weight.T + bias) @ t, atol=1e-5)
    assert apply_correction(weight.bfloat16(), t).dtype == torch.bfloat16
    with pytest.raises(MergeError, match="output rows"):
        apply_correction(torch.randn(5, 7), t)


def test_refit_replaces_the_projection_and_contains_every_linear_map():
    g = torch.Generator().manual_seed(8)
    weight, bias, t = torch.randn(4, 7, generator=g), torch.randn(4, generator=g), torch.randn(4, 4, generator=g)
    prior = projection_prior(weight, bias)  # the plain merge as X [d_in + 1, d]
    assert prior.shape == (8, 4)
    assert torch.equal(apply_correction(weight, prior, "refit"), weight)
    assert torch.equal(apply_correction(bias, prior, "refit"), bias)
    # X = [W^T; b^T] T is the linear correction T: refit's family holds linear's.
    as_refit = prior @ t.double()
    assert torch.allclose(apply_correction(weight, as_refit, "refit"), apply_correction(weight, t), atol=1e-5)
    assert torch.allclose(apply_correction(bias, as_refit, "refit"), apply_correction(bias, t), atol=1e-5)
    assert torch.equal(apply_correction(weight, projection_prior(weight, None), "refit"), weight)
    assert apply_correction(weight.bfloat16(), prior, "refit").dtype == torch.bfloat16
    with pytest.raises(MergeError, match="replaces an output projection"):
        apply_correction(torch.randn(4, 9), prior, "refit")
    with pytest.raises(MergeError, match="unknown correction kind"):
        apply_correction(weight, t, "affine")


def test_cross_validation_recovers_a_planted_projection_against_its_prior():
    """Refit: features wider than the targets, pulled towards a prior, not the identity."""
    g = torch.Generator().manual_seed(9)
    prior = torch.randn(12, 5, generator=g, dtype=torch.float64)
    planted = prior + 0.5 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    folds = []
    for b in range(4):
        u = torch.randn(300, 12, generator=g, dtype=torch.float64)
        folds.append((u, u @ planted + 0.01 * torch.randn(300, 5, generator=g), None, None))
    ridge, loss, _, matrix = choose(folds, prior=prior)
    assert ridge is not None and loss < 1e-3
    assert torch.allclose(matrix, planted, atol=1e-2)
    # Targets the prior already explains (plus noise): the prior is kept.
    still = [(u := torch.randn(20, 12, generator=g, dtype=torch.float64), u @ prior + torch.randn(20, 5, generator=g),
              None, None) for _ in range(4)]
    assert choose(still, grid=(1e-6,), prior=prior)[0] is None


# ----------------------------------------------------------------------------------- stage glue
def cached_stages(tiny_model, dtype="float32", correction_weight="relative", pool_cap=None):
    stages = [StageWorker(StageSpec(str(tiny_model), a, b, 6, dtype=dtype, correction_weight=correction_weight,
                                    pool_cap=pool_cap)) for a, b in ((0, 3), (3, 6))]
    batches = [torch.randint(3, 60, (4, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    for batch_id, ids in enumerate(batches):
        x = ids
        for stage in stages:
            x, _ = stage.calibrate(batch_id, x, cache_inputs=True)
    return stages, batches


@pytest.mark.parametrize("kind", ["linear", "refit"])
@pytest.mark.parametrize("rule, alpha", [("drop", None), ("scaled", 0.4)])
def test_stage_correction_is_the_merge_with_the_map_folded_in(tiny_model, rule, alpha, kind):
    """Window [2..4] straddles both stages. The corrected candidate equals the HF model holding
    merge_state_dict(..., corrections) (what the export writes), and it is closer to the window's
    output than the plain merge on the batches it was fitted on."""
    window = (2, 4)
    stages, batches = cached_stages(tiny_model)
    fit = stages[0].fit_correction(window, rule, alpha, [0, 1, 2, 3], kind)
    assert fit.key == correction_key(window, rule, alpha, kind) and fit.window == window and fit.kind == kind
    assert fit.matrix is not None and 0.0 < fit.loss < 1.0
    assert fit.matrix.shape == ((32, 32) if kind == "linear" else (64, 32))  # refit: [intermediate, hidden]

    sd = state_dict(tiny_model)
    alphas = {window: alpha} if rule == "scaled" else None
    plain = merge_state_dict(sd, [window], 6, LLAMA, rule, alphas)
    corrected = merge_state_dict(sd, [window], 6, LLAMA, rule, alphas, corrections={window: fit.matrix},
                                 correction_kind=kind)
    changed = [k for k in plain if not torch.equal(plain[k], corrected[k])]
    assert changed == ["model.layers.2.mlp.down_proj.weight"]

    def hf_model(weights):
        config = AutoConfig.from_pretrained(tiny_model)
        config.num_hidden_layers = 4
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        model.load_state_dict(weights)
        return model.eval()

    model = hf_model(corrected)
    original = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        for batch_id, ids in enumerate(batches):
            x = None
            for stage in stages:
                x = stage.run_candidate(batch_id, x, [window], rule, from_layer=2, alphas=alphas, input_ids=ids,
                                        correction=kind)
            expected = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
            expected = expected.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(x, expected, atol=1e-4), batch_id
    # The corrected layer's output is closer to the window's output than the plain merge's.
    err_plain = err_fixed = 0.0
    for ids in batches:
        target = hf_hidden(original, ids)[4]
        err_plain += squared_error(hf_hidden(hf_model(plain), ids)[2], target)
        err_fixed += squared_error(hf_hidden(model, ids)[2], target)
    assert err_fixed < err_plain


@pytest.mark.parametrize("kind", ["linear", "refit"])
def test_stage_fit_equals_the_old_implementation_on_the_tiny_model(tiny_model, monkeypatch, kind):
    """The stage's rows, recomputed per ridge, give the fit the old implementation gives on the same
    rows held at once: same ridge, losses and map to 1e-6 relative."""
    import slm_dist.workers.window_fits as wf

    results = []

    def both(rows, folds, reference=None, **kwargs):
        assert reference is None  # only pool's fit is scored against the plain merge; old_choose predates it
        held = [[tuple(None if t is None else t.clone() for t in b) for b in rows(i)] for i in range(folds)]
        new = choose_correction(rows, folds, **kwargs)
        results.append((new, old_choose(held, **kwargs)))
        return new

    monkeypatch.setattr(wf, "choose_correction", both)
    stages, _ = cached_stages(tiny_model)
    fit = stages[0].fit_correction((2, 4), "drop", None, [0, 1, 2, 3], kind)
    ((new, old),) = results
    assert fit.matrix is not None
    assert_same_fit(new, old)


@pytest.mark.parametrize("kind", ["linear", "refit"])
def test_relative_weighting_divides_each_tokens_row_by_the_windows_output_norm(tiny_model, monkeypatch, kind):
    """merge.correction_weight=relative: every row the fit sees (ordinary and position 0) is the
    unweighted row divided by ||h_4|| at its token, h_4 the original window's output taken from
    transformers' hidden states; the fit differs from the unweighted one."""
    import slm_dist.workers.window_fits as wf

    seen: dict[str, list] = {}

    def capture(name):
        def choose(rows, folds, **kwargs):
            seen[name] = [[tuple(None if t is None else t.clone() for t in b) for b in rows(i)] for i in range(folds)]
            return choose_correction(rows, folds, **kwargs)
        return choose

    fits = {}
    for weight in ("none", "relative"):
        monkeypatch.setattr(wf, "choose_correction", capture(weight))
        stages, batches = cached_stages(tiny_model, correction_weight=weight)
        fits[weight] = stages[0].fit_correction((2, 4), "drop", None, [0, 1, 2, 3], kind)

    original = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    for fold, ids in enumerate(batches):   # 4 batches, 4 folds: fold i is batch i
        (plain,), (weighted,) = seen["none"][fold], seen["relative"][fold]
        norm = hf_hidden(original, ids)[4].norm(dim=-1, keepdim=True)    # [4, 64, 1]: layer 4's output
        ordinary, first = norm[:, 1:].reshape(-1, 1), norm[:, 0]
        for got, want, by in zip(weighted, plain, (ordinary, ordinary, first, first)):
            torch.testing.assert_close(got, want / by, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(fits["none"].matrix, fits["relative"].matrix)
    with pytest.raises(CorrectionError, match="unknown correction weighting"):
        wf.fit_window_correction(stages[0], (2, 4), "drop", None, [0, 1, 2, 3], kind=kind, weight="squared")


def test_corrected_scoring_needs_a_fitted_map(tiny_model):
    stages, batches = cached_stages(tiny_model)
    with pytest.raises(RuntimeError, match="no linear correction fitted for window"):
        stages[0].run_candidate(0, None, [(1, 2)], "drop", from_layer=1, correction="linear")
    with pytest.raises(CorrectionError, match="at least 2 calibration batches"):
        stages[0].fit_correction((1, 2), "drop", None, [0])


def test_a_window_that_kept_its_plain_merge_is_scored_without_a_layer_copy(tiny_model):
    stages, batches = cached_stages(tiny_model)
    stages[0].set_correction(correction_key((1, 2), "drop", None, "refit"), None)  # the fit kept the plain merge
    plain = stages[0].run_candidate(0, None, [(1, 2)], "drop", from_layer=1)
    kept = stages[0].run_candidate(0, None, [(1, 2)], "drop", from_layer=1, correction="refit")
    assert torch.equal(plain, kept)
    assert stages[0]._merged_layers == {}  # layer 1 ran as it is, no copy built


# ----------------------------------------------------------------------------------- export
def corrected_plan(tmp_path, rule="drop", alpha=None, windows=((1, 3),), hidden=32, seed=7, kind="linear",
                   rows=None):
    g = torch.Generator().manual_seed(seed)
    rows = (hidden if kind == "linear" else 2 * hidden) if rows is None else rows  # refit: tiny intermediate 64
    matrices = {w: torch.eye(rows, hidden) + 0.3 * torch.randn(rows, hidden, generator=g) for w in windows}
    path = tmp_path / "corrections.safetensors"
    sha = save_corrections(path, matrices, kind)
    alphas = tuple(alpha for _ in windows) if rule == "scaled" else None
    plan = MergePlan(6, tuple(windows), rule, "cka", None, alphas=alphas, corrections=str(path),
                     corrections_sha256=sha)
    return plan, matrices


@pytest.mark.parametrize("rule, alpha, budget, kind", [("drop", None, 512 * 1024**2, "linear"),
                                                       ("scaled", 0.3, 4096, "linear"), ("mean", None, 4096, "linear"),
                                                       ("scaled", 0.3, 4096, "refit"), ("sum", None, 512 * 1024**2, "refit")])
def test_export_writes_the_corrected_projection_and_transformers_loads_it(tiny_model, tmp_path, rule, alpha, budget,
                                                                          kind):
    """A tiny memory budget forces the streamed T^T W (or refit's X^T) into many row blocks; the result
    equals the in-memory reference (float32 sums in another order: close, not bit-equal) and loads."""
    windows = ((1, 3), (4, 5))
    plan, matrices = corrected_plan(tmp_path, rule, alpha, windows, kind=kind)
    index = open_index(tiny_model)
    export = plan_export(index, plan, tmp_path / "out", max_shard_bytes=64 * 1024)
    write_export(export, run_jobs_in_threads, max_parallel=2, memory_budget_bytes=budget)
    got = state_dict(tmp_path / "out")
    expected = merge_state_dict(state_dict(tiny_model), windows, 6, LLAMA, rule, plan.alpha_map, corrections=matrices,
                                correction_kind=kind)
    assert got.keys() == expected.keys()
    for key in expected:
        if "mlp.down_proj" in key and key.split(".")[2] in ("1", "2"):
            assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-5), key
            assert not torch.equal(got[key], state_dict(tiny_model)[f"model.layers.{ {'1': 1, '2': 4}[key.split('.')[2]] }.mlp.down_proj.weight"])
        else:
            assert torch.equal(got[key], expected[key]), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    assert f"- correction: `{kind}`" in (tmp_path / "out" / "README.md").read_text()


def test_plan_corrections_round_trip_and_file_checks(tiny_model, tmp_path):
    plan, matrices = corrected_plan(tmp_path)
    assert MergePlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert checked_windows(plan, 32) == {(1, 3): correction_name((1, 3))}
    assert torch.equal(load_corrections(plan, 32)[(1, 3)], matrices[(1, 3)])
    with pytest.raises(PlanError, match="hidden size is 64"):
        checked_windows(plan, 64)
    with pytest.raises(PlanError, match="both the file and its sha256"):
        MergePlan(6, ((1, 3),), "drop", "cka", None, corrections=plan.corrections)
    with pytest.raises(PlanError, match="corrections\" must be"):
        MergePlan.from_json({**plan.to_json(), "corrections": "x.safetensors"})
    stray, _ = corrected_plan(tmp_path, windows=((0, 1),))  # rewrites the file with another window
    with pytest.raises(PlanError, match="changed since the plan was made"):
        checked_windows(plan, 32)
    with pytest.raises(PlanError, match="not a window of the plan"):
        checked_windows(MergePlan(6, ((1, 3),), "drop", "cka", None, corrections=stray.corrections,
                                  corrections_sha256=stray.corrections_sha256), 32)
    (tmp_path / "corrections.safetensors").unlink()
    with pytest.raises(PlanError, match="is missing"):
        plan_export(open_index(tiny_model), stray, tmp_path / "out", 64 * 1024)


def test_refit_files_say_their_kind_and_are_checked_against_the_projection(tiny_model, tmp_path):
    plan, matrices = corrected_plan(tmp_path, kind="refit")
    assert kind_of(plan.corrections) == "refit"
    assert checked_windows(plan, 32) == {(1, 3): correction_name((1, 3))}  # [intermediate, hidden] passes
    with pytest.raises(PlanError, match="hidden size is 64"):
        checked_windows(plan, 64)
    wrong, _ = corrected_plan(tmp_path, kind="refit", rows=48)  # not the projection's 64 inputs
    with pytest.raises(ExportError, match="cannot replace model.layers.1.mlp.down_proj.weight"):
        plan_export(open_index(tiny_model), wrong, tmp_path / "out", 64 * 1024)
    assert not (tmp_path / "out").exists()  # refused before writing anything
    linear, _ = corrected_plan(tmp_path, rows=64)  # a linear map must be square
    with pytest.raises(PlanError, match="hidden size is 32"):
        checked_windows(linear, 32)


# ----------------------------------------------------------------------------------- the run
@pytest.mark.parametrize("kind", ["linear", "refit", "pool"])
def test_corrected_run_writes_fits_and_a_checkpoint_with_them(tiny_model, tiny_text_file, tmp_path, kind):
    from slm_dist import pipeline
    from slm_dist.config import load_config
    from tests.test_pipeline import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "plan.search=global", "merge.rule=scaled", f"merge.correction={kind}",
                                              "merge.correction_batches=4", "eval.enabled=false"))
    pipeline.run(config, show_progress=False)
    raw = json.loads((tmp_path / "plan.json").read_text())
    plan = MergePlan.from_json({k: v for k, v in raw.items() if k != "details"})
    fits = raw["details"]["corrections"]
    assert [f["window"] for f in fits] == [list(w) for w in plan.windows]
    assert {f["kind"] for f in fits} == {kind}
    kept = [f for f in fits if f["ridge"] is not None]
    assert kept, "on these calibration batches a map beats the plain merge held out"
    assert plan.corrections == str((tmp_path / "corrections.safetensors").resolve())
    matrices = load_corrections(plan, 32)
    assert sorted(matrices) == sorted(tuple(f["window"]) for f in kept)
    assert kind_of(plan.corrections) == kind
    expected = merge_state_dict(state_dict(tiny_model), plan.windows, 6, LLAMA, "scaled", plan.alpha_map,
                                corrections=matrices, correction_kind=kind)
    got = state_dict(tmp_path / "model")
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-5), key


def test_output_criterion_rejects_the_correction():
    from slm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="merge.correction=linear fits finished windows"):
        load_config(None, ["similarity.criterion=output", "plan.threshold=0.9", "merge.correction=linear"])


def test_a_plan_whose_windows_all_keep_the_plain_merge_leaves_no_file(tmp_path):
    from slm_dist.planning import write_corrections

    file, sha = write_corrections(tmp_path, {(1, 3): torch.eye(4)})
    assert file == str((tmp_path / "corrections.safetensors").resolve()) and len(sha) == 64
    assert write_corrections(tmp_path, {}) == (None, None)
    assert not (tmp_path / "corrections.safetensors").exists()  # an earlier plan's maps are not left behind


def test_the_sliding_rule_plan_is_corrected_too(tiny_model, tiny_text_file, tmp_path):
    from slm_dist import pipeline
    from slm_dist.config import load_config
    from tests.test_pipeline import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "merge.rule=mean", "merge.correction=linear",
                                              "merge.correction_batches=4", "eval.enabled=false"))
    out = pipeline.run(config, show_progress=False, stop_after="plan")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["rule"] == "mean" and out["plan"]["windows"] == raw["windows"]
    assert [f["window"] for f in raw["details"]["corrections"]] == raw["windows"]


def test_a_new_calibration_forgets_the_maps_fitted_on_the_old_one(tiny_model):
    from slm_dist.backends.local import LocalBackend
    from slm_dist.workers.stage_worker import StatsSpec

    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    batches = [(b, torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(b))) for b in range(2)]
    backend = LocalBackend()
    backend.calibrate(specs, StatsSpec(), batches, keep_for_output_criterion=True)
    backend.fit_corrections([((1, 3), "drop", None, "linear")], 2)
    backend.score_plan([(1, 3)], "drop", None, "nll", correction="linear")
    backend.calibrate(specs, StatsSpec(), batches[::-1], keep_for_output_criterion=True)  # same stages reused
    with pytest.raises(RuntimeError, match="no linear correction fitted for window"):
        backend.score_plan([(1, 3)], "drop", None, "nll", correction="linear")


@pytest.mark.parametrize("kind", ["linear", "refit"])
def test_the_search_holds_one_plans_corrections_at_a_time(tiny_model, tiny_text_file, tmp_path, monkeypatch, kind):
    """Maps are released after each plan is scored; a released map fitted again is the same map, and
    the plan file holds the final plan's maps."""
    from slm_dist import pipeline
    from slm_dist.backends.local import LocalBackend
    from slm_dist.config import load_config
    from tests.test_pipeline import tiny_overrides

    first_fit, held, refits = {}, [], []
    fit_corrections, score_plan = LocalBackend.fit_corrections, LocalBackend.score_plan

    def recording_fit(self, requests, num_batches):
        fits = fit_corrections(self, requests, num_batches)
        for fit in fits:
            if fit.key in first_fit:
                refits.append(fit.key)
                same = first_fit[fit.key]
                assert (same is None and fit.matrix is None) or torch.equal(same, fit.matrix), fit.key
            first_fit.setdefault(fit.key, fit.matrix)
        return fits

    def recording_score(self, windows, rule, alphas=None, metric="nll", correction=None, num_batches=None,
                        skip_batches=0):
        maps = sum(m is not None for stage in self.stages for m in stage._corrections.values())
        held.append((maps, len(windows), correction))
        return score_plan(self, windows, rule, alphas, metric, correction, num_batches, skip_batches)

    monkeypatch.setattr(LocalBackend, "fit_corrections", recording_fit)
    monkeypatch.setattr(LocalBackend, "score_plan", recording_score)
    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "plan.search=global", "plan.candidates=5", "plan.local_search=4",
                                              "plan.cost=measured", "merge.rule=drop", f"merge.correction={kind}",
                                              "merge.correction_batches=4", "cluster.backend=local",
                                              "eval.enabled=false"))
    pipeline.run(config, show_progress=False, stop_after="plan")
    corrected = [(maps, n) for maps, n, correction in held if correction == kind]
    assert len(corrected) >= 3  # [1..3], [2..4], [1..2]+[3..4]
    assert all(maps <= n for maps, n in corrected)  # never more maps than the scored plan has windows
    assert refits, "the final plan's maps were released after scoring and fitted again"
    raw = json.loads((tmp_path / "plan.json").read_text())
    plan = MergePlan.from_json({k: v for k, v in raw.items() if k != "details"})
    for window, matrix in load_corrections(plan, 32).items():
        assert torch.equal(matrix, first_fit[correction_key(window, "drop", None, kind)])


def test_plans_whose_loss_is_remembered_release_their_maps_too(tiny_model, tiny_text_file, tmp_path):
    """compare remembers plan losses across runs: a remembered plan is not scored, but its maps are
    still fitted (to know whether it is corrected) and must not pile up on the stages."""
    from slm_dist import context, pipeline
    from slm_dist.config import load_config
    from slm_dist.planning import PlanMemo, PlanSearch
    from tests.test_pipeline import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "plan.search=global", "plan.candidates=5", "plan.local_search=4",
                                              "merge.rule=drop", "merge.correction=linear",
                                              "merge.correction_batches=4", "cluster.backend=local",
                                              "eval.enabled=false"))
    ctx = context.resolve_inputs(config, None, False)
    index = open_index(tiny_model)
    backend = context.make_backend(config)
    reducer = pipeline.calibrate(ctx, index, backend)
    memo = PlanMemo()
    first, _ = PlanSearch(ctx, reducer, backend, memo).make_plan(index)
    backend.clear_candidates(corrections=True)
    again, _ = PlanSearch(ctx, reducer, backend, PlanMemo(losses=memo.losses)).make_plan(index)  # every loss known
    assert again.windows == first.windows
    held = sum(m is not None for stage in backend.stages for m in stage._corrections.values())
    assert held <= len(again.windows)  # the final plan's maps only
