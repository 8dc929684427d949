"""The whole run, top to bottom: inspect -> calibrate -> plan -> merge -> verify -> evaluate.

Each stage writes its artifact into the run folder (DESIGN.md, "Run directory"). The backend
(`local`: every stage worker in this process; `ray`: stage actors) only changes how batches move
between the same `StageWorker` objects.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from slm_dist import calibration, corrections_file, planner, run_state
from slm_dist import report as report_mod
from slm_dist import heal as heal_mod
from slm_dist.calibrated_merge import AlphaFit
from slm_dist.arch import get_arch
from slm_dist.checkpoint.index import CheckpointIndex, open_index
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import SlmConfig, needs_cached_inputs, to_yaml
from slm_dist.export import check_output_dir, load_plan, merge_stage  # noqa: F401 (load_plan: re-exported)
from slm_dist.linear_correction import correction_key
from slm_dist.partition import DTYPE_BYTES, ModelBytes, model_bytes_from_tensors, partition_layers
from slm_dist.verify import verify_model
from slm_dist.workers.stage_worker import StageSpec, StatsSpec
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the stages share: resolved inputs, timings, and the progress switch."""

    config: SlmConfig
    model_dir: Path
    calibration_source: Path
    heldout_text: Path | None
    show_progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.config.run.dir

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s ...", stage)
        yield
        self.timings[stage] = round(time.perf_counter() - start, 3)
        log.info("stage %s done in %.1f s", stage, self.timings[stage])


# ------------------------------------------------------------------------------------ resolve
def resolve_inputs(config: SlmConfig, cache_dir: Path | None, show_progress: bool = True) -> RunContext:
    """Fill in the demo model and text where the config leaves them null (fetching them once)."""
    from slm_dist import assets

    model_dir, source, heldout = config.model.path, config.calibration.source, config.eval.heldout
    if model_dir is None or source is None or (heldout is None and config.eval.enabled):
        demo = assets.prepare_demo_assets(config.run.cache_dir or cache_dir or assets.default_cache_dir())
        model_dir = model_dir or demo.model_dir
        source = source or demo.calibration_text
        heldout = heldout or demo.heldout_text
    return RunContext(config, Path(model_dir), Path(source), Path(heldout) if heldout else None, show_progress)


def device_and_dtype(config: SlmConfig) -> tuple[str, str]:
    cluster = config.cluster
    device = cluster.device
    if device == "auto":
        # Ray stages see the GPUs their bundle reserved, not the driver's; locally, what this process sees.
        gpus = cluster.gpus_per_stage > 0 if cluster.backend == "ray" else torch.cuda.is_available()
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and not torch.cuda.is_available() and config.cluster.backend == "local":
        raise RuntimeError("cluster.device=cuda but this process sees no CUDA device; use cluster.device=cpu")
    dtype = config.model.dtype
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; on GPUs bf16 halves memory and is the native format.
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def stage_specs(config: SlmConfig, index: CheckpointIndex, model_dir: Path | None = None) -> list[StageSpec]:
    """Contiguous, byte-balanced layer slices, one per stage, sized in the compute dtype."""
    device, dtype = device_and_dtype(config)
    sizes = index_model_bytes(index, dtype)
    slices = partition_layers(sizes.layers, config.cluster.num_stages, config.cluster.memory_per_stage_bytes,
                              sizes.first_extra, sizes.last_extra)
    return [StageSpec(model_dir=str(model_dir or index.root), start=a, stop=b, num_layers=index.num_layers,
                      device=device, dtype=dtype, attn_implementation=config.model.attn_implementation,
                      allow_pickle=config.model.allow_pickle) for a, b in slices]


def index_model_bytes(index: CheckpointIndex, dtype: str) -> ModelBytes:
    """Bytes each part of the model takes on a stage computing in ``dtype`` (the stage casts on load,
    so a bf16 checkpoint computed in float32 takes twice its file size)."""
    arch = get_arch(index.model_type)
    shapes = {key: info.shape for key, info in index.tensors.items()}
    tied_head = None
    head_key = f"{arch.lm_head_module}.weight"
    if head_key not in shapes and index.config.get("tie_word_embeddings", False):
        tied_head = math.prod(shapes[f"{arch.embed_module}.weight"])  # the last stage holds a copy
    return model_bytes_from_tensors(shapes, lambda k: (arch.split_key(k) or (None,))[0], arch.embed_module,
                                    index.num_layers, DTYPE_BYTES[dtype], tied_head)


def stats_spec(config: SlmConfig) -> StatsSpec:
    s = config.similarity
    return StatsSpec(kernel=s.kernel, unit=s.unit, tokens_per_batch=s.tokens_per_batch,
                     skip_first_token=s.skip_first_token, seed=config.calibration.seed)


def make_backend(config: SlmConfig):
    if config.cluster.backend == "ray":
        from slm_dist import distributed

        return distributed.RayBackend(config.cluster)
    from slm_dist.local_backend import LocalBackend

    return LocalBackend()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def batches(input_ids: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    return [(i // batch_size, input_ids[i:i + batch_size]) for i in range(0, len(input_ids), batch_size)]


# ----------------------------------------------------------------------------------- stages
def calibrate(ctx: RunContext, index: CheckpointIndex, backend) -> tuple[StatsReducer, torch.Tensor]:
    cfg = ctx.config.calibration
    tokenizer = load_tokenizer(ctx.model_dir)
    input_ids = calibration.load_calibration(ctx.calibration_source, tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed)
    calibration.save_calibration(ctx.run_dir / "calibration.parquet", input_ids)
    if ctx.config.similarity.unit == "sample" and len(input_ids) % cfg.batch_size and len(input_ids) % cfg.batch_size < 4:
        raise ValueError(f"calibration.num_samples={cfg.num_samples} leaves a last batch of "
                         f"{len(input_ids) % cfg.batch_size} samples; unit=sample needs >= 4 per batch: use a multiple "
                         f"of calibration.batch_size={cfg.batch_size}")
    specs = stage_specs(ctx.config, index, ctx.model_dir)
    log.info("stages: %s", ", ".join(f"[{s.start},{s.stop})" for s in specs))
    reducer = backend.calibrate(specs, stats_spec(ctx.config), batches(input_ids, cfg.batch_size),
                                run_dir=ctx.run_dir, show_progress=ctx.show_progress,
                                keep_for_output_criterion=needs_cached_inputs(ctx.config))
    return reducer, input_ids


def similarity_json(reducer: StatsReducer, config: SlmConfig) -> dict:
    cka = reducer.cka()
    return {
        "labels": ["embed", *range(reducer.num_layers)],
        "cka": cka.tolist(),
        "kernel": config.similarity.kernel,
        "unit": config.similarity.unit,
        "estimator": "minibatch unbiased HSIC (Nguyen et al. 2021), float64 sums",
        "skip_first_token": config.similarity.skip_first_token,
        "num_batches": reducer.num_batches,
        "block_influence": reducer.block_influence().tolist(),
        "angular_distance": reducer.angular_distance().tolist(),
    }


def make_plan(ctx: RunContext, index: CheckpointIndex, reducer: StatsReducer, backend,
              measured: dict | None = None, out_dir: Path | None = None) -> tuple[planner.MergePlan, dict]:
    """``measured`` (optional, shared by callers that plan several times on one calibration pass, as
    `compare` does): plan losses, fitted alphas and corrections already measured, reused instead of
    re-measured. merge.correction=linear|refit writes the plan's corrections to ``out_dir`` (default run.dir)."""
    p, cfg = ctx.config.plan, ctx.config
    n = index.num_layers
    details: dict = {}
    measured = {} if measured is None else measured
    fits: dict[tuple[int, int], AlphaFit] = measured.setdefault("fits", {})
    corrections: dict = measured.setdefault("corrections", {})
    if cfg.similarity.criterion == "output":
        windows, trace = backend.plan_output(p.threshold, cfg.merge.rule, p.protect_first, p.protect_last, n)
        details["trace"] = [{"committed": [list(w) for w in s.committed], "trial": list(s.trial),
                             "score": s.score, "decision": s.decision} for s in trace]
        threshold = p.threshold
    elif p.search == "global":
        k = p.target_layers_removed
        if k is None:
            k = layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)
            details["target_ratio"] = p.target_ratio
        details["target_layers_removed"] = k
        windows, details["global"] = plan_global(ctx, reducer, backend, k, fits, measured.setdefault("losses", {}),
                                                 corrections)
        threshold = None
    else:
        cka = reducer.cka()
        if p.threshold is not None:
            threshold = p.threshold
            windows = planner.plan_windows_cka(cka, threshold, p.protect_first, p.protect_last, p.max_window)
        else:
            k = p.target_layers_removed
            if k is None:
                k = layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)
                details["target_ratio"] = p.target_ratio
            details["target_layers_removed"] = k
            threshold, windows = planner.search_threshold(cka, k, p.protect_first, p.protect_last, p.max_window)
    windows = tuple(tuple(w) for w in windows)
    alphas = None
    if cfg.merge.rule == "scaled":
        fit_missing_alphas(ctx, backend, windows, fits)
        alphas = tuple(fits[w].alpha for w in windows)
        details["alphas"] = [fits[w].to_json() for w in windows]
    file = sha = None
    if cfg.merge.correction != "none" and windows:
        alpha_of = dict(zip(windows, alphas)) if alphas is not None else {}
        requests = [(w, cfg.merge.rule, alpha_of.get(w), cfg.merge.correction) for w in windows]
        fit_missing_corrections(ctx, backend, requests, corrections, refit_released=True)
        chosen = [corrections[correction_key(*r)] for r in requests]
        details["corrections"] = [fit.to_json() for fit in chosen]
        file, sha = write_corrections(out_dir or ctx.run_dir, {f.window: f.matrix for f in chosen if f.corrects},
                                      cfg.merge.correction)
    plan = planner.MergePlan(num_layers_before=n, windows=windows, rule=cfg.merge.rule,
                             criterion=cfg.similarity.criterion, threshold=threshold, alphas=alphas,
                             corrections=file, corrections_sha256=sha)
    return plan, details


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


def plan_global(ctx: RunContext, reducer: StatsReducer, backend, k: int, fits: dict,
                memo: dict | None = None, corrections: dict | None = None) -> tuple[tuple[tuple[int, int], ...], dict]:
    """Exact least-cost windows (global_planner). With plan.candidates > 1 every cost proposes plans
    and forward passes on the calibration samples rank them; plan.local_search then tries plans one
    move from the best; rule scaled fits each window's alpha, and merge.correction=linear|refit each
    window's correction, before its plan is measured."""
    from slm_dist import global_planner as gp

    p, rule, n = ctx.config.plan, ctx.config.merge.rule, reducer.num_layers
    kind = ctx.config.merge.correction
    correct = kind != "none"
    memo = {} if memo is None else memo  # (windows, rule label, metric) -> loss
    corrections = {} if corrections is None else corrections
    if needs_cached_inputs(ctx.config) and not hasattr(backend, "score_plan"):
        raise NotImplementedError(
            f"the {type(backend).__name__} cannot measure plans yet (no score_plan / fit_alphas); plan.candidates > 1, "
            "plan.local_search, plan.cost=measured and merge.rule=scaled need them: use cluster.backend=local")

    def measure(windows: tuple[tuple[int, int], ...], rule_used: str, correctable: bool = True) -> float:
        """Calibration loss of a plan, lower is better (each plan measured once)."""
        alphas = None
        if rule_used == "scaled":
            fit_missing_alphas(ctx, backend, windows, fits)
            alphas = {w: fits[w].alpha for w in windows}
            if all(a == 0.0 for a in alphas.values()):
                rule_used, alphas = "drop", None  # alpha 0 everywhere is the drop model: measure it once
        corrected = False
        if correct and correctable and windows:
            requests = [(w, rule_used, None if alphas is None else alphas[w], kind) for w in windows]
            fit_missing_corrections(ctx, backend, requests, corrections)
            corrected = any(corrections[correction_key(*r)].corrects for r in requests)
        # The memo (and compare's loss file) key: what the plan's weights depend on.
        label = rule_used + (f"+{kind}(batches={ctx.config.merge.correction_batches})" if corrected else "")
        key = (windows, label, p.refine_metric)
        if key not in memo:
            if corrected:
                fit_missing_corrections(ctx, backend, requests, corrections, refit_released=True)
            score = backend.score_plan(windows, rule_used, alphas, p.refine_metric,
                                       correction=kind if corrected else None)
            memo[key] = score if p.refine_metric == "nll" else 1.0 - score
            log.info("plan %s (%s): calibration %s %.4f", [list(w) for w in windows], label, p.refine_metric,
                     memo[key])
        if correct and correctable and windows:
            release_corrections(backend, corrections)  # scored or remembered, its maps are done with
        return memo[key]

    stats = dict(cka=reducer.cka(), block_influence=reducer.block_influence(),
                 angular_distance=reducer.angular_distance())
    details: dict = {"cost": p.cost, "metric": p.refine_metric}
    if p.cost == "measured":
        # Each removable layer's own damage: the loss with that layer alone removed, minus the dense loss.
        # Uncorrected even under merge.correction: it only proposes plans (those are measured
        # corrected), and it is then shared with the uncorrected searches of the same calibration.
        dense = measure((), "drop")
        layers = gp.removable_layers(n, p.protect_first, p.protect_last)
        per_layer = [measure(((layer - 1, layer),), "drop", correctable=False) - dense if layer in layers else math.inf
                     for layer in range(n)]
        stats["measured"] = torch.tensor(per_layer, dtype=torch.float64)
        details["dense_loss"] = dense
        details["measured"] = [v if math.isfinite(v) else None for v in per_layer]
        log.info("measured damage per layer: %s", [None if not math.isfinite(v) else round(v, 4) for v in per_layer])
    names = [p.cost] + [c for c in gp.STATISTIC_COSTS if c != p.cost]  # the configured cost proposes first
    tables = {name: gp.window_costs(name, **stats) for name in names}
    if p.candidates == 1 and p.local_search == 0:
        best = gp.plan_windows_global(tables[p.cost], k, p.protect_first, p.protect_last, p.max_window)
        return best.windows, {**details, "windows": [list(w) for w in best.windows], "cost_value": best.cost}

    candidates = gp.candidate_plans(tables, k, p.candidates, p.protect_first, p.protect_last, p.max_window)
    ranked = gp.rank_plans(candidates, lambda w: measure(w, rule))
    best, best_loss = ranked[0].windows, ranked[0].loss
    log.info("global search: %d candidates ranked by calibration %s; best %s (proposed by %s, loss %.4f)",
             len(ranked), p.refine_metric, [list(w) for w in best], ranked[0].proposed_by, best_loss)
    details["candidates"] = [r.to_json() for r in ranked]
    if p.local_search > 0:
        known = {r.windows: r.loss for r in ranked}
        # Swaps are tried cheapest predicted first: by measured damage when measured, else Block Influence.
        layer_cost = stats.get("measured", stats["block_influence"]).tolist()
        best, best_loss, steps = gp.local_search(
            best, lambda w: measure(w, rule),
            lambda w: gp.neighbour_plans(w, n, p.protect_first, p.protect_last, p.max_window, layer_cost),
            p.local_search, known)
        details["local_search"] = [{"windows": [list(w) for w in plan], "loss": v} for plan, v in steps]
        log.info("local search: %d more plans measured; best %s (loss %.4f)", len(steps), [list(w) for w in best],
                 best_loss)
    details.update(windows=[list(w) for w in best], loss=best_loss)
    return best, details


def fit_missing_corrections(ctx: RunContext, backend, requests, corrections: dict,
                            refit_released: bool = False) -> None:
    """Fit (window, rule, alpha, kind) corrections not fitted yet (and, with ``refit_released``, those
    whose maps ``release_corrections`` dropped); ``corrections`` is keyed by ``correction_key``."""
    keys = [correction_key(*r) for r in requests]
    missing = list(dict.fromkeys(k for k in keys if k not in corrections
                                 or (refit_released and corrections[k].released)))
    if missing:
        if not hasattr(backend, "fit_corrections"):
            raise NotImplementedError(f"the {type(backend).__name__} cannot fit corrections; use cluster.backend=local "
                                      "or ray, or merge.correction=none")
        for fit in backend.fit_corrections(missing, ctx.config.merge.correction_batches):
            again = fit.key in corrections  # a released map fitted again: logged the first time
            corrections[fit.key] = fit
            log.log(logging.DEBUG if again else logging.INFO,
                    "%s correction of window %s (%s): held-out error %.3f of the plain merge's (ridge %s)",
                    fit.kind, list(fit.window), fit.rule, fit.loss, fit.ridge)


def release_corrections(backend, corrections: dict) -> None:
    """Drop every fitted map from the stages (and the Ray driver's copies) and from ``corrections``,
    keeping the fits' scores. The search holds one plan's maps at a time this way (a linear map is
    256 MiB at hidden 8192, a refit more); the final plan's are fitted again on the same batches."""
    held = [key for key, fit in corrections.items() if fit.matrix is not None]
    if held:
        backend.clear_candidates(corrections=True)
    for key in held:
        corrections[key] = corrections[key].release()


def fit_missing_alphas(ctx: RunContext, backend, windows, fits: dict) -> None:
    missing = [w for w in windows if w not in fits]
    if missing:
        for fit in backend.fit_alphas(missing, ctx.config.merge.alpha_batches):
            fits[fit.window] = fit


def layer_params(index: CheckpointIndex) -> tuple[int, int]:
    """(all parameters, parameters of one decoder layer) from shapes alone."""
    arch = get_arch(index.model_type)
    total = per_layer = 0
    for key, info in index.tensors.items():
        numel = math.prod(info.shape)
        total += numel
        split = arch.split_key(key)
        if split is not None and split[0] == 0:
            per_layer += numel
    return total, per_layer


def layers_for_ratio(index, ratio, protect_first, protect_last, max_window) -> int:
    total, per_layer = layer_params(index)
    return planner.layers_for_param_ratio(total, per_layer, ratio,
                                          planner.removable_layers(index.num_layers, protect_first, protect_last))


def check_target_feasible(config: SlmConfig, index: CheckpointIndex) -> None:
    """Fail before any forward pass when the asked-for removal cannot be met."""
    p = config.plan
    if p.target_layers_removed is not None:
        most = planner.removable_layers(index.num_layers, p.protect_first, p.protect_last)
        if p.target_layers_removed > most:
            raise planner.PlanError(
                f"plan.target_layers_removed={p.target_layers_removed} but a {index.num_layers}-layer model with "
                f"protect_first={p.protect_first}, protect_last={p.protect_last} can lose at most {most} layers "
                "(each window keeps one); ask for fewer")
    elif p.target_ratio is not None:
        layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)


def merge(ctx: RunContext, index: CheckpointIndex, plan: planner.MergePlan) -> Path:
    """Write (or finish, after a kill) the pruned checkpoint; `<run.dir>/merge.json` says what it cost."""
    merge_stage(ctx.config, index, plan, ctx.show_progress)
    return ctx.config.output_dir


def perplexity(ctx: RunContext, model_dir: Path, backend) -> float | None:
    """exp(mean token NLL) on contiguous windows of the held-out text; no BOS is prepended."""
    if not ctx.config.eval.enabled or ctx.heldout_text is None:
        return None
    cfg = ctx.config.eval
    tokenizer = load_tokenizer(model_dir)
    text = ctx.heldout_text.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = calibration.contiguous_windows(ids, cfg.seq_len, cfg.max_windows)
    index = open_index(model_dir, allow_pickle=ctx.config.model.allow_pickle)
    specs = stage_specs(ctx.config, index, model_dir)
    nll_sum, count = backend.nll(specs, batches(windows, ctx.config.calibration.batch_size), ctx.show_progress)
    return math.exp(nll_sum / count)


# --------------------------------------------------------------------------------------- run
def open_run_state(ctx: RunContext, index: CheckpointIndex, force: bool = False) -> run_state.RunState:
    """The run folder's recorded stages, keyed to this config, these inputs and this checkpoint."""
    config = ctx.config
    device, dtype = device_and_dtype(config)
    inputs = run_state.RunInputs(ctx.model_dir, ctx.calibration_source, ctx.heldout_text, config.output_dir,
                                 device, dtype)
    index_fp = run_state.index_fingerprint(index)
    return run_state.RunState.open(ctx.run_dir, run_state.stage_keys(config, inputs, index_fp),
                                   run_state.run_key(config, index_fp), inputs, force=force)


def save_stats(reducer: StatsReducer, path: Path) -> None:
    """Write stats.parquet, unless the backend already checkpointed exactly these sums there (the Ray
    reducer does, with the fingerprint it resumes by: keep that file)."""
    if path.is_file():
        saved = StatsReducer.load(path)
        if (saved.hsic.batch_ids == reducer.hsic.batch_ids and saved.num_layers == reducer.num_layers
                and torch.equal(saved.hsic.state_dict()["sums"], reducer.hsic.state_dict()["sums"])):
            return
    reducer.save(path)


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def run(config: SlmConfig, cache_dir: Path | None = None, show_progress: bool = True, force: bool = False,
        stop_after: str | None = None) -> dict:
    """Run every stage whose artifact is missing or stale (see run_state.py) and return the report.

    A finished run returns its report at once; an interrupted one resumes at the stage it was in;
    ``force`` starts over; ``stop_after="plan"`` stops once plan.json is written.
    """
    ctx = resolve_inputs(config, cache_dir, show_progress)
    run_dir = ctx.run_dir

    with ctx.timed("inspect"):
        index = open_index(ctx.model_dir, allow_pickle=config.model.allow_pickle)
        get_arch(index.model_type)
        check_output_dir(ctx.model_dir, config.output_dir)
        check_target_feasible(config, index)
        state = open_run_state(ctx, index, force)
    todo = state.stages_to_run(config.similarity.criterion, stop_after)
    if not todo:
        log.info("run %s in %s is already complete: nothing to do (--force starts over)", state.run_key[:12], run_dir)
        return report_mod.load_report(run_dir) if stop_after is None else {"plan": load_plan(run_dir).to_json()}
    log.info("run %s in %s: stages to run: %s", state.run_key[:12], run_dir, ", ".join(todo))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_if_changed(run_dir / "config.resolved.yaml", to_yaml(config))

    state.lock()
    backend = None
    try:
        if {"calibrate", "plan", "eval"} & set(todo):
            backend = make_backend(config)
        if "calibrate" in todo:
            state.start("calibrate")
            with ctx.timed("calibrate"):
                reducer, _ = calibrate(ctx, index, backend)
                save_stats(reducer, run_dir / "stats.parquet")
                write_json(run_dir / "similarity.json", similarity_json(reducer, config))
            state.mark_done("calibrate", ctx.timings["calibrate"])
        else:
            reducer = StatsReducer.load(run_dir / "stats.parquet")
            log.info("calibrate: reusing the statistics of %d batches in %s (no forward pass)", reducer.num_batches,
                     run_dir / "stats.parquet")
        if "plan" in todo:
            state.start("plan")
            with ctx.timed("plan"):
                plan, details = make_plan(ctx, index, reducer, backend)
                write_json(run_dir / "plan.json", {**plan.to_json(), "details": details})
                log.info("plan: %d -> %d layers, windows %s (threshold %s)", plan.num_layers_before,
                         plan.num_layers_after, list(plan.windows), plan.threshold)
            state.mark_done("plan", ctx.timings["plan"])
        else:
            plan = load_plan(run_dir)
        out_dir = config.output_dir
        if "merge" in todo:
            state.start("merge")
            with ctx.timed("merge"):
                out_dir = merge(ctx, index, plan)
            with ctx.timed("verify"):
                problems = verify_model(out_dir)
                if problems:
                    raise RuntimeError(f"the written checkpoint {out_dir} failed verification: {problems}")
            info = {"params_before": layer_params(index)[0], "params_after": layer_params(open_index(out_dir))[0],
                    "verify_seconds": ctx.timings["verify"]}
            state.mark_done("merge", ctx.timings["merge"], info=info, checkpoint_dir=out_dir)
        if "eval" in todo:
            state.start("eval")
            with ctx.timed("eval"):
                ppl_before = perplexity(ctx, ctx.model_dir, backend)
                ppl_after = perplexity(ctx, out_dir, backend)
                # issue 7: LoRA healing of the pruned checkpoint (resumes from its Ray Train checkpoints);
                # its fields (perplexity_healed, ...) join eval.json, which the report shows.
                healed = heal_mod.heal_stage(ctx, out_dir, backend) if config.heal.enabled else {}
                write_json(run_dir / "eval.json", {
                    "perplexity_before": ppl_before, "perplexity_after": ppl_after,
                    "perplexity_text": str(ctx.heldout_text) if ctx.heldout_text else None, **healed})
            state.mark_done("eval", ctx.timings["eval"])
        if "report" in todo:
            state.start("report")
            with ctx.timed("report"):
                report_mod.write_report(run_dir)
            state.mark_done("report", ctx.timings["report"])
    finally:
        if backend is not None:
            backend.close()
        state.unlock()
    if stop_after is not None:
        return {"plan": plan.to_json()}
    return report_mod.load_report(run_dir)
