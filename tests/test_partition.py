"""Layer partition: contiguous balanced slices, memory budget errors, bytes from config.json alone."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from slm_dist.checkpoint.index import open_index
from slm_dist.config import load_config
from slm_dist.context import index_model_bytes, stage_specs
from slm_dist.core.partition import (
    PartitionError,
    balanced_slices,
    model_bytes_from_config,
    partition_layers,
    stages_needed,
)
from slm_dist.testing import make_tiny_model

# Llama-3-70B's config.json as published (weights not needed: only shapes matter here).
LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
# By hand, bf16 (2 bytes): q, o 8192x8192; k, v 1024x8192 (8 KV heads x 128); gate, up, down 8192x28672;
# two norms of 8192.
L70 = 2 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192)  # 1_711_308_800
E70 = 2 * 128256 * 8192                                                       # embeddings
H70 = 2 * 128256 * 8192 + 2 * 8192                                            # lm_head + final norm
GiB = 2**30


def loads(layer_bytes, slices, first=0, last=0):
    out = [sum(layer_bytes[a:b]) for a, b in slices]
    out[0] += first
    out[-1] += last
    return out


def brute_force_best(layer_bytes, num_stages, first, last) -> int:
    """Smallest possible largest stage over every contiguous split into num_stages non-empty slices."""
    n = len(layer_bytes)
    best = None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0, *cuts, n)
        slices = list(zip(bounds, bounds[1:]))
        worst = max(loads(layer_bytes, slices, first, last))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("layer_bytes, stages, first, last, expected", [
    ([1] * 8, 1, 0, 0, [(0, 8)]),
    ([1] * 8, 2, 0, 0, [(0, 4), (4, 8)]),
    ([1] * 8, 3, 0, 0, [(0, 3), (3, 5), (5, 8)]),               # max 3 layers, the middle one lighter
    ([1] * 4, 4, 0, 0, [(0, 1), (1, 2), (2, 3), (3, 4)]),        # one layer per stage
    ([1] * 6, 2, 2, 2, [(0, 3), (3, 6)]),                          # loads 5, 5
    ([5, 1, 1, 1, 1, 5], 2, 0, 0, [(0, 3), (3, 6)]),               # loads 7, 7
    ([1, 1, 1, 1], 2, 0, 10, [(0, 3), (3, 4)]),                    # a heavy lm_head: last stage gets 1 layer
    ([1, 1, 1, 1], 2, 10, 0, [(0, 1), (1, 4)]),                    # heavy embeddings: first stage gets 1 layer
    ([L70] * 80, 8, E70, H70, [(0, 9), (9, 20), (20, 31), (31, 42), (42, 53), (53, 64), (64, 71), (71, 80)]),
    ([L70] * 80, 4, E70, H70, [(0, 19), (19, 40), (40, 61), (61, 80)]),
    ([L70] * 80, 2, E70, H70, [(0, 40), (40, 80)]),
])
def test_partition_table(layer_bytes, stages, first, last, expected):
    slices = partition_layers(layer_bytes, stages, None, first, last)
    assert slices == expected
    if len(layer_bytes) <= 12:
        assert max(loads(layer_bytes, slices, first, last)) == brute_force_best(layer_bytes, stages, first, last)


def test_llama3_70b_bytes_from_config_json_alone(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_70B))  # no weights in the folder
    sizes = model_bytes_from_config(json.loads((tmp_path / "config.json").read_text()), bytes_per_element=2)
    assert L70 == 1_711_308_800
    assert sizes.layers == (L70,) * 80
    assert (sizes.first_extra, sizes.last_extra) == (E70, H70)
    assert sizes.total == 2 * 70_553_706_496  # Llama-3-70B's parameter count, in bf16 bytes
    # Optimal largest stage by hand: middle stages hold at most 11 layers below a cap of 11 L, the two
    # end stages 9 (E + 9 L < 11 L < E + 10 L), so 9 + 6 * 11 + 9 >= 80 fits and 10-layer caps do not.
    slices = partition_layers(sizes.layers, 8, None, sizes.first_extra, sizes.last_extra)
    assert max(loads(sizes.layers, slices, E70, H70)) == 11 * L70
    # Two stages: 40 layers each, the lm_head stage is the larger by the final norm.
    two = partition_layers(sizes.layers, 2, None, sizes.first_extra, sizes.last_extra)
    assert max(loads(sizes.layers, two, E70, H70)) == H70 + 40 * L70


@pytest.mark.parametrize("stages, budget, needed_stages", [
    (1, 80 * GiB, 2),   # one 80 GiB device: two would hold it (H + 40 L = 70.6 GB each)
    (8, 16 * GiB, 9),   # 16 GiB = 10.04 L: middle 10 layers, ends 8 -> 8 stages hold 76 layers, 9 hold 86
])
def test_70b_that_cannot_fit_fails_with_needed_available_and_fitting_stage_count(stages, budget, needed_stages):
    with pytest.raises(PartitionError) as err:
        partition_layers([L70] * 80, stages, budget, E70, H70)
    msg = str(err.value)
    assert str(80 * L70 + E70 + H70) in msg          # bytes needed
    assert str(stages * budget) in msg               # bytes available
    assert f"{needed_stages} stages of this size would fit" in msg
    assert stages_needed([L70] * 80, budget, E70, H70) == needed_stages
    partition_layers([L70] * 80, needed_stages, budget, E70, H70)  # and that many do fit


def test_70b_fits_8_stages_of_20_gib():
    slices = partition_layers([L70] * 80, 8, 20 * GiB, E70, H70)
    assert max(loads([L70] * 80, slices, E70, H70)) <= 20 * GiB


def test_heavy_lm_head_counts_against_the_budget():
    # Everything fits one stage by layer bytes, but the stage holding lm_head needs 1 + 10 > 5.
    with pytest.raises(PartitionError, match="no number of stages fits"):
        partition_layers([1, 1], 2, 5, 0, 10)


def test_optimal_against_brute_force_on_random_tables():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        layer_bytes = [rng.randint(0, 9) for _ in range(n)]
        stages = rng.randint(1, n)
        first, last = rng.choice([0, 0, rng.randint(0, 12)]), rng.choice([0, 0, rng.randint(0, 12)])
        slices = partition_layers(layer_bytes, stages, None, first, last)
        assert len(slices) == stages
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a < b for a, b in slices) and all(s[1] == t[0] for s, t in zip(slices, slices[1:]))
        best = brute_force_best(layer_bytes, stages, first, last)
        assert max(loads(layer_bytes, slices, first, last)) == best, (layer_bytes, stages, first, last, slices)
        # A budget of exactly the optimum fits; one byte less does not, and says how many would.
        assert partition_layers(layer_bytes, stages, best, first, last) == slices
        if best > 0:
            with pytest.raises(PartitionError):
                partition_layers(layer_bytes, stages, best - 1, first, last)


@pytest.mark.parametrize("stages, msg", [(0, "num_stages must be >= 1"), (9, "more than the model's 8 layers")])
def test_bad_stage_counts(stages, msg):
    with pytest.raises(PartitionError, match=msg):
        partition_layers([1] * 8, stages)


def test_balanced_slices_every_stage_gets_a_layer_even_when_fewer_would_do():
    # Two slices already reach the optimum (100); the widest is split so the third stage has work.
    assert balanced_slices([0, 0, 0, 100], 3) == [(0, 1), (1, 2), (2, 4)]


@pytest.mark.parametrize("model_type, tie, overrides", [
    ("llama", False, {}),
    ("llama", True, {}),
    ("llama", False, {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", False, {}),                      # q/k/v biases always
    ("qwen3", False, {"head_dim": 16}),        # q_norm / k_norm of head_dim
    ("mistral", False, {"head_dim": 4}),       # head_dim not hidden / heads
])
def test_config_bytes_equal_index_bytes(tmp_path: Path, model_type, tie, overrides):
    model = make_tiny_model(tmp_path / "m", model_type=model_type, num_layers=3, hidden=32,
                            tie_word_embeddings=tie, **overrides)
    index = open_index(model)
    config = json.loads((model / "config.json").read_text())
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        from_index = index_model_bytes(index, dtype)
        assert model_bytes_from_config(config, nbytes) == from_index
    # float32 checkpoint computed in float32: the index's own byte counts
    assert index_model_bytes(index, "float32").total == index.total_bytes + (
        4 * 32 * config["vocab_size"] if tie else 0)


def test_stage_specs_refuse_a_model_over_budget_before_loading(tmp_path: Path):
    model = make_tiny_model(tmp_path / "m", num_layers=4, hidden=32)
    index = open_index(model)
    cfg = load_config(None, [f"model.path={model}", "cluster.num_stages=2", "cluster.memory_per_stage_bytes=20000"])
    with pytest.raises(PartitionError, match="stages of this size would fit|no number of stages fits"):
        stage_specs(cfg, index)
    ok = load_config(None, [f"model.path={model}", "cluster.num_stages=2"])
    specs = stage_specs(ok, index)
    assert [(s.start, s.stop) for s in specs] == [(0, 2), (2, 4)]
    assert all(s.device == "cpu" and s.dtype == "float32" for s in specs)
