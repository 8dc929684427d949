import pytest

from slm_dist.arch import UnsupportedArchitectureError, get_arch, prune_config, supported_model_types


def test_supported_types():
    assert supported_model_types() == ["llama", "mistral", "qwen2", "qwen3"]


def test_unknown_type_lists_supported():
    with pytest.raises(UnsupportedArchitectureError, match=r"'phi3' is not supported; supported: \['llama'"):
        get_arch("phi3")


@pytest.mark.parametrize("model_type,suffix,role", [
    ("llama", "self_attn.q_proj.weight", "projection"),
    ("llama", "input_layernorm.weight", "norm"),
    ("qwen2", "self_attn.k_proj.bias", "projection"),
    ("qwen3", "self_attn.q_norm.weight", "norm"),
    ("mistral", "mlp.down_proj.weight", "projection"),
])
def test_roles(model_type, suffix, role):
    assert get_arch(model_type).role(suffix) == role


def test_unknown_suffix_is_an_error_not_a_guess():
    with pytest.raises(UnsupportedArchitectureError, match="mlp.experts.0.weight"):
        get_arch("llama").role("mlp.experts.0.weight")


def test_split_key():
    arch = get_arch("llama")
    assert arch.split_key("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert arch.split_key("model.embed_tokens.weight") is None
    assert arch.layer_key(3, "input_layernorm.weight") == "model.layers.3.input_layernorm.weight"


def test_prune_config_trims_every_per_layer_entry():
    cfg = {"model_type": "qwen2", "num_hidden_layers": 6, "max_window_layers": 4,
           "layer_types": ["full_attention"] * 4 + ["sliding_attention"] * 2, "hidden_size": 8}
    # windows (1,2) and (4,5): new layers sit at old 0, 1, 3, 4
    out = prune_config(cfg, [0, 1, 3, 4], get_arch("qwen2"))
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["full_attention", "full_attention", "full_attention", "sliding_attention"]
    assert out["max_window_layers"] == 3  # old layers 0, 1, 3 were below 4
    assert out["hidden_size"] == 8 and cfg["num_hidden_layers"] == 6  # input not modified


def test_prune_config_rejects_inconsistent_source():
    cfg = {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 5}
    with pytest.raises(ValueError, match="layer_types has 5 entries but num_hidden_layers=4"):
        prune_config(cfg, [0, 1], get_arch("llama"))
    with pytest.raises(ValueError, match="strictly increasing"):
        prune_config({"num_hidden_layers": 4}, [1, 0], get_arch("llama"))
