"""Per-architecture facts, read from ``architectures.json``.

The table is data, not code: adding a Llama-like architecture means adding an entry, never an
``if "llama" in name`` branch somewhere else. Anything not in the table fails loudly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

Role = Literal["projection", "norm"]


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layer_prefix: str
    projections: tuple[str, ...]
    optional_projections: tuple[str, ...]
    norms: tuple[str, ...]
    optional_norms: tuple[str, ...]
    per_layer_lists: tuple[str, ...]
    per_layer_counts: tuple[str, ...]
    embed_module: str          # module paths inside the *ForCausalLM model
    final_norm_module: str
    lm_head_module: str
    rotary_module: str
    layers_module: str
    # The MLP's output projection: its output adds straight to the residual stream (no norm after
    # it), which is what lets merge.correction=linear fold a fitted map into its weight.
    mlp_out_module: str
    # The gated MLP's gate and up projections (in that order) and the norm before them: act(gate x) *
    # up x feeds mlp_out_module. merge.correction=pool chooses a window's neurons among all of them.
    mlp_in_modules: tuple[str, str]
    mlp_norm: str

    def mlp_in_suffixes(self) -> tuple[str, str]:
        """Weight suffixes of the gate and up projections."""
        return tuple(f"{name}.weight" for name in self.mlp_in_modules)  # type: ignore[return-value]

    def mlp_out_suffixes(self) -> tuple[str, ...]:
        """Per-layer tensor suffixes of ``mlp_out_module`` (weight, and bias where the model has one)."""
        return tuple(f"{self.mlp_out_module}.{name}" for name in ("weight", "bias"))

    @property
    def required_suffixes(self) -> tuple[str, ...]:
        return self.projections + self.norms

    def role(self, suffix: str) -> Role:
        """Merge role of a per-layer tensor suffix; unknown suffixes are an error, never a guess."""
        if suffix in self.projections or suffix in self.optional_projections:
            return "projection"
        if suffix in self.norms or suffix in self.optional_norms:
            return "norm"
        raise UnsupportedArchitectureError(
            f"tensor suffix {suffix!r} is not known for model_type {self.model_type!r}; known: "
            f"{sorted(self.projections + self.optional_projections + self.norms + self.optional_norms)}. "
            "Add it to slm_dist/architectures.json if this variant is Llama-like."
        )

    def layer_key(self, layer: int, suffix: str) -> str:
        return f"{self.layer_prefix}{layer}.{suffix}"

    def split_key(self, key: str) -> tuple[int, str] | None:
        """``model.layers.7.mlp.up_proj.weight`` -> ``(7, "mlp.up_proj.weight")``; None outside layers."""
        m = _layer_regex(self.layer_prefix).match(key)
        if m is None:
            return None
        return int(m.group(1)), m.group(2)


@lru_cache(maxsize=None)
def _layer_regex(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix) + r"(\d+)\.(.+)$")


@lru_cache(maxsize=1)
def _table() -> dict[str, ArchSpec]:
    raw = json.loads(resources.files("slm_dist").joinpath("architectures.json").read_text())
    table = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        table[name] = ArchSpec(model_type=name, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items()})
    return table


def supported_model_types() -> list[str]:
    return sorted(_table())


def get_arch(model_type: str | None) -> ArchSpec:
    table = _table()
    if model_type not in table:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {supported_model_types()}. "
            "slm-dist merges Llama-like decoder layers only."
        )
    return table[model_type]


def prune_config(config: dict, new_to_old: list[int], arch: ArchSpec) -> dict:
    """The source ``config.json`` rewritten for a model whose layer j sits at old layer ``new_to_old[j]``.

    Every per-layer list is re-indexed (transformers 5 rejects a ``layer_types`` longer than
    ``num_hidden_layers``); per-layer counts such as Qwen's ``max_window_layers`` ("layers below this
    index use full attention") become the number of new layers whose origin was below the old count.
    """
    old_n = int(config["num_hidden_layers"])
    if any(not (0 <= i < old_n) for i in new_to_old) or list(new_to_old) != sorted(set(new_to_old)):
        raise ValueError(f"new_to_old must be strictly increasing old layer indices in [0, {old_n}), got {new_to_old}")
    out = dict(config)
    out["num_hidden_layers"] = len(new_to_old)
    for key in arch.per_layer_lists:
        value = config.get(key)
        if value is None:
            continue
        if len(value) != old_n:
            raise ValueError(f"config.json {key} has {len(value)} entries but num_hidden_layers={old_n}; "
                             "fix the source config")
        out[key] = [value[i] for i in new_to_old]
    for key in arch.per_layer_counts:
        value = config.get(key)
        if isinstance(value, int):
            out[key] = sum(1 for i in new_to_old if i < value)
    return out
