"""Pure: split decoder layers into contiguous, balanced stage slices that fit each stage's memory.

A stage's load is the bytes of its layers, plus the embeddings on the first stage and the final
norm + lm_head on the last. ``partition_layers`` minimises the largest load over all contiguous
splits into exactly ``num_stages`` non-empty slices (binary search on the cap, with an exact
feasibility test), and refuses a model that cannot fit before anything is loaded.
``model_bytes_from_config`` gives those byte counts from ``config.json`` alone, so a 70B plan can be
checked on a laptop without its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

# bytes per element of the compute dtypes a stage can hold
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PartitionError(ValueError):
    pass


@dataclass(frozen=True)
class ModelBytes:
    """Bytes a stage holds for each part of the model, in the stage's compute dtype."""

    layers: tuple[int, ...]  # per decoder layer
    first_extra: int         # embeddings (first stage)
    last_extra: int          # final norm + lm_head (last stage)

    @property
    def total(self) -> int:
        return sum(self.layers) + self.first_extra + self.last_extra


def _stage_loads(layer_bytes: Sequence[int], slices: Sequence[tuple[int, int]], first_extra: int,
                 last_extra: int) -> list[int]:
    loads = [sum(layer_bytes[a:b]) for a, b in slices]
    loads[0] += first_extra
    loads[-1] += last_extra
    return loads


def _fewest_slices(layer_bytes: Sequence[int], cap: int, first_extra: int) -> list[tuple[int, int]] | None:
    """Greedy fill of ``layer_bytes`` under ``cap`` (first slice carries ``first_extra``): the fewest
    contiguous slices, or None when one layer alone does not fit."""
    slices, start, used = [], 0, first_extra
    for i, b in enumerate(layer_bytes):
        if used + b > cap:
            if i == start:
                return None
            slices.append((start, i))
            start, used = i, 0
            if b > cap:
                return None
        used += b
    slices.append((start, len(layer_bytes)))
    return slices


def _fit(layer_bytes: Sequence[int], num_stages: int, cap: int, first_extra: int,
         last_extra: int) -> list[tuple[int, int]] | None:
    """Contiguous slices, at most ``num_stages``, each stage's load <= ``cap``; None if impossible.

    The last slice takes the longest suffix that fits with ``last_extra`` (a shorter prefix never
    needs more slices), the prefix is filled greedily (optimal for a prefix).
    """
    n = len(layer_bytes)
    if num_stages == 1:
        return [(0, n)] if sum(layer_bytes) + first_extra + last_extra <= cap else None
    suffix, j = last_extra, n
    while j > 1 and suffix + layer_bytes[j - 1] <= cap:
        suffix += layer_bytes[j - 1]
        j -= 1
    if j == n:
        return None  # the last layer plus lm_head alone exceeds the cap
    head = _fewest_slices(layer_bytes[:j], cap, first_extra)
    if head is None or len(head) > num_stages - 1:
        return None
    return head + [(j, n)]


def _split_to(slices: list[tuple[int, int]], num_stages: int) -> list[tuple[int, int]]:
    """Split the widest slices until there are ``num_stages``: no stage's load grows (the extras
    stay on the first and last slice), and every stage gets work."""
    slices = list(slices)
    while len(slices) < num_stages:
        k = max(range(len(slices)), key=lambda i: slices[i][1] - slices[i][0])
        a, b = slices[k]
        mid = (a + b) // 2
        slices[k:k + 1] = [(a, mid), (mid, b)]
    return slices


def balanced_slices(layer_bytes: Sequence[int], num_stages: int, first_extra: int = 0,
                    last_extra: int = 0) -> list[tuple[int, int]]:
    """The ``num_stages`` contiguous half-open slices whose largest stage load is smallest."""
    total = sum(layer_bytes) + first_extra + last_extra
    lo = max(max(layer_bytes), -(-total // num_stages))
    hi = total
    while lo < hi:
        mid = (lo + hi) // 2
        if _fit(layer_bytes, num_stages, mid, first_extra, last_extra) is not None:
            hi = mid
        else:
            lo = mid + 1
    best = _fit(layer_bytes, num_stages, lo, first_extra, last_extra)
    assert best is not None  # total always fits one slice, so some cap <= total fits
    return _split_to(best, num_stages)


def stages_needed(layer_bytes: Sequence[int], budget_bytes: int, first_extra_bytes: int = 0,
                  last_extra_bytes: int = 0) -> int | None:
    """Fewest stages of ``budget_bytes`` that hold the model, or None if no count does."""
    for k in range(1, len(layer_bytes) + 1):
        if _fit(layer_bytes, k, budget_bytes, first_extra_bytes, last_extra_bytes) is not None:
            return k
    return None


def partition_layers(layer_bytes: Sequence[int], num_stages: int, budget_bytes: int | None = None,
                     first_extra_bytes: int = 0, last_extra_bytes: int = 0) -> list[tuple[int, int]]:
    """Half-open ``[start, stop)`` slices, one per stage, minimising the largest stage.

    ``first_extra_bytes`` / ``last_extra_bytes`` are what the first stage (embeddings) and the last
    (final norm, lm_head) hold besides layers. With ``budget_bytes`` set, a model that cannot fit is
    refused before anything loads, with the bytes needed, the bytes available and the stage count
    that would fit.
    """
    n = len(layer_bytes)
    if n == 0:
        raise PartitionError("the model has no decoder layers")
    if num_stages < 1:
        raise PartitionError(f"cluster.num_stages must be >= 1, got {num_stages}")
    if num_stages > n:
        raise PartitionError(f"cluster.num_stages={num_stages} is more than the model's {n} layers; "
                             f"use at most {n} stages")
    if any(b < 0 for b in layer_bytes) or first_extra_bytes < 0 or last_extra_bytes < 0:
        raise PartitionError(f"byte counts must be >= 0, got layers {list(layer_bytes)[:8]}..., "
                             f"first {first_extra_bytes}, last {last_extra_bytes}")
    slices = balanced_slices(layer_bytes, num_stages, first_extra_bytes, last_extra_bytes)
    if budget_bytes is not None:
        loads = _stage_loads(layer_bytes, slices, first_extra_bytes, last_extra_bytes)
        if max(loads) > budget_bytes:
            total = sum(layer_bytes) + first_extra_bytes + last_extra_bytes
            would_fit = stages_needed(layer_bytes, budget_bytes, first_extra_bytes, last_extra_bytes)
            fit_msg = (f"{would_fit} stages of this size would fit" if would_fit else
                       "no number of stages fits: one layer (plus the embeddings or lm_head at the ends) "
                       "exceeds one stage")
            raise PartitionError(
                f"the model needs {total} bytes ({total / 2**30:.2f} GiB) of weights but {num_stages} stage(s) of "
                f"{budget_bytes} bytes ({budget_bytes / 2**30:.2f} GiB) give {num_stages * budget_bytes} bytes "
                f"({num_stages * budget_bytes / 2**30:.2f} GiB); the best split's largest stage needs {max(loads)} "
                f"bytes (largest layer {max(layer_bytes)} bytes); {fit_msg}. "
                "Raise cluster.num_stages or cluster.memory_per_stage_bytes.")
    return slices


# ------------------------------------------------------------------------- bytes from config.json
def _layer_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Per-layer tensor suffix -> shape of a Llama-like decoder layer, from config values."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.bias": (heads * head_dim,),
        "self_attn.k_proj.bias": (kv_heads * head_dim,),
        "self_attn.v_proj.bias": (kv_heads * head_dim,),
        "self_attn.o_proj.bias": (hidden,),
        "mlp.gate_proj.bias": (inter,),
        "mlp.up_proj.bias": (inter,),
        "mlp.down_proj.bias": (hidden,),
        "self_attn.q_norm.weight": (head_dim,),
        "self_attn.k_norm.weight": (head_dim,),
    }
    return shapes


def _present_suffixes(config: Mapping, required: Sequence[str], optional: Sequence[str]) -> list[str]:
    """Required tensors always; optional biases when the config switches them on."""
    present = list(required)
    for suffix in optional:
        is_mlp = suffix.startswith("mlp.")
        if config.get("mlp_bias" if is_mlp else "attention_bias", False):
            present.append(suffix)
    return present


def model_bytes_from_config(config: Mapping, bytes_per_element: int) -> ModelBytes:
    """What each part of a Llama-like model weighs, from ``config.json`` values alone (no weights).

    The per-layer tensors are the architecture table's (``arch.py``): its projections and norms,
    plus the optional biases the config switches on (``attention_bias`` / ``mlp_bias``). The last
    stage holds lm_head even when ``tie_word_embeddings`` stores it once, under the embedding.
    """
    from slm_dist.arch import get_arch  # table data, no I/O beyond the packaged JSON

    arch = get_arch(config.get("model_type"))
    required = arch.required_suffixes
    optional = arch.optional_projections + arch.optional_norms
    shapes = _layer_shapes(config)
    unknown = [s for s in [*required, *optional] if s not in shapes]
    if unknown:
        raise PartitionError(f"no shape rule for per-layer tensors {unknown}; model_bytes_from_config knows "
                             f"{sorted(shapes)}. Partition from the checkpoint index instead.")
    per_layer = 0
    for suffix in _present_suffixes(config, required, optional):
        numel = 1
        for d in shapes[suffix]:
            numel *= d
        per_layer += numel * bytes_per_element
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    embed = vocab * hidden * bytes_per_element
    norm = hidden * bytes_per_element
    # A tied lm_head is stored once, but the last stage still holds a copy of it.
    last = norm + vocab * hidden * bytes_per_element
    return ModelBytes(layers=(per_layer,) * int(config["num_hidden_layers"]), first_extra=embed, last_extra=last)


def model_bytes_from_tensors(tensors: Mapping[str, tuple[int, ...]], layer_of, embed_prefix: str,
                             num_layers: int, bytes_per_element: int,
                             lm_head_numel: int | None = None) -> ModelBytes:
    """The same figures from a checkpoint index's shapes (key -> shape), in the compute dtype.

    ``layer_of(key)`` gives a key's layer index or None (``ArchSpec.split_key``); keys under
    ``embed_prefix`` go to the first stage, every other non-layer key to the last. ``lm_head_numel``
    adds a tied lm_head that the index stores only once, under the embedding.
    """
    layers = [0] * num_layers
    first = last = 0
    for key, shape in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * bytes_per_element
        layer = layer_of(key)
        if layer is not None and layer < num_layers:
            layers[layer] += nbytes
        elif key.startswith(embed_prefix):
            first += nbytes
        else:
            last += nbytes
    last += (lm_head_numel or 0) * bytes_per_element
    return ModelBytes(layers=tuple(layers), first_extra=first, last_extra=last)
