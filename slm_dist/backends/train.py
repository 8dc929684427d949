"""Healing's Ray Train side: the session a training worker reports through, and the trainer run.

With ``ray.py`` the only code that imports ``ray``. The training loop itself (``heal.train_worker``)
is plain code that sees only the ``TrainSession`` protocol (heal.py); ``fit`` runs it on Ray Train
workers and ``RaySession`` is what those workers get.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class RaySession:
    """A ``TrainSession`` on Ray Train: checkpoints go to the run's storage, every worker adds its files."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

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


def fit(train_fn: Callable[[dict], None], loop: dict, num_workers: int, device: str, cpus_per_worker: float,
        storage_path: str, keep_checkpoints: int, max_failures: int = 0) -> Any:
    """Run ``train_fn(loop)`` on ``num_workers`` Ray Train workers; returns the final `ray.train.Checkpoint`
    (None when the run left none).

    The run is named "train" under ``storage_path``: a rerun with the same storage resumes from the
    latest checkpoint there (Ray Train restores the run's checkpoint history). Within one run, a
    failed worker group is restarted from the latest checkpoint up to ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if device == "cuda" else {})}
    trainer = TorchTrainer(
        train_fn, train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=device == "cuda",
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend=loop["dist_backend"]),
        run_config=ray.train.RunConfig(storage_path=storage_path, name="train",
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    return trainer.fit().checkpoint
