"""The merge half of the Ray layer: output shard jobs as Ray tasks (`cluster.backend: ray`).

DESIGN.md keeps every `import ray` in `distributed.py`; this module is the merge stage's part of
that layer, kept apart while `distributed.py` is being written, to be folded into it (as a generic
`map_tasks(fn, items, max_parallel, memory_bytes_each)`) later. The tasks run the same plain
`MergeWorker.write_shard` that `export.run_jobs_local` runs in threads, so the two backends write
byte-identical shards.

Scheduling follows Ray's guidance: the shared settings are `ray.put` once, at most
``max_parallel`` tasks are in flight (`ray.wait` frees a slot before the next submit), each task
reserves one CPU and its share of the memory budget, and results come back as they finish.
"""

from __future__ import annotations

import logging
from typing import Sequence

import ray

from slm_dist.config import ClusterSection
from slm_dist.export import OnDone, ShardJob, ShardRunner, WorkerSettings
from slm_dist.workers.merge_worker import MergeWorker, ShardResult

log = logging.getLogger(__name__)


def _write_shard(settings: WorkerSettings, job: ShardJob) -> ShardResult:
    import torch

    torch.set_num_threads(1)  # one CPU per task; see export.run_jobs_local
    worker = MergeWorker(settings.source_dir, settings.allow_pickle, settings.memory_bytes)
    return worker.write_shard(settings.out_dir, job)


def shard_runner(cluster: ClusterSection) -> ShardRunner:
    """A `ShardRunner` for `export.write_export` that runs each shard job as a Ray task."""

    def run(jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int, on_done: OnDone) -> None:
        run_shard_tasks(jobs, settings, max_parallel, on_done, cluster)

    return run


def run_shard_tasks(jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int, on_done: OnDone,
                    cluster: ClusterSection) -> None:
    """Every job as a Ray task, ``max_parallel`` in flight; ``on_done`` runs here as each one lands.

    A task that fails raises its own error type here (a `CheckpointError` stays one), after the
    tasks still running have finished and been recorded. A worker that dies is retried by Ray up
    to ``cluster.max_restarts`` times: a job rewrites its shard from scratch under a temporary name.
    """
    if not jobs:
        return
    started = _connect(cluster)
    try:
        task = ray.remote(_write_shard).options(**_task_resources(settings.memory_bytes),
                                                max_retries=cluster.max_restarts, retry_exceptions=False)
        settings_ref = ray.put(settings)
        queue = list(jobs)
        running: dict[ray.ObjectRef, ShardJob] = {}
        error: BaseException | None = None
        while queue or running:
            while queue and error is None and len(running) < max_parallel:
                job = queue.pop(0)
                running[task.remote(settings_ref, job)] = job
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                on_done(job, ray.get(ready[0]))
            except ray.exceptions.RayTaskError as e:
                error = error or e.as_instanceof_cause()
            except BaseException as e:  # noqa: BLE001 - re-raised once running tasks settle
                error = error or e
        if error is not None:
            raise error
    finally:
        if started:
            ray.shutdown()


def _task_resources(memory_bytes: int) -> dict[str, float]:
    """One CPU and the job's memory share per task, unless the cluster has none free to give.

    In `slm-dist run` the calibration stage actors may still hold every CPU bundle of a small
    cluster; reserving one then would leave the merge tasks pending forever, so they run
    unreserved (they are short and mostly wait on I/O) and say so.
    """
    free = ray.available_resources()
    wanted = {"num_cpus": 1.0, "memory": float(memory_bytes)}
    if free.get("CPU", 0.0) < 1.0 or free.get("memory", 0.0) < memory_bytes:
        log.warning("ray: no free CPU or %.0f MiB of memory for merge tasks (free: %s); running them without a "
                    "reservation", memory_bytes / 2**20, {k: free.get(k) for k in ("CPU", "memory")})
        wanted = {"num_cpus": 0.0}
    return wanted


def _connect(cluster: ClusterSection) -> bool:
    """Join the configured cluster (or the job's, or a private local one); True when this call started Ray."""
    if ray.is_initialized():
        return False
    ray.init(address=cluster.address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    log.info("ray: %s CPUs available for merge tasks", ray.cluster_resources().get("CPU"))
    return True
