"""Baselines (pure plans from statistics) and `slm-dist compare` end to end on the tiny model.

References: hand-built statistics for the planners; for the end-to-end run, the Hugging Face model
itself (with layers deleted by hand for the "drop last n" baseline) on the same perplexity windows,
to 1e-5 relative (float32 through the same modules).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from slm_dist import calibration, compare, evaluation
from slm_dist.config import load_config
from slm_dist.core import baselines, planner
from slm_dist.core.planner import PlanError
from slm_dist.testing import tiny_tokenizer

# The methods issue 6 compares (compare.METHODS may hold more, tested where they are built).
ISSUE_METHODS = ("shortgpt", "angular", "laco", "last_layers", *(f"slm_cka_{r}" for r in compare.SLM_RULES),
                 "slm_output")


# ------------------------------------------------------------------------------ pure plans
def test_removal_windows_drop_exactly_the_asked_layers():
    assert baselines.removal_windows(10, [3, 4, 7, 9]) == ((2, 4), (6, 7), (8, 9))
    plan = baselines.removal_plan("x", 10, [9, 3, 7, 4])
    assert plan.new_to_old == [0, 1, 2, 5, 6, 8] and plan.removed == (3, 4, 7, 9) and plan.rule == "drop"
    assert plan.num_layers_after == 6 and plan.criterion == "x" and plan.to_json()["criterion"] == "x"
    with pytest.raises(PlanError, match="removing layer 0"):
        baselines.removal_windows(10, [0, 1])


def test_shortgpt_removes_the_lowest_block_influence():
    bi = [0.01, 0.9, 0.1, 0.5, 0.05, 0.3, 0.2, 0.6]
    plan = baselines.shortgpt(bi, 3, protect_first=1)  # layer 0 has the lowest BI but is protected
    assert plan.removed == (2, 4, 6) and plan.windows == ((1, 2), (3, 4), (5, 6))
    assert baselines.shortgpt([0.5, 0.1, 0.1, 0.9], 1, protect_first=1).removed == (1,)  # ties: lower index
    with pytest.raises(PlanError, match="removing layer 0"):
        baselines.shortgpt(bi, 1)  # unprotected, it picks layer 0, which no plan can remove


def test_angular_distance_matrix_by_hand_and_block_choice():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    states = torch.stack([e1, e2, 3 * e1, -e1])[None]  # [1 sample, 4 boundaries, 2]
    d = baselines.angular_distance_matrix(states)
    assert d[0, 1].item() == pytest.approx(0.5) and d[0, 2].item() == pytest.approx(0.0, abs=1e-7)
    assert d[0, 3].item() == pytest.approx(1.0) and torch.allclose(d, d.T)

    # 6 layers; boundaries 2..5 (inputs of layers 2..4 and output of layer 4) nearly equal.
    rng = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=rng)
    states = torch.randn(8, 7, 16, generator=rng)
    for b in (2, 3, 4, 5):
        states[:, b] = base + 0.01 * b * torch.randn(8, 16, generator=rng)
    plan = baselines.angular_block(baselines.angular_distance_matrix(states), 3, protect_first=1)
    assert plan.removed == (2, 3, 4) and plan.details["block_start"] == 2
    assert baselines.angular_block(baselines.angular_distance_matrix(states), 2, protect_first=1).removed in ((2, 3),
                                                                                                          (3, 4))


def test_boundary_states_equal_hf_hidden_states(tiny_model):
    """The angular baseline's layer-by-layer pass against HF output_hidden_states (last token).

    HF's last entry is after the final norm; the last layer's raw output comes from a hook."""
    from transformers import AutoModelForCausalLM

    from slm_dist.workers.stage_worker import StageSpec

    ids = torch.randint(3, 60, (5, 12), generator=torch.Generator().manual_seed(0))
    states = compare.boundary_last_token_states(StageSpec(str(tiny_model), 0, 6, 6), ids, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    last = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: last.__setitem__("h", o[0] if isinstance(o, tuple)
                                                                                else o))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    reference = torch.stack([*(h[:, -1] for h in hidden[:6]), last["h"][:, -1]], dim=1)
    assert states.shape == (5, 7, 32)
    assert torch.allclose(states, reference, atol=1e-5)


def test_laco_windows_and_last_layers_by_hand():
    assert baselines.laco_windows(30, 6).windows == ((20, 23), (25, 28))
    assert baselines.laco_windows(30, 10).windows == ((12, 13), (15, 18), (20, 23), (25, 28))
    assert baselines.laco_windows(30, 6).rule == "sum"
    with pytest.raises(PlanError, match="do not fit"):
        baselines.laco_windows(8, 6)
    plan = baselines.last_layers(6, 2)
    assert plan.windows == ((3, 5),) and plan.new_to_old == [0, 1, 2, 3]


def test_output_threshold_search_finds_the_target_across_the_dropped_window_quirk():
    # removed(T): grows as T falls, then collapses to 0 when the one window reaches the floor.
    def plan_at(t):
        removed = 0 if t < 0.5 else (5 if t < 0.8 else (3 if t < 0.9 else (2 if t < 0.95 else 0)))
        return [(1, 1 + removed)] if removed else []

    t, windows, tried = compare.search_output_threshold(plan_at, 3)
    assert 0.8 <= t < 0.9 and windows == [(1, 4)]
    t, windows, tried = compare.search_output_threshold(plan_at, 4)  # unreachable: nearest, fewer preferred
    assert sum(hi - lo for lo, hi in windows) == 3 and len(tried) <= 16


def test_model_identity_equates_alpha_zero_with_drop_only():
    drop = baselines.removal_plan("angular", 8, [3, 4])  # window [2..4], drop
    scaled = planner.MergePlan(8, ((2, 4),), "scaled", "cka", None, alphas=(0.0,))
    assert compare.model_identity(drop) == compare.model_identity(scaled) != compare.model_identity(None)
    assert compare.model_identity(planner.MergePlan(8, (), "sum", "cka", 0.99)) == compare.model_identity(None)
    moved = planner.MergePlan(8, ((2, 4),), "scaled", "cka", None, alphas=(0.1,))
    mean = planner.MergePlan(8, ((2, 4),), "mean", "cka", None)
    assert len({compare.model_identity(p) for p in (drop, moved, mean)}) == 3
    mixed = planner.MergePlan(8, ((1, 2), (4, 6)), "scaled", "cka", None, alphas=(0.1, 0.0))
    assert compare.model_identity(mixed) != compare.model_identity(
        planner.MergePlan(8, ((1, 2), (4, 6)), "drop", "cka", None))


def test_published_loop_scores_survive_a_restart_only_for_the_same_calibration(tmp_path):
    cache = {(((3, 5),), (1, 2), "reference"): 0.97, ((), (4, 4), "reference"): 0.5}
    compare.save_scores(tmp_path / "s.json", "abc", cache)
    assert compare.load_scores(tmp_path / "s.json", "abc") == cache
    assert compare.load_scores(tmp_path / "s.json", "other") == {}
    assert compare.load_scores(tmp_path / "absent.json", "abc") == {}


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model, tiny_text_file):
    root = tmp_path_factory.mktemp("compare")
    task = root / "obqa.jsonl"
    rows = [{"id": str(k), "question": {"stem": "the city of the king", "choices": [
        {"text": w, "label": "ABCD"[c]} for c, w in enumerate(["river", "north", "the war", "school"])]},
        "answerKey": "ABCD"[k % 4]} for k in range(3)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, [f"model.path={tiny_model}", f"calibration.source={tiny_text_file}",
                                f"run.dir={root / 'run'}", "calibration.num_samples=8", "calibration.seq_len=32",
                                "calibration.batch_size=4", "similarity.unit=sample", "plan.target_layers_removed=2",
                                "merge.max_shard_bytes=40000", "cluster.num_stages=2", "eval.seq_len=32",
                                "eval.max_windows=6"])
    spec = evaluation.EvalSpec.from_config(config.eval, [tiny_text_file], {"openbookqa": task})
    result = compare.compare(config, [2], spec, methods=ISSUE_METHODS, show_progress=False)
    return config, spec, result


def hf_perplexity(model, windows) -> float:
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_compare_runs_every_method_at_the_same_layer_count(compared, tiny_model, tiny_text_file):
    from transformers import AutoModelForCausalLM

    config, spec, result = compared
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", *ISSUE_METHODS]
    assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
    assert (rows["dense"]["layers_removed"], rows["dense"]["layers_after"], rows["dense"]["windows"]) == (0, 6, [])
    for method in ISSUE_METHODS:
        # The windows the row records (the model that was built and scored) remove the asked 2 layers.
        assert sum(hi - lo for lo, hi in rows[method]["windows"]) == 2, (method, rows[method]["windows"])
        assert (rows[method]["target_removed"], rows[method]["layers_removed"], rows[method]["layers_after"]) \
            == (2, 2, 4), method
        assert rows[method]["windows"] == result["plans"][f"{method}@2"]["windows"], method
        assert set(rows[method]["eval"]["tasks"]["openbookqa"]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}

    windows = calibration.perplexity_windows(
        tiny_tokenizer()(evaluation.read_ppl_text(tiny_text_file), add_special_tokens=False)["input_ids"], 32, 6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    key = str(tiny_text_file)
    assert rows["dense"]["eval"]["ppl"][key] == pytest.approx(hf_perplexity(model, windows), rel=1e-5)
    del model.model.layers[4:]  # the "drop last 2" model, built by hand
    model.config.num_hidden_layers = 4
    assert rows["last_layers"]["eval"]["ppl"][key] == pytest.approx(hf_perplexity(model, windows), rel=1e-5)

    # Every plan comes from the one calibration pass's statistics.
    sim = json.loads((config.run.dir / "similarity.json").read_text())
    bi = sim["block_influence"]
    lowest = sorted(range(1, 6), key=lambda i: (bi[i], i))[:2]
    assert rows["shortgpt"]["rule"] == "drop"
    assert sorted(i for lo, hi in rows["shortgpt"]["windows"] for i in range(lo + 1, hi + 1)) == sorted(lowest)
    _, cka_windows = planner.search_threshold(torch.tensor(sim["cka"]), 2, 1, 1)
    for rule in compare.SLM_RULES:
        assert rows[f"slm_cka_{rule}"]["windows"] == [list(w) for w in cka_windows]
        assert rows[f"slm_cka_{rule}"]["rule"] == rule
    assert rows["laco"]["rule"] == "sum" and rows["slm_output"]["rule"] == "reference"
    ppls = {rows[f"slm_cka_{r}"]["eval"]["ppl"][key] for r in compare.SLM_RULES}
    assert len(ppls) > 1  # the rules really merge different weights
    assert not any(p.name == "model" for p in (config.run.dir / "compare").rglob("model"))  # checkpoints removed

    table = compare.format_table(result).splitlines()
    assert len(table) == 2 + 1 + len(ISSUE_METHODS)
    assert table[3].startswith("| ShortGPT") and "drop " in table[3]


def test_compare_rerun_reuses_measured_models(compared, monkeypatch):
    config, spec, result = compared
    monkeypatch.setattr(compare, "merge_stage", lambda *a: pytest.fail("a measured model was merged again"))
    monkeypatch.setattr(compare.evaluation, "evaluate_model", lambda *a, **k: pytest.fail("a measured model re-scored"))
    again = compare.compare(config, [2], spec, methods=("last_layers", "laco"), show_progress=False)
    before = {r["method"]: r["eval"] for r in result["rows"]}
    assert [r["method"] for r in again["rows"]] == ["dense", "last_layers", "laco"]
    assert all(r["eval"] == before[r["method"]] for r in again["rows"])


def test_a_changed_search_setting_replans_only_the_global_search(compared, monkeypatch):
    config, spec, _ = compared
    asked: list[dict] = []
    plan_all = compare._plan_all

    def recording(ctx, cfg, index, backend, input_ids, wanted, *rest):
        asked.append({k: sorted(ms) for k, ms in wanted.items() if ms})
        return plan_all(ctx, cfg, index, backend, input_ids, wanted, *rest)

    monkeypatch.setattr(compare, "_plan_all", recording)
    methods = ("shortgpt", "slm_output", "slm_global_drop")
    with_candidates = lambda n: config.model_copy(  # noqa: E731
        update={"plan": config.plan.model_copy(update={"candidates": n})})
    compare.compare(with_candidates(2), [2], spec, methods=methods, show_progress=False)
    compare.compare(with_candidates(2), [2], spec, methods=methods, show_progress=False)
    again = compare.compare(with_candidates(3), [2], spec, methods=methods, show_progress=False)
    # The baselines and the published loop were planned by the fixture's run; only the global
    # search reads plan.candidates, so only it is planned again when that changes.
    assert asked == [{2: ["slm_global_drop"]}, {2: ["slm_global_drop"]}]
    assert again["plan_settings"]["slm_global_drop@2"]["candidates"] == 3
    assert "shortgpt@2" in again["plans"] and "slm_output@2" in again["plans"]


def test_two_methods_that_build_the_same_weights_are_evaluated_once(compared, tmp_path, monkeypatch):
    config, spec, _ = compared
    config = config.model_copy(update={"run": config.run.model_copy(update={"dir": tmp_path / "run"})})
    same = baselines.removal_plan("angular", 6, [3, 4])
    scaled = planner.MergePlan(6, ((2, 4),), "scaled", "cka", None, alphas=(0.0,))
    monkeypatch.setattr(compare, "_plan_all", lambda *a: {2: {"angular": same, "slm_global_scaled": scaled}})
    evaluated = []
    real = compare.evaluation.evaluate_model
    monkeypatch.setattr(compare.evaluation, "evaluate_model", lambda d, *a, **k: evaluated.append(d) or real(d, *a, **k))
    result = compare.compare(config, [2], spec, methods=("angular", "slm_global_scaled"), show_progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert len(evaluated) == 2  # dense and angular; the scaled plan with alpha 0 is the angular model
    assert rows["slm_global_scaled"]["same_model_as"] == "angular"
    assert rows["slm_global_scaled"]["eval"] == rows["angular"]["eval"]
    assert rows["slm_global_scaled"]["rule"] == "scaled"


def test_compare_command_prints_one_table(compared, capsys):
    from slm_dist.cli import main

    config, spec, result = compared
    args = ["-q", "compare", f"model.path={config.model.path}", f"calibration.source={config.calibration.source}",
            f"run.dir={config.run.dir}", "calibration.num_samples=8", "calibration.seq_len=32",
            "calibration.batch_size=4", "similarity.unit=sample", "merge.max_shard_bytes=40000",
            "cluster.num_stages=2", "eval.seq_len=32", "eval.max_windows=6", "--removed", "2",
            "--methods", "last_layers,slm_cka_drop", "--ppl", str(spec.ppl_files[0]),
            "--task", f"openbookqa={spec.tasks[0][1]}"]
    assert main(args) == 0  # every row is reused from the fixture's run
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 + 3 and out[2].startswith("| Dense") and "drop 4-5" in out[3]
    assert main(["-q", "compare", f"model.path={config.model.path}", "--methods", "nope", "--removed", "1"]) == 2


def test_rows_for_other_settings_are_moved_aside_not_lost(tmp_path):
    path = tmp_path / "compare.json"
    previous = {"rows": [{"key": 1, "eval": {"average": 0.4}}, {"key": 2, "eval": {"average": 0.3}}, {"key": 3}]}
    path.write_text(json.dumps(previous))
    compare.keep_previous(path, previous, reused=2)  # every measured row reused: nothing to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json"]
    compare.keep_previous(path, previous, reused=0)
    kept = [p for p in tmp_path.iterdir() if p.name != "compare.json"]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == previous


def test_model_identity_tells_corrected_plans_apart():
    from slm_dist.core.planner import MergePlan

    drop = MergePlan(6, ((1, 3),), "drop", "cka", None)
    scaled0 = MergePlan(6, ((1, 3),), "scaled", "cka", None, alphas=(0.0,))
    fixed = MergePlan(6, ((1, 3),), "scaled", "cka", None, alphas=(0.0,), corrections="/c.safetensors",
                      corrections_sha256="ab")
    assert compare.model_identity(drop) == compare.model_identity(scaled0) != compare.model_identity(fixed)


def test_rows_of_corrected_plans_say_their_kind(tmp_path):
    from slm_dist.checkpoint.corrections import save_corrections
    from slm_dist.core.planner import MergePlan

    def plan(kind):
        path = tmp_path / f"{kind}.safetensors"
        sha = save_corrections(path, {(1, 3): torch.eye(4)}, kind)
        return MergePlan(6, ((1, 3),), "scaled", "cka", None, alphas=(0.0,), corrections=str(path),
                         corrections_sha256=sha)

    linear, refit = compare._row_key("slm_global_linear", plan("linear")), compare._row_key("slm_global_refit", plan("refit"))
    assert "correction_kind" not in linear  # the key rows measured before refit existed were stored under
    assert refit["correction_kind"] == "refit"
    assert compare.correction_label(linear) == " + linear" and compare.correction_label(refit) == " + refit"
    assert compare.correction_label(compare._row_key("angular", MergePlan(6, ((1, 3),), "drop", "cka", None))) == ""


def test_runs_over_other_methods_add_up_in_one_file(compared, monkeypatch):
    config, spec, result = compared
    monkeypatch.setattr(compare, "merge_stage", lambda *a: pytest.fail("a measured model was merged again"))
    monkeypatch.setattr(compare.evaluation, "evaluate_model", lambda *a, **k: pytest.fail("a measured model re-scored"))
    only_laco = compare.compare(config, [2], spec, methods=("laco",), show_progress=False)
    assert [r["method"] for r in only_laco["rows"]] == ["dense", "laco"]
    assert "last_layers" in {r["method"] for r in only_laco["other_rows"]}  # kept, not dropped
    again = compare.compare(config, [2], spec, methods=("last_layers",), show_progress=False)
    before = {r["method"]: r["eval"] for r in result["rows"]}
    assert again["rows"][1]["method"] == "last_layers" and again["rows"][1]["eval"] == before["last_layers"]


def test_the_table_shows_each_metric_and_the_average_with_its_standard_error():
    tasks = {"piqa": {"acc": 0.6, "acc_stderr": 0.06 ** 0.5, "acc_norm": 0.4, "acc_norm_stderr": 0.2, "n": 5},
             "hellaswag": {"acc": 0.2, "acc_stderr": 0.2, "acc_norm": 0.4, "acc_norm_stderr": 0.3, "n": 5}}
    ev = {"ppl": {"/d/wiki.txt": 12.3456}, "tasks": tasks, "average": evaluation.average(tasks),
          "average_stderr": evaluation.average_stderr(tasks)}
    result = {"eval_settings": {"ppl_windows": {"/d/wiki.txt": 4}, "metric": {"piqa": "acc", "hellaswag": "acc_norm"}},
              "rows": [{"label": "Dense", "layers_removed": 0, "layers_after": 6, "windows": [], "rule": None,
                        "key": {}, "eval": ev},
                       {"label": "Old", "layers_removed": 2, "layers_after": 4, "windows": [[1, 2]], "rule": "sum",
                        "key": {}, "eval": {"ppl": {}, "tasks": {"piqa": {"acc": 0.5, "acc_norm": 0.5, "n": 4}},
                                            "average": 0.5}}]}   # measured before standard errors existed
    table = compare.format_table(result).splitlines()
    # piqa acc 60.0 ± 24.5 (sqrt(.06)); hellaswag acc_norm 40.0 ± 30.0; average (.6 + .4) / 2 = 50.0 with
    # sqrt(.06 + .09) / 2 = 0.19365 -> ± 19.4
    assert table[2].endswith("| 12.35 | 60.0 ± 24.5 | 40.0 ± 30.0 | 50.0 ± 19.4 |")
    assert table[3].endswith("| n/a | 50.0 | n/a | 50.0 |")


def test_methods_on_the_angular_block_alone_get_the_angular_pass(compared, tmp_path):
    """angular_refit or linearpatch_angular asked for without `angular` itself still measure the angular
    distances (they crashed on a missing matrix before), and use the block `angular` chose."""
    config, spec, result = compared
    alone = compare.compare(config.model_copy(update={"run": config.run.model_copy(update={"dir": tmp_path / "run"})}),
                            [2], spec, methods=("angular_refit", "linearpatch_angular"), show_progress=False)
    rows = {r["method"]: r for r in alone["rows"]}
    assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
    angular = next(r for r in result["rows"] if r["method"] == "angular")
    assert rows["angular_refit"]["windows"] == rows["linearpatch_angular"]["windows"] == angular["windows"]
