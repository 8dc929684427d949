"""Planner: hand-written similarity matrices -> windows, the published loop's exact trace,
threshold search, MergePlan bookkeeping. Every expected value below is worked out by hand
in the comments (matrix index m = layer + 1; window [lo..hi] touches m = lo..hi+1)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from slm_dist.core.planner import (
    LayerPlan,
    MergePlan,
    PlanError,
    TraceStep,
    layers_for_param_ratio,
    max_layers_removed,
    plan_windows_cka,
    plan_windows_output,
    search_threshold,
)


def uniform(size: int, value: float) -> list[list[float]]:
    return [[1.0 if i == j else value for j in range(size)] for i in range(size)]


def blocks(size: int, groups: list[range], inside: float = 0.97, outside: float = 0.2) -> list[list[float]]:
    """Matrix indices in the same group are similar, everything else is not."""
    group_of = {m: g for g, r in enumerate(groups) for m in r}

    def value(i: int, j: int) -> float:
        if i == j:
            return 1.0
        return inside if i in group_of and group_of[i] == group_of.get(j) else outside

    return [[value(i, j) for j in range(size)] for i in range(size)]


def decaying(size: int, by_distance: dict[int, float]) -> list[list[float]]:
    """CKA that depends only on |i - j|: a window of L layers is admissible iff by_distance[L] > T."""
    return [[1.0 if i == j else by_distance[abs(i - j)] for j in range(size)] for i in range(size)]


# N = 6 layers, one bad pair: m=1 (h_0, input of layer 1) vs m=5 (h_4, output of layer 4).
ONE_BAD_PAIR = [
    [1.00, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95],
    [0.95, 1.00, 0.95, 0.95, 0.95, 0.50, 0.95],
    [0.95, 0.95, 1.00, 0.95, 0.95, 0.95, 0.95],
    [0.95, 0.95, 0.95, 1.00, 0.95, 0.95, 0.95],
    [0.95, 0.95, 0.95, 0.95, 1.00, 0.95, 0.95],
    [0.95, 0.50, 0.95, 0.95, 0.95, 1.00, 0.95],
    [0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 1.00],
]

# N = 6; f(1)=.95 f(2)=.9 f(3)=.8 f(4)=.7 f(5)=.6 f(6)=.5
DECAY6 = decaying(7, {1: 0.95, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.5})


CKA_CASES = [
    # id, matrix, threshold, protect_first, protect_last, max_window, expected windows
    ("nothing_merges", uniform(5, 0.3), 0.5, 1, 1, None, []),
    ("all_similar_default_protect", uniform(6, 0.99), 0.9, 1, 1, None, [(1, 3)]),
    ("all_similar_protect_none", uniform(6, 0.99), 0.9, 0, 0, None, [(0, 4)]),
    ("all_similar_protect_first_only", uniform(6, 0.99), 0.9, 0, 1, None, [(0, 3)]),
    ("all_similar_protect_2_2", uniform(6, 0.99), 0.9, 2, 2, None, []),  # only layer 2 is mergeable
    ("all_similar_protect_2_1", uniform(6, 0.99), 0.9, 2, 1, None, [(2, 3)]),
    # N=8, m-blocks {0..3} and {4..8}: hi=6: [5..6] ok, [4..6] (m4..7) ok, [3..6] pairs m3-m4 fail
    # -> commit (4,6), hi=3: [2..3] (m2..4) fails -> slide, hi=2: [1..2] (m1..3) ok, at the floor.
    ("two_blocks", blocks(9, [range(0, 4), range(4, 9)]), 0.9, 1, 1, None, [(1, 2), (4, 6)]),
    # hi=4: [3..4] ok, [2..4] (m2..5) ok, [1..4] (m1..5) hits the bad pair -> commit (2,4); hi=1 is
    # at the floor, nothing left.
    ("one_bad_pair", ONE_BAD_PAIR, 0.9, 1, 1, None, [(2, 4)]),
    # Same, layer 0 unprotected: after (2,4), hi=1: [0..1] (m0..2) ok -> (0,1).
    ("one_bad_pair_protect_first_0", ONE_BAD_PAIR, 0.9, 0, 1, None, [(0, 1), (2, 4)]),
    # CKA equal to T is not > T: the pair still fails.
    ("bad_pair_equal_to_threshold", ONE_BAD_PAIR, 0.5, 1, 1, None, [(2, 4)]),
    ("bad_pair_below_threshold", ONE_BAD_PAIR, 0.49, 1, 1, None, [(1, 4)]),
    # The top window fails at its first step (m5-m6 low): slide, then the rest merges.
    ("slide_at_top", [[1.0 if i == j else (0.1 if {i, j} == {5, 6} else 0.99) for j in range(7)] for i in range(7)],
     0.9, 1, 1, None, [(1, 4)]),
    # N=8 all similar, mergeable 1..6; max_window caps and the next window starts below.
    ("max_window_2", uniform(9, 0.99), 0.9, 1, 1, 2, [(1, 2), (3, 4), (5, 6)]),
    ("max_window_3", uniform(9, 0.99), 0.9, 1, 1, 3, [(1, 3), (4, 6)]),
    ("max_window_4", uniform(9, 0.99), 0.9, 1, 1, 4, [(1, 2), (3, 6)]),
    ("max_window_5", uniform(9, 0.99), 0.9, 1, 1, 5, [(2, 6)]),  # layer 1 is left alone
    ("max_window_6", uniform(9, 0.99), 0.9, 1, 1, 6, [(1, 6)]),
    # Window of L layers admissible iff f(L) > T.
    ("decay_L2", DECAY6, 0.85, 1, 1, None, [(1, 2), (3, 4)]),
    ("decay_L3", DECAY6, 0.75, 1, 1, None, [(2, 4)]),
    ("decay_L4", DECAY6, 0.65, 1, 1, None, [(1, 4)]),
    ("decay_L1", DECAY6, 0.92, 1, 1, None, []),
]


@pytest.mark.parametrize(
    "matrix, threshold, protect_first, protect_last, max_window, expected",
    [c[1:] for c in CKA_CASES],
    ids=[c[0] for c in CKA_CASES],
)
def test_plan_windows_cka_table(matrix, threshold, protect_first, protect_last, max_window, expected):
    got = plan_windows_cka(matrix, threshold, protect_first, protect_last, max_window)
    assert got == expected
    # A float32 tensor input must plan the same (values are compared in float64).
    as_tensor = plan_windows_cka(torch.tensor(matrix, dtype=torch.float32), threshold, protect_first,
                                 protect_last, max_window)
    assert as_tensor == expected


def test_asymmetric_matrix_uses_the_stricter_entry():
    m = uniform(6, 0.99)
    m[4][1] = 0.5  # only the lower triangle is low: pair (m1, m4) must still fail
    # hi=3 (N=5): [2..3] m2..4 ok, [1..3] m1..4 fails -> (2,3)
    assert plan_windows_cka(m, 0.9) == [(2, 3)]


def _reference_cka_plan(s, threshold, pf, pl, mw):
    """DESIGN.md's rule in its own words, with the admissibility of every window checked in full."""
    n = len(s) - 1

    def admissible(lo, hi):
        idx = range(lo, hi + 2)
        return all(s[i][j] > threshold and s[j][i] > threshold for i in idx for j in idx if i != j)

    windows = []
    hi = n - 1 - pl
    lo = hi - 1
    while lo >= pf:
        fits = mw is None or hi - lo + 1 <= mw
        if fits and admissible(lo, hi):
            lo -= 1  # grow
            continue
        if hi - (lo + 1) + 1 >= 2:  # [lo..hi] failed or exceeds the cap: commit [lo+1..hi]
            windows.append((lo + 1, hi))
        hi = lo  # continue with hi = lo (for a one-layer leftover this is the slide hi -= 1)
        lo = hi - 1
    if hi - (lo + 1) >= 1:  # the window still open at the bottom is admissible: commit it
        windows.append((lo + 1, hi))
    return sorted(windows)


def test_plan_windows_cka_matches_literal_rule_on_random_matrices():
    rng = random.Random(1234)
    levels = [0.3, 0.6, 0.8, 0.9, 0.95, 0.99]
    for _ in range(300):
        size = rng.randint(2, 13)
        s = uniform(size, 0.0)
        for i in range(size):
            for j in range(i + 1, size):
                # Similar near the diagonal, less so far away, with noise: gives runs and breaks.
                v = rng.choice(levels[max(0, 4 - (j - i)):]) if rng.random() < 0.8 else rng.choice(levels)
                s[i][j] = s[j][i] = v
        n = size - 1
        pf = rng.randint(0, min(2, n))
        pl = rng.randint(0, min(2, n - pf))
        mw = rng.choice([None, None, 2, 3, 4])
        t = rng.choice(levels)  # thresholds equal to matrix values exercise the strict ">"
        assert plan_windows_cka(s, t, pf, pl, mw) == _reference_cka_plan(s, t, pf, pl, mw), (s, t, pf, pl, mw)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan")])
def test_threshold_range_is_validated(bad):
    with pytest.raises(PlanError, match=r"threshold must be in \(0, 1\].*got " + str(bad)):
        plan_windows_cka(uniform(4, 0.9), bad)
    with pytest.raises(PlanError, match=r"\(0, 1\]"):
        plan_windows_output(4, lambda c, t: 1.0, bad)
    with pytest.raises(PlanError, match=r"\(0, 1\]"):
        MergePlan(4, (), "sum", "cka", bad)


def test_threshold_one_is_valid_and_merges_nothing():
    assert plan_windows_cka(uniform(6, 1.0), 1.0) == []


@pytest.mark.parametrize(
    "matrix, kwargs, message",
    [
        ([[1.0, 0.9, 0.9], [0.9, 1.0, 0.9]], {}, r"square .*got shape \(2, 3\)"),
        ([[1.0]], {}, r"N >= 1"),
        ([[1.0, float("nan")], [0.5, 1.0]], {}, r"non-finite .*\[0, 1\]"),
        (uniform(4, 0.9), {"protect_first": 2, "protect_last": 2}, r"protect_first=2 \+ protect_last=2 .*3 layers"),
        (uniform(4, 0.9), {"protect_first": -1}, r"protect_first=-1"),
        (uniform(4, 0.9), {"max_window": 1}, r"max_window must be >= 2.*got 1"),
    ],
)
def test_plan_windows_cka_input_errors(matrix, kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan_windows_cka(matrix, 0.5, **kwargs)


# --------------------------------------------------------------------------------------------
# The published loop (criterion: output)
# --------------------------------------------------------------------------------------------


def scripted(table):
    """A scorer that answers only the calls written down, so an unexpected call fails loudly."""

    def score(committed, trial):
        key = (tuple(committed), trial)
        assert key in table, f"unexpected scorer call {key}"
        return table[key]

    return score


def test_published_loop_exact_trace():
    # N=8, T=0.5: start hi=6, lo=5; layer 7 protected.
    w = ((4, 6),)
    table = {
        ((), (5, 6)): 0.9,  # pass -> grow (lo=4)
        ((), (4, 6)): 0.8,  # pass -> grow (lo=3)
        ((), (3, 6)): 0.4,  # fail -> commit [4..6], hi=lo=3
        (w, (3, 3)): 0.8,  # quirk: one-layer trial re-scores the committed model; pass -> lo=2
        (w, (2, 3)): 0.3,  # fail, window [3..3] has one layer -> slide (hi=2, lo=1)
        (w, (1, 2)): 0.7,  # pass -> grow (lo=0)
        (w, (0, 2)): 0.6,  # pass but lo is at the floor -> stop; pending [1..2] is DROPPED
    }
    windows, trace = plan_windows_output(8, scripted(table), 0.5)
    assert windows == [(4, 6)]
    assert trace == [
        TraceStep((), (5, 6), 0.9, "grow"),
        TraceStep((), (4, 6), 0.8, "grow"),
        TraceStep((), (3, 6), 0.4, "commit"),
        TraceStep(w, (3, 3), 0.8, "grow"),
        TraceStep(w, (2, 3), 0.3, "slide"),
        TraceStep(w, (1, 2), 0.7, "grow"),
        TraceStep(w, (0, 2), 0.6, "stop"),
    ]


def test_published_loop_commit_at_floor_then_rescore():
    # N=5: hi=3, lo=2. The failing trial reaches layer 0, so [1..3] is committed; the one-layer
    # re-score (0,0) then passes at the floor and ends the loop.
    w = ((1, 3),)
    table = {((), (2, 3)): 0.9, ((), (1, 3)): 0.9, ((), (0, 3)): 0.2, (w, (0, 0)): 0.9}
    windows, trace = plan_windows_output(5, scripted(table), 0.5)
    assert windows == [(1, 3)]
    assert [s.decision for s in trace] == ["grow", "grow", "commit", "stop"]
    assert [s.trial for s in trace] == [(2, 3), (1, 3), (0, 3), (0, 0)]


def test_published_loop_merges_nothing_when_everything_passes():
    # The dropped-bottom quirk in its purest form: every trial passes, the window grows to layer 0,
    # the loop ends and nothing is committed.
    windows, trace = plan_windows_output(6, lambda committed, trial: 0.99, 0.5)
    assert windows == []
    assert [(s.trial, s.decision) for s in trace] == [
        ((3, 4), "grow"), ((2, 4), "grow"), ((1, 4), "grow"), ((0, 4), "stop"),
    ]


def test_published_loop_score_equal_to_threshold_fails():
    # N=4: hi=2, lo=1. 0.5 is not > 0.5 -> slide to (0,1), which passes at the floor -> stop.
    table = {((), (1, 2)): 0.5, ((), (0, 1)): 0.9}
    windows, trace = plan_windows_output(4, scripted(table), 0.5)
    assert windows == []
    assert [(s.trial, s.decision) for s in trace] == [((1, 2), "slide"), ((0, 1), "stop")]


def test_published_loop_protect_arguments_move_the_ends():
    # N=8, protect_first=2 (floor: lo >= 1), protect_last=2 (start hi=5).
    table = {((), (4, 5)): 0.9, ((), (3, 5)): 0.9, ((), (2, 5)): 0.9, ((), (1, 5)): 0.1,
             (((2, 5),), (1, 1)): 0.9}
    windows, trace = plan_windows_output(8, scripted(table), 0.5, protect_first=2, protect_last=2)
    assert windows == [(2, 5)]
    assert [s.decision for s in trace] == ["grow", "grow", "grow", "commit", "stop"]


def test_published_loop_inconsistent_scorer_is_an_error_not_a_hang():
    table = {((), (2, 3)): 0.9, ((), (1, 3)): 0.9, ((), (0, 3)): 0.2, (((1, 3),), (0, 0)): 0.1}
    with pytest.raises(PlanError, match=r"returned 0.1 .*scored 0.9 > threshold .*forever"):
        plan_windows_output(5, scripted(table), 0.5)


def test_published_loop_rejects_protect_first_zero():
    with pytest.raises(PlanError, match=r"protect_first >= 1, got 0"):
        plan_windows_output(6, lambda c, t: 1.0, 0.5, protect_first=0)


def _authors_loop(n, sim_of_model, threshold):
    """Line-by-line transcription of SLM.py's loop, with the model stood in for by the list of
    windows merged into it (merge of [low..high] with low == high changes nothing)."""
    merged = []
    calls = []
    high_lay = n - 1 - 1
    low_lay = high_lay - 1
    while low_lay >= 0:
        assert len(calls) < 10_000
        tmp_merged_model = merged + ([(low_lay, high_lay)] if low_lay < high_lay else [])
        sim_value = sim_of_model(frozenset(tmp_merged_model))
        calls.append(frozenset(tmp_merged_model))
        if sim_value > threshold:
            low_lay -= 1
        else:
            if low_lay + 1 != high_lay:
                merged = merged + [(low_lay + 1, high_lay)]
                high_lay = low_lay
            else:
                high_lay -= 1
                low_lay -= 1
    return sorted(merged), calls


def test_published_loop_matches_transcription_on_random_scorers():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(2, 14)
        cache: dict[frozenset, float] = {}

        def sim_of_model(model: frozenset) -> float:
            # Deterministic per candidate model, like a real forward pass.
            if model not in cache:
                cache[model] = rng.choice([0.3, 0.5, 0.7, 0.9, rng.random()])
            return cache[model]

        def score(committed, trial):
            lo, hi = trial
            return sim_of_model(frozenset(list(committed) + ([trial] if lo < hi else [])))

        threshold = rng.choice([0.5, 0.6, 0.8])
        expected, calls = _authors_loop(n, sim_of_model, threshold)
        windows, trace = plan_windows_output(n, score, threshold)
        assert windows == expected
        assert [frozenset(list(s.committed) + ([s.trial] if s.trial[0] < s.trial[1] else [])) for s in trace] == calls


# --------------------------------------------------------------------------------------------
# Threshold search
# --------------------------------------------------------------------------------------------


def test_search_threshold_hits_exact_counts_at_the_highest_threshold():
    # DECAY6 plans: T in [0.9, 1]: nothing; [0.8, 0.9): (1,2),(3,4) -> 2; [0.7, 0.8): (2,4) -> 2;
    # below 0.7: (1,4) -> 3. The highest T for k=2 is the float just below 0.9.
    t, windows = search_threshold(DECAY6, 2)
    assert t == math.nextafter(0.9, 0.0)
    assert windows == [(1, 2), (3, 4)]
    assert plan_windows_cka(DECAY6, t) == windows
    assert plan_windows_cka(DECAY6, 0.9) == []  # one step higher changes the plan

    t3, windows3 = search_threshold(DECAY6, 3)
    assert t3 == math.nextafter(0.7, 0.0)
    assert windows3 == [(1, 4)]

    assert search_threshold(DECAY6, 0) == (1.0, [])


def test_search_threshold_unreachable_count_names_neighbours():
    with pytest.raises(PlanError) as err:
        search_threshold(DECAY6, 1)
    msg = str(err.value)
    assert "exactly 1 layers" in msg
    assert "0 layers at threshold 1.0" in msg
    assert f"2 layers at threshold {math.nextafter(0.9, 0.0)!r}" in msg
    assert "Ask for one of those" in msg


@pytest.mark.parametrize(
    "k, max_window, message",
    [
        (4, None, r"cannot remove 4 layers: at most 3 .*6 layers, 4 of them mergeable"),
        (3, 2, r"cannot remove 3 layers: at most 2 .*max_window=2"),
        (-1, None, r"must be >= 0, got -1"),
    ],
)
def test_search_threshold_impossible_counts(k, max_window, message):
    with pytest.raises(PlanError, match=message):
        search_threshold(DECAY6, k, max_window=max_window)


def test_search_threshold_is_highest_on_random_matrices():
    rng = random.Random(99)
    for _ in range(60):
        size = rng.randint(3, 10)
        s = uniform(size, 0.0)
        for i in range(size):
            for j in range(i + 1, size):
                s[i][j] = s[j][i] = round(rng.uniform(0.5, 1.0), 2)
        n = size - 1
        values = sorted({v for row in s for v in row})
        for k in range(max_layers_removed(n) + 1):
            try:
                t, windows = search_threshold(s, k)
            except PlanError:
                # Unreachable: then no threshold in the grid of plan boundaries reaches it either.
                assert all(_removed(plan_windows_cka(s, v)) != k for v in values if 0 < v <= 1)
                continue
            assert _removed(windows) == k and plan_windows_cka(s, t) == windows
            # Every higher threshold lies in an interval starting at some matrix value above t.
            assert all(_removed(plan_windows_cka(s, v)) != k for v in values if t < v <= 1)


def _removed(windows):
    return sum(hi - lo for lo, hi in windows)


def test_max_layers_removed():
    assert max_layers_removed(32, 1, 1) == 29
    assert max_layers_removed(6, 1, 1) == 3
    assert max_layers_removed(3, 1, 1) == 0
    assert max_layers_removed(2, 1, 1) == 0
    assert max_layers_removed(4, 0, 0) == 3
    with pytest.raises(PlanError, match=r"protect_first=3 \+ protect_last=2 .*4 layers"):
        max_layers_removed(4, 3, 2)


def test_max_layers_removed_counts_the_windows_a_cap_forces():
    # 30 mergeable layers in windows of at most 4 need 8 windows, each keeping one layer: 22 removable.
    assert max_layers_removed(32, 1, 1, max_window=4) == 22
    assert max_layers_removed(32, 1, 1, max_window=2) == 15
    for n, cap in [(12, 3), (9, 2), (32, 5)]:
        most = max_layers_removed(n, 1, 1, max_window=cap)
        assert plan_windows_cka(torch.ones(n + 1, n + 1, dtype=torch.float64), 0.5, 1, 1, cap) and \
            _removed(plan_windows_cka(torch.ones(n + 1, n + 1, dtype=torch.float64), 0.5, 1, 1, cap)) == most
    with pytest.raises(PlanError, match="max_window must be >= 2"):
        max_layers_removed(8, 1, 1, max_window=1)


# --------------------------------------------------------------------------------------------
# Parameter ratio
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, per_layer, ratio, max_removable, expected",
    [
        (1000, 30, 0.2, 10, 7),  # 200/30 = 6.67: 210 is 10 away, 180 is 20 away
        (1000, 30, 0.1, 10, 3),  # 100/30 = 3.33
        (1000, 20, 0.25, 20, 12),  # 250/20 = 12.5: a tie, the smaller removal wins
        (1000, 30, 0.16, 5, 5),  # 160/30 = 5.33 -> 5 == max_removable
        # Llama-2-7B: 6,738,415,616 params, 202,383,360 per layer; 20% -> 6.66 layers -> 7
        (6_738_415_616, 202_383_360, 0.2, 29, 7),
    ],
)
def test_layers_for_param_ratio(total, per_layer, ratio, max_removable, expected):
    assert layers_for_param_ratio(total, per_layer, ratio, max_removable) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        ((1000, 30, 0.0, 10), r"in \(0, 1\), got 0.0"),
        ((1000, 30, 1.0, 10), r"in \(0, 1\), got 1.0"),
        ((1000, 30, float("nan"), 10), r"in \(0, 1\), got nan"),
        ((1000, 30, 0.2, 5), r"target_ratio=0.2 needs about 7 layers.*at most 5 .*ratio of 0.15"),
        ((1000, 30, 0.01, 10), r"less than half a layer"),
        ((1000, 0, 0.2, 10), r"params_per_layer=0"),
    ],
)
def test_layers_for_param_ratio_errors(args, message):
    with pytest.raises(PlanError, match=message):
        layers_for_param_ratio(*args)


# --------------------------------------------------------------------------------------------
# MergePlan
# --------------------------------------------------------------------------------------------


def test_merge_plan_maps():
    plan = MergePlan(8, ((1, 3), (5, 6)), "sum", "cka", 0.9)
    assert plan.layers_removed == 3
    assert plan.num_layers_after == 5
    #                 old: 0  1  2  3  4  5  6  7
    assert plan.index_map == [0, 1, 1, 1, 2, 3, 3, 4]
    assert plan.new_to_old == [0, 1, 4, 5, 7]
    assert plan.window_of(2) == (1, 3)
    assert plan.window_of(6) == (5, 6)
    assert plan.window_of(4) is None
    with pytest.raises(PlanError, match=r"layer 8 is outside .*0..7"):
        plan.window_of(8)


def test_merge_plan_without_windows_is_identity():
    plan = MergePlan(4, (), "reference", "output", None)
    assert plan.index_map == [0, 1, 2, 3] and plan.new_to_old == [0, 1, 2, 3] and plan.num_layers_after == 4


def test_merge_plan_json_round_trip():
    plan = MergePlan(8, ((1, 3), (5, 6)), "mean", "output", 0.72)
    d = plan.to_json()
    assert d == {
        "num_layers_before": 8,
        "num_layers_after": 5,
        "windows": [[1, 3], [5, 6]],
        "rule": "mean",
        "criterion": "output",
        "threshold": 0.72,
        "index_map": [0, 1, 1, 1, 2, 3, 3, 4],
    }
    back = MergePlan.from_json(json.loads(json.dumps(d)))
    assert back == plan
    assert back.windows == ((1, 3), (5, 6))  # lists from JSON become tuples


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"index_map": [0, 1, 1, 1, 2, 3, 4, 4]}, r"index_map .* does not match"),
        ({"num_layers_after": 6}, r"num_layers_after=6 .*leave 5 of 8"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"windows": [[1, 3], [2, 6]]}, r"sorted ascending and disjoint"),
    ],
)
def test_merge_plan_from_json_rejects_inconsistent(edit, message):
    d = MergePlan(8, ((1, 3), (5, 6)), "sum", "cka", 0.9).to_json()
    d.update(edit)
    with pytest.raises(PlanError, match=message):
        MergePlan.from_json(d)


def test_merge_plan_from_json_missing_key():
    d = MergePlan(8, ((1, 3),), "sum", "cka", 0.9).to_json()
    del d["rule"]
    with pytest.raises(PlanError, match=r"missing keys \['rule'\]"):
        MergePlan.from_json(d)


def test_layer_plan_json_round_trip_and_load_plan(tmp_path):
    """A compare method's plan.json (it names its method and the removed layers) reads back as the same
    baseline plan, through run_state.load_plan as `slm-dist merge` reads it, corrections included."""
    from slm_dist.run_state import load_plan

    inner = MergePlan(8, ((1, 3), (5, 6)), "drop", "cka", None, corrections="fix.safetensors",
                      corrections_sha256="ab" * 32)
    plan = LayerPlan("sleb_pool", inner, {"fit": "pool"})
    d = json.loads(json.dumps(plan.to_json()))
    assert d["criterion"] == "sleb_pool" and d["removed"] == [2, 3, 6]
    back = LayerPlan.from_json(d)
    assert back == plan and back.details == {"fit": "pool"} and back.corrections == "fix.safetensors"
    (tmp_path / "plan.json").write_text(json.dumps(d))
    loaded = load_plan(tmp_path)
    assert loaded == plan and loaded.criterion == "sleb_pool" and loaded.new_to_old == inner.new_to_old


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"removed": [2, 3]}, r"says removed=\[2, 3\] but its windows .* remove \[2, 3, 6\]"),
        ({"criterion": "cka"}, r"names its method twice .*criterion='cka'"),
        ({"details": [1]}, r"\"details\" must be an object"),
        ({"index_map": [0, 1, 1, 1, 2, 3, 3, 3]}, r"index_map .* does not match"),
    ],
)
def test_layer_plan_from_json_rejects_inconsistent(edit, message):
    d = LayerPlan("sleb", MergePlan(8, ((1, 3), (5, 6)), "drop", "cka", None)).to_json()
    d.update(edit)
    with pytest.raises(PlanError, match=message):
        LayerPlan.from_json(d)


@pytest.mark.parametrize(
    "n, windows, rule, criterion, message",
    [
        (8, ((1, 3), (3, 5)), "sum", "cka", r"\[1, 3\] is followed by \[3, 5\]"),
        (8, ((4, 5), (1, 2)), "sum", "cka", r"sorted ascending"),
        (8, ((2, 2),), "sum", "cka", r"at least two layers"),
        (8, ((5, 8),), "sum", "cka", r"\[5, 8\] is outside .*0..7"),
        (8, ((-1, 2),), "sum", "cka", r"outside"),
        (8, ((1, 2, 3),), "sum", "cka", r"pair"),
        (8, ((1.5, 3),), "sum", "cka", r"integer"),
        (0, (), "sum", "cka", r"num_layers_before must be >= 1"),
        (8, ((1, 3),), "average", "cka", r"unknown merge rule 'average'.*reference"),
        (8, ((1, 3),), "sum", "cosine", r"unknown criterion 'cosine'"),
    ],
)
def test_merge_plan_validation(n, windows, rule, criterion, message):
    with pytest.raises(PlanError, match=message):
        MergePlan(n, windows, rule, criterion, 0.5)
