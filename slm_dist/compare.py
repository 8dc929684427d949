"""`slm-dist compare`: prune one model with every method at the same layer counts and evaluate each.

The story: one calibration pass (its statistics feed every method), one plan per method and
layer count, then for each plan the same merge -> evaluate path as `slm-dist run` (the checkpoint
is written, its stages loaded on the configured backend, and scored). Results land in
``<run.dir>/compare/compare.json`` as each model finishes, so a rerun with the same settings skips
the models already measured.

Methods (k = layers removed):
- ``shortgpt``: remove the k layers of lowest Block Influence (Men et al. 2024).
- ``angular``: remove the k-layer block whose input and output are closest in angular distance on
  the last token (Gromov et al. 2024). Needs distances between every pair of layer boundaries,
  which the calibration pass does not keep: one extra layer-by-layer pass over the same
  calibration tokens measures them (in this process, one layer held at a time).
- ``laco``: LaCo-style fixed windows merged by RDSC (rule ``sum``).
- ``last_layers``: remove the last k layers.
- ``slm_cka_<rule>``: SLM's CKA sliding window, threshold searched to remove k, each merge rule.
- ``slm_output``: the published code's loop (final-hidden cosine, rule ``reference``); its
  threshold is searched with forward passes, so k may be unreachable (the nearest is reported).
- ``slm_global_<rule>``: slm-dist's global search (``plan.search: global``): exact least-cost windows
  from the statistics, ``plan.candidates`` of them ranked by ``plan.refine_metric`` on the
  calibration samples; rule ``drop`` or ``scaled`` (alpha fitted per window); ``slm_global_linear``
  and ``slm_global_refit`` are ``scaled`` with ``merge.correction: linear`` (a fitted map per window)
  or ``refit`` (each window's MLP output projection refitted). Each one's plan.json
  (ranked candidates, alphas, corrections) is kept under ``<run.dir>/compare/<method>-<k>/``.
- ``sleb``: SLEB (Song et al. 2024): k single layers removed one at a time, each the one whose removal
  from the model pruned so far gives the lowest calibration NLL (``baselines.sleb``); every trial is a
  plan scored by ``Backend.score_plan`` on the stages' cached calibration inputs, run from its lowest
  removed layer up. Trials are shared with the global search's memo (same plans, same losses).
- ``replaceme_lstsq`` / ``replaceme_cosine``: ReplaceMe (Shopkhoev et al. 2025): the angular block,
  and one hidden x hidden map fitted on every calibration batch (least squares, or the cosine loss from
  the identity with Adam) on the MLP output of the layer below the block, folded into its down
  projection (``core/replaceme.py``). The map is fitted on the stage holding that layer
  (``Backend.fit_corrections``) and written as a linear corrections file beside the plan.
- ``linearpatch_sleb`` / ``linearpatch_angular``: LinearPatch (Chen et al. 2025) on SLEB's or the
  angular block's layers: at each pruning interface a patch P = H D H^T on the residual stream
  (``core/linear_patch.py``), fitted on the stage holding the layer below the cut. It does not fold
  into a plain checkpoint: the checkpoint is the plain removal, the patches go to ``patches.safetensors``
  beside the plan, and the model is evaluated with them applied in memory (``StageSpec.patch_file``).
- ``angular_refit``: slm-dist's ``refit`` correction (cross-validated ridge, position 0 kept out of the
  ridge choice) on the angular block: the same layers as ReplaceMe, our correction instead of its map.
- ``sleb_refit``: SLEB's layers (a non-contiguous plan) with slm-dist's ``refit`` correction fitted for
  each of its windows: the layer choice LinearPatch found best, our correction instead of its patch.
  The product's ``plan.search: sleb`` with ``merge.rule: drop`` and ``merge.correction: refit``
  builds the same plan (its ``protect_last`` aside: SLEB here may drop the top layer).
- ``angular_pool`` / ``sleb_pool``: the same layers with ``merge.correction: pool`` instead: each window's
  kept layer takes the best MLP neurons of the whole window, then refit (``core/neuron_pool.py``).
  With ``plan.rerank`` > 1, ``sleb_refit`` and ``sleb_pool`` rank SLEB's last-step finalists after
  their corrections, on the calibration batches no fit saw (``PlanSearch.rerank``, as ``run`` does).

SLEB's trials (and the global search's measured plans) score on ``plan.score_batches`` calibration
batches when it is set (all when null): SLEB measures about k x N plans, each a forward pass from its
lowest removed layer, so on a CPU its trials take fewer batches than the fits.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from slm_dist import context, evaluation, pipeline, preflight, progress
from slm_dist.backends.base import Backend
from slm_dist.checkpoint import corrections as corrections_file
from slm_dist.checkpoint.index import CheckpointIndex, open_index
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import COMPARE_METHODS as METHODS
from slm_dist.config import GLOBAL_METHODS, GLOBAL_RULES, SLM_RULES, STAGED_BASELINES, ConfigError, SlmConfig
from slm_dist.context import RunContext
from slm_dist.core import baselines, planner
from slm_dist.core.correction_fit import CorrectionFit, correction_key
from slm_dist.merging import merge_stage
from slm_dist.planning import PlanMemo, PlanSearch, score_label, write_corrections
from slm_dist.workers.stage_worker import StageSpec, StageWorker

log = logging.getLogger(__name__)

# Methods whose layers are the angular block: they need the angular-distance pass after calibration.
ANGULAR_METHODS = ("angular", "linearpatch_angular", "angular_refit", "angular_pool")
SLEB_METHODS = ("sleb", "linearpatch_sleb", "sleb_refit", "sleb_pool")  # SLEB's layers: its trials first
LABELS = {
    "dense": "Dense (unpruned)",
    "shortgpt": "ShortGPT (lowest Block Influence)",
    "angular": "Angular block (Gromov et al.)",
    "laco": "LaCo-style windows (RDSC)",
    "last_layers": "Drop last n layers",
    **{f"slm_cka_{r}": f"SLM CKA, rule {r}" for r in SLM_RULES},
    "slm_output": "SLM published code (output cos, reference)",
    **{f"slm_global_{r}": f"slm-dist global search, rule {r}" for r in GLOBAL_RULES},
    "slm_global_linear": "slm-dist global search, scaled + linear correction",
    "slm_global_refit": "slm-dist global search, scaled + refitted projection",
    "sleb": "SLEB (Song et al. 2024)",
    "replaceme_lstsq": "ReplaceMe, least squares (Shopkhoev et al. 2025)",
    "replaceme_cosine": "ReplaceMe, cosine (Shopkhoev et al. 2025)",
    "linearpatch_sleb": "SLEB + LinearPatch (Chen et al. 2025; patch in memory)",
    "linearpatch_angular": "Angular block + LinearPatch (patch in memory)",
    "angular_refit": "slm-dist refit on the angular block",
    "sleb_refit": "slm-dist refit on SLEB's layers",
    "angular_pool": "slm-dist pool on the angular block",
    "sleb_pool": "slm-dist pool on SLEB's layers",
}


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Statistics:
    """What one calibration pass leaves for the planners (all small, on the driver)."""

    num_layers: int
    cka: Tensor                      # [N+1, N+1]
    block_influence: Tensor          # [N]
    angular: Tensor | None           # [N+1, N+1] last-token angular distance between boundaries


@torch.inference_mode()
def boundary_last_token_states(spec: StageSpec, input_ids: Tensor, batch_size: int,
                               show_progress: bool = False) -> Tensor:  # -> [samples, N+1, hidden] float32
    """The last token's hidden state at every layer boundary, one layer loaded at a time.

    ``spec`` gives model folder, device and dtype; its layer range is ignored. Activations of all
    samples are kept between layers (samples x seq x hidden), weights one layer at a time.
    """
    n = spec.num_layers
    h: list[Tensor] = [ids for ids in input_ids.split(batch_size)]
    states: list[Tensor] = []
    layers = progress.wrap(range(n), show_progress, "angular", "layer")
    for layer in layers:
        worker = StageWorker(replace(spec, start=layer, stop=layer + 1, with_lm_head=False))
        if layer == 0:  # the embedding output is boundary 0
            states.append(torch.cat([worker.embed(ids.to(worker.device))[:, -1].float().cpu() for ids in h]))
        h = [worker.forward(x) for x in h]
        states.append(torch.cat([x[:, -1].float().cpu() for x in h]))
        del worker
    return torch.stack(states, dim=1)


SHARED_PLAN_SETTINGS = ("protect_first", "protect_last", "max_window")  # every method reads these
SEARCH_SETTINGS = ("cost", "candidates", "local_search", "refine_metric")  # only the global search reads these


def plans_fingerprint(model_dir: Path, input_ids: Tensor, config: SlmConfig) -> str:
    """What every plan and every measured plan loss depends on: the model, the calibration tokens, the
    statistics settings, the layer limits and the alpha fit. Settings one method alone reads are
    ``method_settings``: changing them re-plans that method, not the slow published loop."""
    import hashlib

    h = hashlib.sha256(str(Path(model_dir).resolve()).encode())
    h.update(input_ids.numpy().tobytes())
    plan = {k: getattr(config.plan, k) for k in SHARED_PLAN_SETTINGS}
    h.update(json.dumps([config.similarity.model_dump(mode="json"), plan, config.model.dtype,
                         config.merge.alpha_batches], sort_keys=True).encode())
    return h.hexdigest()


def method_settings(method: str, config: SlmConfig) -> dict:
    """The settings one method's plan depends on beyond ``plans_fingerprint`` (stored beside its plan)."""
    if method in GLOBAL_METHODS:
        settings = {k: getattr(config.plan, k) for k in SEARCH_SETTINGS}
        if GLOBAL_METHODS[method][1] != "none":
            settings["correction_batches"] = config.merge.correction_batches
            settings["correction_weight"] = config.merge.correction_weight
        return settings
    settings = {}
    if method in SLEB_METHODS:  # how SLEB's trials are scored
        settings["score_batches"] = config.plan.score_batches
    if method.endswith(("_refit", "_pool")):   # our correction on a chosen plan: how it is fitted
        settings.update(correction_batches=config.merge.correction_batches,
                        correction_weight=config.merge.correction_weight)
    if method.endswith("_pool") and config.merge.pool_cap is not None:
        settings["pool_cap"] = config.merge.pool_cap
    if method in SLEB_METHODS and method.endswith(("_refit", "_pool")) and config.plan.rerank > 1:
        settings["rerank"] = config.plan.rerank  # unset: the plans cached before it
    return settings


def plan_to_json(plan) -> dict:
    if isinstance(plan, str):
        return {"error": plan}
    return plan.to_json()


def plan_from_json(data: dict):
    """The plan (or error text) stored by plan_to_json."""
    if "error" in data:
        return data["error"]
    return planner.plan_from_json(data)


# ---------------------------------------------------------------- published-code threshold search
Plan = Callable[[float], list[tuple[int, int]]]


def search_output_threshold(plan_at: Plan, target: int, start: float = 0.99, max_calls: int = 12,
                            resolution: float = 1e-4) -> tuple[float, list[tuple[int, int]], list[tuple[float, int]]]:
    """A threshold whose published-loop plan removes ``target`` layers (or the nearest found).

    The removed count is not monotone in T: it grows as T falls, until at low T the single growing
    window reaches the floor and the loop drops it (their quirk), leaving nothing. So T is lowered
    from ``start`` in widening steps until the plan removes >= target, then bisected between the
    last two thresholds until they are ``resolution`` apart (closer thresholds almost never change
    the plan, and every try costs forward passes). Returns (threshold, windows, every (threshold,
    removed) tried); when no try hits ``target`` the nearest count wins, fewer layers on a tie.
    """
    tried: list[tuple[float, int]] = []
    plans: dict[float, list[tuple[int, int]]] = {}

    def removed_at(t: float) -> int:
        plans[t] = plan_at(t)
        tried.append((t, sum(hi - lo for lo, hi in plans[t])))
        log.info("published-code loop at threshold %.5f removes %d layers (target %d)", t, tried[-1][1], target)
        return tried[-1][1]

    high, step, low = 1.0, 1.0 - start, None  # removed(high) < target <= removed(low)
    t = start
    while len(tried) < max_calls and t > 0:
        r = removed_at(t)
        if r == target:
            return t, plans[t], tried
        if r > target:
            low = t
            break
        high, step = t, step * 2
        t = max(t - step, 0.0)
    while low is not None and len(tried) < max_calls and high - low > resolution:
        t = (low + high) / 2
        r = removed_at(t)
        if r == target:
            return t, plans[t], tried
        low, high = (t, high) if r > target else (low, t)
    best = min(tried, key=lambda x: (abs(x[1] - target), x[1] > target, -x[0]))
    return best[0], plans[best[0]], tried


def cached_output_planner(backend: Backend, num_layers: int, rule: str, protect_first: int, protect_last: int,
                          cache: dict) -> Plan:
    """plan_at(T) for the published loop; scores are cached across thresholds (same calibration
    batches, deterministic), so a search pays only for the trials its paths do not share."""
    def score(committed, trial) -> float:
        key = (tuple(committed), tuple(trial), rule)
        if key not in cache:
            cache[key] = backend.score_candidate(committed, trial, rule)
        return cache[key]

    def plan_at(t: float) -> list[tuple[int, int]]:
        windows, _ = planner.plan_windows_output(num_layers, score, t, protect_first, protect_last)
        return windows

    return plan_at


def load_scores(path: Path, fingerprint: str) -> dict:
    """Published-loop scores saved by an earlier search on the same model and calibration tokens."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("fingerprint") != fingerprint:
        return {}
    return {(tuple(map(tuple, e["committed"])), tuple(e["trial"]), e["rule"]): e["score"] for e in data["scores"]}


def save_scores(path: Path, fingerprint: str, cache: dict) -> None:
    """Forward passes are the expensive part of the search: keep them for a rerun after a crash."""
    scores = [{"committed": [list(w) for w in c], "trial": list(t), "rule": r, "score": v}
              for (c, t, r), v in cache.items()]
    write_json(path, {"fingerprint": fingerprint, "scores": scores})


class PlanLosses(dict):
    """slm_global plan losses ((windows, rule, metric) -> loss), written through to a JSON file so a rerun
    on the same model and calibration tokens (same fingerprint) measures none of them again."""

    def __init__(self, path: Path, fingerprint: str):
        super().__init__()
        self.path, self.fingerprint = Path(path), fingerprint
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if data.get("fingerprint") == fingerprint:
            for e in data["losses"]:
                super().__setitem__((tuple(map(tuple, e["windows"])), e["rule"], e["metric"]), e["loss"])

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        losses = [{"windows": [list(w) for w in windows], "rule": rule, "metric": metric, "loss": loss}
                  for (windows, rule, metric), loss in self.items()]
        write_json(self.path, {"fingerprint": self.fingerprint, "losses": losses})


# --------------------------------------------------------------------------------- plans
def make_plans(stats: Statistics, k: int, config: SlmConfig, methods: Sequence[str],
               output_plan: Callable[[int], tuple[float, list, list]] | None,
               global_plan: Callable[[int, str], planner.MergePlan] | None = None,
               staged_plan: Callable[[int, str], object] | None = None) -> dict[str, object]:
    """Every requested method's plan for k removed layers; a method that cannot plan gets its error text."""
    p = config.plan
    n = stats.num_layers
    plans: dict[str, object] = {}
    builders: dict[str, Callable[[], object]] = {
        # Layer 0 stays (as SLM keeps it): a plan cannot drop it, and on trained models neither
        # method picks it. The top layer is a candidate, as in the papers.
        "shortgpt": lambda: baselines.shortgpt(stats.block_influence, k, protect_first=max(p.protect_first, 1)),
        "angular": lambda: baselines.angular_block(stats.angular, k, protect_first=max(p.protect_first, 1)),
        "laco": lambda: baselines.laco_windows(n, k, protect_first=p.protect_first, protect_last=p.protect_last),
        "last_layers": lambda: baselines.last_layers(n, k),
    }
    cka_windows: list | None = None
    threshold = None
    for method in methods:
        try:
            if method in builders:
                plans[method] = builders[method]()
            elif method.startswith("slm_cka_"):
                if cka_windows is None:
                    threshold, cka_windows = planner.search_threshold(stats.cka, k, p.protect_first, p.protect_last,
                                                                      p.max_window)
                plans[method] = planner.MergePlan(n, tuple(map(tuple, cka_windows)), method[len("slm_cka_"):],
                                                  "cka", threshold)
            elif method in GLOBAL_METHODS:
                plans[method] = global_plan(k, method)
            elif method in STAGED_BASELINES:
                plans[method] = staged_plan(k, method)
            elif method == "slm_output":
                t, windows, tried = output_plan(k)
                plans[method] = planner.MergePlan(n, tuple(map(tuple, windows)), "reference", "output", t)
                if sum(hi - lo for lo, hi in windows) != k:
                    log.warning("slm_output: no threshold tried removes exactly %d layers; nearest: %s", k, tried)
            else:
                raise ConfigError(f"unknown method {method!r}; known: {list(METHODS)}")
        except planner.PlanError as e:
            plans[method] = str(e)
    return plans


# ---------------------------------------------------------------------------------- the story
def _plan_all(ctx: RunContext, config: SlmConfig, index: CheckpointIndex, backend: Backend, input_ids: Tensor,
              wanted: dict[int, list[str]], out_root: Path, fingerprint: str) -> dict[int, dict[str, object]]:
    """The one calibration pass, the statistics every method reads, and the ``wanted`` plans (k -> methods)."""
    n = index.num_layers
    methods = {m for ms in wanted.values() for m in ms}
    show_progress = ctx.show_progress
    with ctx.timed("calibrate"):
        keep = any(m == "slm_output" or m.startswith("slm_global_") or m in STAGED_BASELINES for m in methods)
        reducer = pipeline.calibrate(ctx, index, backend, input_ids, keep_inputs=keep)
        write_json(ctx.run_dir / "similarity.json", pipeline.similarity_json(reducer, config))
    angular = None
    if any(m in ANGULAR_METHODS or m.startswith("replaceme_") for m in methods):
        with ctx.timed("angular"):
            first = context.stage_specs(config, index, ctx.model_dir)[0]
            states = boundary_last_token_states(first, input_ids, config.calibration.batch_size, show_progress)
            angular = baselines.angular_distance_matrix(states)
    stats = Statistics(n, reducer.cka(), reducer.block_influence(), angular)
    scores_path = out_root / "output_scores.json"
    cache = load_scores(scores_path, fingerprint)
    p = config.plan
    plan_cached = cached_output_planner(backend, n, "reference", p.protect_first, p.protect_last, cache)

    def plan_at(t: float) -> list[tuple[int, int]]:
        windows = plan_cached(t)
        save_scores(scores_path, fingerprint, cache)
        return windows

    search = lambda k: search_output_threshold(plan_at, k)  # noqa: E731

    # Plan losses, alphas and corrections, shared by every slm_global plan of this calibration; losses
    # kept on disk.
    memo = PlanMemo(losses=PlanLosses(out_root / "plan_losses.json", fingerprint))

    def global_plan(k: int, method: str) -> planner.MergePlan:
        rule, correction = GLOBAL_METHODS[method]
        plan_cfg = config.plan.model_copy(update={"search": "global", "threshold": None,
                                                  "target_layers_removed": k, "target_ratio": None})
        merge_cfg = config.merge.model_copy(update={"rule": rule, "correction": correction})
        method_config = config.model_copy(update={"plan": plan_cfg, "merge": merge_cfg})
        method_ctx = RunContext(method_config, ctx.model_dir, ctx.calibration_source, None, show_progress)
        out_dir = out_root / f"{method}-{k}"
        out_dir.mkdir(parents=True, exist_ok=True)
        plan, details = PlanSearch(method_ctx, reducer, backend, memo).make_plan(index, out_dir)
        write_json(out_dir / "plan.json", {**plan.to_json(), "details": details})
        return plan

    def staged_plan(k: int, method: str):
        out_dir = out_root / f"{method}-{k}"
        out_dir.mkdir(parents=True, exist_ok=True)
        protect_first = max(p.protect_first, 1)
        fits = None
        if method in SLEB_METHODS:
            plan = baselines.sleb(n, k, lambda windows: plan_loss(backend, memo, windows, p.score_batches),
                                  protect_first)
            if p.rerank > 1 and method.endswith(("_refit", "_pool")):
                plan, search, fits = reranked_sleb(plan, method.rpartition("_")[2])
        elif method in ANGULAR_METHODS:
            plan = baselines.angular_block(stats.angular, k, protect_first=protect_first)
        else:
            plan = replaceme_plan(backend, stats, k, method, protect_first, out_dir)
        if method.startswith("linearpatch_"):
            plan = linear_patch_plan(backend, plan, method, out_dir)
        elif method.endswith(("_refit", "_pool")):
            plan = refit_plan(backend, plan, method, out_dir, config.merge.correction_batches,
                              method.rpartition("_")[2], fits)
        if fits is not None:
            search.release_corrections()  # the finalists' maps: the winner's are in its file now
        write_json(out_dir / "plan.json", plan.to_json())
        return plan

    def reranked_sleb(base: baselines.LayerPlan, kind: str):
        """plan.rerank: SLEB's finalists ranked after their ``kind`` corrections (PlanSearch.rerank, as
        `run` does with plan.search=sleb); the plan, the search holding their maps, and the winner's fits."""
        merge_cfg = config.merge.model_copy(update={"rule": "drop", "correction": kind})
        method_ctx = RunContext(config.model_copy(update={"merge": merge_cfg}), ctx.model_dir,
                                ctx.calibration_source, None, show_progress)
        search = PlanSearch(method_ctx, reducer, backend, memo)
        best, ranking = search.rerank(baselines.sleb_finalists(n, base.details, p.rerank))
        last = next(layer for (layer, _), f in zip(base.details["last_step"], ranking) if f["chosen"])
        order = [*base.details["order"][:-1], last]
        plan = baselines.removal_plan("sleb", n, order, **{**base.details, "order": order, "rerank": ranking})
        return plan, search, [memo.corrections[correction_key(w, "drop", None, kind)] for w in best]

    with ctx.timed("plan"):
        plans = {k: make_plans(stats, k, config, ms, search, global_plan, staged_plan)
                 for k, ms in wanted.items() if ms}
    # Free the merged layers and fitted corrections the stages built while planning (the plans that use
    # corrections carry them in their own files).
    backend.clear_candidates(corrections=True)
    return plans


def plan_loss(backend: Backend, memo: PlanMemo, windows: tuple, num_batches: int | None = None) -> float:
    """Calibration NLL of removing ``windows`` (rule drop, uncorrected) on the first ``num_batches``
    batches, measured once per memo: SLEB's trials and the global search's measured plans are the same
    plans."""
    key = (tuple(windows), "drop", score_label("nll", num_batches))
    if key not in memo.losses:
        memo.losses[key] = backend.score_plan(windows, "drop", None, "nll", num_batches=num_batches)
        log.info("plan %s (drop): calibration nll %.4f", [list(w) for w in windows], memo.losses[key])
    return memo.losses[key]


def replaceme_plan(backend: Backend, stats: Statistics, k: int, method: str, protect_first: int,
                   out_dir: Path) -> baselines.LayerPlan:
    """ReplaceMe: the angular block, its map fitted on every cached calibration batch and written beside
    the plan (a linear corrections file: the merge folds it into the down projection of the layer below)."""
    block = baselines.angular_block(stats.angular, k, protect_first=protect_first)
    (window,) = block.windows
    (fit,) = backend.fit_corrections([(window, "drop", None, method)], num_batches=1 << 30)  # every batch
    backend.clear_candidates(corrections=True)
    file, sha = write_corrections(out_dir, {window: fit.matrix}, "linear")
    inner = replace(block.plan, corrections=file, corrections_sha256=sha)
    log.info("%s: block %s, map error on its fitting tokens %.3f of the plain removal's", method, list(window),
             fit.loss)
    return baselines.LayerPlan(method, inner, {**block.details, "fit": method, "fit_loss": fit.loss})


def refit_plan(backend: Backend, base: baselines.LayerPlan, method: str, out_dir: Path,
               num_batches: int, kind: str = "refit", fits: Sequence[CorrectionFit] | None = None
               ) -> baselines.LayerPlan:
    """``base``'s removal with slm-dist's ``kind`` correction (refit or pool) of each window's kept layer,
    each fitted on the original model's inputs to its window (as the global search fits them); a window
    whose fit does not beat its plain removal on held-out batches keeps the plain removal. ``fits``:
    the windows' fits made already (plan.rerank's), in window order."""
    windows = list(base.windows)
    if fits is None:
        fits = backend.fit_corrections([(w, "drop", None, kind) for w in windows], num_batches)
        backend.clear_candidates(corrections=True)
    kept = {w: fit.matrix for w, fit in zip(windows, fits) if fit.corrects}
    file, sha = write_corrections(out_dir, kept, kind)
    log.info("%s: windows %s, held-out error %s of the plain removal's (%d of %d corrected)", method,
             [list(w) for w in windows], [round(f.loss, 3) for f in fits], len(kept), len(windows))
    details = {**base.details, kind: [f.to_json() for f in fits] if len(fits) > 1 else fits[0].to_json()}
    inner = replace(base.plan, corrections=file, corrections_sha256=sha) if kept else base.plan
    return baselines.LayerPlan(method, inner, details)


def linear_patch_plan(backend: Backend, base: baselines.LayerPlan, method: str,
                      out_dir: Path) -> baselines.LayerPlan:
    """LinearPatch on ``base``'s removal: one patch per window (pruning interface), fitted on every
    cached calibration batch, saved keyed by the pruned model's index of the layer below the cut."""
    windows = list(base.windows)
    patches = backend.fit_patches(windows, num_batches=1 << 30)
    backend.clear_candidates()
    by_layer = {lo - sum(h - l for l, h in windows if h < lo): p for (lo, _), p in zip(windows, patches)}
    path = out_dir / corrections_file.PATCH_FILE_NAME
    sha = corrections_file.save_patches(path, by_layer)
    log.info("%s: %d patch(es) after pruned layers %s written to %s", method, len(by_layer), sorted(by_layer), path)
    return baselines.LayerPlan(method, base.plan, {**base.details, "patch": {"file": str(path.resolve()),
                                                                            "sha256": sha}})


def plan_patch(plan) -> dict | None:
    """LinearPatch's patch file of a plan ({"file", "sha256"}), or None."""
    return getattr(plan, "details", {}).get("patch") if plan is not None else None


def keep_previous(results_path: Path, previous: dict, reused: int) -> None:
    """Measured rows this run cannot reuse (another model, other eval items or files) are moved aside
    to ``compare.<time>.json``, never overwritten: they may have cost hours."""
    measured = sum(1 for r in previous.get("rows", []) + previous.get("other_rows", []) if "eval" in r)
    if measured > reused:
        kept = results_path.with_name(f"compare.{time.strftime('%Y%m%d-%H%M%S')}.json")
        shutil.copyfile(results_path, kept)
        log.warning("%s holds %d measured rows for other settings (model or evaluation differ); this run starts "
                    "afresh and keeps them in %s", results_path, measured - reused, kept)


def model_identity(plan) -> str:
    """Plans that build the same weights share this string. A window merged with alpha 0 writes layer
    lo's tensors unchanged, as drop does; so ``slm_global_scaled`` with alphas 0 and the angular block
    over the same layers are one model, evaluated once."""
    if plan is None or not plan.windows:
        return "dense"
    alphas = getattr(plan, "alphas", None) or [None] * len(plan.windows)
    parts = [[list(w), "drop"] if plan.rule == "drop" or (plan.rule == "scaled" and a == 0.0)
             else [list(w), plan.rule, a] for w, a in zip(plan.windows, alphas)]
    if getattr(plan, "corrections", None):
        parts.append(["corrections", plan.corrections_sha256])  # fitted maps change the weights
    if plan_patch(plan):
        parts.append(["patch", plan_patch(plan)["sha256"]])  # an in-memory patch changes the model too
    return json.dumps(parts)


def _row_key(method: str, plan) -> dict:
    if plan is None:
        return {"method": method, "windows": [], "rule": None}
    key = {"method": method, "windows": [list(w) for w in plan.windows], "rule": plan.rule}
    if getattr(plan, "corrections", None):
        key["corrections"] = plan.corrections_sha256  # refitted maps are another model
        # Rows written before refit existed hold linear maps and no kind. A missing file is left to the
        # merge, which names it.
        kind = corrections_file.kind_of(plan.corrections) if Path(plan.corrections).is_file() else "linear"
        kind = getattr(plan, "details", {}).get("fit", kind)  # ReplaceMe: its objective, folded as linear
        if kind != "linear":
            key["correction_kind"] = kind
    if plan_patch(plan):
        key["patch"] = plan_patch(plan)["sha256"]
    return key


def _method_config(config: SlmConfig, out_dir: Path) -> SlmConfig:
    merge = config.merge.model_copy(update={"output_dir": out_dir / "model"})
    run = config.run.model_copy(update={"dir": out_dir})
    return config.model_copy(update={"merge": merge, "run": run})


def compare(config: SlmConfig, layers_removed: Sequence[int], spec: evaluation.EvalSpec,
            methods: Sequence[str] = METHODS, cache_dir: Path | None = None, keep_models: bool = False,
            show_progress: bool = True) -> dict:
    """Prune with every method at each count in ``layers_removed``, evaluate all, return the table data."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if not layers_removed:
        raise ConfigError("give at least one layer count to remove (--removed N, or plan.target_layers_removed)")
    ctx = context.resolve_inputs(config, cache_dir, show_progress)
    preflight.require(preflight.run_problems(config, ctx.model_dir, ctx.calibration_source, None, stop_after="plan",
                                             compare=True)
                      + preflight.eval_input_problems(spec.ppl_files, spec.tasks, spec.ppl_join, spec.limit))
    out_root = ctx.run_dir / "compare"
    out_root.mkdir(parents=True, exist_ok=True)
    index = open_index(ctx.model_dir, allow_pickle=config.model.allow_pickle)
    n = index.num_layers
    if spec.ppl_files == () and ctx.heldout_text is not None:
        spec = replace(spec, ppl_files=(ctx.heldout_text,), ppl_join="raw")  # the demo's held-out text
    tokenizer = context.load_tokenizer(ctx.model_dir)
    inputs = evaluation.prepare_inputs(spec, tokenizer)
    settings = evaluation.describe(spec, inputs)
    results_path = out_root / "compare.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    # Measured rows of the same model and evaluation are reused, and kept (``other_rows``) when this
    # run does not ask for them, so runs over different methods or counts add up in one file.
    reuse = {json.dumps(r["key"], sort_keys=True): r for r in previous.get("rows", []) + previous.get("other_rows", [])
             if previous.get("model") == str(ctx.model_dir) and "eval" in r
             and previous.get("eval_settings") == json.loads(json.dumps(settings))}
    keep_previous(results_path, previous, len(reuse))
    result = {"model": str(ctx.model_dir), "num_layers": n, "layers_removed": list(layers_removed),
              "methods": list(methods), "eval_settings": settings,
              "calibration": {"source": str(ctx.calibration_source), **config.calibration.model_dump(mode="json"),
                              "score_batches": config.plan.score_batches},
              "rows": [], "other_rows": list(reuse.values())}

    input_ids = pipeline.calibration_ids(ctx)
    fingerprint = plans_fingerprint(ctx.model_dir, input_ids, config)
    stored = {}
    if previous.get("plans_fingerprint") == fingerprint:
        before = previous.get("plan_settings", {})
        stored = {key: plan for key, plan in previous.get("plans", {}).items()
                  if before.get(key, {}) == method_settings(key.split("@")[0], config)}
    result["plans_fingerprint"], result["plans"] = fingerprint, dict(stored)
    result["plan_settings"] = {key: v for key, v in previous.get("plan_settings", {}).items() if key in stored}

    backend = context.make_backend(config)
    try:
        missing = {k: [m for m in methods if f"{m}@{k}" not in stored] for k in layers_removed}
        if any(missing.values()):
            new = _plan_all(ctx, config, index, backend, input_ids, missing, out_root, fingerprint)
            result["plans"].update({f"{m}@{k}": plan_to_json(plan) for k in new for m, plan in new[k].items()})
            result["plan_settings"].update({f"{m}@{k}": method_settings(m, config) for k in new for m in new[k]})
        else:
            log.info("reusing every plan in %s (same model, calibration tokens and settings)", results_path)
        plans = {k: {m: plan_from_json(result["plans"][f"{m}@{k}"]) for m in methods} for k in layers_removed}
        write_json(results_path, result)

        by_model: dict[str, dict] = {}  # model_identity -> its measured row, this run

        def record(row: dict, plan=None) -> None:
            result["rows"].append(row)
            key = json.dumps(row["key"], sort_keys=True)
            result["other_rows"] = [r for r in result["other_rows"] if json.dumps(r["key"], sort_keys=True) != key]
            write_json(results_path, result)
            if "eval" in row:
                by_model.setdefault(model_identity(plan), row)

        def measure(method: str, k: int, plan) -> None:
            key = _row_key(method, plan)
            done = reuse.get(json.dumps(key, sort_keys=True))
            if done is not None:
                log.info("%s (k=%d): reusing the result in %s", method, k, results_path)
                record(done, plan)
                return
            twin = by_model.get(model_identity(plan))
            if twin is not None:
                log.info("%s (k=%d) builds the same weights as %s: its scores are reused", method, k, twin["method"])
                record({**twin, "key": key, "method": method, "label": LABELS[method], "target_removed": k,
                        "windows": key["windows"], "rule": key["rule"],
                        "threshold": None if plan is None else plan.threshold,
                        "same_model_as": twin["method"], "seconds": 0.0}, plan)
                return
            start = time.perf_counter()
            model_dir = ctx.model_dir
            method_dir = out_root / f"{method}-{k}"
            try:
                if plan is not None:
                    method_config = _method_config(config, method_dir)
                    method_dir.mkdir(parents=True, exist_ok=True)
                    merge_stage(method_config, index, plan, backend.run_shard_jobs, show_progress)
                    model_dir = method_config.output_dir
                log.info("evaluating %s (k=%d) from %s", method, k, model_dir)
                patch = plan_patch(plan)
                scores = evaluation.evaluate_model(model_dir, spec, config, backend, show_progress, inputs,
                                                   patch_file=None if patch is None else Path(patch["file"]))
            except Exception as err:  # one broken method must not cost the other models' hours
                log.exception("%s (k=%d) failed; its row records the error", method, k)
                record({"key": key | {"k": k}, "method": method, "label": LABELS[method], "target_removed": k,
                        "error": f"{type(err).__name__}: {err}"})
                return
            if plan is not None and not keep_models:
                shutil.rmtree(method_dir / "model", ignore_errors=True)
            record({"key": key, "method": method, "label": LABELS[method], "target_removed": k,
                    "layers_removed": 0 if plan is None else plan.layers_removed,
                    "layers_after": n if plan is None else plan.num_layers_after,
                    "windows": key["windows"], "rule": key["rule"],
                    "threshold": None if plan is None else plan.threshold,
                    "eval": scores, "seconds": round(time.perf_counter() - start, 1)}, plan)

        measure("dense", 0, None)
        for k in layers_removed:
            for method in methods:
                plan = plans[k][method]
                if isinstance(plan, str):
                    log.warning("%s (k=%d) cannot plan: %s", method, k, plan)
                    record({"key": _row_key(method, None) | {"k": k}, "method": method, "label": LABELS[method],
                            "target_removed": k, "error": plan})
                    continue
                measure(method, k, plan)
    finally:
        backend.close()
    result["seconds"] = ctx.timings
    write_json(results_path, result)
    (out_root / "compare.md").write_text(format_table(result) + "\n")
    similarity = ctx.run_dir / "similarity.json"
    if similarity.is_file():
        from slm_dist.report import save_figure

        shown = [(f"{LABELS[m]}, k={k}", plans[k][m]) for k in layers_removed for m in methods
                 if not isinstance(plans[k][m], str)]
        save_figure(plans_figure(json.loads(similarity.read_text())["cka"], shown), out_root / PLANS_FIGURE)
    return result


# ------------------------------------------------------------------------------------ figure
PLANS_FIGURE = "plans.png"


def plans_figure(cka: Sequence[Sequence[float]], plans: Sequence[tuple[str, object]]):
    """The CKA heatmap with, under it on the same layer axis, one row per plan: the layers it removes
    (red) and, for merge rules, the layer each window is folded into (orange).

    Column m is matrix index m: 0 the embedding output, l+1 the output of layer l, so a plan's
    mark for layer l sits under the heatmap column of that layer's output.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from slm_dist.report import HEATMAP_CMAP, heatmap_range

    size = len(cka)
    marks = torch.zeros(max(len(plans), 1), size)
    for row, (_, plan) in enumerate(plans):
        for lo, hi in plan.windows:
            marks[row, lo + 2:hi + 2] = 2.0  # removed layers lo+1..hi
            if plan.rule != "drop":
                marks[row, lo + 1] = 1.0  # merged into layer lo
    rows = max(len(plans), 1)
    fig = Figure(figsize=(9.0, 6.5 + 0.25 * rows), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=[40, 1], height_ratios=[size, 1.3 * rows], hspace=0.08,
                            wspace=0.03, left=0.30, right=0.92, top=0.95, bottom=0.12)
    top, bar, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 0])
    vmin, vmax = heatmap_range(cka)
    image = top.imshow(cka, cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
    fig.colorbar(image, cax=bar, label="CKA")
    top.set_title("Linear CKA between layer outputs; below: what each plan removes", fontsize=9)
    top.set_ylabel("layer output")
    top.set_xticks([])
    top.set_yticks([0, *range(5, size, 5)], ["embed", *(str(m - 1) for m in range(5, size, 5))], fontsize=7)
    bottom.imshow(marks, cmap=ListedColormap(["#f2f2f2", "tab:orange", "tab:red"]), vmin=0, vmax=2,
                  interpolation="nearest", aspect="auto")
    bottom.set_yticks(range(len(plans)), [label for label, _ in plans], fontsize=6)
    step = max(1, math.ceil(size / 24))
    ticks = list(range(0, size, step))
    bottom.set_xticks(ticks, ["embed" if m == 0 else str(m - 1) for m in ticks], rotation=90, fontsize=7)
    bottom.set_xlabel("layer (red: removed; orange: a window merged into it)", fontsize=8)
    for ax in (top, bottom):
        ax.set_xlim(-0.5, size - 0.5)
    return fig


# ------------------------------------------------------------------------------------ table
def _short(path: str) -> str:
    p = Path(path)
    return p.parent.name or p.stem


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_se(value: float | None, stderr: float | None) -> str:
    """A proportion as a percentage with one decimal and its standard error: '61.0 ± 2.2'."""
    if value is None:
        return "n/a"
    return _fmt(100 * value, 1) + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def describe_plan(windows: Sequence[Sequence[int]], rule: str | None) -> str:
    """'drop 12-17' (layers removed) for removals, 'sum 20-23, 25-28' (inclusive windows) for merges."""
    if not windows:
        return "-"
    if rule == "drop":
        runs = [(lo + 1, hi) for lo, hi in windows]
        return "drop " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
    return f"{rule} " + ", ".join(f"{lo}-{hi}" for lo, hi in windows)


def correction_label(key: dict) -> str:
    """' + linear' / ' + refit' for a row whose plan carries corrections, else ''."""
    label = f" + {key.get('correction_kind', 'linear')}" if key.get("corrections") else ""
    return label + (" + LinearPatch (in memory)" if key.get("patch") else "")


def format_table(result: dict) -> str:
    """One Markdown table: a row per model, perplexities, each task's reported metric (%) and the average,
    each ± its standard error."""
    ppl_files = list(result["eval_settings"]["ppl_windows"])
    tasks = list(result["eval_settings"]["metric"])
    metric = result["eval_settings"]["metric"]
    lambada = any("lambada" in r.get("eval", {}) for r in result["rows"])
    head = (["Method", "Removed", "Layers", "Plan", *(f"PPL {_short(f)}" for f in ppl_files),
             *(f"{t} ({metric[t]})" for t in tasks), "Avg", *(["LAMBADA (acc)"] if lambada else [])])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if "error" in row:
            cells = [row["label"], str(row["target_removed"]), "-", f"cannot plan: {row['error'][:80]}"]
            cells += ["-"] * (len(head) - len(cells))
        else:
            ev = row["eval"]
            cells = [row["label"], str(row["layers_removed"]), str(row["layers_after"]),
                     describe_plan(row["windows"], row["rule"]) + correction_label(row["key"]),
                     *(_fmt(ev["ppl"].get(f)) for f in ppl_files),
                     *(_fmt_se(ev["tasks"][t][metric[t]], ev["tasks"][t].get(f"{metric[t]}_stderr"))
                       if t in ev["tasks"] else "n/a" for t in tasks),
                     _fmt_se(ev["average"], ev.get("average_stderr"))]
            if lambada:
                lam = ev.get("lambada")
                cells.append("n/a" if lam is None else _fmt_se(lam["acc"], lam.get("acc_stderr")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
