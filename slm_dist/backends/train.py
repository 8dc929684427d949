"""Healing's Ray Train side: the session a training worker reports through, and the trainer run.

With ``ray.py`` the only code that imports ``ray``. The training loop itself (``heal.train_worker``)
is plain code that sees only the ``TrainSession`` protocol (heal.py); ``fit`` runs it on Ray Train
workers and ``RaySession`` is what those workers get.

Every step's metrics go to ``ray.train.report`` (Ray Train's record of the run); rank 0 also puts
them on a small queue that ``fit`` drains on the driver for ``on_report`` (the driver's progress
bar: Ray Train's own callbacks run in its controller actor, not in the driver process).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


class RaySession:
    """A ``TrainSession`` on Ray Train: checkpoints go to the run's storage, every worker adds its files;
    rank 0's metrics also go to ``progress`` (a `ray.util.queue.Queue`) when given."""

    def __init__(self, progress=None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.progress = progress

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank == 0 and self.progress is not None:
            self.progress.put(dict(metrics))


@contextmanager
def train_cluster(address: str | None, num_cpus: int | None = None) -> Iterator[float]:
    """The cluster the training workers run on (``backends.ray.connect``: the one already connected,
    ``address``, the job's own cluster, else a private local one of ``num_cpus``); yields its GPU count.
    A connection this call opened is closed after."""
    import ray

    from slm_dist.backends.ray import connect

    started = connect(address, num_cpus)
    try:
        yield ray.cluster_resources().get("GPU", 0.0)
    finally:
        if started:
            ray.shutdown()


def fit(train_fn: Callable[[dict, Any], None], loop: dict, num_workers: int, device: str, cpus_per_worker: float,
        storage_path: str, keep_checkpoints: int, max_failures: int = 0,
        on_report: Callable[[dict], None] | None = None) -> Any:
    """Run ``train_fn(loop, session)`` on ``num_workers`` Ray Train workers; returns the final
    `ray.train.Checkpoint` (None when the run left none). ``on_report(metrics)`` runs on this
    (driver) process for every step rank 0 reports, in order.

    The run is named "train" under ``storage_path``: a rerun with the same storage resumes from the
    latest checkpoint there (Ray Train restores the run's checkpoint history). Within one run, a
    failed worker group is restarted from the latest checkpoint up to ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    # No CPU reserved: the queue must never compete with the training workers for a bundle.
    queue = Queue(actor_options={"num_cpus": 0}) if on_report is not None else None

    def per_worker(config: dict) -> None:
        train_fn(config, RaySession(queue))

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if device == "cuda" else {})}
    trainer = TorchTrainer(
        per_worker, train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=device == "cuda",
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend=loop["dist_backend"]),
        run_config=ray.train.RunConfig(storage_path=storage_path, name="train",
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    if queue is None:
        return _fit_off_the_main_thread(trainer).checkpoint
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(queue, on_report, stop), name="heal-progress", daemon=True)
    drain.start()
    try:
        return _fit_off_the_main_thread(trainer).checkpoint
    finally:
        stop.set()
        drain.join()
        queue.shutdown()


def _fit_off_the_main_thread(trainer) -> Any:
    """``trainer.fit()`` on a thread of its own. On the main thread Ray Train installs its own Ctrl-C
    handler (a graceful abort that then exits the process with 0 or 1), which would replace the CLI's
    contract: KeyboardInterrupt, exit 130, a run folder that resumes. On another thread it leaves the
    handler alone (as under Ray Tune); Ctrl-C interrupts the wait here, and the driver's Ray shutdown
    (or its exit, which ends the actors it owns) stops the workers. Checkpoints already written stay."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the caller's thread as it is
            outcome["error"] = err

    worker = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)   # a timed wait: KeyboardInterrupt lands here
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _drain(queue, on_report: Callable[[dict], None], stop: threading.Event) -> None:
    """Hand every queued report to ``on_report`` until ``stop`` is set and the queue is empty."""
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get(timeout=0.2)
        except Empty:
            if stop.is_set():
                return
            continue
        except Exception as err:  # noqa: BLE001 - the bar is a convenience: never fail the training for it
            log.debug("heal progress queue: %s", err)
            return
        try:
            on_report(item)
        except Exception as err:  # noqa: BLE001
            log.debug("heal progress callback: %s", err)
