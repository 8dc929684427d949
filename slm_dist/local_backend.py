"""The in-process backend: the same StageWorkers, chained by plain function calls.

Used by tests, by CPU runs of small models, and as the reference the Ray backend must equal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from slm_dist import planner
from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)


def _progress(items, show: bool, desc: str, unit: str = "batch"):
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit)


def stage_holding(specs: Sequence[StageSpec], layer: int) -> int:
    for k, s in enumerate(specs):
        if s.start <= layer < s.stop:
            return k
    raise ValueError(f"no stage holds layer {layer}")


class LocalBackend:
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

    def calibrate(self, specs: Sequence[StageSpec], stats: StatsSpec, batches: Sequence[tuple[int, torch.Tensor]],
                  run_dir: Path | None = None, show_progress: bool = False,
                  keep_for_output_criterion: bool = False) -> StatsReducer:
        stages = self._workers(specs, stats)
        for stage in stages:
            stage.clear_candidates(corrections=True)  # maps fitted on an earlier calibration's inputs
        reducer = StatsReducer(specs[0].num_layers)
        for batch_id, ids in _progress(batches, show_progress, "calibrate"):
            x = ids
            for stage in stages:
                x, stage_stats = stage.calibrate(batch_id, x, cache_inputs=keep_for_output_criterion)
                reducer.add(stage_stats)
        self._batch_ids = [b for b, _ in batches]
        self._input_ids = dict(batches) if keep_for_output_criterion else {}
        return reducer

    def score_candidate(self, committed: Sequence[tuple[int, int]], trial: tuple[int, int], rule: str) -> float:
        """Mean cosine (final-norm hidden, candidate vs original) over the calibration samples."""
        specs = [s.spec for s in self.stages]
        lo, hi = trial
        windows = list(committed) + ([trial] if hi > lo else [])
        lo = min([lo, *(w[0] for w in windows)])  # below the lowest changed layer: the original model
        first = stage_holding(specs, lo)
        total, count = 0.0, 0
        for batch_id in self._batch_ids:
            x = None
            for stage in self.stages[first:]:
                x = stage.run_candidate(batch_id, x, windows, rule, from_layer=lo)
            total += float(x.double().sum())
            count += x.numel()
        return total / count

    def plan_output(self, threshold: float, rule: str, protect_first: int, protect_last: int, num_layers: int):
        if not self.stages or not self._batch_ids:
            raise RuntimeError("plan_output needs a calibrate(..., keep_for_output_criterion=True) pass first")
        windows, trace = planner.plan_windows_output(
            num_layers, lambda committed, trial: self.score_candidate(committed, trial, rule), threshold,
            protect_first, protect_last)
        for stage in self.stages:
            stage.clear_candidates()
        return windows, trace

    def score_plan(self, windows: Sequence[tuple[int, int]], rule: str,
                   alphas: dict[tuple[int, int], float] | None = None, metric: str = "nll",
                   correction: str | None = None) -> float:
        """A whole plan scored on the calibration samples, run from its lowest window upward on cached inputs.

        ``nll``: mean next-token NLL of the candidate model (lower is better); ``cosine``: the published
        criterion, mean cosine of the final-norm hidden to the original model's (higher is better).
        ``correction``: with the corrections of that kind fitted for these windows (``fit_corrections``).
        """
        if not self.stages or not self._input_ids:
            raise RuntimeError("score_plan needs a calibrate(..., keep_for_output_criterion=True) pass first")
        if metric not in ("nll", "cosine"):
            raise ValueError(f"metric must be 'nll' or 'cosine', got {metric!r}")
        specs = [s.spec for s in self.stages]
        windows = sorted(windows)
        lo = windows[0][0] if windows else specs[-1].start  # below lo the candidate is the original model
        first = stage_holding(specs, lo)
        total, count = 0.0, 0
        for batch_id in self._batch_ids:
            x = None
            for stage in self.stages[first:]:
                x = stage.run_candidate(batch_id, x, windows, rule, from_layer=lo, alphas=alphas,
                                        input_ids=self._input_ids[batch_id] if metric == "nll" else None,
                                        correction=correction)
            total += float(x.double().sum())
            count += x.numel()
        for stage in self.stages:
            stage.clear_candidates()  # one plan's merged layers at a time: memory stays bounded
        return -total / count if metric == "nll" else total / count

    def fit_alphas(self, windows: Sequence[tuple[int, int]], num_batches: int):
        """Rule ``scaled``: each window's alpha, fitted on the stage holding its lo (first ``num_batches``)."""
        if not self.stages or not self._input_ids:
            raise RuntimeError("fit_alphas needs a calibrate(..., keep_for_output_criterion=True) pass first")
        specs = [s.spec for s in self.stages]
        batch_ids = self._batch_ids[:num_batches]
        return [self.stages[stage_holding(specs, lo)].fit_alpha((lo, hi), batch_ids) for lo, hi in windows]

    def fit_corrections(self, requests: Sequence[tuple[tuple[int, int], str, float | None, str]], num_batches: int):
        """merge.correction=linear|refit: each (window, rule, alpha, kind)'s correction, fitted and kept on
        the stage holding its lo (first ``num_batches`` calibration batches)."""
        if not self.stages or not self._input_ids:
            raise RuntimeError("fit_corrections needs a calibrate(..., keep_for_output_criterion=True) pass first")
        specs = [s.spec for s in self.stages]
        batch_ids = self._batch_ids[:num_batches]
        return [self.stages[stage_holding(specs, w[0])].fit_correction(tuple(w), rule, alpha, batch_ids, kind)
                for w, rule, alpha, kind in requests]

    def clear_candidates(self, corrections: bool = False) -> None:
        """Drop the merged candidate layers the stages built while scoring (and the fitted corrections)."""
        for stage in self.stages:
            stage.clear_candidates(corrections)

    def logprobs(self, specs: Sequence[StageSpec], batches: Sequence[tuple[int, torch.Tensor]],
                 show_progress: bool = False, desc: str = "score", starts: Sequence[int] | None = None
                 ) -> list[torch.Tensor]:
        """Per batch, log p(token t+1 | prefix): [batch, seq-1] float32, in order; NaN before ``starts[i]``."""
        stages = self._workers(specs)
        out = []
        for i, (_, ids) in enumerate(_progress(batches, show_progress, desc)):
            x = ids
            for stage in stages[:-1]:
                x = stage.forward(x)
            out.append(stages[-1].token_logprobs(x, ids, 0 if starts is None else starts[i]))
        return out

    def nll(self, specs: Sequence[StageSpec], batches: Sequence[tuple[int, torch.Tensor]],
            show_progress: bool = False) -> tuple[float, int]:
        logps = self.logprobs(specs, batches, show_progress, desc="perplexity")
        return -sum(float(lp.double().sum()) for lp in logps), sum(lp.numel() for lp in logps)

    def close(self) -> None:
        self.stages = []
        self._key = None
