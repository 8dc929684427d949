"""The plan stage: calibration statistics (and, for the searches that measure, forward passes on the
cached calibration batches) -> a `MergePlan`.

`PlanSearch.make_plan` is the one call. Which planner runs follows the config: the published
loop (``similarity.criterion: output``), the sliding CKA window (``plan.search: sliding``, the
paper), the global search (``plan.search: global``: exact least-cost windows from the statistics,
candidates ranked by calibration loss, then a local search), or SLEB's greedy removal (``plan.search:
sleb``: every trial removal measured). Rule ``scaled`` fits an alpha per
window and ``merge.correction`` a correction per window before a plan is measured.

What a search measured (alphas, corrections, plan losses) lives in a `PlanMemo`: one per calibration
pass, so `compare`, which plans many methods on one pass, measures each plan once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slm_dist import progress
from slm_dist.backends.base import Backend
from slm_dist.checkpoint import corrections as corrections_file
from slm_dist.checkpoint.index import CheckpointIndex, layers_for_ratio
from slm_dist.config import SlmConfig
from slm_dist.context import RunContext
from slm_dist.core import baselines, planner
from slm_dist.core import global_planner as gp
from slm_dist.core.alpha_fit import AlphaFit
from slm_dist.core.correction_fit import CorrectionFit, CorrectionKey, CorrectionRequest, correction_key
from slm_dist.core.types import Window
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)

Windows = tuple[Window, ...]
LossKey = tuple[Windows, str, str]  # (windows, what the weights depend on: rule and correction, metric)


@dataclass
class PlanMemo:
    """What the searches measured on one calibration pass (all small, on the driver)."""

    fits: dict[Window, AlphaFit] = field(default_factory=dict)                # rule scaled: alpha per window
    corrections: dict[CorrectionKey, CorrectionFit] = field(default_factory=dict)  # maps released after scoring
    losses: MutableMapping[LossKey, float] = field(default_factory=dict)      # calibration loss per plan


def score_label(metric: str, num_batches: int | None, skip_batches: int = 0) -> str:
    """The metric part of a loss key: a plan scored on other batches is another measurement."""
    if skip_batches:
        return f"{metric}(batches={skip_batches}:{'' if num_batches is None else skip_batches + num_batches})"
    return metric if num_batches is None else f"{metric}(batches={num_batches})"


def check_target_feasible(config: SlmConfig, index: CheckpointIndex) -> None:
    """Fail before any forward pass when the asked-for removal cannot be met."""
    p = config.plan
    if p.target_layers_removed is not None:
        most = planner.max_layers_removed(index.num_layers, p.protect_first, p.protect_last, p.max_window)
        if p.target_layers_removed > most:
            cap = f", max_window={p.max_window}" if p.max_window is not None else ""
            raise planner.PlanError(
                f"plan.target_layers_removed={p.target_layers_removed} but a {index.num_layers}-layer model with "
                f"protect_first={p.protect_first}, protect_last={p.protect_last}{cap} can lose at most {most} "
                "layers (each window keeps one); ask for fewer")
    elif p.target_ratio is not None:
        layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)


def write_corrections(out_dir: Path, matrices: dict, kind: str = "linear") -> tuple[str | None, str | None]:
    """The plan's maps beside its plan.json: (absolute path, sha256), or (None, None) when every window
    kept its plain merge (a file left by an earlier plan is removed so nothing stale lies beside it)."""
    path = Path(out_dir) / corrections_file.FILE_NAME
    if not matrices:
        path.unlink(missing_ok=True)
        return None, None
    sha = corrections_file.save_corrections(path, matrices, kind)
    log.info("plan: %s corrections of %d window(s) written to %s", kind, len(matrices), path)
    return str(path.resolve()), sha


class PlanSearch:
    """The plan stage on one calibration pass: ``make_plan`` builds the plan the config asks for."""

    def __init__(self, ctx: RunContext, reducer: StatsReducer, backend: Backend, memo: PlanMemo | None = None):
        self.ctx, self.config, self.reducer, self.backend = ctx, ctx.config, reducer, backend
        self.memo = PlanMemo() if memo is None else memo

    # ----------------------------------------------------------------------------------- plan
    def make_plan(self, index: CheckpointIndex, out_dir: Path | None = None) -> tuple[planner.MergePlan, dict]:
        """The plan and its provenance (``details``: trace, candidates, alphas, corrections).
        merge.correction=linear|refit writes the plan's corrections to ``out_dir`` (default run.dir)."""
        p, cfg = self.config.plan, self.config
        n = index.num_layers
        details: dict = {}
        threshold = None
        if cfg.similarity.criterion == "output":
            windows, trace = self.backend.plan_output(p.threshold, cfg.merge.rule, p.protect_first, p.protect_last, n)
            details["trace"] = [{"committed": [list(w) for w in s.committed], "trial": list(s.trial),
                                 "score": s.score, "decision": s.decision} for s in trace]
            threshold = p.threshold
        elif p.search == "global":
            k = self._target(index, details)
            windows, details["global"] = self.global_windows(k)
        elif p.search == "sleb":
            k = self._target(index, details)
            windows, details["sleb"] = self.sleb_windows(k)
        elif p.threshold is not None:
            threshold = p.threshold
            windows = planner.plan_windows_cka(self.reducer.cka(), threshold, p.protect_first, p.protect_last,
                                               p.max_window)
        else:
            k = self._target(index, details)
            threshold, windows = planner.search_threshold(self.reducer.cka(), k, p.protect_first, p.protect_last,
                                                          p.max_window)
        windows = tuple(tuple(w) for w in windows)
        alphas = None
        if cfg.merge.rule == "scaled":
            self.fit_alphas(windows)
            alphas = tuple(self.memo.fits[w].alpha for w in windows)
            details["alphas"] = [self.memo.fits[w].to_json() for w in windows]
        file = sha = None
        if cfg.merge.correction != "none" and windows:
            alpha_of = dict(zip(windows, alphas)) if alphas is not None else {}
            requests = [(w, cfg.merge.rule, alpha_of.get(w), cfg.merge.correction) for w in windows]
            self.fit_corrections(requests, refit_released=True)
            chosen = [self.memo.corrections[correction_key(*r)] for r in requests]
            details["corrections"] = [fit.to_json() for fit in chosen]
            file, sha = write_corrections(out_dir or self.ctx.run_dir, {f.window: f.matrix for f in chosen if f.corrects},
                                          cfg.merge.correction)
        plan = planner.MergePlan(num_layers_before=n, windows=windows, rule=cfg.merge.rule,
                                 criterion=cfg.similarity.criterion, threshold=threshold, alphas=alphas,
                                 corrections=file, corrections_sha256=sha)
        return plan, details

    def _target(self, index: CheckpointIndex, details: dict) -> int:
        """Layers to remove: plan.target_layers_removed, or the count nearest plan.target_ratio."""
        p = self.config.plan
        k = p.target_layers_removed
        if k is None:
            k = layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)
            details["target_ratio"] = p.target_ratio
        details["target_layers_removed"] = k
        return k

    # -------------------------------------------------------------------------- global search
    def global_windows(self, k: int) -> tuple[Windows, dict]:
        """Exact least-cost windows (global_planner). With plan.candidates > 1 every cost proposes plans
        and forward passes on the calibration samples rank them; plan.local_search then tries plans one
        move from the best."""
        p, n = self.config.plan, self.reducer.num_layers
        stats = dict(cka=self.reducer.cka(), block_influence=self.reducer.block_influence(),
                     angular_distance=self.reducer.angular_distance())
        details: dict = {"cost": p.cost, "metric": p.refine_metric}
        if p.cost == "measured":
            # Each removable layer's own damage: the loss with that layer alone removed, minus the dense
            # loss. Uncorrected even under merge.correction: it only proposes plans (those are measured
            # corrected), and it is then shared with the uncorrected searches of the same calibration.
            dense = self.measure((), "drop")
            layers = gp.removable_layer_ids(n, p.protect_first, p.protect_last)
            per_layer = [self.measure(((layer - 1, layer),), "drop", correctable=False) - dense
                         if layer in layers else math.inf for layer in range(n)]
            stats["measured"] = torch.tensor(per_layer, dtype=torch.float64)
            details["dense_loss"] = dense
            details["measured"] = [v if math.isfinite(v) else None for v in per_layer]
            log.info("measured damage per layer: %s", [None if not math.isfinite(v) else round(v, 4) for v in per_layer])
        names = [p.cost] + [c for c in gp.STATISTIC_COSTS if c != p.cost]  # the configured cost proposes first
        tables = {name: gp.window_costs(name, **stats) for name in names}
        if p.candidates == 1 and p.local_search == 0:
            best = gp.plan_windows_global(tables[p.cost], k, p.protect_first, p.protect_last, p.max_window)
            return best.windows, {**details, "windows": [list(w) for w in best.windows], "cost_value": best.cost}

        rule = self.config.merge.rule
        candidates = gp.candidate_plans(tables, k, p.candidates, p.protect_first, p.protect_last, p.max_window)
        ranked = gp.rank_plans(candidates, lambda w: self.measure(w, rule))
        best, best_loss = ranked[0].windows, ranked[0].loss
        log.info("global search: %d candidates ranked by calibration %s; best %s (proposed by %s, loss %.4f)",
                 len(ranked), p.refine_metric, [list(w) for w in best], ranked[0].proposed_by, best_loss)
        details["candidates"] = [r.to_json() for r in ranked]
        if p.local_search > 0:
            known = {r.windows: r.loss for r in ranked}
            # Swaps are tried cheapest predicted first: by measured damage when measured, else Block Influence.
            layer_cost = stats.get("measured", stats["block_influence"]).tolist()
            best, best_loss, steps = gp.local_search(
                best, lambda w: self.measure(w, rule),
                lambda w: gp.neighbour_plans(w, n, p.protect_first, p.protect_last, p.max_window, layer_cost),
                p.local_search, known)
            details["local_search"] = [{"windows": [list(w) for w in plan], "loss": v} for plan, v in steps]
            log.info("local search: %d more plans measured; best %s (loss %.4f)", len(steps),
                     [list(w) for w in best], best_loss)
        details.update(windows=[list(w) for w in best], loss=best_loss)
        return best, details

    def sleb_windows(self, k: int) -> tuple[Windows, dict]:
        """SLEB's greedy (core/baselines.py): each trial is a plain removal scored by plan.refine_metric on
        plan.score_batches batches. The trials are uncorrected, as the paper's: merge.rule and
        merge.correction then apply to the chosen layers' windows."""
        p, n = self.config.plan, self.reducer.num_layers
        first = max(p.protect_first, 1)  # layer 0 stays, as every planner here keeps it
        trials = planner.sleb_trials(n, k, first, p.protect_last)
        with progress.bar(self.ctx.show_progress, trials, "sleb", "trial") as bar:
            def loss(windows: Sequence[Window]) -> float:
                bar.update()
                return self.measure(tuple(windows), "drop", correctable=False)

            chosen = baselines.sleb(n, k, loss, first, p.protect_last)
        log.info("sleb: removed %s in that order (%d trials)", list(chosen.details["order"]), trials)
        details = {"order": list(chosen.details["order"]), "steps": chosen.details["steps"],
                   "last_step": chosen.details["last_step"], "metric": p.refine_metric}
        if p.rerank == 1:
            return chosen.windows, details
        best, details["rerank"] = self.rerank(baselines.sleb_finalists(n, chosen.details, p.rerank))
        return best, details

    def rerank(self, plans: Sequence[Windows]) -> tuple[Windows, list[dict]]:
        """``plans`` (SLEB's finalists, best plain removal first) ranked by the calibration NLL of each
        with its merge.correction fitted, on the batches after merge.correction_batches: no fit saw them,
        so a fit that only memorised its batches gains nothing there. The plain removal's loss ranks
        what the removal breaks; this ranks what is left after the repair, which is what gets written.

        Every finalist's maps are fitted before any is scored and kept until the plan is written (the
        finalists share most windows: each is fitted once; the winner's are not fitted again)."""
        m = self.config.merge
        windows = list(dict.fromkeys(w for plan in plans for w in plan))
        alphas: dict[Window, float] = {}
        if m.rule == "scaled":
            self.fit_alphas(windows)
            alphas = {w: self.memo.fits[w].alpha for w in windows}
        self.fit_corrections([(w, m.rule, alphas.get(w), m.correction) for w in windows], refit_released=True)
        scored = [(plan, self.measure(plan, m.rule, held_out=True, release=False)) for plan in plans]
        best = min(range(len(plans)), key=lambda i: (scored[i][1], i))  # ties: the better plain removal
        log.info("sleb rerank: %d finalists scored with their %s corrections on the calibration batches after the "
                 "first %d: %s; chosen %s", len(plans), m.correction, m.correction_batches,
                 [round(v, 4) for _, v in scored], [list(w) for w in plans[best]])
        return plans[best], [{"windows": [list(w) for w in plan], "held_out_nll": v, "chosen": i == best}
                             for i, (plan, v) in enumerate(scored)]

    def measure(self, windows: Windows, rule: str, correctable: bool = True, held_out: bool = False,
                release: bool = True) -> float:
        """Calibration loss of a plan, lower is better (each plan measured once per memo). Rule scaled
        fits each window's alpha, and merge.correction each window's correction, before it is measured.
        ``held_out``: on the calibration batches after merge.correction_batches instead of the first
        plan.score_batches; ``release``: drop the plan's fitted maps once it is scored."""
        p, kind = self.config.plan, self.config.merge.correction
        correct = kind != "none" and correctable and bool(windows)
        alphas = None
        if rule == "scaled":
            self.fit_alphas(windows)
            alphas = {w: self.memo.fits[w].alpha for w in windows}
            if all(a == 0.0 for a in alphas.values()):
                rule, alphas = "drop", None  # alpha 0 everywhere is the drop model: measure it once
        corrected = False
        if correct:
            requests = [(w, rule, None if alphas is None else alphas[w], kind) for w in windows]
            self.fit_corrections(requests)
            corrected = any(self.memo.corrections[correction_key(*r)].corrects for r in requests)
        # The memo (and compare's loss file) key: what the plan's weights depend on.
        m = self.config.merge
        cap = f",cap={m.pool_cap}" if kind == "pool" and m.pool_cap is not None else ""  # unset: the labels before it
        label = rule + (f"+{kind}(batches={m.correction_batches},weight={m.correction_weight}{cap})" if corrected else "")
        num, skip = (None, m.correction_batches) if held_out else (p.score_batches, 0)
        key = (windows, label, score_label(p.refine_metric, num, skip))
        if key not in self.memo.losses:
            if corrected:
                self.fit_corrections(requests, refit_released=True)
            score = self.backend.score_plan(windows, rule, alphas, p.refine_metric,
                                            correction=kind if corrected else None, num_batches=num, skip_batches=skip)
            self.memo.losses[key] = score if p.refine_metric == "nll" else 1.0 - score
            log.info("plan %s (%s): calibration %s %.4f", [list(w) for w in windows], label, p.refine_metric,
                     self.memo.losses[key])
        if correct and release:
            self.release_corrections()  # scored or remembered, its maps are done with
        return self.memo.losses[key]

    # ----------------------------------------------------------------------------------- fits
    def fit_alphas(self, windows: Sequence[Window]) -> None:
        missing = [w for w in windows if w not in self.memo.fits]
        if missing:
            for fit in self.backend.fit_alphas(missing, self.config.merge.alpha_batches):
                self.memo.fits[fit.window] = fit

    def fit_corrections(self, requests: Sequence[CorrectionRequest], refit_released: bool = False) -> None:
        """Fit the corrections not fitted yet (and, with ``refit_released``, those whose maps
        ``release_corrections`` dropped)."""
        held = self.memo.corrections
        keys = [correction_key(*r) for r in requests]
        missing = list(dict.fromkeys(k for k in keys if k not in held or (refit_released and held[k].released)))
        if missing:
            # A refit at 70B is minutes of float64 solves per window with nothing else to log meanwhile.
            log.info("fitting %d %s correction(s) on their stages: windows %s, %d calibration batches each ...",
                     len(missing), "/".join(sorted({k[3] for k in missing})), [list(k[0]) for k in missing],
                     self.config.merge.correction_batches)
            for fit in self.backend.fit_corrections(missing, self.config.merge.correction_batches):
                again = fit.key in held  # a released map fitted again: logged the first time
                held[fit.key] = fit
                log.log(logging.DEBUG if again else logging.INFO,
                        "%s correction of window %s (%s): held-out error %.3f of the plain merge's (ridge %s)",
                        fit.kind, list(fit.window), fit.rule, fit.loss, fit.ridge)

    def release_corrections(self) -> None:
        """Drop every fitted map from the stages (and the Ray driver's copies) and from the memo, keeping
        the fits' scores. The search holds one plan's maps at a time this way (a linear map is 256 MiB at
        hidden 8192, a refit more); the final plan's are fitted again on the same batches."""
        held = [key for key, fit in self.memo.corrections.items() if fit.matrix is not None]
        if held:
            self.backend.clear_candidates(corrections=True)
        for key in held:
            self.memo.corrections[key] = self.memo.corrections[key].release()
