"""The whole run, top to bottom: inspect -> calibrate -> plan -> merge -> verify -> evaluate -> report.

Each stage writes its artifact into the run folder (DESIGN.md, "Run directory"), and `run` skips the
stages whose artifact is complete and valid (run_state.py). The backend (`local`: every stage worker
in this process; `ray`: stage actors) only changes how batches move between the same `StageWorker`s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slm_dist import calibration, context, extras, heal, preflight, report, run_state
from slm_dist.arch import get_arch
from slm_dist.backends.base import Backend
from slm_dist.checkpoint.export import add_evaluation_to_card, check_output_dir
from slm_dist.checkpoint.index import CheckpointIndex, layer_params, open_index
from slm_dist.checkpoint.verify import verify_model
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import SlmConfig, needs_cached_inputs, to_yaml
from slm_dist.context import RunContext
from slm_dist.merging import merge_stage
from slm_dist.planning import PlanSearch, check_target_feasible
from slm_dist.run_state import load_plan
from slm_dist.workers.stats_reducer import StatsReducer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- stages
def calibration_ids(ctx: RunContext) -> torch.Tensor:  # int64 [num_samples, seq_len]
    """The calibration token windows the config asks for, checked against the batch size."""
    cfg = ctx.config.calibration
    input_ids = calibration.load_calibration(ctx.calibration_source, context.load_tokenizer(ctx.model_dir),
                                             cfg.num_samples, cfg.seq_len, cfg.seed)
    last = len(input_ids) % cfg.batch_size
    if ctx.config.similarity.unit == "sample" and last and last < 4:
        raise ValueError(f"calibration.num_samples={cfg.num_samples} leaves a last batch of {last} samples; "
                         f"unit=sample needs >= 4 per batch: use a multiple of calibration.batch_size={cfg.batch_size}")
    return input_ids


def calibrate(ctx: RunContext, index: CheckpointIndex, backend: Backend, input_ids: torch.Tensor | None = None,
              keep_inputs: bool | None = None) -> StatsReducer:
    """Stream the calibration batches through the stages; the reduced statistics (calibration.parquet
    saved). ``keep_inputs`` (default: what the config's planning needs) keeps every batch's stage
    inputs for candidate scoring."""
    input_ids = calibration_ids(ctx) if input_ids is None else input_ids
    calibration.save_calibration(ctx.run_dir / "calibration.parquet", input_ids)
    specs = context.stage_specs(ctx.config, index, ctx.model_dir)
    log.info("stages: %s", ", ".join(f"[{s.start},{s.stop})" for s in specs))
    keep = needs_cached_inputs(ctx.config) if keep_inputs is None else keep_inputs
    return backend.calibrate(specs, context.stats_spec(ctx.config),
                             context.batches(input_ids, ctx.config.calibration.batch_size), run_dir=ctx.run_dir,
                             show_progress=ctx.show_progress, keep_for_output_criterion=keep)


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


def save_stats(reducer: StatsReducer, path: Path) -> None:
    """Write stats.parquet, unless the backend already checkpointed exactly these sums there (the Ray
    reducer does, with the fingerprint it resumes by: keep that file)."""
    if path.is_file():
        saved = StatsReducer.load(path)
        if (saved.hsic.batch_ids == reducer.hsic.batch_ids and saved.num_layers == reducer.num_layers
                and torch.equal(saved.hsic.state_dict()["sums"], reducer.hsic.state_dict()["sums"])):
            return
    reducer.save(path)


def verify(out_dir: Path) -> None:
    problems = verify_model(out_dir)
    if problems:
        raise RuntimeError(f"the written checkpoint {out_dir} failed verification: {problems}")


# --------------------------------------------------------------------------------------- run
def open_run_state(ctx: RunContext, index: CheckpointIndex, force: bool = False) -> run_state.RunState:
    """The run folder's recorded stages, keyed to this config, these inputs and this checkpoint."""
    config = ctx.config
    device, dtype = context.device_and_dtype(config)
    inputs = run_state.RunInputs(ctx.model_dir, ctx.calibration_source, ctx.heldout_text, config.output_dir,
                                 device, dtype)
    index_fp = run_state.index_fingerprint(index)
    return run_state.RunState.open(ctx.run_dir, run_state.stage_keys(config, inputs, index_fp),
                                   run_state.run_key(config, index_fp), inputs, force=force)


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def run(config: SlmConfig, cache_dir: Path | None = None, show_progress: bool = True, force: bool = False,
        stop_after: str | None = None) -> dict:
    """Run every stage whose artifact is missing or stale (see run_state.py) and return the report.

    A finished run returns its report at once; an interrupted one resumes at the stage it was in;
    ``force`` starts over; ``stop_after="plan"`` stops once plan.json is written.
    """
    if config.heal.enabled and stop_after is None:
        extras.require("heal", "heal.enabled=true")  # before any download or forward pass
    ctx = context.resolve_inputs(config, cache_dir, show_progress)
    run_dir = ctx.run_dir

    with ctx.timed("inspect"):
        # Every input, output and the cluster, before anything is written or computed (all problems at once).
        preflight.require(preflight.run_problems(config, ctx.model_dir, ctx.calibration_source, ctx.heldout_text,
                                                 stop_after, layers_removed=preflight.planned_removal(config)))
        index = open_index(ctx.model_dir, allow_pickle=config.model.allow_pickle)
        get_arch(index.model_type)
        check_output_dir(ctx.model_dir, config.output_dir)
        check_target_feasible(config, index)
        state = open_run_state(ctx, index, force)
    todo = state.stages_to_run(config.similarity.criterion, stop_after)
    if not todo:
        log.info("run %s in %s is already complete: nothing to do (--force starts over)", state.run_key[:12], run_dir)
        return report.load_report(run_dir) if stop_after is None else {"plan": load_plan(run_dir).to_json()}
    log.info("run %s in %s: stages to run: %s", state.run_key[:12], run_dir, ", ".join(todo))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_if_changed(run_dir / "config.resolved.yaml", to_yaml(config))

    state.lock()
    backend = context.make_backend(config)  # cheap until a stage uses it (Ray connects on first use)
    try:
        if "calibrate" in todo:
            state.start("calibrate")
            with ctx.timed("calibrate"):
                reducer = calibrate(ctx, index, backend)
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
                plan, details = PlanSearch(ctx, reducer, backend).make_plan(index)
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
                merge_stage(config, index, plan, backend.run_shard_jobs, ctx.show_progress)
            with ctx.timed("verify"):
                verify(out_dir)
            info = {"params_before": layer_params(index)[0],
                    "params_after": layer_params(open_index(out_dir))[0],
                    "verify_seconds": ctx.timings["verify"]}
            state.mark_done("merge", ctx.timings["merge"], info=info, checkpoint_dir=out_dir)

        if "eval" in todo:
            state.start("eval")
            with ctx.timed("eval"):
                ppl_before = context.perplexity(ctx, ctx.model_dir, backend)
                ppl_after = context.perplexity(ctx, out_dir, backend)
                # LoRA healing of the pruned checkpoint (resumes from its Ray Train checkpoints); its
                # fields (perplexity_healed, ...) join eval.json, which the report shows.
                healed = heal.heal_stage(ctx, out_dir, backend) if config.heal.enabled else {}
                write_json(run_dir / "eval.json", {
                    "perplexity_before": ppl_before, "perplexity_after": ppl_after,
                    "perplexity_text": str(ctx.heldout_text) if ctx.heldout_text else None, **healed})
                if ppl_after is not None:  # the model card reports what was measured (its hash re-recorded)
                    add_evaluation_to_card(out_dir, {"before": ppl_before, "after": ppl_after,
                                                     "text": ctx.heldout_text})
                    state.rerecord_checkpoint("merge", out_dir)
            state.mark_done("eval", ctx.timings["eval"])

        if "report" in todo:
            state.start("report")
            with ctx.timed("report"):
                report.write_report(run_dir)
            state.mark_done("report", ctx.timings["report"])
    finally:
        backend.close()
        state.unlock()
    if stop_after is not None:
        return {"plan": plan.to_json()}
    return report.load_report(run_dir)
