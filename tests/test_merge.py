"""Merge rules against hand-computed numbers, key mapping, errors, and real HF state dicts."""

from __future__ import annotations

import pytest
import torch

from slm_dist.arch import get_arch
from slm_dist.core.merge import merge_state_dict, merge_tensor, merge_window
from slm_dist.core.merge_jobs import RULES, MergeError, TensorJob, new_index_map, plan_tensor_jobs, rename_layer_key

LLAMA = get_arch("llama")

# A 3-layer window of 2x2 weights, bottom first. Integers keep every expected value exact.
T0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
T1 = torch.tensor([[2.0, 0.0], [6.0, 4.0]])
T2 = torch.tensor([[6.0, 1.0], [3.0, -2.0]])
WINDOW = [T0, T1, T2]
# sum: t0 + (t1 - t0) + (t2 - t0) = t1 + t2 - t0
SUM = torch.tensor([[7.0, -1.0], [6.0, -2.0]])
# mean: (t0 + t1 + t2) / 3 = [[9, 3], [12, 6]] / 3
MEAN = torch.tensor([[3.0, 1.0], [4.0, 2.0]])


# --------------------------------------------------------------------------------------------
# Rules by hand
# --------------------------------------------------------------------------------------------


def test_reference_takes_top_projection_and_bottom_norm():
    assert torch.equal(merge_tensor(WINDOW, "projection", "reference"), T2)
    assert torch.equal(merge_tensor(WINDOW, "norm", "reference"), T0)


def test_reference_equals_the_published_in_place_loop():
    """What the published code does: merged = copy(lo); merged += theta_k - merged, k = lo+1..hi."""
    gen = torch.Generator().manual_seed(0)
    window = [torch.randn(8, 4, generator=gen) for _ in range(4)]
    merged = window[0].clone()
    for theta in window[1:]:
        merged.data.add_(theta.data - merged.data)  # the telescoping in-place update
    torch.testing.assert_close(merge_tensor(window, "projection", "reference"), merged, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("rule", "expected"), [("sum", SUM), ("mean", MEAN), ("drop", T0)]
)
def test_rules_on_projections_by_hand(rule, expected):
    assert torch.equal(merge_tensor(WINDOW, "projection", rule), expected)


@pytest.mark.parametrize("rule", ["sum", "mean", "drop"])
def test_norms_come_from_bottom_layer(rule):
    assert torch.equal(merge_tensor(WINDOW, "norm", rule), T0)
    assert torch.equal(merge_tensor(WINDOW, "norm", "scaled", alpha=0.7), T0)


def test_scaled_by_hand():
    # t0 + 0.5 * ((t1 - t0) + (t2 - t0)) = t0 + 0.5 * [[6, -3], [3, -6]]
    expected = torch.tensor([[4.0, 0.5], [4.5, 1.0]])
    assert torch.equal(merge_tensor(WINDOW, "projection", "scaled", alpha=0.5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_alpha_0_1_inv_n_equal_drop_sum_mean_exactly(dtype):
    gen = torch.Generator().manual_seed(1)
    window = [torch.randn(16, 8, generator=gen).to(dtype) for _ in range(3)]
    n = len(window)
    pairs = [(0.0, "drop"), (1.0, "sum"), (1.0 / n, "mean")]
    for alpha, rule in pairs:
        scaled = merge_tensor(window, "projection", "scaled", alpha=alpha)
        assert torch.equal(scaled, merge_tensor(window, "projection", rule)), (alpha, rule)


def test_bf16_is_computed_in_float32_and_rounded_once():
    # bf16-exact inputs. In float32: 1.0078125 + 2 * (256 - 1.0078125) = 510.9921875, which
    # rounds to 510 in bf16 (spacing 2 in [256, 512)). Doing the arithmetic in bf16 rounds
    # 511.0... on the way and lands on 512, so this test tells the two apart.
    window = [torch.tensor([1.0078125, 1.0]), torch.tensor([256.0, 1.0078125]), torch.tensor([256.0, 1.0078125])]
    bf16 = [t.to(torch.bfloat16) for t in window]
    naive = bf16[0] + (bf16[1] - bf16[0]) + (bf16[2] - bf16[0])
    assert naive[0].item() == 512.0  # the bug this guards against

    out = merge_tensor(bf16, "projection", "sum")
    assert out.dtype == torch.bfloat16
    expected_f32 = torch.tensor([510.9921875, 1.0 + 2 * 0.0078125])  # hand computation in float32
    assert torch.equal(out, expected_f32.to(torch.bfloat16))
    assert out[0].item() == 510.0

    mean = merge_tensor(bf16, "projection", "mean")
    # (1.0078125 + 256 + 256) / 3 = 171.00260416..., (1 + 2 * 1.0078125) / 3 = 1.00520833...
    expected_mean = torch.tensor([513.0078125 / 3, 3.015625 / 3]).to(torch.bfloat16)
    assert mean.dtype == torch.bfloat16
    assert torch.equal(mean, expected_mean)


def test_output_is_fresh_contiguous_and_keeps_dtype():
    base = torch.arange(12.0).reshape(3, 4)
    window = [base.t(), (base + 1).t()]  # non-contiguous views
    for rule in RULES:
        alpha = 0.5 if rule == "scaled" else None
        for role in ("projection", "norm"):
            out = merge_tensor(window, role, rule, alpha)
            assert out.is_contiguous() and out.dtype == torch.float32 and out.shape == (4, 3)
            assert all(out.data_ptr() != t.data_ptr() for t in window)
            before = out.clone()
            base.add_(100.0)  # later writes to the inputs must not show in the output
            assert torch.equal(out, before)


def test_single_layer_window_is_identity():
    for rule in RULES:
        alpha = 0.3 if rule == "scaled" else None
        assert torch.equal(merge_tensor([T0], "projection", rule, alpha), T0)


def test_merge_window_by_hand():
    layers = [{"w": t, "n": t * 10} for t in WINDOW]
    roles = {"w": "projection", "n": "norm"}.__getitem__
    out = merge_window(layers, "sum", roles)
    assert list(out) == ["w", "n"]
    assert torch.equal(out["w"], SUM)
    assert torch.equal(out["n"], T0 * 10)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_rule_lists_the_rules():
    with pytest.raises(MergeError) as err:
        merge_tensor(WINDOW, "projection", "average")
    for rule in RULES:
        assert rule in str(err.value)
    with pytest.raises(MergeError, match="'average'"):
        plan_tensor_jobs(_llama_keys(2), [], 2, LLAMA, "average")


def test_dtype_clash_names_keys_and_dtypes():
    keys = ["model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(MergeError) as err:
        merge_tensor([T0, T1.to(torch.bfloat16)], "projection", "sum", keys=keys)
    msg = str(err.value)
    assert all(k in msg for k in keys) and "torch.float32" in msg and "torch.bfloat16" in msg

    sd = _fake_state_dict(LLAMA, 4)
    sd["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.2.mlp.up_proj.weight"].half()
    with pytest.raises(MergeError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: torch\.float16"):
        merge_state_dict(sd, [(1, 2)], 4, LLAMA, "sum")


def test_shape_clash_names_shapes():
    with pytest.raises(MergeError, match=r"\(2, 2\).*\(3, 2\)"):
        merge_tensor([T0, torch.zeros(3, 2)], "projection", "mean")


def test_alpha_only_and_always_for_scaled():
    with pytest.raises(MergeError, match="needs alpha"):
        merge_tensor(WINDOW, "projection", "scaled")
    with pytest.raises(MergeError, match="only used by rule 'scaled'"):
        merge_tensor(WINDOW, "projection", "sum", alpha=1.0)
    with pytest.raises(MergeError, match="finite"):
        merge_tensor(WINDOW, "projection", "scaled", alpha=float("nan"))


def test_empty_window_rejected():
    with pytest.raises(MergeError, match="no tensors"):
        merge_tensor([], "projection", "sum")


def test_missing_suffix_in_window_member_names_the_key():
    # Optional biases: the bottom has one, a window member does not.
    keys = _llama_keys(4) + ["model.layers.1.self_attn.q_proj.bias"]
    with pytest.raises(MergeError, match=r"model\.layers\.2\.self_attn\.q_proj\.bias"):
        plan_tensor_jobs(keys, [(1, 2)], 4, LLAMA, "sum")
    # ... and the other way round: a member has a bias the bottom lacks.
    keys = _llama_keys(4) + ["model.layers.2.self_attn.q_proj.bias"]
    with pytest.raises(MergeError, match=r"model\.layers\.2\.self_attn\.q_proj\.bias"):
        plan_tensor_jobs(keys, [(1, 2)], 4, LLAMA, "sum")


def test_missing_required_suffix_names_the_key():
    keys = [k for k in _llama_keys(4) if k != "model.layers.3.post_attention_layernorm.weight"]
    with pytest.raises(MergeError, match=r"model\.layers\.3\.post_attention_layernorm\.weight"):
        plan_tensor_jobs(keys, [(1, 2)], 4, LLAMA, "sum")


def test_layer_index_out_of_range_and_unknown_suffix():
    with pytest.raises(MergeError, match=r"model\.layers\.4\..*num_layers=4"):
        plan_tensor_jobs(_llama_keys(5), [], 4, LLAMA, "sum")
    with pytest.raises(ValueError, match="rotary_emb.inv_freq"):
        plan_tensor_jobs(_llama_keys(2) + ["model.layers.0.self_attn.rotary_emb.inv_freq"], [], 2, LLAMA, "sum")
    with pytest.raises(MergeError, match="layer 9"):
        rename_layer_key("model.layers.9.mlp.up_proj.weight", [0, 1, 2], LLAMA)


@pytest.mark.parametrize(
    ("windows", "match"),
    [
        ([(1, 3), (3, 4)], "overlap"),
        ([(2, 1)], "0 <= lo < hi"),
        ([(2, 2)], "at least 2 layers"),
        ([(4, 6)], "num_layers=6"),
        ([(-1, 1)], "0 <= lo < hi"),
    ],
)
def test_bad_windows_rejected(windows, match):
    with pytest.raises(MergeError, match=match):
        plan_tensor_jobs(_llama_keys(6), windows, 6, LLAMA, "sum")


def test_per_window_alpha_must_cover_the_windows():
    sd = _fake_state_dict(LLAMA, 6)
    with pytest.raises(MergeError, match=r"missing \[\(3, 4\)\]"):
        merge_state_dict(sd, [(1, 2), (3, 4)], 6, LLAMA, "scaled", alpha={(1, 2): 0.5})
    with pytest.raises(MergeError, match="only used by rule 'scaled'"):
        merge_state_dict(sd, [(1, 2)], 6, LLAMA, "sum", alpha={(1, 2): 0.5})


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "windows", "expected"),
    [
        (6, [(1, 2), (3, 4)], [0, 1, 1, 2, 2, 3]),
        (6, [], [0, 1, 2, 3, 4, 5]),
        (6, [(0, 5)], [0, 0, 0, 0, 0, 0]),
        (8, [(5, 7), (1, 3)], [0, 1, 1, 1, 2, 3, 3, 3]),
    ],
)
def test_new_index_map(num_layers, windows, expected):
    assert new_index_map(num_layers, windows) == expected


def test_plan_on_six_llama_layers():
    keys = _llama_keys(6)
    jobs = plan_tensor_jobs(reversed(keys), [(1, 2), (3, 4)], 6, LLAMA, "sum")
    by_out = {job.out_key: job for job in jobs}
    assert len(by_out) == len(jobs)  # output keys unique

    # Every source key is consumed by exactly one job.
    consumed = [k for job in jobs for k in job.source_keys]
    assert sorted(consumed) == sorted(keys)

    # New layers are 0..3, each with the full llama suffix set.
    new_layers = {LLAMA.split_key(k)[0] for k in by_out if LLAMA.split_key(k)}
    assert new_layers == {0, 1, 2, 3}
    assert len(by_out) == 3 + 4 * len(LLAMA.required_suffixes)

    q = "self_attn.q_proj.weight"
    norm = "input_layernorm.weight"
    assert by_out[f"model.layers.0.{q}"] == TensorJob(f"model.layers.0.{q}", (f"model.layers.0.{q}",), "projection", "copy", None)
    assert by_out[f"model.layers.1.{q}"] == TensorJob(
        f"model.layers.1.{q}", (f"model.layers.1.{q}", f"model.layers.2.{q}"), "projection", "sum", (1, 2)
    )
    assert by_out[f"model.layers.2.{norm}"] == TensorJob(
        f"model.layers.2.{norm}", (f"model.layers.3.{norm}", f"model.layers.4.{norm}"), "norm", "sum", (3, 4)
    )
    assert by_out[f"model.layers.3.{q}"].source_keys == (f"model.layers.5.{q}",)
    assert by_out["lm_head.weight"] == TensorJob("lm_head.weight", ("lm_head.weight",), None, "copy", None)

    # Order: non-layer keys first (sorted), then (new layer, suffix).
    out_keys = [job.out_key for job in jobs]
    assert out_keys[:3] == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    layer_order = [LLAMA.split_key(k) for k in out_keys[3:]]
    assert layer_order == sorted(layer_order)

    # The plan depends on the key set, not on the order it was listed in.
    assert plan_tensor_jobs(keys, [(3, 4), (1, 2)], 6, LLAMA, "sum") == jobs


def test_rename_round_trips_through_index_map():
    index_map = new_index_map(6, [(1, 2), (3, 4)])
    for old, new in [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]:
        key = f"model.layers.{old}.mlp.down_proj.weight"
        assert rename_layer_key(key, index_map, LLAMA) == f"model.layers.{new}.mlp.down_proj.weight"
    assert rename_layer_key("model.embed_tokens.weight", index_map, LLAMA) == "model.embed_tokens.weight"
    # Every job's out key is the rename of its first (bottom) source key.
    for job in plan_tensor_jobs(_llama_keys(6), [(1, 2), (3, 4)], 6, LLAMA, "mean"):
        assert rename_layer_key(job.source_keys[0], index_map, LLAMA) == job.out_key


def test_qwen2_biases_are_merged_as_projections():
    qwen2 = get_arch("qwen2")
    jobs = {j.out_key: j for j in plan_tensor_jobs(_arch_keys(qwen2, 4), [(1, 3)], 4, qwen2, "mean")}
    bias = jobs["model.layers.1.self_attn.k_proj.bias"]
    assert bias.role == "projection"
    assert bias.source_keys == tuple(f"model.layers.{i}.self_attn.k_proj.bias" for i in (1, 2, 3))
    assert "model.layers.2.self_attn.k_proj.bias" not in jobs


def test_qwen3_qk_norms_are_norms():
    qwen3 = get_arch("qwen3")
    jobs = {j.out_key: j for j in plan_tensor_jobs(_arch_keys(qwen3, 4), [(0, 1)], 4, qwen3, "sum")}
    for name in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        assert jobs[f"model.layers.0.{name}"].role == "norm"
        assert jobs[f"model.layers.0.{name}"].source_keys == (f"model.layers.0.{name}", f"model.layers.1.{name}")
    assert {k for k in jobs if k.startswith("model.layers.")} == {
        qwen3.layer_key(i, s) for i in range(3) for s in qwen3.required_suffixes
    }


# --------------------------------------------------------------------------------------------
# Real transformers models
# --------------------------------------------------------------------------------------------


def _tiny_config(name: str, num_layers: int):
    import transformers

    config_cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[name]
    return getattr(transformers, config_cls)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, head_dim=8,
    )


def _tiny_model(name: str, num_layers: int, seed: int = 0):
    import transformers

    model_cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(_tiny_config(name, num_layers))
    with torch.no_grad():  # random norms and biases, so "bottom" vs "top" vs "sum" differ
        for key, tensor in model.state_dict().items():
            if key.endswith("norm.weight") or key.endswith(".bias"):
                tensor.normal_()
    return model


@pytest.mark.parametrize("rule", RULES)
def test_llama_state_dict_loads_strict_and_matches_hand_rule(rule):
    import transformers

    source = _tiny_model("llama", 6)
    sd = source.state_dict()
    alpha = 0.25 if rule == "scaled" else None
    merged = merge_state_dict(sd, [(1, 2), (3, 4)], 6, LLAMA, rule, alpha)

    pruned = transformers.LlamaForCausalLM(_tiny_config("llama", 4))
    pruned.load_state_dict(merged, strict=True)

    q, up, norm = "self_attn.q_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight"

    def layer(i: int, suffix: str) -> torch.Tensor:
        return sd[f"model.layers.{i}.{suffix}"].float()

    for new, (lo, hi) in [(1, (1, 2)), (2, (3, 4))]:
        for suffix in (q, up):
            window = [layer(i, suffix) for i in range(lo, hi + 1)]
            expected = {
                "reference": window[-1],
                "sum": window[0] + (window[1] - window[0]),
                "mean": (window[0] + window[1]) / 2,
                "drop": window[0],
                "scaled": window[0] + 0.25 * (window[1] - window[0]),
            }[rule]
            torch.testing.assert_close(merged[f"model.layers.{new}.{suffix}"], expected, rtol=0, atol=1e-6)
        assert torch.equal(merged[f"model.layers.{new}.{norm}"], sd[f"model.layers.{lo}.{norm}"])
    # Kept layers and non-layer tensors are copied unchanged (old 0 -> 0, old 5 -> 3).
    assert torch.equal(merged[f"model.layers.0.{q}"], sd[f"model.layers.0.{q}"])
    assert torch.equal(merged[f"model.layers.3.{q}"], sd[f"model.layers.5.{q}"])
    assert torch.equal(merged["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert all(merged[k].data_ptr() != v.data_ptr() for k, v in sd.items() if k in merged)


def test_drop_model_equals_model_without_the_window_layers():
    """Property: rule 'drop' gives exactly the model with layers lo+1..hi deleted."""
    source = _tiny_model("llama", 6).eval()
    merged = merge_state_dict(source.state_dict(), [(1, 2), (3, 4)], 6, LLAMA, "drop")
    import transformers

    pruned = transformers.LlamaForCausalLM(_tiny_config("llama", 4)).eval()
    pruned.load_state_dict(merged, strict=True)
    source.model.layers = torch.nn.ModuleList([source.model.layers[i] for i in (0, 1, 3, 5)])
    for i, block in enumerate(source.model.layers):
        block.self_attn.layer_idx = i
    source.config.num_hidden_layers = 4
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_per_window_alpha_on_llama():
    sd = _tiny_model("llama", 6).state_dict()
    merged = merge_state_dict(sd, [(1, 2), (3, 4)], 6, LLAMA, "scaled", alpha={(1, 2): 0.0, (3, 4): 1.0})
    dropped = merge_state_dict(sd, [(1, 2), (3, 4)], 6, LLAMA, "drop")
    summed = merge_state_dict(sd, [(1, 2), (3, 4)], 6, LLAMA, "sum")
    key = "mlp.down_proj.weight"
    assert torch.equal(merged[f"model.layers.1.{key}"], dropped[f"model.layers.1.{key}"])
    assert torch.equal(merged[f"model.layers.2.{key}"], summed[f"model.layers.2.{key}"])
    assert not torch.equal(merged[f"model.layers.2.{key}"], dropped[f"model.layers.2.{key}"])


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_qwen_state_dicts_load_strict(name):
    import transformers

    arch = get_arch(name)
    sd = _tiny_model(name, 5).state_dict()
    merged = merge_state_dict(sd, [(1, 3)], 5, arch, "sum")
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[name]
    model_cls(_tiny_config(name, 3)).load_state_dict(merged, strict=True)

    # Projections (qwen2's biases included) are summed; norms (qwen3's q/k norms included) are the bottom's.
    for suffix in arch.required_suffixes:
        window = [sd[f"model.layers.{i}.{suffix}"] for i in (1, 2, 3)]
        if arch.role(suffix) == "projection":
            expected = window[0] + (window[1] - window[0]) + (window[2] - window[0])
            torch.testing.assert_close(merged[f"model.layers.1.{suffix}"], expected, rtol=0, atol=1e-5)
        else:
            assert torch.equal(merged[f"model.layers.1.{suffix}"], window[0])
    if name == "qwen2":
        assert arch.role("self_attn.q_proj.bias") == "projection"
        assert "model.layers.1.self_attn.q_proj.bias" in merged
    else:
        assert arch.role("self_attn.q_norm.weight") == "norm"
        # Distinct random q-norms per layer, so taking the bottom one is a real choice.
        assert not torch.equal(sd["model.layers.1.self_attn.q_norm.weight"], sd["model.layers.3.self_attn.q_norm.weight"])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _arch_keys(arch, num_layers: int) -> list[str]:
    non_layer = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return non_layer + [arch.layer_key(i, s) for i in range(num_layers) for s in arch.required_suffixes]


def _llama_keys(num_layers: int) -> list[str]:
    return _arch_keys(LLAMA, num_layers)


def _fake_state_dict(arch, num_layers: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {key: torch.randn(2, 2, generator=gen) for key in _arch_keys(arch, num_layers)}
