"""The Ray backend: the same StageWorkers as the in-process backend, as actors on a placement group.

With ``train.py`` beside it, the only code that imports ``ray``. ``RayBackend`` is a ``Backend``
(base.py) like ``LocalBackend``, so the stages do not care which one they drive; its
``run_shard_jobs`` runs the merge stage's shard jobs as Ray tasks. How a calibration batch moves::

    driver: ray.put(input_ids) once
    stage 0 --h ref--> stage 1 --h ref--> ... stage K-1      (hidden states actor to actor)
       |stats ref         |stats ref             |stats ref
       +------------------+----------------------+--> StatsReducer actor (dedupe by batch id,
                                                      stats.parquet every checkpoint_every batches)

The driver only holds object references and, at the end, the reducer's float64 sums: its memory
does not grow with the model. At most ``cluster.max_inflight`` batches are in flight (``ray.wait``).

Fault tolerance: stage actors restart after a crash (``cluster.max_restarts``; a restart reloads
the stage's layers), and every batch whose results were lost is sent again from stage 0; the
reducer counts a batch once, so a retried batch never counts twice. Batches the reducer lost in
its own crash are found by comparing its counted ids with the batches sent, and sent again. A
rerun after the driver died resumes from ``stats.parquet`` when it was written for the same inputs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from slm_dist import host_memory, logs, progress
from slm_dist.backends.base import StagedScoring, stage_holding
from slm_dist.checkpoint.export import OnDone, ShardJob, ShardResult, WorkerSettings
from slm_dist.config import ClusterSection
from slm_dist.workers.merge_worker import write_shard_job
from slm_dist.workers.stage_worker import StageCacheMissing, StageSpec, StageStats, StageWorker, StatsSpec
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)

# A stage (or the node under it) died: the work is lost but can be sent again.
LOST_WORK = (RayActorError, ObjectLostError)
STATS_FILE = "stats.parquet"


class RayBackendError(RuntimeError):
    """The cluster could not do what the config asked; the message says what and how to fix it."""


# ------------------------------------------------------------------------------- actor bodies
class StageActor(StageWorker):
    """A StageWorker in its own process: torch threads sized to the CPUs its bundle reserved, and a
    report of where it runs and what it holds (for tests and benchmarks).

    Its log records go to its stderr in the driver's format and level (``log_settings``: `logs.current()` on
    the driver); Ray forwards them to the driver and the job log, prefixed with this actor's repr,
    which names the stage and its layers.
    """

    def __init__(self, spec: StageSpec, stats: StatsSpec, num_threads: int, index: int = 0,
                 log_settings: tuple[int, bool] = (logging.INFO, False)):
        self._name = f"stage={index}, layers=[{spec.start},{spec.stop})"  # for __repr__, even if loading fails
        logs.setup_worker(*log_settings)
        torch.set_num_threads(num_threads)
        import accelerate  # noqa: F401  (imported before the baseline so it counts as runtime, not weights)
        import transformers  # noqa: F401

        self._baseline_rss = host_memory.rss_bytes()
        super().__init__(spec, stats)
        self._index, self._said_first = index, False

    # The remote entry points. Hidden states leave a stage on the host: the object store is the
    # portable hop between stages (a GPU transport could replace it behind these methods), and the
    # driver, which may have no GPU, never deserializes a CUDA tensor. The last stage's calibration
    # output feeds nothing, so it is not stored at all. (StageWorker's own methods stay untouched:
    # it calls them internally with device tensors.)
    def calibrate_hop(self, batch_id: int, x: torch.Tensor, cache_inputs: bool = False):
        started = time.perf_counter()
        h, stats = self.calibrate(batch_id, x, cache_inputs)
        if not self._said_first:  # once per actor, after __init__: Ray prefixes it with this actor's repr
            self._said_first = True
            log.info("stage %d: layers [%d, %d), %.1f MiB held; first calibration batch in %.2f s", self._index,
                     self.spec.start, self.spec.stop, self.held_bytes() / 2**20, time.perf_counter() - started)
        # The Grams travel as a numpy array: Ray writes those straight into the object store, where a
        # pickled tensor is first copied whole in the actor's heap (a stage's Grams grow with its layers).
        return (None if self.spec.is_last else h.cpu()), replace(stats, grams=stats.grams.numpy())

    def forward_hop(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).cpu()

    def run_candidate_hop(self, *args, **kwargs) -> torch.Tensor:
        return self.run_candidate(*args, **kwargs).cpu()

    def __repr__(self) -> str:
        return f"StageActor({self._name})"

    def ping(self) -> int:
        return os.getpid()

    def report(self) -> dict:
        cuda_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "start": self.spec.start,
            "stop": self.spec.stop,
            "held_bytes": self.held_bytes(),
            "loaded_keys": self.loaded_keys(),
            "baseline_rss_bytes": self._baseline_rss,  # after importing torch/transformers, before any weight
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "shared_rss_bytes": host_memory.shared_rss_bytes(),  # object-store pages inside that peak (stay mapped)
            "cuda_peak_bytes": cuda_peak,
        }


@dataclass(frozen=True)
class ReducerRun:
    """One calibrate() call as the reducer sees it; sent with every call so that a reducer restarted
    after a crash picks the run up again from its checkpoint on its own."""

    run_id: int                   # new per calibrate() call: fresh sums (or the checkpoint's)
    num_layers: int
    checkpoint_path: str | None   # stats.parquet in the run folder, or None
    checkpoint_every: int
    fingerprint: str              # what the sums come from (inputs_fingerprint)


class ReducerActor:
    """A StatsReducer in its own process, one per backend, checkpointing to ``stats.parquet``.

    A run starts from the checkpoint when that was written for the same inputs (``fingerprint``);
    a checkpoint of other inputs is ignored and overwritten.
    """

    def __init__(self, num_threads: int = 1, log_settings: tuple[int, bool] = (logging.INFO, False)):
        logs.setup_worker(*log_settings)
        torch.set_num_threads(num_threads)
        self.run: ReducerRun | None = None
        self.reducer: StatsReducer | None = None
        self.since_save = 0

    def _for(self, run: ReducerRun) -> StatsReducer:
        if self.run != run:
            self.run, self.since_save = run, 0
            self.reducer = StatsReducer(run.num_layers)
            path = Path(run.checkpoint_path) if run.checkpoint_path else None
            if path is not None and path.is_file():
                saved = StatsReducer.load(path)
                if saved.fingerprint == run.fingerprint and saved.num_layers == run.num_layers:
                    self.reducer = saved
                    log.info("resuming from %s: %d batches already counted", path, saved.num_batches)
                else:
                    log.warning("%s was written for other inputs (model, statistics or batches); starting afresh",
                                path)
        return self.reducer

    def __repr__(self) -> str:
        return "ReducerActor(statistics)"

    def ping(self) -> int:
        return os.getpid()

    def counted(self, run: ReducerRun) -> list[int]:
        return self._for(run).hsic.batch_ids

    def add(self, stats: StageStats, run: ReducerRun) -> bool:
        # The Grams arrive as a read-only numpy view of the object store (calibrate_hop): copy them out.
        completed = self._for(run).add(replace(stats, grams=torch.from_numpy(stats.grams.copy())))
        if completed:
            self.since_save += 1
            if run.checkpoint_path is not None and self.since_save >= run.checkpoint_every:
                self.save(run)
        return completed

    def save(self, run: ReducerRun) -> None:
        if run.checkpoint_path is not None:
            self._for(run).save(Path(run.checkpoint_path), fingerprint=run.fingerprint)
        self.since_save = 0

    def result(self, run: ReducerRun) -> StatsReducer:
        return self._for(run)


# ------------------------------------------------------------------------------------- helpers
def inputs_fingerprint(specs: Sequence[StageSpec], stats: StatsSpec,
                       batches: Sequence[tuple[int, torch.Tensor]]) -> str:
    """What a statistics checkpoint depends on: the model, the statistics asked for, every batch."""
    h = hashlib.sha256()
    first = specs[0]
    h.update(repr((str(Path(first.model_dir).resolve()), first.num_layers, first.dtype, stats)).encode())
    for batch_id, ids in batches:
        ids = ids.detach().to("cpu", torch.int64).contiguous()
        h.update(repr((int(batch_id), tuple(ids.shape))).encode())
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """The one way slm-dist joins Ray; True when this call connected (the caller then shuts it down).

    A session this process already holds (a test fixture, a notebook, the job's driver) is used as it
    is. Otherwise ``address``; with none, Ray's own discovery: RAY_ADDRESS (set inside `ray job
    submit`), or the cluster `ray start` last started on this node, else a new private local
    instance, sized to ``num_cpus`` logical CPUs when given.

    Not ``address="auto"``: besides those two, it joins ANY Ray instance it finds among the node's
    processes (another user's, a test's), where the stages would then run.
    """
    if ray.is_initialized():
        return False
    if address is None and num_cpus is not None:
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
        except ValueError as err:
            # Ray found a cluster to join, and sizing one is not ours to do: join it as it is.
            if "existing cluster" not in str(err):
                raise
            ray.init()
    else:
        ray.init(address=address)
    return True


def private_cpus(cluster: ClusterSection) -> int:
    """Logical CPUs of a private local Ray this tool starts: the stage bundles asked for, plus one for the
    driver's merge tasks (the statistics reducer reserves none). Ray's default, the machine's cores,
    would leave 3 stages of 1 CPU unplaceable on a 2-core machine."""
    return math.ceil(cluster.num_stages * cluster.cpus_per_stage) + 1


def placement_shortfall(nodes: Sequence[dict[str, float]], bundle: dict[str, float], count: int,
                        strategy: str) -> str | None:
    """Why ``count`` copies of ``bundle`` can never be placed on nodes with these TOTAL resources (what
    Ray counts per node), or None when they can once the nodes are free. Exact for equal bundles."""
    def fits(node: dict[str, float]) -> int:  # copies of the bundle one empty node holds
        return min(int(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0) if bundle else count

    per_node = [fits(n) for n in nodes]
    if strategy == "STRICT_SPREAD":
        usable = sum(1 for k in per_node if k >= 1)
        if usable < count:
            return f"STRICT_SPREAD needs {count} nodes that each hold one bundle; {usable} of {len(nodes)} do"
    elif strategy == "STRICT_PACK":
        if max(per_node, default=0) < count:
            return f"STRICT_PACK needs one node holding all {count} bundles; the largest holds {max(per_node, default=0)}"
    elif sum(per_node) < count:
        return f"the nodes hold {sum(per_node)} such bundles in all ({per_node} per node), {count} are needed"
    return None


def _bundle(cluster: ClusterSection) -> dict[str, float]:
    bundle = {"CPU": cluster.cpus_per_stage}
    if cluster.gpus_per_stage > 0:
        bundle["GPU"] = cluster.gpus_per_stage
    return bundle


@dataclass
class StreamCounts:
    """What the last calibrate() did, for logs and tests."""

    resumed: int = 0   # batches counted from stats.parquet, not computed again
    sent: int = 0      # batch submissions, first tries and retries
    retried: int = 0   # batches sent again after a stage crash


# --------------------------------------------------------------------------------------- backend
class RayBackend(StagedScoring):
    def __init__(self, cluster: ClusterSection):
        self.cluster = cluster
        self._started_ray = False
        self._pg: PlacementGroup | None = None
        self._stages: list = []              # StageActor handles, stage order
        self._specs: tuple[StageSpec, ...] = ()
        self._stats: StatsSpec | None = None
        self._calibration: list[tuple[int, ray.ObjectRef]] = []  # batches cached on stages (output criterion)
        self._corrections: dict[tuple, torch.Tensor | None] = {}  # fitted maps, to re-install after a restart
        self._reducer = None                 # ReducerActor handle, started with the first calibrate()
        self._runs = 0
        self.counts = StreamCounts()

    # ---------------------------------------------------------------------------- cluster setup
    def _connect(self) -> None:
        if connect(self.cluster.address, num_cpus=private_cpus(self.cluster)):
            self._started_ray = True
            log.info("ray: connected, cluster resources %s", ray.cluster_resources())

    def _placement_group(self, num_stages: int) -> PlacementGroup:
        bundle = _bundle(self.cluster)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        why = placement_shortfall(nodes, bundle, num_stages, self.cluster.placement)
        if why is not None and not self.cluster.autoscaling:
            # Waiting placement_timeout_s would only delay this answer: the nodes' totals, not what is
            # busy now, say it can never fit.
            raise RayBackendError(
                f"the cluster can never place {num_stages} stage bundles of {bundle} with strategy "
                f"{self.cluster.placement}: {why} (cluster resources {ray.cluster_resources()}). Lower "
                "cluster.num_stages, cluster.cpus_per_stage or cluster.gpus_per_stage, use placement PACK/SPREAD "
                "instead of STRICT_SPREAD, or add nodes (cluster.autoscaling=true waits for an autoscaler to add them).")
        pg = placement_group([dict(bundle) for _ in range(num_stages)], strategy=self.cluster.placement)
        if not pg.wait(timeout_seconds=self.cluster.placement_timeout_s):
            remove_placement_group(pg)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise RayBackendError(
                f"the cluster could not place {num_stages} stage bundles of {bundle} with strategy "
                f"{self.cluster.placement} within {self.cluster.placement_timeout_s:.0f} s; it has {nodes} node(s), "
                f"resources {ray.cluster_resources()}, free now {ray.available_resources()}. Lower cluster.num_stages, "
                "cluster.cpus_per_stage or cluster.gpus_per_stage, use placement PACK/SPREAD instead of "
                "STRICT_SPREAD, or add nodes.")
        return pg

    def _workers(self, specs: Sequence[StageSpec], stats: StatsSpec | None = None) -> list:
        """Stage actors for ``specs``; reused while the specs are the same (``stats=None``: any stats)."""
        specs = tuple(specs)
        if self._stages and self._specs == specs and (stats is None or stats == self._stats):
            return self._stages
        self._connect()
        self._teardown_stages()
        stats = stats or StatsSpec()
        self._pg = self._placement_group(len(specs))
        cluster = self.cluster
        actor_cls = ray.remote(StageActor)
        threads = max(1, int(cluster.cpus_per_stage))
        self._stages = [
            actor_cls.options(
                num_cpus=cluster.cpus_per_stage,
                num_gpus=cluster.gpus_per_stage,
                max_restarts=cluster.max_restarts,
                max_task_retries=0,  # lost batches are re-sent by the driver, from stage 0
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=k),
            ).remote(spec, stats, threads, k, logs.current())
            for k, spec in enumerate(specs)
        ]
        self._specs, self._stats = specs, stats
        try:
            reports = ray.get([s.report.remote() for s in self._stages])  # surface load errors here, once
        except RayActorError as err:
            self._teardown_stages()
            raise RayBackendError(f"a stage actor failed to start (loading its layers): {err}") from None
        log.info("stages: %s", ", ".join(f"[{r['start']},{r['stop']}) on node {r['node_id'][:8]} pid {r['pid']}"
                                         for r in reports))
        return self._stages

    def _teardown_stages(self) -> None:
        for actor in self._stages:
            ray.kill(actor, no_restart=True)
        self._stages, self._specs, self._stats, self._calibration = [], (), None, []
        self._corrections = {}
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def stage_reports(self) -> list[dict]:
        """Per stage: pid, node, layer range, loaded tensor keys, held bytes, peak memory."""
        return ray.get([s.report.remote() for s in self._stages])

    def stage_handles(self) -> list:
        return list(self._stages)

    # ------------------------------------------------------------------------------- streaming
    def _await_alive(self, actors: Sequence) -> None:
        """Block until every actor answers: a crashed one has restarted (and reloaded its layers).

        Work sent to an actor while it restarts fails at once, so re-sending lost batches before
        this would only lose them again.
        """
        deadline = time.monotonic() + self.cluster.placement_timeout_s
        pending = list(actors)
        while pending:
            refs = [a.ping.remote() for a in pending]
            still = []
            for actor, ref in zip(pending, refs):
                try:
                    ray.get(ref)
                except ActorDiedError as err:
                    raise RayBackendError(f"an actor died for good (cluster.max_restarts="
                                          f"{self.cluster.max_restarts} restarts used up): {err}") from None
                except ActorUnavailableError:
                    still.append(actor)
            if still and time.monotonic() > deadline:
                raise RayBackendError(f"{len(still)} actor(s) did not come back within "
                                      f"cluster.placement_timeout_s={self.cluster.placement_timeout_s:.0f} s")
            if still:
                time.sleep(0.2)
            pending = still

    def _stream(self, keys: Iterable[int], submit: Callable[[int], list], desc: str, show_progress: bool,
                retry: bool = True, on_done: Callable[[int], None] | None = None,
                actors: Sequence = ()) -> dict[int, list]:
        """``submit(key)`` for every key, at most ``max_inflight`` in flight; results by key.

        ``submit`` returns the refs of one unit of work, the last one finishing last. A unit whose
        work was lost to a crashed actor is submitted again (up to ``max_restarts`` times) when
        ``retry``, once the stages and ``actors`` answer again; otherwise the error propagates.
        """
        queue = deque(keys)
        inflight: dict = {}
        attempts: dict[int, int] = {}
        results: dict[int, list] = {}
        bar = progress.bar(show_progress, len(queue), desc, "batch")
        try:
            while queue or inflight:
                while queue and len(inflight) < self.cluster.max_inflight:
                    key = queue.popleft()
                    refs = submit(key)
                    self.counts.sent += 1
                    inflight[refs[-1]] = (key, refs)
                (ready,), _ = ray.wait(list(inflight), num_returns=1)
                key, refs = inflight.pop(ready)
                try:
                    values = ray.get(refs)  # finished work only: ``ready`` is the last to finish
                except LOST_WORK as err:
                    attempts[key] = attempts.get(key, 0) + 1
                    if not retry or attempts[key] > self.cluster.max_restarts:
                        raise
                    log.warning("%s: batch %s lost (%s); sending it again (try %d)", desc, key,
                                type(err).__name__, attempts[key] + 1)
                    self.counts.retried += 1
                    self._await_alive([*self._stages, *actors])
                    queue.appendleft(key)
                    continue
                results[key] = values
                if on_done is not None:
                    on_done(key)
                bar.update(1)
        finally:
            bar.close()
        return results

    # ----------------------------------------------------------------------------- calibration
    def calibrate(self, specs: Sequence[StageSpec], stats: StatsSpec, batches: Sequence[tuple[int, torch.Tensor]],
                  run_dir: Path | None = None, show_progress: bool = False, keep_for_output_criterion: bool = False,
                  on_batch: Callable[[int], None] | None = None) -> StatsReducer:
        """Stream ``batches`` through the stages; the reducer's sums (and ``run_dir/stats.parquet``).

        ``on_batch(batch_id)`` runs on the driver after each batch is fully counted (progress hooks,
        fault-injection tests).
        """
        ids_seen = [b for b, _ in batches]
        if len(set(ids_seen)) != len(ids_seen):
            raise ValueError(f"calibration batch ids must be unique (the reducer dedupes by id), got {ids_seen}")
        stages = self._workers(specs, stats)
        self.clear_candidates(corrections=True)  # maps fitted on an earlier calibration's inputs
        self.counts = StreamCounts()
        inputs = {bid: ray.put(ids) for bid, ids in batches}  # once; retries reuse the same object
        path = Path(run_dir) / STATS_FILE if run_dir is not None else None
        self._runs += 1
        run = ReducerRun(self._runs, specs[0].num_layers, str(path) if path else None, self.cluster.checkpoint_every,
                         inputs_fingerprint(specs, stats, batches))
        reducer = self._reducer_actor()
        counted = set(ray.get(reducer.counted.remote(run)))
        self.counts.resumed = len(counted & set(ids_seen))
        # The output criterion needs every batch's inputs cached on the stages, counted or not.
        todo = [b for b in ids_seen if keep_for_output_criterion or b not in counted]

        def submit(batch_id: int) -> list:
            x, refs = inputs[batch_id], []
            for stage in stages:
                x, stage_stats = stage.calibrate_hop.options(num_returns=2).remote(
                    batch_id, x, keep_for_output_criterion)
                refs.append(reducer.add.remote(stage_stats, run))  # stage -> reducer, not via the driver
            return refs

        for _ in range(self.cluster.max_restarts + 1):
            self._stream(todo, submit, "calibrate", show_progress, on_done=on_batch, actors=[reducer])
            counted = set(ray.get(reducer.counted.remote(run)))
            todo = [b for b in ids_seen if b not in counted]
            if not todo:
                break
            # Only a restarted reducer forgets batches (those after its last checkpoint).
            log.warning("the statistics reducer lost %d batch(es) in a restart; sending them again", len(todo))
        if todo:
            raise RayBackendError(f"batches {todo[:8]} were never counted after {self.cluster.max_restarts + 1} "
                                  "rounds; the statistics reducer keeps failing (see the Ray logs)")
        if path is not None:
            ray.get(reducer.save.remote(run))
        result = ray.get(reducer.result.remote(run))
        self._calibration = [(b, inputs[b]) for b in ids_seen] if keep_for_output_criterion else []
        log.info("calibrate: %d batches (%d resumed from %s, %d retried after a stage crash)", len(ids_seen),
                 self.counts.resumed, path, self.counts.retried)
        return result

    def _reducer_actor(self):
        """The backend's StatsReducer actor, on the driver's node (stats.parquet lands in the run folder
        the driver sees), started on first use."""
        if self._reducer is None:
            here = ray.get_runtime_context().get_node_id()
            # No CPU reserved, one thread: always placeable next to the driver, and it never competes
            # with a stage on the same node for more than one core (it adds m x m HSIC terms per batch).
            self._reducer = ray.remote(ReducerActor).options(
                num_cpus=0,
                max_restarts=self.cluster.max_restarts,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            ).remote(1, logs.current())
        return self._reducer

    def _prime_caches(self) -> None:
        """Cache every calibration batch's stage inputs again (after a stage restart lost them)."""
        stages = self._stages

        def submit(batch_id: int) -> list:
            x = inputs[batch_id]
            for stage in stages:
                x, _ = stage.calibrate_hop.options(num_returns=2).remote(batch_id, x, True)
            return [x]

        inputs = dict(self._calibration)
        self._stream(list(inputs), submit, "re-cache", False)

    # ------------------------------------------------------------- published-code criterion
    def _stage_specs(self) -> tuple[StageSpec, ...]:
        return self._specs

    def _has_cached_inputs(self) -> bool:
        return bool(self._stages and self._calibration)

    def _score(self, windows: Sequence[tuple[int, int]], from_layer: int, rule: str,
               alphas: dict | None = None, with_ids: bool = False, correction: str | None = None,
               batches: slice = slice(None)) -> tuple[float, int]:
        """Sum and count of the last stage's per-sample (or per-token) values for a candidate model,
        run from ``from_layer`` upward on the calibration batches ``batches`` selects (in batch order, as
        the local backend)."""
        self._require_cache("candidate scoring")
        stages = self._stages[stage_holding(self._specs, from_layer):]
        inputs = dict(self._calibration[batches])
        windows = list(windows)

        def submit(batch_id: int) -> list:
            x = None  # the stage holding `from_layer` starts from its cached original input
            ids = inputs[batch_id] if with_ids else None
            for stage in stages:
                x = stage.run_candidate_hop.remote(batch_id, x, windows, rule, from_layer, alphas, ids, correction)
            return [x]

        for attempt in range(self.cluster.max_restarts + 1):
            try:
                results = self._stream(list(inputs), submit, "score", False, retry=False)
                break
            except (*LOST_WORK, StageCacheMissing) as err:
                if attempt == self.cluster.max_restarts:
                    raise
                log.warning("scoring lost a stage (%s); re-caching the calibration inputs", type(err).__name__)
                self._await_alive(self._stages)
                self._prime_caches()
                self._reinstall_corrections()
        total, count = 0.0, 0
        for batch_id in inputs:
            values = results[batch_id][0]
            total += float(values.double().sum())
            count += values.numel()
        return total, count

    def fit_alphas(self, windows: Sequence[tuple[int, int]], num_batches: int):
        """Rule ``scaled``: each window's alpha, fitted on the stage holding its lo (first ``num_batches``)."""
        self._require_cache("fit_alphas")
        batch_ids = [b for b, _ in self._calibration][:num_batches]
        return ray.get([self._stages[stage_holding(self._specs, lo)].fit_alpha.remote((lo, hi), batch_ids)
                        for lo, hi in windows])

    def fit_corrections(self, requests: Sequence[tuple[tuple[int, int], str, float | None, str]], num_batches: int):
        """merge.correction=linear|refit: each (window, rule, alpha, kind)'s correction, fitted and kept on
        the stage holding its lo; the driver keeps a copy to re-install on a stage Ray restarts."""
        self._require_cache("fit_corrections")
        batch_ids = [b for b, _ in self._calibration][:num_batches]
        fits = ray.get([self._stages[stage_holding(self._specs, w[0])].fit_correction.remote(tuple(w), rule, alpha,
                                                                                               batch_ids, kind)
                        for w, rule, alpha, kind in requests])
        for fit in fits:
            self._corrections[fit.key] = fit.matrix
        return fits

    def fit_patches(self, windows: Sequence[tuple[int, int]], num_batches: int) -> list[torch.Tensor]:
        """LinearPatch: each window's residual-stream patch, fitted on the stage holding its lo."""
        self._require_cache("fit_patches")
        batch_ids = [b for b, _ in self._calibration][:num_batches]
        return ray.get([self._stages[stage_holding(self._specs, lo)].fit_patch.remote((lo, hi), batch_ids)
                        for lo, hi in windows])

    def _reinstall_corrections(self) -> None:
        ray.get([self._stages[stage_holding(self._specs, key[0][0])].set_correction.remote(key, matrix)
                 for key, matrix in self._corrections.items()])

    def clear_candidates(self, corrections: bool = False) -> None:
        """Drop the merged candidate layers the stages built while scoring (and the fitted corrections)."""
        ray.get([s.clear_candidates.remote(corrections) for s in self._stages])
        if corrections:
            self._corrections.clear()

    # ------------------------------------------------------------------------------ evaluation
    def logprobs(self, specs: Sequence[StageSpec], batches: Sequence[tuple[int, torch.Tensor]],
                 show_progress: bool = False, desc: str = "score", starts: Sequence[int] | None = None,
                 greedy: bool = False) -> list[torch.Tensor]:
        """Per batch, log p(token t+1 | prefix): [batch, seq-1] float32, in order; NaN before ``starts[i]``
        (``greedy``: [batch, seq-1, 2], with 1.0 where the token is the argmax)."""
        stages = self._workers(specs)
        inputs = [ray.put(ids) for _, ids in batches]

        def submit(i: int) -> list:
            x = inputs[i]
            for stage in stages[:-1]:
                x = stage.forward_hop.remote(x)
            return [stages[-1].token_logprobs.remote(x, inputs[i], 0 if starts is None else starts[i], greedy)]

        results = self._stream(range(len(batches)), submit, desc, show_progress)
        return [results[i][0] for i in range(len(batches))]

    # ------------------------------------------------------------------------------------ merge
    def run_shard_jobs(self, jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int,
                       on_done: OnDone) -> None:
        """The merge's shard jobs as Ray tasks on this backend's cluster (``run_shard_tasks``)."""
        if jobs:
            self._connect()
            log.info("ray: %s CPUs available for merge tasks", ray.cluster_resources().get("CPU"))
        run_shard_tasks(jobs, settings, max_parallel, on_done, self.cluster.max_restarts)

    def close(self) -> None:
        """Stop the stage actors and free their bundles; shut Ray down only if this backend started it."""
        if ray.is_initialized():
            self._teardown_stages()
            if self._reducer is not None:
                ray.kill(self._reducer, no_restart=True)
            if self._started_ray:
                ray.shutdown()
        self._started_ray = False
        self._reducer = None


# ------------------------------------------------------------------------------------- merge
# Output shard jobs as Ray tasks (`cluster.backend: ray`). The tasks run the same plain
# `MergeWorker.write_shard` that `merge_worker.run_jobs_in_threads` runs in threads, so both backends write
# byte-identical shards. The shared settings are `ray.put` once, at most ``max_parallel`` tasks are
# in flight (`ray.wait` frees a slot before the next submit), each task reserves one CPU and its
# share of the memory budget, and results come back as they finish.


def _write_shard(settings: WorkerSettings, job: ShardJob) -> ShardResult:
    import torch

    torch.set_num_threads(1)  # one CPU per task; see merge_arithmetic.single_threaded_torch
    return write_shard_job(settings, job)


def run_shard_tasks(jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int, on_done: OnDone,
                    max_retries: int) -> None:
    """Every job as a Ray task, ``max_parallel`` in flight; ``on_done`` runs here as each one lands.

    A task that fails raises its own error type here (a `CheckpointError` stays one), after the
    tasks still running have finished and been recorded. A worker that dies is retried by Ray up
    to ``max_retries`` times: a job rewrites its shard from scratch under a temporary name. Needs a
    connected Ray (``RayBackend.run_shard_jobs`` connects).
    """
    if not jobs:
        return
    task = ray.remote(_write_shard).options(**_task_resources(settings.memory_bytes), max_retries=max_retries,
                                            retry_exceptions=False)
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
