"""The plan stage's checks that run before any forward pass (planning.py)."""

from __future__ import annotations

import pytest

from slm_dist.checkpoint.index import layer_params, layers_for_ratio, open_index
from slm_dist.config import load_config
from slm_dist.core.planner import PlanError
from slm_dist.planning import check_target_feasible
from slm_dist.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny12(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny12") / "model", num_layers=12)


def test_a_window_cap_limits_what_a_target_can_ask_for(tiny12):
    index = open_index(tiny12)
    # 10 mergeable layers (layer 0 and 11 protected) in windows of at most 3: 4 windows, 6 removable.
    config = load_config(None, [f"model.path={tiny12}", "plan.target_layers_removed=6", "plan.max_window=3"])
    check_target_feasible(config, index)
    too_many = load_config(None, [f"model.path={tiny12}", "plan.target_layers_removed=7", "plan.max_window=3"])
    with pytest.raises(PlanError, match=r"target_layers_removed=7 .*max_window=3 can lose at most 6 layers"):
        check_target_feasible(too_many, index)
    # Without the cap the same 7 fit in one window of 8.
    check_target_feasible(load_config(None, [f"model.path={tiny12}", "plan.target_layers_removed=7"]), index)


def test_a_ratio_that_needs_more_layers_than_the_cap_allows_is_refused(tiny12):
    index = open_index(tiny12)
    total, per_layer = layer_params(index)
    seven = 7 * per_layer / total  # the share of the parameters that 7 layers hold
    assert layers_for_ratio(index, seven, 1, 1, None) == 7
    with pytest.raises(PlanError, match="at most 6 can be removed"):
        layers_for_ratio(index, seven, 1, 1, 3)
