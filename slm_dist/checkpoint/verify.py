"""Check a written checkpoint: manifest hashes, index completeness, config consistency."""

from __future__ import annotations

from pathlib import Path

from slm_dist.arch import get_arch
from slm_dist.checkpoint.index import CheckpointError, open_index
from slm_dist.checkpoint.writer import verify_manifest


def verify_model(folder: Path, check_hashes: bool = True) -> list[str]:
    """Every problem found (an empty list means the folder is complete and consistent)."""
    folder = Path(folder)
    problems = verify_manifest(folder) if check_hashes else []
    try:
        index = open_index(folder)
    except CheckpointError as e:
        return problems + [str(e)]
    try:
        arch = get_arch(index.model_type)
    except ValueError as e:
        return problems + [str(e)]
    n = index.num_layers
    present: dict[int, set[str]] = {}
    for key in index.tensors:
        split = arch.split_key(key)
        if split is not None:
            present.setdefault(split[0], set()).add(split[1])
    if sorted(present) != list(range(n)):
        problems.append(f"config.json says num_hidden_layers={n} but the weights hold layers {sorted(present)}")
    for layer, suffixes in sorted(present.items()):
        missing = [s for s in arch.required_suffixes if s not in suffixes]
        if missing:
            problems.append(f"layer {layer} lacks {missing}")
    for key in arch.per_layer_lists:
        value = index.config.get(key)
        if value is not None and len(value) != n:
            problems.append(f"config.json {key} has {len(value)} entries for {n} layers")
    for name in (arch.embed_module + ".weight", arch.final_norm_module + ".weight"):
        if name not in index:
            problems.append(f"{name} is missing")
    return problems
