"""merge.correction=pool (core/neuron_pool.py): OBS's choice against brute force, the pool's features
against each layer's own MLP, the stage's pooled layer against the export and transformers, the
corrections file checks, merge.pool_cap's screen against the whole pool's equations, and the dry run's
count."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from slm_dist.arch import get_arch
from slm_dist.checkpoint.export import ExportError, plan_export, write_export
from slm_dist.checkpoint.index import open_index
from slm_dist.core.alpha_fit import squared_error
from slm_dist.core.correction_fit import CorrectionError, correction_key
from slm_dist.core.correction_sizes import screen_share
from slm_dist.core.merge import apply_correction, merge_state_dict
from slm_dist.core.merge_jobs import MergeError, plan_tensor_jobs, pool_rows
from slm_dist.core.neuron_pool import check_no_bias, obs_select, pool_matrix, pool_weights
from slm_dist.workers.merge_worker import run_jobs_in_threads
from tests.test_calibrated_merge import hf_hidden, state_dict
from tests.test_linear_correction import cached_stages, corrected_plan

LLAMA = get_arch("llama")


def ridge_objective(u, r, lam, keep):
    """min_X ||u[:, keep] X - r||^2 + lam ||X||^2, solved directly."""
    k = u[:, keep]
    x = torch.linalg.solve(k.T @ k + lam * torch.eye(len(keep), dtype=k.dtype), k.T @ r)
    return float(((k @ x - r) ** 2).sum() + lam * (x ** 2).sum())


def test_obs_removes_the_feature_whose_removal_costs_least_by_brute_force():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200, 9, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 9, dtype=torch.float64)
    r = u[:, [0, 4, 7]] @ torch.randn(3, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        200, 5, generator=g, dtype=torch.float64)
    gram, cross = u.T @ u, u.T @ r
    ridge = 1e-2
    lam = ridge * float(gram.diagonal().mean())
    everything = list(range(9))
    full = ridge_objective(u, r, lam, everything)
    costs = [ridge_objective(u, r, lam, [j for j in everything if j != i]) - full for i in everything]
    alive = obs_select(gram, cross, 8, ridge=ridge, chunks=1)
    dropped = sorted(set(everything) - set(alive.tolist()))
    assert dropped == [min(everything, key=lambda i: costs[i])]
    # One at a time down to 3 keeps the planted features; each step matches the brute-force choice.
    keep = everything
    for _ in range(6):
        keep_costs = {i: ridge_objective(u, r, lam, [j for j in keep if j != i]) for i in keep}
        keep = [j for j in keep if j != min(keep_costs, key=keep_costs.get)]
    assert obs_select(gram, cross, 3, ridge=ridge, chunks=6).tolist() == keep == [0, 4, 7]
    with pytest.raises(CorrectionError, match="keeps between 1 and 9"):
        obs_select(gram, cross, 10)


def test_pool_features_are_each_layers_own_mlp_on_its_own_norm():
    """A member's neuron, on the merged layer's normalised input with its gain folded in, is that
    member's own MLP neuron on its own RMSNorm of the same residual stream (transformers' modules)."""
    g = torch.Generator().manual_seed(1)
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=8, num_attention_heads=2,
                                 num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6)
    layers = []
    for _ in range(3):
        norm, mlp = LlamaRMSNorm(16, eps=1e-6), LlamaMLP(config)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        layers.append((norm, mlp))
    tensors = [{"post_attention_layernorm.weight": n.weight.detach(), "mlp.gate_proj.weight": m.gate_proj.weight.detach(),
                "mlp.up_proj.weight": m.up_proj.weight.detach(), "mlp.down_proj.weight": m.down_proj.weight.detach()}
               for n, m in layers]
    gate, up = pool_weights(tensors[0], tensors, LLAMA)  # rule drop: the merged layer is the bottom one
    assert gate.shape == up.shape == (24, 16)  # its own 8 neurons once, then the two members' 8 each
    h = torch.randn(5, 16, generator=g)
    x = layers[0][0](h)
    pooled = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    with torch.no_grad():
        for k, (norm, mlp) in enumerate(layers):
            xk = norm(h)
            own = mlp.act_fn(mlp.gate_proj(xk)) * mlp.up_proj(xk)
            torch.testing.assert_close(pooled[:, 8 * k:8 * (k + 1)], own, rtol=1e-5, atol=1e-5)
    with pytest.raises(CorrectionError, match="without biases"):
        check_no_bias({**tensors[0], "mlp.up_proj.bias": torch.zeros(8)}, LLAMA)


def hf_model(tiny_model, weights, layers):
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.load_state_dict(weights)
    return model.eval()


def test_stage_pool_fit_is_the_merge_with_the_chosen_mlp_and_beats_refit(tiny_model):
    """Window [2..4] straddles both stages. The pooled candidate equals the HF model holding
    merge_state_dict(..., pool) (what the export writes): only layer 2's gate, up and down change, its
    neurons come from layers 2-4, and its output is closer to the window's than refit's on these batches."""
    window = (2, 4)
    stages, batches = cached_stages(tiny_model)
    fit = stages[0].fit_correction(window, "drop", None, [0, 1, 2, 3], "pool")
    refit = stages[0].fit_correction(window, "drop", None, [0, 1, 2, 3], "refit")
    assert fit.key == correction_key(window, "drop", None, "pool") and fit.kind == "pool"
    assert fit.matrix is not None and fit.matrix.shape == (3 * 64, 32) and 0.0 < fit.loss < 1.0

    sd = state_dict(tiny_model)
    plain = merge_state_dict(sd, [window], 6, LLAMA, "drop")
    pooled = merge_state_dict(sd, [window], 6, LLAMA, "drop", corrections={window: fit.matrix}, correction_kind="pool")
    changed = sorted(k for k in plain if not torch.equal(plain[k], pooled[k]))
    assert changed == [f"model.layers.2.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]
    members = [{s: sd[LLAMA.layer_key(i, s)] for s in LLAMA.required_suffixes} for i in (2, 3, 4)]
    gates, ups = pool_weights(members[0], members, LLAMA)  # checked against transformers above
    rows = [int((gates == row).all(dim=1).nonzero()[0]) for row in pooled["model.layers.2.mlp.gate_proj.weight"]]
    assert len(set(rows)) == 64 and max(rows) >= 64  # 64 distinct neurons, some from layers 3-4
    assert torch.equal(pooled["model.layers.2.mlp.up_proj.weight"], ups[rows])

    model = hf_model(tiny_model, pooled, 4)
    with torch.no_grad():
        for batch_id, ids in enumerate(batches):
            x = None
            for stage in stages:
                x = stage.run_candidate(batch_id, x, [window], "drop", from_layer=2, input_ids=ids, correction="pool")
            expected = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
            expected = expected.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(x, expected, atol=1e-4), batch_id
    original = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    refitted = hf_model(tiny_model, merge_state_dict(sd, [window], 6, LLAMA, "drop", corrections={window: refit.matrix},
                                                     correction_kind="refit"), 4)
    errors = {"plain": 0.0, "refit": 0.0, "pool": 0.0}
    for ids in batches:
        target = hf_hidden(original, ids)[4]
        for name, m in (("plain", hf_model(tiny_model, plain, 4)), ("refit", refitted), ("pool", model)):
            errors[name] += squared_error(hf_hidden(m, ids)[2], target)
    assert errors["pool"] < errors["refit"] < errors["plain"], errors


def test_screen_share_splits_the_cap_among_the_other_layers():
    assert screen_share(3 * 64, 64, 2) == 32       # host + 2 others, 1 x 64 more kept: 32 each
    assert screen_share(8 * 100, 100, 3) == 28     # 7 others share 200
    for cap in (None, 3, 9):
        assert screen_share(3 * 64, 64, cap) is None  # the whole pool is within the cap
    assert screen_share(64, 64, 2) is None         # the host alone: nothing to screen
    with pytest.raises(CorrectionError, match="at least 2"):
        screen_share(4 * 64, 64, 1)
    with pytest.raises(CorrectionError, match="not whole layers"):
        screen_share(100, 64, 2)


def test_capped_pool_screens_each_layer_alone_then_chooses_among_the_survivors(tiny_model, monkeypatch):
    """merge.pool_cap=2 on window [2..4] (rule drop: the pool is layer 2's 64 neurons, then layers 3's
    and 4's): OBS runs on each other layer's equations alone, which are exactly that layer's block of the
    whole pool's, keeping 32 each; the final choice runs on the whole pool's equations restricted to the
    host's and the survivors, and every chosen neuron is one of them. A cap the pool is within changes
    nothing."""
    import slm_dist.workers.window_fits as window_fits

    calls = []

    def recording(gram, cross, keep, *args, **kwargs):
        alive = obs_select(gram, cross, keep, *args, **kwargs)
        calls.append((gram.clone(), cross.clone(), keep, alive.clone()))
        return alive

    monkeypatch.setattr(window_fits, "obs_select", recording)
    window, ids = (2, 4), [0, 1, 2, 3]
    whole_stages, _ = cached_stages(tiny_model)
    whole = whole_stages[0].fit_correction(window, "drop", None, ids, "pool")
    ((gram, cross, keep, _),) = calls
    assert gram.shape == (3 * 64, 3 * 64) and keep == 64

    calls.clear()
    capped_stages, _ = cached_stages(tiny_model, pool_cap=2)
    capped = capped_stages[0].fit_correction(window, "drop", None, ids, "pool")
    assert len(calls) == 3
    survivors = [torch.arange(64)]
    for k, (g, c, keep, alive) in enumerate(calls[:2], start=1):
        block = torch.arange(64 * k, 64 * (k + 1))
        assert keep == 32
        torch.testing.assert_close(g, gram[block][:, block], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(c, cross[block], rtol=1e-6, atol=1e-9)
        survivors.append(block[alive])
    screened = torch.cat(survivors)
    g, c, keep, alive = calls[2]
    assert keep == 64 and len(screened) == 128
    torch.testing.assert_close(g, gram[screened][:, screened], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(c, cross[screened], rtol=1e-6, atol=1e-9)

    members = [{s: v.float() for s, v in layer.items()} for layer in capped_stages[0].window_members(window)[0]]
    gates, _ = pool_weights(members[0], members, LLAMA)
    chosen_gates = capped.matrix[64:128]  # X, then the gate rows (pool_matrix)
    rows = {int((gates == row).all(dim=1).nonzero()[0]) for row in chosen_gates}
    assert rows == set(screened[alive].tolist()) and rows <= set(screened.tolist())
    assert not torch.equal(capped.matrix, whole.matrix) and 0.0 < capped.loss < 1.0

    calls.clear()
    loose = cached_stages(tiny_model, pool_cap=3)[0][0].fit_correction(window, "drop", None, ids, "pool")
    assert len(calls) == 1 and torch.equal(loose.matrix, whole.matrix)


def test_pool_rows_and_apply_pick_each_projection():
    x, gate, up = (torch.randn(6, 4) for _ in range(3))
    matrix = pool_matrix(x, gate, up)
    assert matrix.shape == (18, 4)
    assert torch.equal(apply_correction(torch.zeros(4, 6), matrix, "pool"), x.T)
    assert torch.equal(apply_correction(torch.zeros(6, 4), matrix, "pool", "gate"), gate)
    assert torch.equal(apply_correction(torch.zeros(6, 4), matrix, "pool", "up"), up)
    assert pool_rows("up", (6, 4), (18, 4)) == slice(12, 18)
    with pytest.raises(MergeError, match="replaces a gated MLP's projections"):
        pool_rows(None, (4, 5), (18, 4))
    jobs = plan_tensor_jobs([LLAMA.layer_key(i, s) for i in range(3) for s in LLAMA.required_suffixes], [(0, 1)], 3,
                            LLAMA, "drop", None, {(0, 1): "window.0-1"}, "pool")
    corrected = {j.out_key: j.correction_part for j in jobs if j.correction}
    assert corrected == {"model.layers.0.mlp.down_proj.weight": None, "model.layers.0.mlp.gate_proj.weight": "gate",
                         "model.layers.0.mlp.up_proj.weight": "up"}


def test_export_writes_the_pooled_mlp_and_transformers_loads_it(tiny_model, tmp_path):
    """A tiny memory budget streams each pooled projection in many row blocks; the export equals the
    in-memory reference bit for bit, and a pool file of another intermediate size is refused first."""
    windows = ((1, 3), (4, 5))
    plan, matrices = corrected_plan(tmp_path, "drop", None, windows, kind="pool", rows=3 * 64)
    index = open_index(tiny_model)
    export = plan_export(index, plan, tmp_path / "out", max_shard_bytes=64 * 1024)
    write_export(export, run_jobs_in_threads, max_parallel=2, memory_budget_bytes=4096)
    got = state_dict(tmp_path / "out")
    expected = merge_state_dict(state_dict(tiny_model), windows, 6, LLAMA, "drop", corrections=matrices,
                                correction_kind="pool")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], matrices[(1, 3)][128:])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    wrong, _ = corrected_plan(tmp_path, kind="pool", rows=3 * 48)
    with pytest.raises(ExportError, match="cannot replace model.layers.1.mlp"):
        plan_export(index, wrong, tmp_path / "out2", 64 * 1024)
    assert not (tmp_path / "out2").exists()


def test_dry_run_counts_the_pool_and_names_it(tiny_model):
    from slm_dist.config import load_config
    from slm_dist.dryrun import dry_run, pool_stat_bytes, refit_stat_bytes

    # SmolLM2's 7-layer window: the pool's equations dwarf refit's.
    assert pool_stat_bytes(576, 1536, 7) > 3 * (7 * 1536) ** 2 * 8 > refit_stat_bytes(576, 1536)
    overrides = [f"model.path={tiny_model}", "plan.target_layers_removed=2", "merge.correction=pool"]
    report = dry_run(load_config(None, overrides), tiny_model)
    assert any("merge.correction=pool" in note and "3-layer window" in note for note in report.notes)


def test_dry_run_with_a_pool_cap_fits_llama2_7b_where_the_whole_pool_does_not():
    """configs/best.yaml on Llama-2-7B's geometry (7 of 32 layers, an 8-layer window, 2 x 80 GiB GPUs):
    the whole pool's choice, 3 x (8 x 11008)^2 float64, does not fit; merge.pool_cap=3 does, and the
    note names the cap."""
    from slm_dist.config import load_config
    from slm_dist.dryrun import dry_run, pool_stat_bytes
    from tests.test_dryrun import REPO

    model = REPO / "configs" / "models" / "llama-2-7b"
    base = [f"model.path={model}", "plan.target_layers_removed=7", "cluster.backend=ray", "cluster.num_stages=2",
            "cluster.gpus_per_stage=1", "cluster.device=cuda", f"cluster.memory_per_stage_bytes={80 * 1024**3}"]
    # the capped choice's statistics, and every candidate's gate and up rows (float32)
    assert pool_stat_bytes(4096, 11008, 8, 3) - pool_stat_bytes(4096, 11008, 3) == 2 * 5 * 11008 * 4096 * 4
    assert pool_stat_bytes(4096, 11008, 8, 3) < pool_stat_bytes(4096, 11008, 8) / 5
    assert pool_stat_bytes(4096, 11008, 2, 3) == pool_stat_bytes(4096, 11008, 2)  # within the cap
    whole = dry_run(load_config(REPO / "configs" / "best.yaml", base), model)
    capped = dry_run(load_config(REPO / "configs" / "best.yaml", [*base, "merge.pool_cap=3"]), model)
    assert not whole.fits and capped.fits
    assert any("merge.pool_cap" in note and "does not fit" in note for note in whole.notes)
    assert any("(merge.pool_cap=3 x intermediate)^2" in note for note in capped.notes)
    assert capped.seconds["plan"] < whole.seconds["plan"]
