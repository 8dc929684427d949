"""Global planner: the DP equals brute force over every window set; window costs match hand-computed
values; impossible targets say why. Matrix index m = layer + 1; window [lo..hi] touches m = lo..hi+1."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from slm_dist.core.global_planner import (
    COSTS,
    best_block,
    best_plans,
    candidate_plans,
    plan_windows_global,
    window_costs,
)
from slm_dist.core.planner import PlanError


def all_window_sets(n: int, first: int, stop: int, max_window: int | None):
    """Every set of disjoint windows inside layers [first, stop), by plain recursion."""
    width = stop - first if max_window is None else max_window

    def from_layer(i: int):
        if i >= stop:
            yield ()
            return
        yield from from_layer(i + 1)  # layer i alone
        for j in range(i + 1, min(i + width, stop)):
            for rest in from_layer(j + 1):
                yield ((i, j),) + rest

    return list(from_layer(first))


def brute_force(costs, n, k, protect_first, protect_last, max_window):
    plans = []
    for windows in all_window_sets(n, protect_first, n - protect_last, max_window):
        if sum(hi - lo for lo, hi in windows) == k:
            plans.append((sum(costs[lo][hi] for lo, hi in windows), windows))
    return sorted(plans)


def random_costs(n: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.random() if hi > lo else math.nan for hi in range(n)] for lo in range(n)]


CASES = [
    # (layers, removed, protect_first, protect_last, max_window)
    (4, 1, 1, 1, None),
    (5, 2, 0, 0, None),
    (6, 2, 1, 1, 2),
    (6, 3, 1, 1, None),
    (7, 3, 0, 1, 3),
    (8, 3, 1, 1, 2),
    (8, 3, 1, 2, 3),
    (9, 4, 2, 1, None),
    (9, 0, 1, 1, None),
    (10, 5, 1, 1, 4),
]


@pytest.mark.parametrize("n, k, protect_first, protect_last, max_window", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_plan_equals_brute_force(n, k, protect_first, protect_last, max_window, seed):
    costs = random_costs(n, seed * 100 + n)
    expected = brute_force(costs, n, k, protect_first, protect_last, max_window)
    best = plan_windows_global(costs, k, protect_first, protect_last, max_window)
    assert best.cost == pytest.approx(expected[0][0], abs=1e-12)
    assert best.windows == expected[0][1]  # random costs: the optimum is unique
    assert best.layers_removed == k


@pytest.mark.parametrize("n, k, protect_first, protect_last, max_window", CASES)
def test_k_best_equals_brute_force_ranking(n, k, protect_first, protect_last, max_window):
    costs = random_costs(n, 7 + n)
    expected = brute_force(costs, n, k, protect_first, protect_last, max_window)
    got = best_plans(costs, k, 6, protect_first, protect_last, max_window)
    assert len(got) == min(6, len(expected))
    assert [p.windows for p in got] == [w for _, w in expected[:6]]
    assert [p.cost for p in got] == pytest.approx([c for c, _ in expected[:6]], abs=1e-12)
    assert len({p.windows for p in got}) == len(got)  # distinct


def test_inf_cost_forbids_a_window_and_ties_are_deterministic():
    # 5 layers, all windows cost 1 except [1..2] forbidden; removing 1 layer: [1..2], [2..3] possible
    # with protect 1/1 (mergeable 1..3); [1..2] is forbidden, so [2..3] is the only plan.
    costs = [[1.0] * 5 for _ in range(5)]
    costs[1][2] = math.inf
    assert plan_windows_global(costs, 1).windows == ((2, 3),)
    # Equal costs: the plan that leaves the first differing layer alone comes first.
    costs[1][2] = 1.0
    plans = best_plans(costs, 1, 5)
    assert [p.windows for p in plans] == [((2, 3),), ((1, 2),)]


def test_all_forbidden_says_why():
    costs = [[math.inf] * 5 for _ in range(5)]
    with pytest.raises(PlanError, match="cost \\+inf"):
        plan_windows_global(costs, 1)


@pytest.mark.parametrize("k, max_window, message", [
    (4, None, "at most 3 can be removed"),      # 6 layers, 4 mergeable, one window keeps one
    (3, 2, "at most 2 can be removed"),         # windows of 2: 4 mergeable -> 2 windows -> 2 removed
    (-1, None, ">= 0"),
])
def test_impossible_targets(k, max_window, message):
    with pytest.raises(PlanError, match=message):
        plan_windows_global(random_costs(6, 0), k, 1, 1, max_window)


def test_nan_cost_is_an_error_naming_the_window():
    costs = random_costs(5, 0)
    costs[1][3] = math.nan
    with pytest.raises(PlanError, match=r"window cost \[1, 3\] is nan"):
        plan_windows_global(costs, 1)


# ------------------------------------------------------------------------------ window costs
# 3 layers; matrix indices 0 (embedding), 1 (h0), 2 (h1), 3 (h2).
CKA3 = [
    [1.0, 0.9, 0.8, 0.5],
    [0.9, 1.0, 0.7, 0.6],
    [0.8, 0.7, 1.0, 0.95],
    [0.5, 0.6, 0.95, 1.0],
]


def test_cka_costs_by_hand():
    drop = window_costs("cka_drop", cka=CKA3)
    # [0..1]: h0 vs h1 = m1 vs m2 = 0.7; [1..2]: h1 vs h2 = m2 vs m3 = 0.95; [0..2]: h0 vs h2 = m1, m3 = 0.6
    assert drop[0, 1].item() == pytest.approx(0.3)
    assert drop[1, 2].item() == pytest.approx(0.05)
    assert drop[0, 2].item() == pytest.approx(0.4)
    win = window_costs("cka_window", cka=CKA3)
    # [0..1] touches m0..m2: min(0.9, 0.8, 0.7) = 0.7; [1..2] m1..m3: min(0.7, 0.6, 0.95) = 0.6;
    # [0..2] m0..m3: min over all = 0.5
    assert win[0, 1].item() == pytest.approx(0.3)
    assert win[1, 2].item() == pytest.approx(0.4)
    assert win[0, 2].item() == pytest.approx(0.5)
    assert math.isnan(win[1, 0].item()) and math.isnan(win[1, 1].item())


def test_cka_window_cost_uses_the_stricter_of_asymmetric_entries():
    m = [row[:] for row in CKA3]
    m[3][1] = 0.1  # m[1][3] stays 0.6
    assert window_costs("cka_drop", cka=m)[0, 2].item() == pytest.approx(0.9)


def test_cka_window_cost_matches_literal_min_on_random_matrices():
    n = 7
    a = torch.rand(n + 1, n + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = (a + a.T) / 2
    win = window_costs("cka_window", cka=m)
    for lo in range(n):
        for hi in range(lo + 1, n):
            idx = range(lo, hi + 2)
            least = min(m[i, j].item() for i, j in itertools.combinations(idx, 2))
            assert win[lo, hi].item() == pytest.approx(1 - least)


def test_per_layer_costs_sum_the_removed_layers():
    bi = [0.5, 0.1, 0.2, 0.4]
    c = window_costs("block_influence", block_influence=bi)
    # [0..2] removes layers 1, 2: 0.1 + 0.2; [1..3] removes 2, 3: 0.2 + 0.4; [2..3] removes 3
    assert c[0, 2].item() == pytest.approx(0.3)
    assert c[1, 3].item() == pytest.approx(0.6)
    assert c[2, 3].item() == pytest.approx(0.4)
    a = window_costs("angular", angular_distance=bi)
    assert torch.equal(a.nan_to_num(), c.nan_to_num())


def test_block_influence_drop_plan_is_shortgpt_when_layers_are_isolated():
    # ShortGPT removes the k layers with the least Block Influence. With max_window=2 and those
    # layers not adjacent, the global plan removes exactly them (each via a window [l-1..l]).
    bi = [0.9, 0.5, 0.05, 0.6, 0.04, 0.7, 0.03, 0.8]
    plan = plan_windows_global(window_costs("block_influence", block_influence=bi), 3, 1, 1, 2)
    removed = sorted(layer for lo, hi in plan.windows for layer in range(lo + 1, hi + 1))
    assert removed == [2, 4, 6]
    assert plan.cost == pytest.approx(0.12)


def test_unknown_cost_and_missing_statistics():
    with pytest.raises(PlanError, match="unknown window cost 'x'"):
        window_costs("x", cka=CKA3)
    with pytest.raises(PlanError, match="needs the CKA matrix"):
        window_costs("cka_drop")
    with pytest.raises(PlanError, match="block influence"):
        window_costs("block_influence", cka=CKA3)


def test_candidates_round_robin_over_costs_without_duplicates():
    # 6 layers, protect 1/1, remove 1: the plans are [1..2], [2..3], [3..4].
    a = [[1.0] * 6 for _ in range(6)]
    b = [[1.0] * 6 for _ in range(6)]
    a[1][2], a[2][3] = 0.0, 0.5   # a ranks [1..2], [2..3], [3..4]
    b[1][2], b[3][4] = 0.0, 0.1   # b ranks [1..2], [3..4], [2..3]
    got = candidate_plans({"a": torch.tensor(a), "b": torch.tensor(b)}, 1, 3)
    # rank 0: a's [1..2]; b's is the same plan (dropped). rank 1: a's [2..3], then b's [3..4].
    assert [(name, p.windows) for name, p in got] == [("a", ((1, 2),)), ("a", ((2, 3),)), ("b", ((3, 4),))]
    assert [p.cost for _, p in got] == pytest.approx([0.0, 0.5, 0.1])


@pytest.mark.parametrize("n, k, protect_first, protect_last, max_window", CASES)
def test_best_block_is_the_cheapest_single_window(n, k, protect_first, protect_last, max_window):
    costs = random_costs(n, 100 + n + k)
    singles = [plan for plan in brute_force(costs, n, k, protect_first, protect_last, max_window)
               if len(plan[1]) == 1]
    got = best_block(costs, k, protect_first, protect_last, max_window)
    if not singles:
        assert got is None
    else:
        assert got.windows == singles[0][1]
        assert got.cost == pytest.approx(singles[0][0])


def test_best_block_is_none_when_no_single_window_may_remove_k():
    costs = random_costs(8, 3)
    assert best_block(costs, 3, 1, 1, max_window=3) is None      # 4 layers in one window
    assert best_block(costs, 6, 1, 1) is None                    # layers 1..6 leave 7 protected: 0..6 needs 0
    assert best_block(costs, 0, 1, 1) is None
    forbidden = [[math.inf if hi > lo else math.nan for hi in range(8)] for lo in range(8)]
    assert best_block(forbidden, 2, 1, 1) is None


def test_candidates_offer_each_costs_best_block_after_the_best_plans():
    # 8 layers, protect 1/1, remove 2. Every single window [lo..lo+1] is cheap (0.1) and every
    # two-layer window dear (1.0), so the cheapest plan is two windows; the block [3..5] is
    # the cheapest of the dear ones.
    a = [[math.nan] * 8 for _ in range(8)]
    for lo in range(8):
        for hi in range(lo + 1, 8):
            a[lo][hi] = 0.1 if hi == lo + 1 else 1.0
    a[3][5] = 0.9
    got = candidate_plans({"a": torch.tensor(a)}, 2, 3)
    assert [name for name, _ in got] == ["a", "a (one block)", "a"]
    assert len(got[0][1].windows) == 2 and got[1][1].windows == ((3, 5),)
    assert got[1][1].cost == pytest.approx(0.9)
    assert len(candidate_plans({"a": torch.tensor(a)}, 2, 1)) == 1  # count still caps the list


def test_every_cost_name_builds():
    n = 4
    cka = torch.eye(n + 1, dtype=torch.float64) * 0.5 + 0.5
    stats = dict(cka=cka, block_influence=torch.full((n,), 0.1), angular_distance=torch.full((n,), 0.2),
                 measured=torch.tensor([math.inf, math.inf, 0.3, 0.4]))
    for name in COSTS:
        table = window_costs(name, **stats)
        assert table.shape == (n, n)
        assert torch.isfinite(table[1, 2:]).all()


@pytest.mark.parametrize("max_window", [None, 2, 3])
@pytest.mark.parametrize("protect_first, protect_last", [(0, 0), (1, 1), (2, 1)])
def test_every_reachable_count_is_planned_and_the_next_one_is_refused(max_window, protect_first, protect_last):
    n = 8
    costs = random_costs(n, 11)
    sets = all_window_sets(n, protect_first, n - protect_last, max_window)
    reachable = {sum(hi - lo for lo, hi in w) for w in sets}
    most = max(reachable)
    assert reachable == set(range(most + 1))
    for k in range(most + 1):
        assert plan_windows_global(costs, k, protect_first, protect_last, max_window).layers_removed == k
    with pytest.raises(PlanError, match=f"at most {most} can be removed"):
        plan_windows_global(costs, most + 1, protect_first, protect_last, max_window)


def test_rank_plans_orders_by_measured_loss_and_keeps_provenance():
    from slm_dist.core.global_planner import RankedPlan, ScoredPlan, rank_plans

    candidates = [("cka_drop", ScoredPlan(((1, 2),), 0.1)), ("block_influence", ScoredPlan(((3, 4),), 0.2)),
                  ("angular", ScoredPlan(((2, 3),), 0.3))]
    measured = {((1, 2),): 3.0, ((3, 4),): 2.5, ((2, 3),): 3.0}
    ranked = rank_plans(candidates, measured.__getitem__)
    assert ranked == [RankedPlan(((3, 4),), "block_influence", 0.2, 2.5), RankedPlan(((1, 2),), "cka_drop", 0.1, 3.0),
                      RankedPlan(((2, 3),), "angular", 0.3, 3.0)]  # the tie keeps the statistics order
    with pytest.raises(PlanError, match="NaN"):
        rank_plans(candidates, lambda w: math.nan)


# ------------------------------------------------------------------ end to end on the tiny model
def hf_nll(model_dir, ids: torch.Tensor, removed: set[int]) -> float:
    """Mean next-token NLL of the original model with the `removed` layers deleted (rule drop), by HF alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in removed]
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(-logp.mean())


def test_global_search_with_refinement_runs_end_to_end(tiny_model, tiny_text_file, tmp_path):
    import json

    from slm_dist import pipeline
    from slm_dist.calibration import load_calibration_parquet
    from slm_dist.config import load_config
    from tests.test_pipeline import tiny_overrides

    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.target_layers_removed=2",
                                              "plan.search=global", "plan.candidates=5", "merge.rule=drop",
                                              "plan.cost=measured", "plan.local_search=4", "eval.enabled=false"))
    report = pipeline.run(config, show_progress=False)
    plan = json.loads((tmp_path / "plan.json").read_text())
    ranked = plan["details"]["global"]["candidates"]
    # Layers 1..4 are mergeable: [1..3], [2..4] and [1..2]+[3..4] are every plan removing 2.
    assert sorted(c["windows"] for c in ranked) == [[[1, 2], [3, 4]], [[1, 3]], [[2, 4]]]
    assert plan["threshold"] is None
    assert [c["loss"] for c in ranked] == sorted(c["loss"] for c in ranked)
    assert plan["windows"] == ranked[0]["windows"] and report["layers_after"] == 4
    # Every candidate's loss is the calibration NLL the plain HF model gives with those layers removed.
    ids = load_calibration_parquet(tmp_path / "calibration.parquet")
    for c in ranked + plan["details"]["global"]["local_search"]:
        removed = {layer for lo, hi in c["windows"] for layer in range(lo + 1, hi + 1)}
        assert c["loss"] == pytest.approx(hf_nll(tiny_model, ids, removed), rel=1e-5), c
    # Measured cost: each removable layer's own damage (layers 2..4 with protect 1/1), the rest None.
    details = plan["details"]["global"]
    dense = hf_nll(tiny_model, ids, set())
    assert details["dense_loss"] == pytest.approx(dense, rel=1e-5)
    assert details["measured"][:2] == [None, None] and details["measured"][5] is None
    for layer in (2, 3, 4):
        assert details["measured"][layer] == pytest.approx(hf_nll(tiny_model, ids, {layer}) - dense, rel=1e-4, abs=1e-6)
    assert ranked[0]["proposed_by"] in ("measured", "cka_drop", "cka_window", "block_influence", "angular")
    assert details["loss"] == min(c["loss"] for c in ranked + details["local_search"])


# ------------------------------------------------------------------------------ local search
def removed_set(windows) -> set[int]:
    return {layer for lo, hi in windows for layer in range(lo + 1, hi + 1)}


def test_neighbours_by_hand():
    from slm_dist.core.global_planner import neighbour_plans, windows_removing

    assert windows_removing([3, 4, 6, 9]) == ((2, 4), (5, 6), (8, 9))
    assert neighbour_plans([(2, 3)], 6) == [((1, 2),), ((3, 4),)]
    # 8 layers, removable 2..6; [1..2] + [4..5] removes {2, 5}. Nearest swaps first (then out, into).
    assert neighbour_plans([(1, 2), (4, 5)], 8) == [
        ((2, 3), (4, 5)), ((1, 2), (3, 4)), ((1, 2), (5, 6)),  # 2->3, 5->4, 5->6: window shifts
        ((3, 5),), ((1, 3),),                                  # 2->4, 5->3: a layer handed to the other window
        ((4, 6),)]                                             # 2->6
    assert neighbour_plans([(1, 2), (4, 5)], 8, max_window=2) == [((2, 3), (4, 5)), ((1, 2), (3, 4)),
                                                                  ((1, 2), (5, 6))]
    # With per-layer costs: the cheapest predicted change (cost added - cost given back) first.
    cost = [math.inf, math.inf, 0.5, 0.375, 0.25, 0.625, 0.0, math.inf]
    assert neighbour_plans([(1, 2), (4, 5)], 8, layer_cost=cost) == [
        ((1, 2), (5, 6)),   # 5->6: -0.625
        ((4, 6),),          # 2->6: -0.5
        ((1, 2), (3, 4)),   # 5->4: -0.375
        ((3, 5),),          # 2->4: -0.25 (tie with 5->3: the lower layer given back first)
        ((1, 3),),          # 5->3: -0.25
        ((2, 3), (4, 5))]   # 2->3: -0.125
    with pytest.raises(PlanError, match="outside the removable"):
        neighbour_plans([(0, 1)], 8)


@pytest.mark.parametrize("seed", range(4))
def test_every_neighbour_swaps_one_removed_layer_and_stays_valid(seed):
    from slm_dist.core.global_planner import neighbour_plans
    from slm_dist.core.planner import MergePlan

    rng = random.Random(seed)
    n = 14
    windows = rng.choice([w for w in all_window_sets(n, 1, n - 1, 4) if sum(hi - lo for lo, hi in w) == 5])
    for plan in neighbour_plans(windows, n, 1, 1, 4):
        MergePlan(n, plan, "drop", "cka", None)  # valid: disjoint, sorted, in range
        assert all(1 <= lo and hi <= n - 2 and hi - lo + 1 <= 4 for lo, hi in plan)
        assert len(removed_set(plan)) == 5 and len(removed_set(plan) ^ removed_set(windows)) == 2


def test_local_search_ends_at_a_local_optimum_and_never_remeasures():
    from slm_dist.core.global_planner import local_search, neighbour_plans

    n = 12
    rng = random.Random(1)
    weight = [rng.random() for _ in range(n)]
    calls: list = []

    def loss(windows):
        calls.append(windows)
        removed = removed_set(windows)
        return sum(weight[i] for i in removed) + 0.3 * len(windows)  # fewer, longer windows are cheaper

    def neighbours(w):
        return neighbour_plans(w, n)

    start = ((1, 2), (5, 6), (8, 9))
    best, best_loss, measured = local_search(start, loss, neighbours, max_evals=1000, known={start: loss(start)})
    assert len(calls) == len(set(calls)) == 1 + len(measured)  # the start was known: measured once, above
    assert best_loss == loss(best) and best_loss <= loss(start)
    assert all(loss(p) >= best_loss for p in neighbours(best))  # no neighbour is better
    calls.clear()
    _, _, few = local_search(start, loss, neighbours, max_evals=2)
    assert len(few) == 2 and len(calls) == 3  # the start (not known this time) and two neighbours


def test_config_keys_for_the_global_search():
    from slm_dist.config import ConfigError, load_config

    cfg = load_config(None, ["plan.target_layers_removed=3", "plan.search=global", "plan.cost=measured",
                             "plan.candidates=4", "plan.local_search=5", "merge.rule=scaled"])
    assert (cfg.plan.search, cfg.plan.cost, cfg.plan.candidates, cfg.plan.local_search, cfg.merge.rule) == \
        ("global", "measured", 4, 5, "scaled")
    assert load_config(None, []).plan.search == "sliding"  # the paper's rule stays the default
    with pytest.raises(ConfigError, match="removes a number of layers"):
        load_config(None, ["plan.search=global", "plan.threshold=0.9"])
    with pytest.raises(ConfigError, match="plan.cost"):
        load_config(None, ["plan.cost=nope"])
    with pytest.raises(ConfigError, match="merge.rule=scaled fits alphas"):
        load_config(None, ["similarity.criterion=output", "plan.threshold=0.9", "merge.rule=scaled"])


def test_neighbours_are_every_single_swap():
    from slm_dist.core.global_planner import neighbour_plans

    n, windows = 12, ((2, 4), (7, 8))  # removes {3, 4, 8}; removable 2..10 (9 layers)
    got = neighbour_plans(windows, n)
    assert len(got) == len(set(got)) == 3 * (9 - 3)
    assert {frozenset(removed_set(p)) for p in got} == {
        frozenset({3, 4, 8} - {out} | {into}) for out in (3, 4, 8) for into in range(2, 11) if into not in (3, 4, 8)}
