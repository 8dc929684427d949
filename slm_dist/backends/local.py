"""The in-process backend: the same StageWorkers, chained by plain function calls.

Used by tests, by CPU runs of small models, and as the reference the Ray backend must equal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from slm_dist import progress
from slm_dist.backends.base import Batches, StagedScoring, stage_holding
from slm_dist.checkpoint.export import OnDone, ShardJob, WorkerSettings
from slm_dist.core.alpha_fit import AlphaFit
from slm_dist.core.correction_fit import CorrectionFit, CorrectionRequest
from slm_dist.core.types import Window
from slm_dist.workers.merge_worker import run_jobs_in_threads
from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)


class LocalBackend(StagedScoring):
    def __init__(self) -> None:
        self._key: tuple | None = None
        self.stages: list[StageWorker] = []
        self._batch_ids: list[int] = []
        self._input_ids: dict[int, torch.Tensor] = {}  # calibration tokens, for plan scoring by NLL

    def _workers(self, specs: Sequence[StageSpec], stats: StatsSpec | None = None) -> list[StageWorker]:
        key = (tuple(specs), stats)
        if self._key != key:
            self.stages = []  # drop the previous model's stages before loading the next
            self.stages = [StageWorker(s, stats or StatsSpec()) for s in specs]
            self._key = key
        return self.stages

    def _stage_specs(self) -> list[StageSpec]:
        return [s.spec for s in self.stages]

    def _has_cached_inputs(self) -> bool:
        return bool(self.stages and self._input_ids)

    def calibrate(self, specs: Sequence[StageSpec], stats: StatsSpec, batches: Batches, run_dir: Path | None = None,
                  show_progress: bool = False, keep_for_output_criterion: bool = False) -> StatsReducer:
        stages = self._workers(specs, stats)
        for stage in stages:
            stage.clear_candidates(corrections=True)  # maps fitted on an earlier calibration's inputs
        reducer = StatsReducer(specs[0].num_layers)
        for batch_id, ids in progress.wrap(batches, show_progress, "calibrate", "batch"):
            x = ids
            for stage in stages:
                x, stage_stats = stage.calibrate(batch_id, x, cache_inputs=keep_for_output_criterion)
                reducer.add(stage_stats)
        self._batch_ids = [b for b, _ in batches]
        self._input_ids = dict(batches) if keep_for_output_criterion else {}
        return reducer

    def _score(self, windows: Sequence[Window], from_layer: int, rule: str, alphas: dict | None = None,
               with_ids: bool = False, correction: str | None = None,
               batches: slice = slice(None)) -> tuple[float, int]:
        self._require_cache("candidate scoring")
        first = stage_holding(self._stage_specs(), from_layer)
        total, count = 0.0, 0
        for batch_id in self._batch_ids[batches]:
            x = None
            for stage in self.stages[first:]:
                x = stage.run_candidate(batch_id, x, windows, rule, from_layer=from_layer, alphas=alphas,
                                        input_ids=self._input_ids[batch_id] if with_ids else None,
                                        correction=correction)
            total += float(x.double().sum())
            count += x.numel()
        return total, count

    def fit_alphas(self, windows: Sequence[Window], num_batches: int) -> list[AlphaFit]:
        """Rule ``scaled``: each window's alpha, fitted on the stage holding its lo (first ``num_batches``)."""
        self._require_cache("fit_alphas")
        specs = self._stage_specs()
        batch_ids = self._batch_ids[:num_batches]
        return [self.stages[stage_holding(specs, lo)].fit_alpha((lo, hi), batch_ids) for lo, hi in windows]

    def fit_corrections(self, requests: Sequence[CorrectionRequest], num_batches: int) -> list[CorrectionFit]:
        """merge.correction=linear|refit: each (window, rule, alpha, kind)'s correction, fitted and kept on
        the stage holding its lo (first ``num_batches`` calibration batches)."""
        self._require_cache("fit_corrections")
        specs = self._stage_specs()
        batch_ids = self._batch_ids[:num_batches]
        return [self.stages[stage_holding(specs, w[0])].fit_correction(tuple(w), rule, alpha, batch_ids, kind)
                for w, rule, alpha, kind in requests]

    def fit_patches(self, windows: Sequence[Window], num_batches: int) -> list[torch.Tensor]:
        """LinearPatch: each window's residual-stream patch, fitted on the stage holding its lo."""
        self._require_cache("fit_patches")
        specs = self._stage_specs()
        batch_ids = self._batch_ids[:num_batches]
        return [self.stages[stage_holding(specs, lo)].fit_patch((lo, hi), batch_ids) for lo, hi in windows]

    def clear_candidates(self, corrections: bool = False) -> None:
        """Drop the merged candidate layers the stages built while scoring (and the fitted corrections)."""
        for stage in self.stages:
            stage.clear_candidates(corrections)

    def logprobs(self, specs: Sequence[StageSpec], batches: Batches, show_progress: bool = False,
                 desc: str = "score", starts: Sequence[int] | None = None, greedy: bool = False
                 ) -> list[torch.Tensor]:
        """Per batch, log p(token t+1 | prefix): [batch, seq-1] float32, in order; NaN before ``starts[i]``
        (``greedy``: [batch, seq-1, 2], with 1.0 where the token is the argmax)."""
        stages = self._workers(specs)
        out = []
        for i, (_, ids) in enumerate(progress.wrap(batches, show_progress, desc, "batch")):
            x = ids
            for stage in stages[:-1]:
                x = stage.forward(x)
            out.append(stages[-1].token_logprobs(x, ids, 0 if starts is None else starts[i], greedy))
        return out

    def run_shard_jobs(self, jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int,
                       on_done: OnDone) -> None:
        run_jobs_in_threads(jobs, settings, max_parallel, on_done)

    def close(self) -> None:
        self.stages = []
        self._key = None
