"""What every backend does, and the scoring they share.

A backend moves calibration batches, candidate plans and evaluation batches through the same
plain `StageWorker`s: `local.py` chains them with function calls in this process, `ray.py` runs
them as actors on a placement group. `Backend` is the one interface the stages (pipeline,
planning, evaluation, compare, heal) program against; `StagedScoring` holds the scoring logic
both backends share, over one primitive each implements (`_score`: run a candidate model from one
layer upward on every cached calibration batch and sum the last stage's values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from torch import Tensor

from slm_dist.checkpoint.export import OnDone, ShardJob, WorkerSettings
from slm_dist.core import planner
from slm_dist.core.alpha_fit import AlphaFit
from slm_dist.core.correction_fit import CorrectionFit, CorrectionRequest
from slm_dist.core.types import Window
from slm_dist.workers.stage_worker import StageSpec, StatsSpec
from slm_dist.workers.stats_reducer import StatsReducer

Batches = Sequence[tuple[int, Tensor]]  # (batch id, token ids [batch, seq])


class Backend(Protocol):
    """The seam between the stages of a run and where its StageWorkers live."""

    def calibrate(self, specs: Sequence[StageSpec], stats: StatsSpec, batches: Batches, run_dir: Path | None = None,
                  show_progress: bool = False, keep_for_output_criterion: bool = False) -> StatsReducer:
        """Stream ``batches`` through stages built from ``specs``; the reduced Gram statistics. With
        ``keep_for_output_criterion`` the stages keep each batch's inputs for candidate scoring."""

    def score_candidate(self, committed: Sequence[Window], trial: Window, rule: str) -> float:
        """The published criterion for committed windows plus a trial window (mean final-hidden cosine)."""

    def plan_output(self, threshold: float, rule: str, protect_first: int, protect_last: int,
                    num_layers: int) -> tuple[list[Window], list[planner.TraceStep]]:
        """The published code's loop (``criterion: output``) on the cached calibration batches."""

    def score_plan(self, windows: Sequence[Window], rule: str, alphas: dict[Window, float] | None = None,
                   metric: str = "nll", correction: str | None = None, num_batches: int | None = None,
                   skip_batches: int = 0) -> float:
        """A whole plan's calibration loss (``nll``, lower is better) or cosine (higher is better), on
        ``num_batches`` calibration batches (None: all) after the first ``skip_batches``."""

    def fit_alphas(self, windows: Sequence[Window], num_batches: int) -> list[AlphaFit]:
        """Rule ``scaled``: each window's alpha on the stage holding its lo."""

    def fit_corrections(self, requests: Sequence[CorrectionRequest], num_batches: int) -> list[CorrectionFit]:
        """merge.correction: each request's correction, fitted and kept on the stage holding its lo."""

    def fit_patches(self, windows: Sequence[Window], num_batches: int) -> list[Tensor]:
        """LinearPatch: each window's residual-stream patch [hidden, hidden], on the stage holding its lo."""

    def clear_candidates(self, corrections: bool = False) -> None:
        """Drop candidate layers built while scoring (and, with ``corrections``, the fitted maps)."""

    def logprobs(self, specs: Sequence[StageSpec], batches: Batches, show_progress: bool = False,
                 desc: str = "score", starts: Sequence[int] | None = None, greedy: bool = False) -> list[Tensor]:
        """Per batch, log p(token t+1 | prefix) [batch, seq-1] float32, in order; NaN before ``starts[i]``.
        ``greedy``: [batch, seq-1, 2], the second channel 1.0 where the token is the distribution's argmax."""

    def nll(self, specs: Sequence[StageSpec], batches: Batches, show_progress: bool = False) -> tuple[float, int]:
        """(summed next-token NLL, tokens scored) over ``batches``."""

    def run_shard_jobs(self, jobs: Sequence[ShardJob], settings: WorkerSettings, max_parallel: int,
                       on_done: OnDone) -> None:
        """The merge's output shard jobs, ``max_parallel`` at a time; ``on_done`` as each one lands."""

    def close(self) -> None:
        """Free the stages (and a cluster connection this backend opened)."""


def stage_holding(specs: Sequence[StageSpec], layer: int) -> int:
    for k, s in enumerate(specs):
        if s.start <= layer < s.stop:
            return k
    raise ValueError(f"no stage holds layer {layer}")


def check_metric(metric: str) -> None:
    if metric not in ("nll", "cosine"):
        raise ValueError(f"metric must be 'nll' or 'cosine', got {metric!r}")


class StagedScoring:
    """Candidate scoring over cached calibration inputs, shared by both backends.

    Subclasses provide ``_score`` (sum and count of the last stage's values for a candidate run
    from ``from_layer`` upward on every calibration batch, batch order fixed), ``_stage_specs``
    (the current stages), ``_has_cached_inputs``, ``clear_candidates`` and ``logprobs``.
    """

    def _score(self, windows: Sequence[Window], from_layer: int, rule: str, alphas: dict | None = None,
               with_ids: bool = False, correction: str | None = None,
               batches: slice = slice(None)) -> tuple[float, int]:
        raise NotImplementedError

    def _stage_specs(self) -> Sequence[StageSpec]:
        raise NotImplementedError

    def _has_cached_inputs(self) -> bool:
        raise NotImplementedError

    def clear_candidates(self, corrections: bool = False) -> None:
        raise NotImplementedError

    def logprobs(self, specs: Sequence[StageSpec], batches: Batches, show_progress: bool = False,
                 desc: str = "score", starts: Sequence[int] | None = None, greedy: bool = False) -> list[Tensor]:
        raise NotImplementedError

    def _require_cache(self, what: str) -> None:
        if not self._has_cached_inputs():
            raise RuntimeError(f"{what} needs a calibrate(..., keep_for_output_criterion=True) pass first")

    def score_candidate(self, committed: Sequence[Window], trial: Window, rule: str) -> float:
        """Mean cosine (final-norm hidden, candidate vs original) over the calibration samples."""
        lo, hi = trial
        windows = list(committed) + ([trial] if hi > lo else [])
        lo = min([lo, *(w[0] for w in windows)])  # below the lowest changed layer: the original model
        total, count = self._score(windows, lo, rule)
        return total / count

    def plan_output(self, threshold: float, rule: str, protect_first: int, protect_last: int, num_layers: int):
        self._require_cache("plan_output")
        windows, trace = planner.plan_windows_output(
            num_layers, lambda committed, trial: self.score_candidate(committed, trial, rule), threshold,
            protect_first, protect_last)
        self.clear_candidates()
        return windows, trace

    def score_plan(self, windows: Sequence[Window], rule: str, alphas: dict[Window, float] | None = None,
                   metric: str = "nll", correction: str | None = None, num_batches: int | None = None,
                   skip_batches: int = 0) -> float:
        """A whole plan scored on the calibration samples, run from its lowest window upward on cached inputs.

        ``nll``: mean next-token NLL of the candidate model (lower is better); ``cosine``: the published
        criterion, mean cosine of the final-norm hidden to the original model's (higher is better).
        ``correction``: with the corrections of that kind fitted for these windows (``fit_corrections``).
        ``num_batches``: only that many calibration batches (SLEB's many trials); None: all.
        ``skip_batches``: start after that many (batches a fit did not see: ``plan.rerank``).
        """
        self._require_cache("score_plan")
        check_metric(metric)
        windows = sorted(windows)
        lo = windows[0][0] if windows else self._stage_specs()[-1].start  # below lo: the original model
        stop = None if num_batches is None else skip_batches + num_batches
        total, count = self._score(windows, lo, rule, alphas, with_ids=metric == "nll", correction=correction,
                                    batches=slice(skip_batches, stop))
        self.clear_candidates()  # one plan's merged layers at a time: memory stays bounded
        if count == 0:
            raise ValueError(f"score_plan: no calibration batch left to score after skipping {skip_batches}")
        return -total / count if metric == "nll" else total / count

    def nll(self, specs: Sequence[StageSpec], batches: Batches, show_progress: bool = False) -> tuple[float, int]:
        logps = self.logprobs(specs, batches, show_progress, desc="perplexity")
        return -sum(float(lp.double().sum()) for lp in logps), sum(lp.numel() for lp in logps)


