"""Issue 19's baselines against independent computations on the tiny model: SLEB's first choice is the
best of every single-layer removal scored by a full transformers forward; ReplaceMe's least-squares map
is a direct lstsq on the raw rows taken with hooks from the transformers model; its cosine map is the
cosine fit on those rows; and compare plans, merges and evaluates both on the stages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slm_dist import compare, evaluation, merging, pipeline
from slm_dist.backends.local import LocalBackend
from slm_dist.checkpoint.corrections import load_corrections
from slm_dist.checkpoint.export import add_evaluation_to_card
from slm_dist.config import load_config
from slm_dist.core import baselines
from slm_dist.core.correction_fit import CorrectionError, correction_key
from slm_dist.core.planner import PlanError
from slm_dist.core.replaceme import NormalEquations, cosine_loss, cosine_map, least_squares_map
from slm_dist.run_state import load_plan
from slm_dist.workers.merge_worker import run_jobs_in_threads
from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec
from tests.test_linear_correction import cached_stages


# ----------------------------------------------------------------------------------- pure
def test_sleb_is_greedy_over_every_remaining_layer():
    # A loss with an interaction: removing 4 is cheap alone, but 4 with 3 is expensive.
    cost = {1: 0.5, 2: 0.3, 3: 0.1, 4: 0.05, 5: 0.4}

    def loss(windows):
        gone = {i for lo, hi in windows for i in range(lo + 1, hi + 1)}
        return sum(cost[i] for i in gone) + (10.0 if {3, 4} <= gone else 0.0)

    plan = baselines.sleb(6, 3, loss, protect_first=1)
    assert plan.details["order"] == [4, 2, 5]  # 3 would pair with 4; after 4 and 2, 5 beats 1
    assert plan.removed == (2, 4, 5) and plan.rule == "drop" and plan.windows == ((1, 2), (3, 5))
    # Brute force of the first step: the argmin over every single removal.
    assert plan.details["order"][0] == min(range(1, 6), key=lambda i: loss(baselines.removal_windows(6, [i])))
    with pytest.raises(PlanError, match="sleb: cannot remove 6"):
        baselines.sleb(6, 6, loss, protect_first=1)


def test_replaceme_least_squares_is_lstsq_on_the_rows():
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(300, 7, generator=g, dtype=torch.float64), torch.randn(300, 7, generator=g, dtype=torch.float64)
    eq = NormalEquations.from_rows(m[:100], r[:100]) + NormalEquations.from_rows(m[100:], r[100:])
    assert torch.allclose(least_squares_map(eq), torch.linalg.lstsq(m, r).solution, atol=1e-10)


def test_replaceme_cosine_lowers_the_cosine_loss_from_the_identity():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2048, 8, generator=g)
    planted = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g)
    r = 5.0 * m @ planted  # scale-free: the 5x does not matter to the cosine
    t = cosine_map(m, r, epochs=60, lr=1e-2)
    assert float(cosine_loss(m @ t, r)) < 0.2 * float(cosine_loss(m, r))
    assert torch.equal(t, cosine_map(m, r, epochs=60, lr=1e-2))  # seeded: the same map
    with pytest.raises(CorrectionError, match="one shape"):
        cosine_map(m, r[:, :4])


# ------------------------------------------------------------------------- on the tiny model
def hf_rows(tiny_model, batches, window):
    """M (layer lo's MLP output) and R = L_hi - (L_lo - M), every token, straight from transformers."""
    lo, hi = window
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    ms, rs = [], []
    for ids in batches:
        got = {}
        hooks = [model.model.layers[lo].mlp.register_forward_hook(lambda mod, i, o: got.__setitem__("m", o)),
                 model.model.layers[lo].register_forward_hook(
                     lambda mod, i, o: got.__setitem__("lo", o[0] if isinstance(o, tuple) else o)),
                 model.model.layers[hi].register_forward_hook(
                     lambda mod, i, o: got.__setitem__("hi", o[0] if isinstance(o, tuple) else o))]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        ms.append(got["m"].reshape(-1, 32))
        rs.append((got["hi"] - got["lo"] + got["m"]).reshape(-1, 32))
    return torch.cat(ms).double(), torch.cat(rs).double()


@pytest.mark.parametrize("window", [(1, 2), (2, 4)])  # (2, 4) spans both stages
def test_replaceme_lstsq_map_equals_a_direct_lstsq_on_raw_rows(tiny_model, window):
    stages, batches = cached_stages(tiny_model)
    fit = stages[0].fit_correction(window, "drop", None, [0, 1, 2, 3], "replaceme_lstsq")
    m, r = hf_rows(tiny_model, batches, window)
    direct = torch.linalg.lstsq(m, r).solution
    assert torch.allclose(fit.matrix.double(), direct, atol=2e-3, rtol=1e-3)
    assert fit.kind == "replaceme_lstsq" and fit.corrects and 0.0 < fit.loss < 1.0
    assert fit.loss == pytest.approx(float(((m @ direct - r) ** 2).sum() / ((m - r) ** 2).sum()), rel=1e-3)


def test_replaceme_cosine_map_is_the_cosine_fit_on_the_raw_rows(tiny_model):
    window = (1, 3)
    stages, batches = cached_stages(tiny_model)
    fit = stages[0].fit_correction(window, "drop", None, [0, 1, 2, 3], "replaceme_cosine")
    m, r = hf_rows(tiny_model, batches, window)
    assert torch.allclose(fit.matrix, cosine_map(m.float(), r.float()), atol=1e-4)
    assert float(cosine_loss(m.float() @ fit.matrix, r.float())) < float(cosine_loss(m.float(), r.float()))
    with pytest.raises(ValueError, match="rule drop"):
        stages[0].fit_correction(window, "scaled", 0.5, [0, 1], "replaceme_cosine")


def hf_nll_without(tiny_model, removed, batches) -> float:
    """Mean next-token NLL of the transformers model with ``removed`` layers taken out of its list."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i not in removed])
    total = count = 0.0
    with torch.no_grad():
        for ids in batches:
            logp = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].double(), -1)
            total -= float(logp.gather(-1, ids[:, 1:, None]).sum())
            count += ids[:, 1:].numel()
    return total / count


def test_sleb_first_choice_equals_trying_every_single_layer_removal(tiny_model):
    backend = LocalBackend()
    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    batches = [(b, torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(b))) for b in range(3)]
    backend.calibrate(specs, StatsSpec(unit="sample"), batches, keep_for_output_criterion=True)
    scored = {}

    def loss(windows):
        scored[windows] = backend.score_plan(windows, "drop", None, "nll")
        return scored[windows]

    plan = baselines.sleb(6, 2, loss, protect_first=1)
    brute = {i: hf_nll_without(tiny_model, {i}, [ids for _, ids in batches]) for i in range(1, 6)}
    assert plan.details["order"][0] == min(brute, key=brute.get)
    for i, v in brute.items():
        assert scored[baselines.removal_windows(6, [i])] == pytest.approx(v, rel=1e-4)
    # The second step tried every remaining layer on top of the first.
    first = plan.details["order"][0]
    assert set(scored) >= {baselines.removal_windows(6, [first, j]) for j in range(1, 6) if j != first}
    assert plan.details["steps"][1]["loss"] == pytest.approx(
        hf_nll_without(tiny_model, set(plan.details["order"]), [ids for _, ids in batches]), rel=1e-4)
    backend.close()


def test_a_plan_scored_on_its_first_batches_equals_the_model_on_those_batches_only(tiny_model):
    """plan.score_batches: SLEB's trials on fewer batches are the NLL of those batches (the Ray backend
    against this one: test_distributed)."""
    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    batches = [(b, torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(b))) for b in range(3)]
    windows = baselines.removal_windows(6, [2, 4])
    direct = hf_nll_without(tiny_model, {2, 4}, [ids for _, ids in batches[:2]])
    everything = hf_nll_without(tiny_model, {2, 4}, [ids for _, ids in batches])
    assert direct != pytest.approx(everything, rel=1e-4)  # the batch limit is visible in the loss
    local = LocalBackend()
    local.calibrate(specs, StatsSpec(unit="sample"), batches, keep_for_output_criterion=True)
    assert local.score_plan(windows, "drop", None, "nll", num_batches=2) == pytest.approx(direct, rel=1e-4)
    assert local.score_plan(windows, "drop", None, "nll") == pytest.approx(everything, rel=1e-4)
    local.close()


def assert_same_corrections(ours, theirs) -> None:
    """Two plans carry the same fitted maps (or neither carries any)."""
    assert (ours.corrections is None) == (theirs.corrections is None)
    if ours.corrections is not None:
        mine, other = load_corrections(ours, 32), load_corrections(theirs, 32)
        assert mine.keys() == other.keys()
        for w in mine:
            torch.testing.assert_close(mine[w], other[w])


def test_compare_plans_and_evaluates_sleb_and_replaceme(tmp_path, tiny_model, tiny_text_file):
    config = load_config(None, [f"model.path={tiny_model}", f"calibration.source={tiny_text_file}",
                                f"run.dir={tmp_path / 'run'}", "calibration.num_samples=8", "calibration.seq_len=32",
                                "calibration.batch_size=4", "similarity.unit=sample", "plan.target_layers_removed=2",
                                "merge.max_shard_bytes=40000", "cluster.num_stages=2", "eval.seq_len=32",
                                "eval.max_windows=4"])
    spec = evaluation.EvalSpec.from_config(config.eval, [tiny_text_file], {})
    methods = ("angular", "sleb", "replaceme_lstsq", "replaceme_cosine", "linearpatch_sleb", "linearpatch_angular",
               "angular_refit", "sleb_refit", "angular_pool", "sleb_pool")
    result = compare.compare(config, [2], spec, methods=methods, show_progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
    for method in methods:
        assert rows[method]["layers_removed"] == 2 and rows[method]["layers_after"] == 4, method
    # ReplaceMe removes the angular block and folds a map: another model than the plain block removal.
    for method in ("replaceme_lstsq", "replaceme_cosine"):
        assert rows[method]["windows"] == rows["angular"]["windows"]
        assert rows[method]["key"]["correction_kind"] == method
        assert "same_model_as" not in rows[method]
    assert rows["replaceme_lstsq"]["eval"]["ppl"] != rows["angular"]["eval"]["ppl"]
    assert "+ replaceme_lstsq" in compare.format_table(result)
    # LinearPatch: the plain removal's checkpoint, patched in memory: another model than the removal.
    for method, base in (("linearpatch_sleb", "sleb"), ("linearpatch_angular", "angular")):
        assert rows[method]["windows"] == rows[base]["windows"] and rows[method]["key"]["patch"]
        assert rows[method]["eval"]["ppl"] != rows[base]["eval"]["ppl"], method
    assert "+ LinearPatch (in memory)" in compare.format_table(result)
    # slm-dist's refit (pool) on the angular block and on SLEB's layers: their windows, each with its own
    # corrections file (or the plain removal where the fit kept it).
    for kind in ("refit", "pool"):
        for base in ("angular", "sleb"):
            fitted = rows[f"{base}_{kind}"]
            assert fitted["windows"] == rows[base]["windows"]
            assert fitted["key"].get("correction_kind") == kind or "same_model_as" in fitted
    # A rerun reuses every plan (the ReplaceMe maps included) and every measured row.
    again = compare.compare(config, [2], spec, methods=methods, show_progress=False)
    assert [r["eval"] for r in again["rows"]] == [r["eval"] for r in result["rows"]]
    # The product's plan.search=sleb with merge.correction=refit (pool) is compare's sleb_refit (sleb_pool):
    # the same layers and the same fitted maps (SLEB's trials may remove the top layer there: protect_last=0).
    for kind in ("refit", "pool"):
        product = config.model_copy(update={
            "plan": config.plan.model_copy(update={"search": "sleb", "protect_last": 0}),
            "merge": config.merge.model_copy(update={"rule": "drop", "correction": kind}),
            "run": config.run.model_copy(update={"dir": tmp_path / f"product-{kind}"})})
        planned = pipeline.run(product, show_progress=False, stop_after="plan")["plan"]
        assert [list(w) for w in planned["windows"]] == [list(w) for w in rows["sleb"]["windows"]]
        ours = load_plan(tmp_path / f"product-{kind}")
        folder = tmp_path / "run" / "compare" / f"sleb_{kind}-2"
        theirs = compare.plan_from_json(json.loads((folder / "plan.json").read_text()))
        assert load_plan(folder) == theirs and theirs.criterion == f"sleb_{kind}"
        assert_same_corrections(ours, theirs)
        # `slm-dist merge` builds the compared method's checkpoint from its folder: the product's tensors.
        built = {}
        for run_dir in (tmp_path / f"product-{kind}", folder):
            merge_config = product.model_copy(update={"run": product.run.model_copy(update={"dir": run_dir})})
            merging.merge_from_plan(merge_config, tiny_model, run_jobs_in_threads, show_progress=False)
            built[run_dir] = AutoModelForCausalLM.from_pretrained(merge_config.output_dir, trust_remote_code=False)
        # The card (rewritten with measured perplexity, as `slm-dist run`'s eval does) names the method.
        add_evaluation_to_card(merge_config.output_dir, {"before": 10.0, "after": 12.5})
        card = (merge_config.output_dir / "README.md").read_text()
        assert f"- layers chosen by: `sleb_{kind}`" in card and "similarity criterion" not in card
        assert "12.500" in card
        first, second = (m.state_dict() for m in built.values())
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ------------------------------------------------------------------------------ LinearPatch
def test_rotation_is_orthogonal_and_hadamard_on_powers_of_two():
    from slm_dist.core.linear_patch import rotation, sylvester

    for d in (8, 12, 576):
        r = rotation(d)
        assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-10), d
    h = sylvester(8)
    assert set(h.unique().tolist()) == {-1.0, 1.0} and torch.equal(rotation(8), h / 8 ** 0.5)


def test_linear_patch_matches_magnitudes_of_the_rotated_channels(tiny_model):
    """The stage's patch equals H diag(d) H^T with d the ratio of mean |h H| of layer hi's and layer lo's
    outputs, taken from transformers; applied to h_lo it matches the rotated magnitudes of h_hi."""
    from slm_dist.core.linear_patch import rotation

    window = (2, 4)
    stages, batches = cached_stages(tiny_model)
    patch = stages[0].fit_patch(window, [0, 1, 2, 3])
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    los, his = [], []
    with torch.no_grad():
        for ids in batches:
            hidden = model(ids, output_hidden_states=True).hidden_states  # [i] = input of layer i
            los.append(hidden[3].reshape(-1, 32))
            his.append(hidden[5].reshape(-1, 32))
    lo, hi, h = torch.cat(los).double(), torch.cat(his).double(), rotation(32)
    scale = (hi @ h).abs().mean(0) / (lo @ h).abs().mean(0)
    assert torch.allclose(patch.double(), h @ torch.diag(scale) @ h.T, atol=1e-4)
    assert torch.allclose(((lo @ patch.double()) @ h).abs().mean(0), (hi @ h).abs().mean(0), rtol=1e-3)


def test_a_patched_stage_applies_the_patch_after_its_layer(tiny_model, tmp_path):
    from slm_dist.checkpoint.corrections import load_patches, save_patches

    patch = torch.eye(32) * 0.5 + 0.01 * torch.randn(32, 32, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "patches.safetensors"
    save_patches(path, {1: patch})
    assert torch.equal(load_patches(path, 32)[1], patch)
    with pytest.raises(PlanError, match="layer.<index>"):
        load_patches(path, 16)
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = StageWorker(StageSpec(str(tiny_model), 0, 3, 6))
    patched = StageWorker(StageSpec(str(tiny_model), 0, 3, 6, patch_file=str(path)))
    with torch.inference_mode():
        h = plain._inputs(ids)
        ctx = plain.context(h)
        for i, layer in zip(plain.layer_ids, plain.layers):
            h = plain.run_layer(layer, i, h, ctx)
            if i == 1:
                h = h @ patch
        assert torch.allclose(patched.forward(ids), h, atol=1e-5)


# ------------------------------------------------------------------------------------ LAMBADA
def test_lambada_counts_texts_whose_last_word_is_the_greedy_continuation(tiny_model, tmp_path):
    """Through the stages (greedy gaps) against transformers' argmax: one text built to be a hit, others
    random; the per-text verdicts agree and the built one counts."""
    import json

    from slm_dist.evaluation import EvalSpec, backend_scorer, evaluate, prepare_inputs
    from slm_dist.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()
    words = "the city of the north river was".split()
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    texts = [" ".join(words) + " " + tok.decode([greedy]).strip(), "the king of the south", "a team and the music of war"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    inputs = prepare_inputs(EvalSpec(lambada=path), tok)
    assert len(inputs.lambada) == 3

    def hf_hit(request) -> bool:
        t = torch.tensor([request.tokens])
        with torch.no_grad():
            top = model(t).logits[0, :-1].argmax(-1)
        c = request.num_continuation
        return bool((top[-c:] == t[0, -c:]).all())

    expected = [hf_hit(r) for r in inputs.lambada]
    assert expected[0]
    backend = LocalBackend()
    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    result = evaluate(inputs, backend_scorer(backend, specs))
    acc = sum(expected) / 3
    assert result["lambada"] == {"acc": acc, "acc_stderr": pytest.approx(math.sqrt(acc * (1 - acc) / 2)), "n": 3}
    backend.close()


def test_a_pool_cap_re_plans_the_pool_methods_only():
    """compare stores each method's own settings beside its plan: merge.pool_cap is one of the pool
    methods' (a cached sleb_pool plan fitted without the cap is not reused with it), and no other's."""
    plain, capped = load_config(None, []), load_config(None, ["merge.pool_cap=3"])
    for method in ("sleb_pool", "angular_pool"):
        assert "pool_cap" not in compare.method_settings(method, plain)
        assert compare.method_settings(method, capped) == {**compare.method_settings(method, plain), "pool_cap": 3}
    for method in ("sleb_refit", "sleb", "slm_global_refit", "replaceme_lstsq"):
        assert compare.method_settings(method, capped) == compare.method_settings(method, plain)


# ----------------------------------------------------------------------------- plan.rerank
def test_sleb_records_its_last_step_and_its_finalists_are_the_best_of_it():
    cost = {1: 0.5, 2: 0.3, 3: 0.1, 4: 0.05, 5: 0.4}

    def loss(windows):
        return sum(cost[i] for lo, hi in windows for i in range(lo + 1, hi + 1))

    plan = baselines.sleb(6, 2, loss, protect_first=1)
    assert plan.details["order"] == [4, 3]
    assert [i for i, _ in plan.details["last_step"]] == [3, 2, 5, 1]
    assert [v for _, v in plan.details["last_step"]] == pytest.approx([0.15, 0.35, 0.45, 0.55])
    finalists = baselines.sleb_finalists(6, plan.details, 3)
    assert finalists == [((2, 4),), ((1, 2), (3, 4)), ((3, 5),)]
    assert finalists[0] == plan.windows  # the first finalist is SLEB's own plan
    assert len(baselines.sleb_finalists(6, plan.details, 10)) == 4
    with pytest.raises(PlanError, match="m must be >= 1"):
        baselines.sleb_finalists(6, plan.details, 0)


def test_a_plan_scored_after_skipped_batches_equals_the_model_on_those_batches(tiny_model):
    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    batches = [(b, torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(b))) for b in range(3)]
    windows = baselines.removal_windows(6, [2, 4])
    local = LocalBackend()
    local.calibrate(specs, StatsSpec(unit="sample"), batches, keep_for_output_criterion=True)
    last = hf_nll_without(tiny_model, {2, 4}, [ids for _, ids in batches[1:]])
    middle = hf_nll_without(tiny_model, {2, 4}, [ids for _, ids in batches[1:2]])
    assert local.score_plan(windows, "drop", None, "nll", skip_batches=1) == pytest.approx(last, rel=1e-4)
    assert local.score_plan(windows, "drop", None, "nll", num_batches=1, skip_batches=1) == pytest.approx(middle, rel=1e-4)
    with pytest.raises(ValueError, match="no calibration batch left to score after skipping 3"):
        local.score_plan(windows, "drop", None, "nll", skip_batches=3)
    local.close()


def rerank_overrides(tiny_model, tiny_text_file, run_dir, *extra):
    from tests.test_pipeline import tiny_overrides

    # 4 calibration batches of 4: the fits take the first 2, the finalists are ranked on the last 2.
    return tiny_overrides(tiny_model, tiny_text_file, run_dir, "plan.target_layers_removed=2", "plan.search=sleb",
                          "merge.rule=drop", "merge.correction_batches=2", "plan.rerank=3", "eval.enabled=false",
                          *extra)


def test_rerank_ranks_slebs_finalists_by_the_corrected_models_nll_on_batches_no_fit_saw(
        tiny_model, tiny_text_file, tmp_path):
    """Brute force: each finalist's correction fitted directly on the first two calibration batches, folded
    into its checkpoint (merge_state_dict), and that transformers model's NLL on the last two batches;
    the plan is the finalist with the lowest, and its corrections file holds those maps."""
    from slm_dist import context
    from slm_dist.core.merge import merge_state_dict
    from tests.test_calibrated_merge import state_dict
    from tests.test_linear_correction import LLAMA

    config = load_config(None, rerank_overrides(tiny_model, tiny_text_file, tmp_path, "merge.correction=refit",
                                                "cluster.backend=local"))
    pipeline.run(config, show_progress=False, stop_after="plan")
    raw = json.loads((tmp_path / "plan.json").read_text())
    sleb = raw["details"]["sleb"]
    finalists = baselines.sleb_finalists(6, sleb, 3)
    assert [[tuple(w) for w in f["windows"]] for f in sleb["rerank"]] == [list(f) for f in finalists]

    ids = pipeline.calibration_ids(context.resolve_inputs(config, None, False))
    batches = [b for _, b in context.batches(ids, 4)]
    assert len(batches) == 4
    stages = [StageWorker(StageSpec(str(tiny_model), a, b, 6)) for a, b in ((0, 3), (3, 6))]
    for batch_id, x in enumerate(batches):
        for stage in stages:
            x, _ = stage.calibrate(batch_id, x, cache_inputs=True)
    sd = state_dict(tiny_model)
    direct, maps = [], []
    for plan in finalists:
        fits = {w: next(s for s in stages if s.spec.start <= w[0] < s.spec.stop).fit_correction(
            w, "drop", None, [0, 1], "refit") for w in plan}
        matrices = {w: f.matrix for w, f in fits.items() if f.matrix is not None}
        weights = merge_state_dict(sd, plan, 6, LLAMA, "drop", None, corrections=matrices, correction_kind="refit")
        hf_config = AutoConfig.from_pretrained(tiny_model)
        hf_config.num_hidden_layers = 4
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
        model.load_state_dict(weights)
        total = count = 0.0
        with torch.no_grad():
            for batch in batches[2:]:
                logp = torch.log_softmax(model.eval()(batch, use_cache=False).logits[:, :-1].double(), -1)
                total -= float(logp.gather(-1, batch[:, 1:, None]).sum())
                count += batch[:, 1:].numel()
        direct.append(total / count)
        maps.append(matrices)
    assert [f["held_out_nll"] for f in sleb["rerank"]] == pytest.approx(direct, rel=1e-4)
    best = min(range(3), key=lambda i: (direct[i], i))
    assert [f["chosen"] for f in sleb["rerank"]] == [i == best for i in range(3)]
    assert [tuple(w) for w in raw["windows"]] == list(finalists[best])
    written = load_plan(tmp_path)
    stored = load_corrections(written, 32) if written.corrections else {}
    assert stored.keys() == maps[best].keys()
    for w in stored:
        torch.testing.assert_close(stored[w], maps[best][w])


def test_compare_reranks_its_sleb_pool_as_the_product_does(tiny_model, tiny_text_file, tmp_path):
    config = load_config(None, rerank_overrides(tiny_model, tiny_text_file, tmp_path / "run", "plan.protect_last=0",
                                                "merge.correction=none", "plan.search=sliding"))
    spec = evaluation.EvalSpec.from_config(config.eval, [tiny_text_file], {})
    result = compare.compare(config, [2], spec, methods=("sleb", "sleb_pool"), show_progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    folder = tmp_path / "run" / "compare" / "sleb_pool-2"
    details = json.loads((folder / "plan.json").read_text())["details"]
    assert [f["chosen"] for f in details["rerank"]].count(True) == 1
    chosen = next(f["windows"] for f in details["rerank"] if f["chosen"])
    assert rows["sleb_pool"]["windows"] == chosen
    assert compare.method_settings("sleb_pool", config)["rerank"] == 3
    product = config.model_copy(update={
        "plan": config.plan.model_copy(update={"search": "sleb"}),
        "merge": config.merge.model_copy(update={"correction": "pool"}),
        "run": config.run.model_copy(update={"dir": tmp_path / "product"})})
    planned = pipeline.run(product, show_progress=False, stop_after="plan")
    assert planned["plan"]["windows"] == chosen
    assert_same_corrections(load_plan(tmp_path / "product"), load_plan(folder))


def test_rerank_refuses_what_it_cannot_rank(tiny_model, tiny_text_file, tmp_path):
    from slm_dist.config import ConfigError
    from slm_dist.preflight import PreflightError

    with pytest.raises(ConfigError, match="raise calibration.num_samples to at least 20"):
        load_config(None, rerank_overrides(tiny_model, tiny_text_file, tmp_path, "merge.correction=refit",
                                           "merge.correction_batches=4"))
    for extra, fix in ((("merge.correction=refit", "plan.search=global"), "set plan.search=sleb"),
                       (("merge.correction=none",), "set merge.correction")):
        config = load_config(None, rerank_overrides(tiny_model, tiny_text_file, tmp_path, *extra))
        with pytest.raises(PreflightError, match=fix):
            pipeline.run(config, show_progress=False, stop_after="plan")
        assert not (tmp_path / "calibration.parquet").exists()


def test_rerank_fits_and_scores_the_finalists_with_the_configured_rule(tiny_model, tiny_text_file, tmp_path,
                                                                     monkeypatch):
    """merge.rule=scaled: each finalist scored as it would be written (its alphas fitted, its corrections
    fitted on the scaled merge), and the chosen plan written with those maps, none fitted twice."""
    fitted = []
    fit = LocalBackend.fit_corrections

    def recording(self, requests, num_batches):
        fitted.extend(requests)
        return fit(self, requests, num_batches)

    monkeypatch.setattr(LocalBackend, "fit_corrections", recording)
    config = load_config(None, rerank_overrides(tiny_model, tiny_text_file, tmp_path, "merge.rule=scaled",
                                                "merge.correction=refit", "cluster.backend=local"))
    pipeline.run(config, show_progress=False, stop_after="plan")
    keys = [correction_key(*r) for r in fitted]
    assert keys and len(keys) == len(set(keys))
    assert all(rule == "scaled" or (rule, alpha) == ("drop", None) for _, rule, alpha, _ in keys)
    raw = json.loads((tmp_path / "plan.json").read_text())
    ranked = raw["details"]["sleb"]["rerank"]
    assert len(ranked) == 3 and all(math.isfinite(f["held_out_nll"]) for f in ranked)
    assert next(f["windows"] for f in ranked if f["chosen"]) == raw["windows"]
    assert raw["rule"] == "scaled" and len(raw["alphas"]) == len(raw["windows"])
