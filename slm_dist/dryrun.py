"""`slm-dist plan --dry-run`: what a run will need, from ``config.json`` and the index alone.

Reads no weights: tensor shapes come from the config (``sizing.tensor_shapes``), or from the
safetensors headers when the shards happen to be present. The stage partition is the one the real
run computes (``partition_layers`` over weight bytes in the compute dtype); each stage is then
checked with the activations, logits and runtime overhead it will also hold, so a plan that
passes here fits there. Time is an estimate
from stated throughput assumptions (printed with the result): a guide for booking a cluster, not
a promise.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from slm_dist.arch import get_arch
from slm_dist.checkpoint.index import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, CheckpointError, open_index
from slm_dist.config import SlmConfig, needs_cached_inputs
from slm_dist.config import compute_dtype as config_compute_dtype
from slm_dist.config import resolve_device as config_resolve_device
from slm_dist.core import planner, sizing
from slm_dist.core.correction_sizes import (
    CHUNKS,
    CROSS_COPIES,
    FOLDS,
    GRAM_COPIES,
    POOL_GRAM_COPIES,
    RIDGE_GRID,
    ROW_CHUNK,
    screen_share,
)
from slm_dist.core.partition import PartitionError, partition_layers

GiB = 2**30
OUTPUT_SLACK = 1.05            # export.check_disk_space asks for 5% + 64 MiB over the shard bytes
OUTPUT_FIXED_BYTES = 64 * 2**20


class DryRunError(PartitionError):
    """The model cannot run on the configured stages; the message carries the numbers and the fix."""


@dataclass(frozen=True)
class Assumptions:
    """Throughputs the time estimate uses; change them to match your hardware (``--assume key=value``).

    ``stage_tokens_per_s`` is a MEASURED figure: the calibration tokens per second one stage of this
    config pushed through its layers (statistics included; bench/RESULTS.md has the runs, and a run's
    log gives it). Given, it replaces the FLOP-rate model for every forward pass (calibration,
    scored plans, correction fits, eval): the same model then predicts a CPU run here and a GPU
    cluster from its published figures.
    """

    read_bytes_per_s: float = 2.0e9      # one stage reading safetensors (local NVMe)
    write_bytes_per_s: float = 1.0e9     # one merge task writing a shard (fsynced)
    hop_bytes_per_s: float = 5.0e9       # hidden states stage to stage through the object store
    gpu_flops_per_s: float = 150e12      # sustained bf16 matmul rate of one GPU (about half an A100's peak)
    cpu_flops_per_s: float = 50e9        # sustained float32 rate of one CPU stage (Gram statistics run here)
    gpu_fp64_flops_per_s: float = 20e12  # float64 solves of merge.correction (an A100's fp64 tensor peak)
    cpu_fp64_flops_per_s: float = 25e9   # the same solves on a CPU stage
    hash_bytes_per_s: float = 10e9       # xxh3_128 of the merge's output (verify re-reads at read_bytes_per_s)
    stage_tokens_per_s: float | None = None  # measured calibration tokens/s of one stage (None: from FLOPs)
    stage_start_s: float = 10.0          # starting a pipeline's stages: actor processes, imports, placement
    gpu_overhead_bytes: int = 2 * GiB    # CUDA context + allocator slack per GPU
    cpu_overhead_bytes: int = GiB // 2   # interpreter, torch and buffers per CPU stage
    given: tuple[str, ...] = ()          # the fields set by the user (the rest are these defaults)

    @classmethod
    def parse(cls, items: Sequence[str]) -> Assumptions:
        """``["read_bytes_per_s=5e8", "stage_tokens_per_s=900"]`` -> Assumptions; bad names are errors."""
        names = [f.name for f in fields(cls) if f.name != "given"]
        values: dict[str, Any] = {}
        for item in items:
            key, eq, raw = item.partition("=")
            if not eq or key not in names:
                raise DryRunError(f"--assume {item!r}: expected NAME=NUMBER with NAME one of {names}")
            try:
                value = float(raw)
            except ValueError:
                raise DryRunError(f"--assume {item!r}: {raw!r} is not a number") from None
            if not value > 0:
                raise DryRunError(f"--assume {item!r}: must be positive")
            values[key] = int(value) if key.endswith("_bytes") else value
        if "stage_start_s" in values and not values["stage_start_s"] >= 0:
            raise DryRunError("--assume stage_start_s must be >= 0")
        return cls(**values, given=tuple(values))

    def describe(self, device: str) -> str:
        """The figures this estimate used, each marked given or default."""
        used = ["read_bytes_per_s", "write_bytes_per_s", "hop_bytes_per_s", "hash_bytes_per_s", "stage_start_s"]
        if self.stage_tokens_per_s is not None:
            used.append("stage_tokens_per_s")
        else:
            used += ["gpu_flops_per_s", "cpu_flops_per_s"] if device == "cuda" else ["cpu_flops_per_s"]
        used.append("gpu_fp64_flops_per_s" if device == "cuda" else "cpu_fp64_flops_per_s")
        return ", ".join(f"{k}={getattr(self, k):.3g} ({'given' if k in self.given else 'default'})" for k in used)


@dataclass(frozen=True)
class StageEstimate:
    start: int                 # first layer (inclusive)
    stop: int                  # first layer not held
    weight_bytes: int          # at the compute dtype
    activation_bytes: int      # batches in flight, one layer's working set, logits on the last stage
    overhead_bytes: int
    read_bytes: int            # bytes this stage reads from the checkpoint (storage dtype)
    # merge.correction=refit's fitting statistics, inside activation_bytes: the peak of a stage while it
    # fits a window. Any stage may be asked to (the windows are the plan's); one that fits none peaks lower.
    fit_bytes: int = 0
    # Planning on calibration samples: every calibration batch's input to each of the stage's layers (and
    # the last stage's final hidden), kept for the whole plan stage. Host memory; on a CPU stage that is
    # the stage's own memory, so it is inside activation_bytes there.
    cached_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes


@dataclass(frozen=True)
class DryRun:
    model_dir: str
    model_type: str
    num_layers: int
    params: int
    storage_dtype: str
    compute_dtype: str
    device: str
    weights_from: str                      # "headers" | "config.json"
    source_bytes: int                      # checkpoint size on disk (tensor bytes)
    num_stages: int
    memory_per_stage_bytes: int | None
    stages: tuple[StageEstimate, ...]      # empty when the model does not fit
    fits: bool
    refusal: str | None
    min_stages: int | None                 # fewest stages of this memory that hold the model
    gpus_needed: float
    layers_removed: int | None             # None: depends on the statistics (plan.threshold)
    output_bytes: int                      # upper bound when layers_removed is None
    read_bytes: dict[str, int]
    write_bytes: int
    disk_bytes: int
    host_bytes_per_stage: int              # the largest stage's cached calibration inputs (host memory)
    seconds: dict[str, float]
    assumptions: Assumptions
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for s, stage in zip(d["stages"], self.stages):
            s["total_bytes"] = stage.total_bytes
        d["seconds"]["total"] = round(sum(self.seconds.values()), 1)
        return d


# ------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class _Model:
    config: dict
    sizes: sizing.ModelSizes       # storage dtype
    storage_dtype: str
    weights_from: str
    notes: tuple[str, ...]


def _read_model(model_dir: Path) -> _Model:
    """Shapes from the headers when the shards are here, else from config.json (checked against the index)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: a dry run needs at least the model's config.json "
                              "(and ideally its model.safetensors.index.json)")
    config = json.loads(config_path.read_text())
    arch = get_arch(config.get("model_type"))
    n = int(config["num_hidden_layers"])
    try:
        index = open_index(model_dir)
    except CheckpointError:
        index = None
    if index is not None:
        triples = ((k, t.shape, t.nbytes) for k, t in index.tensors.items())
        dtypes = sorted({t.dtype for t in index.tensors.values()})
        stored = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtypes[0], sizing.storage_dtype(config))
        return _Model(config, sizing.sizes_from_tensors(triples, arch, n), stored, "headers", ())
    stored = sizing.storage_dtype(config)
    sizes = sizing.sizes_from_config(config, arch, sizing.dtype_bytes(stored))
    notes = [f"no weights in {model_dir}: tensor shapes derived from config.json ({stored})"]
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        index_json = json.loads(index_path.read_text())
        expected = set(sizing.tensor_shapes(config, arch))
        listed = set(index_json.get("weight_map", {}))
        if expected != listed:
            missing, extra = sorted(listed - expected)[:3], sorted(expected - listed)[:3]
            raise CheckpointError(f"{index_path} lists tensors config.json does not describe (e.g. {missing}) or "
                                  f"lacks ones it does (e.g. {extra}); the config and index belong to different "
                                  "checkpoints")
        total = (index_json.get("metadata") or {}).get("total_size")
        if isinstance(total, int) and total != sizes.total_bytes:
            notes.append(f"index metadata total_size={total} bytes but shapes give {sizes.total_bytes}; "
                         "byte estimates use the shapes")
    elif not (model_dir / SAFETENSORS_SINGLE).is_file():
        notes.append(f"no {SAFETENSORS_INDEX} either: tensor names were not cross-checked")
    return _Model(config, sizes, stored, "config.json", tuple(notes))


# ------------------------------------------------------------------------------ estimates
def _cuda_available() -> bool:
    """Whether torch would see a GPU (a local config with cluster.device=auto).

    Without a GPU device node (NVIDIA's /dev/nvidia*, ROCm's /dev/kfd) the answer is no, and
    importing torch (seconds) only to hear it is skipped: the dry run stays torch-free on CPU hosts.
    """
    if "torch" not in sys.modules and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(config: SlmConfig) -> str:
    """As a run resolves ``cluster.device`` (config.resolve_device)."""
    return config_resolve_device(config, _cuda_available)


def compute_dtype(config: SlmConfig) -> str:
    return config_compute_dtype(config, resolve_device(config))


def activation_bytes(hf_config: dict, config: SlmConfig, bytes_per_element: int) -> int:
    """What every stage holds besides weights while a batch streams through it.

    Batches queued at the stage plus the one being sent on (``max_inflight + 1`` hidden states),
    one layer's working set (residual, normed input, the wider of attention projections and the
    MLP's gate/up/product), a float32 copy made for the Gram statistics, and the attention score
    matrix when attention is eager.
    """
    b = config.calibration.batch_size
    s = max(config.calibration.seq_len, config.eval.seq_len)
    hidden, inter = int(hf_config["hidden_size"]), int(hf_config["intermediate_size"])
    heads = int(hf_config["num_attention_heads"])
    tokens = b * s
    queued = (config.cluster.max_inflight + 1) * tokens * hidden * bytes_per_element
    working = tokens * (2 * hidden + max(4 * hidden, 3 * inter)) * bytes_per_element
    stats_copy = tokens * hidden * 4
    scores = b * heads * s * s * bytes_per_element * 2 if config.model.attn_implementation == "eager" else 0
    return queued + working + stats_copy + scores


def logits_bytes(hf_config: dict, config: SlmConfig) -> int:
    """Float32 logits and their log-softmax on the last stage while scoring (eval.batch_tokens tokens at once)."""
    if not config.eval.enabled:
        return 0
    tokens = min(config.eval.batch_tokens, config.calibration.batch_size * config.eval.seq_len)
    return 2 * tokens * int(hf_config["vocab_size"]) * 4


def expected_layers_removed(config: SlmConfig, sizes: sizing.ModelSizes) -> int | None:
    p = config.plan
    if p.target_layers_removed is not None:
        return p.target_layers_removed
    if p.target_ratio is not None:
        most = planner.max_layers_removed(sizes.num_layers, p.protect_first, p.protect_last, p.max_window)
        return planner.layers_for_param_ratio(sizes.total_params, sizes.layer_params[0], p.target_ratio, most)
    return None


def output_bytes(config: SlmConfig, sizes: sizing.ModelSizes, layers_removed: int) -> tuple[int, int]:
    """(bytes of the pruned checkpoint, bytes the merge reads for it). Every output tensor reads one
    source tensor, except that ``sum``, ``mean`` and ``scaled`` also read the projections of the layers they fold."""
    n = sizes.num_layers
    out = sizes.total_bytes - round(layers_removed * sum(sizes.layer_bytes) / n)
    folds = config.merge.rule in ("sum", "mean", "scaled")
    extra = round(layers_removed * sum(sizes.projection_bytes) / n) if folds else 0
    return out, out + extra


def _flops_per_token(hf_config: dict, params_per_layer: int, seq_len: int) -> float:
    """Forward FLOPs of one layer per token: 2 per weight, plus attention's QK^T and AV over the sequence."""
    heads = int(hf_config["num_attention_heads"])
    head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
    return 2.0 * params_per_layer + 4.0 * seq_len * heads * head_dim


def _gram_flops(config: SlmConfig, hidden: int) -> float:
    """One layer's Gram matrix for one batch (token unit: m x m over hidden; sample unit: b x b over s*hidden)."""
    b, s = config.calibration.batch_size, config.calibration.seq_len
    if config.similarity.unit == "token":
        m = min(config.similarity.tokens_per_batch, b * (s - 1 if config.similarity.skip_first_token else s))
        return 2.0 * m * m * hidden
    return 2.0 * b * b * s * hidden


def eval_tokens(config: SlmConfig) -> int:
    """Tokens perplexity scores per model: the window cap, else the held-out text's size at ~4 bytes a token."""
    e = config.eval
    if e.max_windows is not None:
        return e.max_windows * e.seq_len
    if e.heldout is not None and Path(e.heldout).is_file():
        return Path(e.heldout).stat().st_size // 4
    return 32 * e.seq_len


def _seconds(hf_config: dict, config: SlmConfig, sizes: sizing.ModelSizes, stages: list[tuple[int, int]],
             stage_read: list[int], out_bytes: int, merge_read: int, a: Assumptions) -> dict[str, float]:
    cal, cb = config.calibration, sizing.dtype_bytes(compute_dtype(config))
    rate = a.gpu_flops_per_s if resolve_device(config) == "cuda" else a.cpu_flops_per_s
    hidden, n = int(hf_config["hidden_size"]), sizes.num_layers
    fpt = _flops_per_token(hf_config, sizes.layer_params[0], cal.seq_len)
    num_batches = cal.num_batches
    batch_tokens = cal.batch_size * cal.seq_len
    hop = batch_tokens * hidden * cb / a.hop_bytes_per_s
    widest = max(b - s for s, b in stages)
    gram = _gram_flops(config, hidden) / a.cpu_flops_per_s
    if a.stage_tokens_per_s is not None:
        # Measured: the widest stage's layers (statistics included) at the given tokens/s. As a FLOP
        # rate it times every other forward pass too.
        rate = a.stage_tokens_per_s * widest * fpt
        gram = 0.0
    inflight = config.cluster.max_inflight

    def pipeline(batches: int, stage_seconds: list[float]) -> float:
        """Batches through the stages in order, at most cluster.max_inflight at once: a batch's latency
        is every stage plus the hops; a new one leaves every max(slowest stage, latency / in flight)."""
        latency = sum(stage_seconds) + (len(stage_seconds) - 1) * hop
        return (batches - 1) * max(max(stage_seconds) + hop, latency / inflight) + latency

    load = a.stage_start_s + max(stage_read) / a.read_bytes_per_s  # a pipeline's stages start and load
    seconds = {"calibrate": load + pipeline(num_batches, [(b - s) * (batch_tokens * fpt / rate + gram)
                                                          for s, b in stages])}
    if config.similarity.criterion == "output":
        # Each step of the published loop re-runs, on average, half the model on every calibration sample.
        candidates = max(n - config.plan.protect_first - config.plan.protect_last, 0)
        seconds["plan"] = candidates * cal.num_samples * cal.seq_len * fpt * n / 2 / rate
    else:
        seconds["plan"] = _global_search_seconds(hf_config, config, sizes, fpt, rate, a)
    # One task per output shard: read, write and hash for the manifest (the hash, xxh3_128, overlaps the
    # write on a thread of its own). Parallel tasks divide the work, but no task splits a shard: the
    # largest shard (up to merge.max_shard_bytes) bounds the stage from below.
    def task_seconds(write: float) -> float:
        read = merge_read * write / max(out_bytes, 1)
        return read / a.read_bytes_per_s + max(write / a.write_bytes_per_s, write / a.hash_bytes_per_s)

    shards = max(1, math.ceil(out_bytes / config.merge.max_shard_bytes))
    tasks = min(config.merge.max_parallel, shards)
    seconds["merge"] = max(task_seconds(out_bytes) / tasks, task_seconds(min(out_bytes, config.merge.max_shard_bytes)))
    seconds["verify"] = out_bytes / a.read_bytes_per_s                  # re-hash every output file
    if config.eval.enabled:
        lm_head = 2.0 * int(hf_config["vocab_size"]) * hidden
        # Windows stream through the stages as calibration batches do (the last stage adds the logits).
        # The dense model is scored on the calibration stages; only the pruned one starts and loads its own.
        per_batch = min(config.eval.batch_tokens, cal.batch_size * config.eval.seq_len)
        stage_seconds = [(b - s) * per_batch * fpt / rate for s, b in stages]
        stage_seconds[-1] += per_batch * lm_head / rate
        forward = pipeline(math.ceil(eval_tokens(config) / per_batch), stage_seconds)
        seconds["eval"] = 2 * forward + load
    return {k: round(v, 1) for k, v in seconds.items()}


def measured_plans(config: SlmConfig, num_layers: int, layers_removed: int | None) -> int:
    """Plans the search scores with forward passes. Global: the dense model and each removable layer
    alone (plan.cost=measured), then the ranked candidates and the local search's moves. SLEB: every
    layer left at each of its ``layers_removed`` steps (``expected_layers_removed``), and with
    plan.rerank > 1 each finalist once more, corrected."""
    p = config.plan
    if p.search == "sleb":
        trials = planner.sleb_trials(num_layers, layers_removed or 0, max(p.protect_first, 1), p.protect_last)
        return trials + (p.rerank if p.rerank > 1 else 0)
    if p.search != "global":
        return 0
    count = 1 + max(num_layers - p.protect_first - p.protect_last, 0) if p.cost == "measured" else 0
    if p.candidates > 1 or p.local_search > 0:
        count += p.candidates + p.local_search
    return count


def _global_search_seconds(hf_config: dict, config: SlmConfig, sizes: sizing.ModelSizes, fpt: float, rate: float,
                           a: Assumptions) -> float:
    """Each scored plan runs, on average, half the model (from its lowest changed layer, or the nearest
    kept input below it) and the head on every calibration sample. With merge.correction, assume one
    window fitted per scored candidate: the window's layers twice on the fitting batches, the merged
    layer once more per ridge and per move of the training set (correction_fit.choose_correction
    recomputes a fold's rows rather than holding its statistics), and in float64 the normal equations
    (2.5 passes of the rows: a first training set, three moves, the final fold), a Cholesky factor and
    two triangular solves per ridge and fold (+ the final fit) and the held-out scores."""
    cal, n, p = config.calibration, sizes.num_layers, config.plan
    hidden = int(hf_config["hidden_size"])
    scored = cal.num_samples if p.score_batches is None else min(p.score_batches * cal.batch_size, cal.num_samples)
    lm_head = 2.0 * int(hf_config["vocab_size"]) * hidden
    removed = expected_layers_removed(config, sizes)
    # calibration.cache_stride: a read starts from the nearest kept input below, (stride - 1) / 2 layers lower.
    recomputed = (cal.cache_stride - 1) / 2
    seconds = measured_plans(config, n, removed) * scored * cal.seq_len * (fpt * (n / 2 + recomputed) + lm_head) / rate
    # Windows fitted: about one per scored global candidate; SLEB's trials are uncorrected and its plan
    # has at most one window per removed layer; each other finalist of plan.rerank differs from it in at
    # most two windows (its last layer joins or splits them).
    sleb = (removed or 0) + 2 * (p.rerank - 1)
    candidates = {"global": p.candidates + p.local_search, "sleb": sleb}.get(p.search, 0)
    if config.merge.correction != "none" and candidates:
        width = int(hf_config.get("intermediate_size") or hidden) if config.merge.correction != "linear" else hidden
        fit_tokens = min(config.merge.correction_batches * cal.batch_size, cal.num_samples) * cal.seq_len
        window = config.plan.max_window or 4
        fp64 = a.gpu_fp64_flops_per_s if resolve_device(config) == "cuda" else a.cpu_fp64_flops_per_s
        grid, folds = len(RIDGE_GRID), FOLDS
        forwards = (2 * window + grid + 3 + recomputed) * fit_tokens * fpt / rate
        normal = (2.5 * 2 * fit_tokens * width * (width + hidden) + grid * fit_tokens * 2 * width * hidden
                  + (grid * folds + 1) * (width ** 3 / 3 + 2 * width ** 2 * hidden))
        pooled = 0.0
        if config.merge.correction == "pool":
            layers, cap = fitted_window_layers(config, removed), config.merge.pool_cap
            layer_pass = fit_tokens * fpt / rate
            share = screen_share(layers * width, width, cap)
            if share is not None:  # each other layer screened alone, then the capped choice
                pooled = (_pool_seconds(cap * width, width, hidden, fit_tokens, layer_pass, rate, fp64)
                          + (layers - 1) * _pool_seconds(width, share, hidden, fit_tokens, layer_pass, rate, fp64))
            else:
                pooled = _pool_seconds(layers * width, width, hidden, fit_tokens, layer_pass, rate, fp64)
        seconds += candidates * (forwards + normal / fp64 + pooled)
    return seconds


def _pool_seconds(pool: int, keep: int, hidden: int, tokens: int, layer_pass: float, rate: float, fp64: float
                  ) -> float:
    """One OBS choice of ``keep`` of ``pool`` neurons: a pass over the fitting batches (the merged layer,
    the features, their equations in float32), then a Cholesky factor and an inverse ((4/3) n^3) per chunk,
    n falling linearly from ``pool`` to ``keep`` (the mean of n^3 over that range)."""
    mean_cube = (pool ** 4 - keep ** 4) / (4 * max(pool - keep, 1))
    return layer_pass + 2 * tokens * pool * (pool + hidden) / rate + CHUNKS * (4 / 3) * mean_cube / fp64


def dry_run(config: SlmConfig, model_dir: Path, assumptions: Assumptions = Assumptions()) -> DryRun:
    """Partition, memory, GPUs, bytes, disk and time of ``config`` on ``model_dir``, reading no weights."""
    model = _read_model(Path(model_dir))
    hf, sizes, a = model.config, model.sizes, assumptions
    n = sizes.num_layers
    stored_b, cdtype = sizing.dtype_bytes(model.storage_dtype), compute_dtype(config)
    compute = sizing.rescale(sizes, stored_b, sizing.dtype_bytes(cdtype))
    cluster = config.cluster
    device = resolve_device(config)
    overhead = a.gpu_overhead_bytes if device == "cuda" else a.cpu_overhead_bytes
    act = activation_bytes(hf, config, sizing.dtype_bytes(cdtype))
    logits = logits_bytes(hf, config)
    notes = list(model.notes)
    # Fitting a refit correction runs the merged layer on a batch while its statistics are held:
    # counted on top of the activations.
    removed = expected_layers_removed(config, sizes)
    stats = correction_stat_bytes(config, int(hf["hidden_size"]), hf.get("intermediate_size"), removed)
    non_weight = "activations" if not stats else \
        f"activations and merge.correction={config.merge.correction}'s fitting statistics"
    io = window_fit_bytes(hf, config, sizing.dtype_bytes(cdtype), max(sizes.layer_bytes, default=0), device,
                          removed)
    fit = stats + io
    act += fit

    # The partition is the run's own (weights only, pipeline.stage_specs); each stage is then checked
    # with its activations, logits and overhead.
    last_extra = compute.last_extra_bytes + _tied_head_bytes(hf, compute)
    cal = config.calibration
    cached_per_layer = cal.num_samples * cal.seq_len * int(hf["hidden_size"]) * sizing.dtype_bytes(cdtype) \
        if needs_cached_inputs(config) else 0
    parts = _Parts(compute, last_extra, act, logits, overhead, fit, cached_per_layer, device != "cuda",
                   cal.cache_stride, io)
    refusal, slices = None, []
    try:
        slices = partition_layers(compute.layer_bytes, cluster.num_stages, cluster.memory_per_stage_bytes,
                                  compute.first_extra_bytes, last_extra)
    except PartitionError:
        refusal = "the weights alone do not fit"
    stages = [_stage(parts, sizes, k, len(slices), a_, b_) for k, (a_, b_) in enumerate(slices)]
    stage_read = [s.read_bytes for s in stages]
    memory = cluster.memory_per_stage_bytes
    over = [k for k, s in enumerate(stages) if memory is not None and s.total_bytes > memory]
    if over:
        refusal = f"with {non_weight}, stage(s) " + ", ".join(
            f"{k} [{stages[k].start},{stages[k].stop}) would hold {stages[k].total_bytes / GiB:.1f} GiB" for k in over)
    min_stages = fewest_stages(parts, memory) if memory is not None else None
    if refusal is not None:
        refusal = _refusal(hf, parts, cdtype, cluster, min_stages, refusal)
        stages = []

    if device == "cuda":
        notes += smaller_cards(parts, cluster.num_stages, memory, config.merge.correction)

    if removed is None:
        notes.append("plan.threshold: how many layers go depends on the statistics; output and disk figures "
                     "assume none (an upper bound)")
    out_bytes, merge_read = output_bytes(config, sizes, removed or 0)
    read = {"calibrate": sizes.total_bytes, "merge": merge_read, "verify": out_bytes,
            "eval": sizes.total_bytes + out_bytes if config.eval.enabled else 0}
    artifacts = _artifact_bytes(config, n)
    disk = int(out_bytes * OUTPUT_SLACK) + OUTPUT_FIXED_BYTES + artifacts
    host = max((s.cached_bytes for s in stages), default=0)
    if needs_cached_inputs(config):
        why = "criterion=output" if config.similarity.criterion == "output" else "planning on calibration samples"
        where = ("counted in each stage's activations above (on a CPU the host is the stage)" if device != "cuda"
                 else "host memory beside each stage's GPU, not counted above")
        which = ("every layer" if cal.cache_stride == 1 else
                 f"one layer in {cal.cache_stride} (calibration.cache_stride; the others are recomputed when read)")
        notes.append(f"{why} caches every calibration batch's input to {which}, each on its stage: "
                     f"{cached_per_layer / GiB:.2f} GiB per layer kept, up to {host / GiB:.2f} GiB on a stage; "
                     f"{where}")
    if config.merge.correction != "none":
        notes.append(correction_note(config.merge.correction, int(hf["hidden_size"]), hf.get("intermediate_size"),
                                     fitted_window_layers(config, removed), config.merge.pool_cap))
    if config.eval.enabled and config.eval.max_windows is None:
        notes.append(f"eval.max_windows=null: eval time assumes {eval_tokens(config):,} tokens (the held-out "
                     "text at ~4 bytes per token when it is here, else 32 windows)")
    seconds = _seconds(hf, config, sizes, slices or [(0, n)], stage_read or [sizes.total_bytes], out_bytes,
                       merge_read, a)
    gpus = cluster.num_stages * cluster.gpus_per_stage if device == "cuda" else 0.0
    return DryRun(
        model_dir=str(model_dir), model_type=hf["model_type"], num_layers=n, params=sizes.total_params,
        storage_dtype=model.storage_dtype, compute_dtype=cdtype, device=device,
        weights_from=model.weights_from, source_bytes=sizes.total_bytes, num_stages=cluster.num_stages,
        memory_per_stage_bytes=cluster.memory_per_stage_bytes, stages=tuple(stages), fits=refusal is None,
        refusal=refusal, min_stages=min_stages, gpus_needed=gpus, layers_removed=removed, output_bytes=out_bytes,
        read_bytes=read, write_bytes=out_bytes + artifacts, disk_bytes=disk, host_bytes_per_stage=host,
        seconds=seconds, assumptions=a, notes=tuple(notes))


def _artifact_bytes(config: SlmConfig, num_layers: int) -> int:
    """Run-folder files besides the checkpoint: token ids, HSIC sums, similarity JSON, figures."""
    cal = config.calibration
    rows = num_layers + 1
    return cal.num_samples * cal.seq_len * 4 + rows * rows * 8 * 2 + rows * rows * 24 + 2 * 2**20


def _tied_head_bytes(hf_config: dict, compute: sizing.ModelSizes) -> int:
    """A tied lm_head is stored once (as the embedding) but the last stage holds its own copy."""
    return compute.first_extra_bytes if hf_config.get("tie_word_embeddings", False) else 0


@dataclass(frozen=True)
class _Parts:
    """What stages hold, in the compute dtype: weights by part, and the non-weight memory."""

    compute: sizing.ModelSizes
    last_extra: int        # final norm + lm_head (+ the tied copy)
    activation: int        # every stage (refit's statistics included)
    logits: int            # the last stage
    overhead: int          # every stage
    fit: int = 0           # refit's statistics, part of activation
    cached_per_layer: int = 0    # one layer's cached calibration inputs (all batches)
    cached_on_stage: bool = False  # CPU stages: the cache is the stage's own memory
    cache_stride: int = 1        # calibration.cache_stride: one layer in this many keeps its inputs
    window_io: int = 0     # a fitted window's inputs, targets and source tensors, part of fit


def _stage(parts: _Parts, stored: sizing.ModelSizes, k: int, num_stages: int, start: int, stop: int) -> StageEstimate:
    first, last = k == 0, k == num_stages - 1
    c = parts.compute
    weights = sum(c.layer_bytes[start:stop]) + (c.first_extra_bytes if first else 0) + (parts.last_extra if last else 0)
    read = sum(stored.layer_bytes[start:stop]) + (stored.first_extra_bytes if first else 0) \
        + (stored.last_extra_bytes if last else 0)
    # The inputs of layers start, start + stride, ... (calibration.cache_stride), + the last stage's final hidden.
    cached = (math.ceil((stop - start) / parts.cache_stride) + (1 if last else 0)) * parts.cached_per_layer
    activation = parts.activation + (parts.logits if last else 0) + (cached if parts.cached_on_stage else 0)
    return StageEstimate(start, stop, weights, activation, parts.overhead, read, parts.fit, cached)


SMALLER_CARDS_GIB = (40, 48)  # the common smaller GPU memories a 70B plan is asked about


def _fits_on(parts: _Parts, num_stages: int, memory: int) -> tuple[bool, int]:
    """(does the run's split onto num_stages stages of memory fit, the largest stage's total bytes)."""
    c = parts.compute
    try:
        slices = partition_layers(c.layer_bytes, num_stages, memory, c.first_extra_bytes, parts.last_extra)
    except PartitionError:
        return False, 0
    peak = max(_stage(parts, c, i, num_stages, a, b).total_bytes for i, (a, b) in enumerate(slices))
    return peak <= memory, peak


def smaller_cards(parts: _Parts, num_stages: int, memory: int | None, correction: str = "refit") -> list[str]:
    """What fits on GPUs smaller than the configured ones (40 and 48 GiB), and without the correction's
    statistics (``correction``: merge.correction, refit or pool)."""
    lines = []
    for gib in SMALLER_CARDS_GIB:
        card = gib * GiB
        if memory is not None and card >= memory:
            continue
        ok, peak = _fits_on(parts, num_stages, card)
        text = (f"{num_stages} x {gib} GiB: fits (largest stage {peak / GiB:.1f} GiB)" if ok else
                f"{num_stages} x {gib} GiB: does not fit" + (f" (largest stage {peak / GiB:.1f} GiB)" if peak else ""))
        if not ok:
            fewest = fewest_stages(parts, card)
            text += f"; {fewest} stages of {gib} GiB would" if fewest else f"; no number of {gib} GiB stages would"
            if parts.fit > parts.window_io:
                stats = parts.fit - parts.window_io
                plain = replace(parts, activation=parts.activation - stats, fit=parts.window_io)
                ok_plain, peak_plain = _fits_on(plain, num_stages, card)
                text += (f"; without {correction}'s statistics (merge.correction=linear or none) {num_stages} stages "
                         + (f"fit (largest {peak_plain / GiB:.1f} GiB)" if ok_plain else "do not fit either"))
        lines.append(text)
    return lines


def fewest_stages(parts: _Parts, memory_per_stage_bytes: int) -> int | None:
    """Fewest stages whose run-time split (weights only, as the run does it) keeps every stage,
    activations and overhead included, within ``memory_per_stage_bytes``; None if no count does."""
    c = parts.compute
    for k in range(1, c.num_layers + 1):
        try:
            slices = partition_layers(c.layer_bytes, k, memory_per_stage_bytes, c.first_extra_bytes, parts.last_extra)
        except PartitionError:
            continue
        if all(_stage(parts, c, i, k, a, b).total_bytes <= memory_per_stage_bytes for i, (a, b) in enumerate(slices)):
            return k
    return None


def _refusal(hf_config: dict, parts: _Parts, dtype: str, cluster, min_stages: int | None, reason: str) -> str:
    g = lambda x: f"{x / GiB:.1f} GiB"  # noqa: E731
    c, memory, num_stages = parts.compute, cluster.memory_per_stage_bytes, cluster.num_stages
    if memory is None:
        return f"cannot split {c.num_layers} layers onto {num_stages} stage(s): {reason}"
    weights = sum(c.layer_bytes) + c.first_extra_bytes + parts.last_extra
    if min_stages:
        fit = (f"{min_stages} stages of {g(memory)} would fit ({math.ceil(min_stages * cluster.gpus_per_stage)} "
               f"GPU(s) at cluster.gpus_per_stage={cluster.gpus_per_stage:g})")
    else:
        fit = ("no number of stages of this size fits: one layer (or the embeddings, or lm_head with the logits) "
               "plus activations and overhead exceeds one stage")
    return (f"{hf_config.get('model_type')} with {c.num_layers} layers needs {g(weights)} of {dtype} weights "
            f"(largest layer {g(max(c.layer_bytes))}, embeddings {g(c.first_extra_bytes)}, final norm + lm_head "
            f"{g(parts.last_extra)}) but {num_stages} stage(s) x {g(memory)} give {g(num_stages * memory)}, and "
            f"each stage also holds {g(parts.activation)} of activations and {g(parts.overhead)} of runtime "
            f"overhead (the last {g(parts.logits)} of logits more): {reason}. {fit}. Raise cluster.num_stages, use "
            "GPUs with more memory, or lower calibration.batch_size / seq_len.")


# ------------------------------------------------------------------------------ text
def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, as GPU memory is sold and reported."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def format_dry_run(d: DryRun) -> str:
    """A few readable lines for the terminal."""
    g = human_bytes
    lines = [f"model: {d.model_dir} ({d.model_type}, {d.num_layers} layers, {_count(d.params)} params, "
             f"{g(d.source_bytes)} in {d.storage_dtype}; shapes from {d.weights_from})",
             f"compute: {d.compute_dtype} on {d.device}, {d.num_stages} stage(s)"
             + (f" of {g(d.memory_per_stage_bytes)}" if d.memory_per_stage_bytes else "")
             + (f", {d.gpus_needed:g} GPU(s)" if d.device == "cuda" else "")]
    if d.fits:
        lines.append("stage  layers       weights      activations  overhead     total        reads")
        for k, s in enumerate(d.stages):
            lines.append(f"{k:>5}  [{s.start:>3},{s.stop:>3})  {g(s.weight_bytes):>11}  {g(s.activation_bytes):>11}  "
                         f"{g(s.overhead_bytes):>11}  {g(s.total_bytes):>11}  {g(s.read_bytes):>11}")
    else:
        lines.append(f"DOES NOT FIT: {d.refusal}")
    removed = "unknown until calibrated" if d.layers_removed is None else str(d.layers_removed)
    lines += [f"layers removed: {removed}; output checkpoint {g(d.output_bytes)}",
              "reads: " + ", ".join(f"{k} {g(v)}" for k, v in d.read_bytes.items() if v),
              f"writes: {g(d.write_bytes)}; disk needed: {g(d.disk_bytes)}",
              "time (s): " + ", ".join(f"{k} {v:,.1f}" for k, v in d.seconds.items())
              + f"; total {sum(d.seconds.values()):,.1f}",
              f"time assumes: {d.assumptions.describe(d.device)} (override: --assume NAME=NUMBER)"]
    lines += [f"note: {n}" for n in d.notes]
    return "\n".join(lines)


def window_fit_bytes(hf_config: dict, config: SlmConfig, compute_bytes: int, stored_layer_bytes: int,
                     device: str, layers_removed: int | None) -> int:
    """What fitting one window holds besides the fit's own statistics (window_fits.window_targets): the
    window's original outputs on every fitting batch, twice while its layers run (the last layer's and
    the next), their inputs moved to the device (on a CPU they are the cache itself), each batch's
    rotary cos/sin and mask, and on a CPU the window's source tensors (checkpoint dtype, host memory on a GPU
    run). The window's length is plan.max_window, else ``layers_removed`` + 1 (one window holding
    them all), else 4 (a threshold decides). 0 when nothing is fitted (no rule scaled, no correction)."""
    m, cal = config.merge, config.calibration
    batches = max(m.alpha_batches if m.rule == "scaled" else 0, m.correction_batches if m.correction != "none" else 0)
    if not batches:
        return 0
    samples = min(batches * cal.batch_size, cal.num_samples)
    hidden = int(hf_config["hidden_size"])
    head_dim = int(hf_config.get("head_dim") or hidden // int(hf_config["num_attention_heads"]))
    copies = 2 if device != "cuda" else 3
    held = samples * cal.seq_len * copies * hidden * compute_bytes
    # Per batch (shared by its samples): rotary cos and sin, and at most a seq x seq boolean mask.
    held += math.ceil(samples / cal.batch_size) * cal.seq_len * (2 * head_dim * compute_bytes + cal.seq_len)
    if device != "cuda":
        held += fitted_window_layers(config, layers_removed) * stored_layer_bytes
    return held


def fitted_window_layers(config: SlmConfig, layers_removed: int | None) -> int:
    """The longest window a correction is expected to fit: plan.max_window, else ``layers_removed`` + 1
    (one window holding them all), else 4 (a threshold decides)."""
    return config.plan.max_window or (layers_removed + 1 if layers_removed is not None else 4)


def correction_stat_bytes(config: SlmConfig, hidden: int, intermediate: int | None, layers_removed: int | None) -> int:
    """Peak memory of one window's correction fit besides the layer's forward (see the kinds' own)."""
    kind = config.merge.correction
    if kind == "refit":
        return refit_stat_bytes(hidden, intermediate)
    if kind == "pool":
        return pool_stat_bytes(hidden, intermediate, fitted_window_layers(config, layers_removed),
                               config.merge.pool_cap)
    return 0


def pool_stat_bytes(hidden: int, intermediate: int | None, window_layers: int, cap: int | None = None) -> int:
    """merge.correction=pool: the larger of its neuron choice (POOL_GRAM_COPIES x pool^2 float64, pool =
    window layers x intermediate, or merge.pool_cap x intermediate when that is fewer, its cross terms, one
    batch's u^T u in float32, and every candidate's gate and up rows in float32) and the refit that follows
    it (core/neuron_pool.py). The cap's screen (one layer's neurons at a time) holds less than the capped
    choice."""
    if intermediate is None:
        return 0
    candidates = window_layers * int(intermediate)
    pool = (window_layers if cap is None else min(window_layers, cap)) * int(intermediate)
    choose = (POOL_GRAM_COPIES * pool ** 2 + 2 * pool * hidden) * 8 + pool ** 2 * 4 + 2 * candidates * hidden * 4
    return max(choose, refit_stat_bytes(hidden, intermediate))


def refit_stat_bytes(hidden: int, intermediate: int | None) -> int:
    """Peak float64 memory of one refit fit besides the layer's forward (0 without intermediate_size):
    the training set's normal equations and one Cholesky factor (GRAM_COPIES x intermediate^2), the
    cross terms, right-hand side and prior (CROSS_COPIES x intermediate x hidden) and a chunk of rows
    in float64 (correction_fit.choose_correction; the fit never holds a fold's own statistics)."""
    if intermediate is None:
        return 0
    d_in = int(intermediate) + 1  # + the intercept column when the projection has a bias
    return (GRAM_COPIES * d_in ** 2 + CROSS_COPIES * d_in * hidden + ROW_CHUNK * (d_in + hidden)) * 8


def correction_note(kind: str, hidden: int, intermediate: int | None, window_layers: int = 4,
                    pool_cap: int | None = None) -> str:
    if kind == "pool" and intermediate is not None:
        stats = pool_stat_bytes(hidden, intermediate, window_layers, pool_cap)
        capped = screen_share(window_layers * intermediate, intermediate, pool_cap) is not None
        size = f"(merge.pool_cap={pool_cap} x intermediate)^2" if capped else "(window layers x intermediate)^2"
        advice = ("Use merge.correction=refit where that does not fit" if capped else
                  "Set merge.pool_cap (3 kept most of the gain on SmolLM2) or use merge.correction=refit where "
                  "that does not fit")
        return (f"merge.correction=pool: choosing a {window_layers}-layer window's neurons holds about "
                f"{stats / GiB:.2f} GiB ({POOL_GRAM_COPIES} copies of {size} float64) on the "
                f"window's stage device, on top of each stage's activations; each fitted correction is "
                f"{3 * intermediate * hidden * 4 / GiB:.2f} GiB (float32). {advice}")
    if kind == "linear":
        return (f"merge.correction=linear: each window's fitted map is {hidden ** 2 * 4 / GiB:.2f} GiB (float32), "
                "held on the window's stage and on the Ray driver while its plan is scored (one plan's maps at a time)")
    if intermediate is None:
        return ("merge.correction=refit: the config has no intermediate_size, so the size of its statistics is "
                "unknown here")
    stats = refit_stat_bytes(hidden, intermediate)
    fitted = (intermediate + 1) * hidden * 4
    return (f"merge.correction=refit: fitting a window holds about {stats / GiB:.2f} GiB of float64 statistics "
            f"({GRAM_COPIES} copies of intermediate^2 + {CROSS_COPIES} of intermediate x hidden) on the window's stage "
            "device, on top of each stage's activations; "
            f"each fitted projection is {fitted / GiB:.2f} GiB (float32), held on the stage and on the Ray driver while "
            "its plan is scored (one plan's at a time). Use merge.correction=linear where that does not fit")
