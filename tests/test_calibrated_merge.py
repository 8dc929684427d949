"""Calibrated merges: `scaled` reproduces drop/sum/mean exactly at alpha 0/1/1/n; the alpha search
recovers a planted alpha; the stage glue's losses equal the full HF model's hidden states."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from slm_dist.arch import get_arch
from slm_dist.checkpoint.index import open_index
from slm_dist.checkpoint.reader import LazyReader
from slm_dist.core.alpha_fit import AlphaSearchError, alpha_grid, search_alpha, squared_error
from slm_dist.core.merge import merge_state_dict, merge_tensor, merge_window
from slm_dist.testing import make_tiny_model
from slm_dist.workers.stage_worker import StageSpec, StageWorker

LLAMA = get_arch("llama")


def state_dict(model_dir) -> dict[str, torch.Tensor]:
    index = open_index(model_dir)
    reader = LazyReader(index)
    return {key: reader.get(key) for key in index.tensors}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("windows", [[(1, 2)], [(1, 3)], [(0, 1), (2, 5)]])
def test_scaled_at_0_1_inv_n_is_drop_sum_mean_tensor_for_tensor(tmp_path, dtype, windows):
    sd = state_dict(make_tiny_model(tmp_path / "m", dtype=dtype))
    n = 6
    for rule, alpha_of in (("drop", lambda w: 0.0), ("sum", lambda w: 1.0),
                           ("mean", lambda w: 1.0 / (w[1] - w[0] + 1))):
        expected = merge_state_dict(sd, windows, n, LLAMA, rule)
        got = merge_state_dict(sd, windows, n, LLAMA, "scaled", {w: alpha_of(w) for w in windows})
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == dtype
            assert torch.equal(got[key], expected[key]), (rule, key)
    # ... and the three really differ, so the equalities above are not vacuous.
    key = "model.layers.1.mlp.up_proj.weight"
    drop, total = (merge_state_dict(sd, windows, n, LLAMA, r)[key] for r in ("drop", "sum"))
    assert not torch.equal(drop, total)


def planted_problem(alpha_star: float, members: int = 3):
    """A linear residual 'layer' x + x W(alpha)^T with W(alpha) the scaled merge of random members."""
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(8, 8, generator=g) for _ in range(members)]
    x = torch.randn(4, 10, 8, generator=g)

    def layer(alpha: float) -> torch.Tensor:
        return x + x @ merge_tensor(weights, "projection", "scaled", alpha).T

    target = layer(alpha_star)
    return (lambda a: squared_error(layer(a), target)), members


@pytest.mark.parametrize("alpha_star", [0.0, 0.37, 0.81, 1.0])
def test_search_recovers_a_planted_alpha(alpha_star):
    loss, members = planted_problem(alpha_star)
    alpha, value, tried = search_alpha(loss, alpha_grid(members), refine_steps=20)
    # The bracket [grid neighbours] shrinks by 0.618 per step: 0.27 * 0.618^19 ~ 3e-5.
    assert alpha == pytest.approx(alpha_star, abs=1e-3)
    assert value == pytest.approx(0.0, abs=1e-3 * loss(0.0) + 1e-9)
    assert {0.0, 1.0 / members, 1.0} <= {a for a, _ in tried}  # drop, mean and sum always tried
    assert value == min(v for _, v in tried)


def test_search_result_is_never_worse_than_the_grid():
    # A loss with two minima: golden section may miss the global one, the answer never loses to the grid.
    loss = lambda a: min((a - 0.1) ** 2, (a - 0.9) ** 2 + 0.001)  # noqa: E731
    alpha, value, tried = search_alpha(loss, alpha_grid(4), refine_steps=3)
    assert value <= min(loss(a) for a in alpha_grid(4))
    assert alpha == pytest.approx(0.1, abs=0.02)


def test_alpha_grid_and_errors():
    assert alpha_grid(2, 3) == [0.0, 0.5, 1.0]
    assert alpha_grid(3, 3) == pytest.approx([0.0, 1 / 3, 0.5, 1.0])
    with pytest.raises(AlphaSearchError, match="at least 2 layers"):
        alpha_grid(1)
    with pytest.raises(AlphaSearchError, match="NaN at alpha=0.0"):
        search_alpha(lambda a: float("nan"), [0.0, 1.0])
    with pytest.raises(AlphaSearchError, match="shapes differ"):
        squared_error(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_squared_error_skips_position_zero():
    out = torch.zeros(1, 3, 2)
    target = torch.tensor([[[100.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    assert squared_error(out, target) == 5.0
    assert squared_error(out, target, skip_first=False) == 10005.0


# ------------------------------------------------------------------------------- stage glue
def layer_suffixes(sd, layer):
    prefix = f"model.layers.{layer}."
    return [k[len(prefix):] for k in sd if k.startswith(prefix)]


def hf_hidden(model, ids):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return outs  # output of each decoder layer


def test_stage_fit_matches_the_full_model(tiny_model):
    """Window [2..4] straddles two stages; the glue's relative losses equal those from HF's own forward."""
    window = (2, 4)
    stages = [StageWorker(StageSpec(str(tiny_model), 0, 3, 6)), StageWorker(StageSpec(str(tiny_model), 3, 6, 6))]
    batches = [torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for batch_id, ids in enumerate(batches):
        x = ids
        for stage in stages:
            x, _ = stage.calibrate(batch_id, x, cache_inputs=True)
    fit = stages[0].fit_alpha(window, [0, 1], grid_points=3, refine_steps=4)

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    sd = state_dict(tiny_model)
    per_layer = [{s: sd[f"model.layers.{i}.{s}"] for s in layer_suffixes(sd, 2)} for i in range(2, 5)]
    original = [hf_hidden(model, ids) for ids in batches]
    base = sum(squared_error(o[4], o[1]) for o in original)

    def hf_loss(alpha: float) -> float:
        merged = merge_window(per_layer, "scaled", LLAMA.role, alpha)
        layer = model.model.layers[2]
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict(merged)
        try:
            # Layers 0..1 are untouched, so layer 2's output is merged_layer(h_1).
            return sum(squared_error(hf_hidden(model, ids)[2], o[4]) for ids, o in zip(batches, original)) / base
        finally:
            layer.load_state_dict(saved)

    tried = dict(fit.tried)
    assert set(tried) >= {0.0, 1 / 3, 0.5, 1.0}
    for alpha in (0.0, 1 / 3, 1.0, fit.alpha):
        assert tried[alpha] == pytest.approx(hf_loss(alpha), rel=1e-4), alpha
    # alpha = 0 is drop: the merged layer is layer 2 itself, its output h_2.
    assert tried[0.0] == pytest.approx(sum(squared_error(o[2], o[4]) for o in original) / base, rel=1e-4)
    assert fit.loss == min(tried.values())
    assert fit.window == window


def test_stage_fit_needs_the_window_on_the_stage_and_cached_inputs(tiny_model):
    stage = StageWorker(StageSpec(str(tiny_model), 3, 6, 6))
    with pytest.raises(AlphaSearchError, match="lo must be on this stage"):
        stage.fit_alpha((1, 4), [0])
    with pytest.raises(RuntimeError, match="no cached input for batch 0"):
        stage.fit_alpha((3, 4), [0])


def test_scaled_run_writes_the_fitted_alphas_and_merges_with_them(tiny_model, tiny_text_file, tmp_path):
    import json

    from slm_dist import pipeline
    from slm_dist.config import load_config
    from slm_dist.core.planner import MergePlan
    from tests.test_pipeline import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "plan.search=global", "merge.rule=scaled", "eval.enabled=false"))
    pipeline.run(config, show_progress=False)
    raw = json.loads((tmp_path / "plan.json").read_text())
    plan = MergePlan.from_json(raw)
    assert plan.rule == "scaled" and len(plan.alphas) == len(plan.windows) >= 1
    assert MergePlan.from_json(plan.to_json()) == plan  # alphas survive the round trip
    for window, alpha, fit in zip(plan.windows, plan.alphas, raw["details"]["alphas"]):
        tried = dict(fit["tried"])
        n = window[1] - window[0] + 1
        assert fit["window"] == list(window) and fit["alpha"] == alpha
        assert fit["loss"] <= min(tried[0.0], tried[1.0 / n], tried[1.0])  # never worse than drop/mean/sum
    # The checkpoint holds exactly the scaled merge with those alphas.
    expected = merge_state_dict(state_dict(tiny_model), plan.windows, 6, LLAMA, "scaled", plan.alpha_map)
    got = state_dict(tmp_path / "model")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_plan_rejects_missing_or_stray_alphas():
    from slm_dist.core.planner import MergePlan, PlanError

    with pytest.raises(PlanError, match="needs one alpha per window"):
        MergePlan(6, ((1, 2),), "scaled", "cka", None)
    with pytest.raises(PlanError, match="only used by rule 'scaled'"):
        MergePlan(6, ((1, 2),), "sum", "cka", None, alphas=(0.5,))
    with pytest.raises(PlanError, match="finite"):
        MergePlan(6, ((1, 2),), "scaled", "cka", None, alphas=(float("inf"),))
