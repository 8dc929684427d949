"""The merge stage: the plan -> the pruned checkpoint, written shard by shard by a shard runner.

`checkpoint/export.py` is the engine (plan every output shard from headers, check it, write it
resumably); this stage adds what a run needs around it: the disk-space check, the backend's shard
runner, a progress bar, ``<run.dir>/merge.json``, and (for `slm-dist merge`) the verification.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from slm_dist import preflight, progress
from slm_dist.checkpoint.export import ShardRunner, check_disk_space, plan_export, write_export
from slm_dist.checkpoint.index import CheckpointIndex, open_index
from slm_dist.checkpoint.verify import verify_model
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import SlmConfig
from slm_dist.core.planner import MergePlan
from slm_dist.run_state import load_plan

log = logging.getLogger(__name__)


def merge_stage(config: SlmConfig, index: CheckpointIndex, plan: MergePlan, run_jobs: ShardRunner,
                show_progress: bool = True) -> dict:
    """Plan and check the export, check disk space, write (or finish) it with ``run_jobs`` (a
    backend's ``run_shard_jobs``, or `merge_worker.run_jobs_in_threads`), and save
    `<run.dir>/merge.json`; returns that summary."""
    export = plan_export(index, plan, config.output_dir, config.merge.max_shard_bytes)
    check_disk_space(export)
    bar = progress.bar(show_progress, len(export.shards), "merge", "shard")
    start = time.perf_counter()
    try:
        result = write_export(export, run_jobs, max_parallel=config.merge.max_parallel,
                              memory_budget_bytes=config.merge.memory_budget_bytes,
                              allow_pickle=config.model.allow_pickle,
                              on_shard=lambda job, res: bar.update())
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary = {**result.to_json(), "backend": config.cluster.backend, "seconds": round(seconds, 3),
               "shards": len(export.shards), "total_bytes": export.total_bytes}
    config.run.dir.mkdir(parents=True, exist_ok=True)
    write_json(config.run.dir / "merge.json", summary)
    log.info("merge: %d shards written, %d verified from an earlier run; %.2f GB read, %.2f GB written in %.1f s",
             len(result.shards_written), len(result.shards_skipped), result.bytes_read / 1e9,
             result.bytes_written / 1e9, seconds)
    return summary


def merge_from_plan(config: SlmConfig, model_dir: Path, run_jobs: ShardRunner, show_progress: bool = True) -> dict:
    """`slm-dist merge`: the merge stage alone, from ``<run.dir>/plan.json``; returns merge.json's summary.

    Loads no model code and runs no forward pass, so a rerun that finds every shard finished costs
    little more than hashing them.
    """
    plan = load_plan(config.run.dir)
    preflight.require(preflight.merge_problems(config, Path(model_dir), plan.num_layers_after))
    if plan.rule != config.merge.rule:
        log.warning("plan.json says rule %r, the config says merge.rule=%r: merging with the plan's rule",
                    plan.rule, config.merge.rule)
    summary = merge_stage(config, open_index(model_dir, allow_pickle=config.model.allow_pickle), plan, run_jobs,
                          show_progress)
    problems = verify_model(config.output_dir, check_hashes=False)  # hashes were taken as the bytes were written
    if problems:
        raise RuntimeError(f"the written checkpoint {config.output_dir} is inconsistent: {problems}")
    return summary
