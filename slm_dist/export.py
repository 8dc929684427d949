"""The merge stage: plan every output shard from the plan and the source index, check it without
reading weights, then write the pruned checkpoint shard by shard.

Plan, validate, execute: `plan_export` reads only headers and fails on the first problem before a
byte is written; `write_export` runs one job per output shard (in-process here; the Ray backend
maps the same `MergeWorker.write_shard` over tasks) and writes config, index and manifest last.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from slm_dist.arch import ArchSpec, get_arch, prune_config
from slm_dist.checkpoint.index import CheckpointIndex
from slm_dist.checkpoint.writer import (FileRecord, plan_shards, shard_name, write_index, write_json,
                                        write_manifest)
from slm_dist.merge import TensorJob, plan_tensor_jobs
from slm_dist.planner import MergePlan

log = logging.getLogger(__name__)

# Files copied unchanged from the source folder when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
              "chat_template.json")
OUTPUT_MARKER = ".slm-dist-output"


class ExportError(ValueError):
    """The export cannot proceed; names the tensor, file or folder and the fix."""


@dataclass(frozen=True)
class ShardJob:
    name: str
    tensors: tuple[TensorJob, ...]
    nbytes: int


@dataclass(frozen=True)
class ExportPlan:
    source: Path
    out_dir: Path
    plan: MergePlan
    shards: tuple[ShardJob, ...]
    config: dict          # the rewritten config.json
    total_bytes: int

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.out_key: s.name for s in self.shards for t in s.tensors}


def check_output_dir(source: Path, out_dir: Path) -> None:
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    if out == src or src in out.parents:
        raise ExportError(f"output folder {out_dir} is the model folder {source} or inside it; slm-dist never "
                          "writes into its input. Set merge.output_dir (or run.dir) elsewhere.")
    if out.exists() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
        raise ExportError(f"output folder {out_dir} exists, is not empty and was not written by slm-dist; "
                          "choose an empty or new folder")


def plan_export(index: CheckpointIndex, plan: MergePlan, out_dir: Path, max_shard_bytes: int) -> ExportPlan:
    """Every output shard and tensor, validated from headers alone (no weights are read)."""
    arch: ArchSpec = get_arch(index.model_type)
    if plan.num_layers_before != index.num_layers:
        raise ExportError(f"plan is for {plan.num_layers_before} layers but {index.root} has {index.num_layers}; "
                          "the plan belongs to another model: re-run the plan stage")
    check_output_dir(index.root, out_dir)
    jobs = plan_tensor_jobs(index.tensors.keys(), plan.windows, index.num_layers, arch, plan.rule)
    sizes = []
    for job in jobs:
        infos = [index.tensors[k] for k in job.source_keys]
        first = infos[0]
        for other in infos[1:]:
            if (other.dtype, other.shape) != (first.dtype, first.shape):
                raise ExportError(f"cannot merge {other.key} ({other.dtype}{list(other.shape)}) with {first.key} "
                                  f"({first.dtype}{list(first.shape)}) in window {job.window}: shapes and dtypes "
                                  "must agree inside a window")
        sizes.append((job.out_key, first.nbytes))
    out_keys = [j.out_key for j in jobs]
    if len(set(out_keys)) != len(out_keys):
        raise ExportError("two output tensors got the same name; this is a bug in the key plan")
    groups = plan_shards(sizes, max_shard_bytes)
    by_key = {j.out_key: j for j in jobs}
    size_of = dict(sizes)
    n = len(groups)
    shards = tuple(ShardJob(shard_name(k + 1, n), tuple(by_key[key] for key in g), sum(size_of[key] for key in g))
                   for k, g in enumerate(groups))
    config = prune_config(index.config, plan.new_to_old, arch)
    return ExportPlan(Path(index.root), Path(out_dir), plan, shards, config, sum(size_of.values()))


def check_disk_space(export: ExportPlan) -> None:
    probe = export.out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(export.total_bytes * 1.05) + 64 * 1024**2
    if free < needed:
        raise ExportError(f"not enough disk space for {export.out_dir}: need {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free. Free space or choose another merge.output_dir.")


def model_card(export: ExportPlan, threshold: float | None) -> str:
    plan = export.plan
    windows = ", ".join(f"[{lo}..{hi}]" for lo, hi in plan.windows) or "none"
    return (f"# Depth-pruned with slm-dist\n\n"
            f"- source: `{export.source}`\n"
            f"- layers: {plan.num_layers_before} -> {plan.num_layers_after}\n"
            f"- merged windows (inclusive, original indices): {windows}\n"
            f"- merge rule: `{plan.rule}`\n- criterion: `{plan.criterion}`\n- threshold: {threshold}\n\n"
            "Sliding Layer Merging (arXiv 2502.19159): each window of consecutive layers is folded into one "
            "layer at the window's bottom position.\n")


def write_export(export: ExportPlan, write_shard: Callable[[str, ShardJob], FileRecord] | None = None,
                 progress: Callable[[Sequence[ShardJob]], Sequence[ShardJob]] | None = None) -> list[FileRecord]:
    """Write every shard, then side files, config, index and the manifest (in that order)."""
    from slm_dist.workers.merge_worker import MergeWorker

    out = export.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text(json.dumps({"source": str(export.source)}) + "\n")
    if write_shard is None:
        worker = MergeWorker(str(export.source))
        write_shard = lambda out_dir, job: worker.write_shard(out_dir, job)  # noqa: E731
    shards = progress(export.shards) if progress else export.shards
    records = [write_shard(str(out), job) for job in shards]
    for name in SIDE_FILES:
        if (export.source / name).is_file():
            shutil.copyfile(export.source / name, out / name)
            records.append(_record(out / name))
    records.append(write_json_text(out / "README.md", model_card(export, export.plan.threshold)))
    records.append(write_json(out / "config.json", export.config))
    records.append(write_index(out, export.weight_map, export.total_bytes))
    write_manifest(out, records, extra={"source": str(export.source), "plan": export.plan.to_json()})
    return records


def _record(path: Path) -> FileRecord:
    from slm_dist.checkpoint.writer import sha256_file

    return FileRecord(path.name, sha256_file(path), path.stat().st_size)


def write_json_text(path: Path, text: str) -> FileRecord:
    import os

    from slm_dist.checkpoint.writer import partial_name

    tmp = partial_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return _record(path)
