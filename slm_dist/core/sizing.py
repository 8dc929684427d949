"""Pure: tensor shapes and bytes of a Llama-like checkpoint from its ``config.json`` alone.

A 70B model can be planned before a single weight is downloaded: every tensor's shape follows
from a handful of config fields (hidden size, heads, kv heads, head dim, intermediate size,
vocabulary, tied embeddings, biases). The same ``ModelSizes`` summary is built from a real
checkpoint's headers (``sizes_from_tensors``), so a dry run and a real run partition alike.
No files, devices, Ray or logging here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from slm_dist.arch import ArchSpec

# bytes per element of the dtype names found in config.json (`torch_dtype` / `dtype`) and in our config
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8,
               "F32": 4, "BF16": 2, "F16": 2, "F64": 8}


class SizingError(ValueError):
    """config.json lacks a field the shapes need, or has one we cannot use; says which and the fix."""


@dataclass(frozen=True)
class ModelSizes:
    """Per-layer and fixed byte counts of one checkpoint at one element size."""

    layer_bytes: tuple[int, ...]       # [num_layers] decoder layer i's tensors
    layer_params: tuple[int, ...]      # [num_layers] elements of decoder layer i
    projection_bytes: tuple[int, ...]  # [num_layers] the merged (projection) part of layer i
    first_extra_bytes: int             # embeddings (held by the first stage)
    last_extra_bytes: int              # final norm + lm_head (held by the last stage)
    other_params: int                  # elements outside decoder layers

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.first_extra_bytes + self.last_extra_bytes

    @property
    def total_params(self) -> int:
        return sum(self.layer_params) + self.other_params


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise SizingError(f"unknown dtype {name!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def storage_dtype(config: Mapping) -> str:
    """The dtype the checkpoint is stored in, as config.json states it (float32 when it says nothing)."""
    value = config.get("torch_dtype") or config.get("dtype") or "float32"
    if not isinstance(value, str) or value not in DTYPE_BYTES:
        raise SizingError(f"config.json dtype {value!r} is not one of {sorted(DTYPE_BYTES)}")
    return value


def _field(config: Mapping, name: str) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SizingError(f"config.json field {name!r} must be a positive integer to size the model, got {value!r}")
    return value


def _suffix_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer tensor suffix a Llama-like layer can hold."""
    hidden = _field(config, "hidden_size")
    heads = _field(config, "num_attention_heads")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = _field(config, "intermediate_size")
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "self_attn.q_proj.weight": (q, hidden), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (hidden, q), "self_attn.o_proj.bias": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.gate_proj.bias": (inter,),
        "mlp.up_proj.weight": (inter, hidden), "mlp.up_proj.bias": (inter,),
        "mlp.down_proj.weight": (hidden, inter), "mlp.down_proj.bias": (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,),
    }


def _layer_suffixes(config: Mapping, arch: ArchSpec) -> list[str]:
    """Required suffixes plus the optional ones the config switches on (attention_bias, mlp_bias)."""
    suffixes = list(arch.required_suffixes)
    for suffix in arch.optional_projections + arch.optional_norms:
        if suffix.endswith(".bias"):
            is_mlp = suffix.startswith("mlp.")
            if config.get("mlp_bias" if is_mlp else "attention_bias"):
                suffixes.append(suffix)
        else:
            suffixes.append(suffix)
    return suffixes


def tensor_shapes(config: Mapping, arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor key of the checkpoint and its shape, as ``save_pretrained`` would write them."""
    n = _field(config, "num_hidden_layers")
    hidden = _field(config, "hidden_size")
    vocab = _field(config, "vocab_size")
    table = _suffix_shapes(config)
    shapes: dict[str, tuple[int, ...]] = {f"{arch.embed_module}.weight": (vocab, hidden)}
    for suffix in _layer_suffixes(config, arch):
        if suffix not in table:
            raise SizingError(f"no shape rule for tensor suffix {suffix!r} of model_type {arch.model_type!r}; "
                              "add it to slm_dist/sizing.py")
    for layer in range(n):
        for suffix in _layer_suffixes(config, arch):
            shapes[arch.layer_key(layer, suffix)] = table[suffix]
    shapes[f"{arch.final_norm_module}.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes[f"{arch.lm_head_module}.weight"] = (vocab, hidden)
    return shapes


def sizes_from_tensors(tensors: Iterable[tuple[str, tuple[int, ...], int]], arch: ArchSpec,
                       num_layers: int) -> ModelSizes:
    """Summarise ``(key, shape, nbytes)`` triples into per-layer and fixed byte counts."""
    layer_bytes, layer_params, proj_bytes = [0] * num_layers, [0] * num_layers, [0] * num_layers
    first = last = other_params = 0
    projections = set(arch.projections + arch.optional_projections)
    for key, shape, nbytes in tensors:
        numel = math.prod(shape)
        split = arch.split_key(key)
        if split is not None and split[0] < num_layers:
            layer, suffix = split
            layer_bytes[layer] += nbytes
            layer_params[layer] += numel
            if suffix in projections:
                proj_bytes[layer] += nbytes
            continue
        other_params += numel
        if key.startswith(arch.embed_module):
            first += nbytes
        else:
            last += nbytes
    return ModelSizes(tuple(layer_bytes), tuple(layer_params), tuple(proj_bytes), first, last, other_params)


def sizes_from_config(config: Mapping, arch: ArchSpec, bytes_per_element: int) -> ModelSizes:
    """``ModelSizes`` of the checkpoint ``config`` describes, every tensor at ``bytes_per_element``."""
    shapes = tensor_shapes(config, arch)
    triples = ((k, s, math.prod(s) * bytes_per_element) for k, s in shapes.items())
    return sizes_from_tensors(triples, arch, _field(config, "num_hidden_layers"))


def rescale(sizes: ModelSizes, from_bytes: int, to_bytes: int) -> ModelSizes:
    """The same model at another element size (stored in float32, computed in bfloat16, ...)."""
    def f(x: int) -> int:
        return x * to_bytes // from_bytes

    return ModelSizes(tuple(map(f, sizes.layer_bytes)), sizes.layer_params, tuple(map(f, sizes.projection_bytes)),
                      f(sizes.first_extra_bytes), f(sizes.last_extra_bytes), sizes.other_params)
