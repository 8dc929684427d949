"""The whole run, top to bottom: inspect -> calibrate -> plan -> merge -> verify -> evaluate.

Each stage writes its artifact into the run folder (DESIGN.md, "Run directory"). The backend
(`local`: every stage worker in this process; `ray`: stage actors) only changes how batches move
between the same `StageWorker` objects.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from slm_dist import calibration, planner
from slm_dist.arch import get_arch
from slm_dist.checkpoint.index import CheckpointIndex, open_index
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import SlmConfig, to_yaml
from slm_dist.export import check_disk_space, check_output_dir, plan_export, write_export
from slm_dist.partition import partition_layers
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
    device = config.cluster.device
    if device == "cuda" and not torch.cuda.is_available() and config.cluster.backend == "local":
        raise RuntimeError("cluster.device=cuda but this process sees no CUDA device; use cluster.device=cpu")
    dtype = config.model.dtype
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; on GPUs bf16 halves memory and is the native format.
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def stage_specs(config: SlmConfig, index: CheckpointIndex, model_dir: Path | None = None) -> list[StageSpec]:
    """Contiguous, byte-balanced layer slices, one per stage."""
    arch = get_arch(index.model_type)
    n = index.num_layers
    layer_bytes = [0] * n
    first_extra = last_extra = 0
    for key, info in index.tensors.items():
        split = arch.split_key(key)
        if split is not None and split[0] < n:
            layer_bytes[split[0]] += info.nbytes
        elif key.startswith(arch.embed_module):
            first_extra += info.nbytes
        else:
            last_extra += info.nbytes
    slices = partition_layers(layer_bytes, config.cluster.num_stages, config.cluster.memory_per_stage_bytes,
                              first_extra, last_extra)
    device, dtype = device_and_dtype(config)
    return [StageSpec(model_dir=str(model_dir or index.root), start=a, stop=b, num_layers=n, device=device,
                      dtype=dtype, attn_implementation=config.model.attn_implementation,
                      allow_pickle=config.model.allow_pickle) for a, b in slices]


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
                                keep_for_output_criterion=ctx.config.similarity.criterion == "output")
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


def make_plan(ctx: RunContext, index: CheckpointIndex, reducer: StatsReducer, backend) -> tuple[planner.MergePlan, dict]:
    p, cfg = ctx.config.plan, ctx.config
    n = index.num_layers
    details: dict = {}
    if cfg.similarity.criterion == "output":
        windows, trace = backend.plan_output(p.threshold, cfg.merge.rule, p.protect_first, p.protect_last, n)
        details["trace"] = [{"committed": [list(w) for w in s.committed], "trial": list(s.trial),
                             "score": s.score, "decision": s.decision} for s in trace]
        threshold = p.threshold
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
    plan = planner.MergePlan(num_layers_before=n, windows=tuple(tuple(w) for w in windows), rule=cfg.merge.rule,
                             criterion=cfg.similarity.criterion, threshold=threshold)
    return plan, details


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
    from tqdm import tqdm

    out = ctx.config.output_dir
    export = plan_export(index, plan, out, ctx.config.merge.max_shard_bytes)
    check_disk_space(export)
    progress = (lambda shards: tqdm(shards, desc="merge", unit="shard")) if ctx.show_progress else None
    write_export(export, progress=progress)
    return out


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
def run(config: SlmConfig, cache_dir: Path | None = None, show_progress: bool = True) -> dict:
    ctx = resolve_inputs(config, cache_dir, show_progress)
    run_dir = ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text(to_yaml(config))

    with ctx.timed("inspect"):
        index = open_index(ctx.model_dir, allow_pickle=config.model.allow_pickle)
        get_arch(index.model_type)
        check_output_dir(ctx.model_dir, config.output_dir)
        check_target_feasible(config, index)

    backend = make_backend(config)
    try:
        with ctx.timed("calibrate"):
            reducer, _ = calibrate(ctx, index, backend)
            write_json(run_dir / "similarity.json", similarity_json(reducer, config))
        with ctx.timed("plan"):
            plan, details = make_plan(ctx, index, reducer, backend)
            write_json(run_dir / "plan.json", {**plan.to_json(), "details": details})
            log.info("plan: %d -> %d layers, windows %s (threshold %s)", plan.num_layers_before,
                     plan.num_layers_after, list(plan.windows), plan.threshold)
        with ctx.timed("merge"):
            out_dir = merge(ctx, index, plan)
        with ctx.timed("verify"):
            problems = verify_model(out_dir)
            if problems:
                raise RuntimeError(f"the written checkpoint {out_dir} failed verification: {problems}")
        with ctx.timed("eval"):
            ppl_before = perplexity(ctx, ctx.model_dir, backend)
            ppl_after = perplexity(ctx, out_dir, backend)
    finally:
        backend.close()

    total, per_layer = layer_params(index)
    after_index = open_index(out_dir)
    total_after, _ = layer_params(after_index)
    report = {
        "model": str(ctx.model_dir),
        "output": str(out_dir),
        "layers_before": plan.num_layers_before,
        "layers_after": plan.num_layers_after,
        "params_before": total,
        "params_after": total_after,
        "windows": [list(w) for w in plan.windows],
        "rule": plan.rule,
        "criterion": plan.criterion,
        "threshold": plan.threshold,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "perplexity_text": str(ctx.heldout_text) if ctx.heldout_text else None,
        "similarity": {"kernel": config.similarity.kernel, "unit": config.similarity.unit,
                       "skip_first_token": config.similarity.skip_first_token,
                       "note": ("position 0 of every sequence is left out of token statistics (its massive "
                                "activations swamp linear CKA)") if config.similarity.unit == "token"
                       and config.similarity.skip_first_token else None},
        "seconds": ctx.timings,
    }
    write_json(run_dir / "report.json", report)
    return report
