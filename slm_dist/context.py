"""What every stage and command shares once a config is loaded: the resolved inputs, device and
dtype, the stage split, the backend, the tokenizer, and the one held-out perplexity.

`pipeline`, `planning`, `evaluation`, `compare`, `heal` and the CLI build on these; nothing here
runs a stage.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from slm_dist import calibration
from slm_dist.arch import get_arch
from slm_dist.checkpoint import folder
from slm_dist.checkpoint.hub import resolve_model
from slm_dist.checkpoint.index import CheckpointIndex, open_index
from slm_dist.config import SlmConfig, compute_dtype, resolve_device
from slm_dist.core.partition import DTYPE_BYTES, ModelBytes, model_bytes_from_tensors, partition_layers
from slm_dist.workers.stage_worker import StageSpec, StatsSpec

if TYPE_CHECKING:
    from slm_dist.backends.base import Backend

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


def resolve_inputs(config: SlmConfig, cache_dir: Path | None, show_progress: bool = True) -> RunContext:
    """Fill in the demo model and text where the config leaves them null (fetching them once); a
    ``model.path`` that names a Hub repo id becomes its snapshot folder."""
    model_dir, source, heldout = config.model.path, config.calibration.source, config.eval.heldout
    if model_dir is not None:
        model_dir = resolve_model(model_dir)  # a Hub repo id: its snapshot in the Hub cache
    if model_dir is None or source is None or (heldout is None and config.eval.enabled):
        from slm_dist import assets  # the demo download: only when the config asks for it

        demo = assets.prepare_demo_assets(config.run.cache_dir or cache_dir or assets.default_cache_dir())
        model_dir = model_dir or demo.model_dir
        source = source or demo.calibration_text
        heldout = heldout or demo.heldout_text
    return RunContext(config, Path(model_dir), Path(source), Path(heldout) if heldout else None, show_progress)


def device_and_dtype(config: SlmConfig) -> tuple[str, str]:
    device = resolve_device(config, torch.cuda.is_available)
    if device == "cuda" and not torch.cuda.is_available() and config.cluster.backend == "local":
        raise RuntimeError("cluster.device=cuda but this process sees no CUDA device; use cluster.device=cpu")
    return device, compute_dtype(config, device)


def stage_specs(config: SlmConfig, index: CheckpointIndex, model_dir: Path | None = None) -> list[StageSpec]:
    """Contiguous, byte-balanced layer slices, one per stage, sized in the compute dtype."""
    device, dtype = device_and_dtype(config)
    sizes = index_model_bytes(index, dtype)
    slices = partition_layers(sizes.layers, config.cluster.num_stages, config.cluster.memory_per_stage_bytes,
                              sizes.first_extra, sizes.last_extra)
    return [StageSpec(model_dir=str(model_dir or index.root), start=a, stop=b, num_layers=index.num_layers,
                      device=device, dtype=dtype, attn_implementation=config.model.attn_implementation,
                      allow_pickle=config.model.allow_pickle, correction_weight=config.merge.correction_weight,
                      pool_cap=config.merge.pool_cap, cache_stride=config.calibration.cache_stride)
            for a, b in slices]


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


def make_backend(config: SlmConfig) -> Backend:
    """The one place that picks where the stages run (``cluster.backend``)."""
    if config.cluster.backend == "ray":
        from slm_dist.backends.ray import RayBackend  # ray is imported only when asked for

        return RayBackend(config.cluster)
    from slm_dist.backends.local import LocalBackend

    return LocalBackend()


def load_tokenizer(model_dir: Path):
    """The model folder's tokenizer, built-in transformers classes only (checkpoint/folder.py)."""
    return folder.load_tokenizer(model_dir)


def batches(input_ids: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    return [(i // batch_size, input_ids[i:i + batch_size]) for i in range(0, len(input_ids), batch_size)]


def perplexity(ctx: RunContext, model_dir: Path, backend: Backend) -> float | None:
    """exp(mean token NLL) on the held-out text, as `slm-dist eval` measures it: ``eval.max_windows``
    windows of ``eval.seq_len`` tokens spread evenly over the whole text, BOS first when ``eval.add_bos``."""
    if not ctx.config.eval.enabled or ctx.heldout_text is None:
        return None
    cfg = ctx.config.eval
    tokenizer = load_tokenizer(model_dir)
    text = calibration.read_text_file(ctx.heldout_text, "eval.heldout")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = calibration.perplexity_windows(ids, cfg.seq_len, cfg.max_windows, bos_token_id(tokenizer, cfg.add_bos))
    index = open_index(model_dir, allow_pickle=ctx.config.model.allow_pickle)
    specs = stage_specs(ctx.config, index, model_dir)
    nll_sum, count = backend.nll(specs, batches(windows, ctx.config.calibration.batch_size), ctx.show_progress)
    return math.exp(nll_sum / count)


def bos_token_id(tokenizer, add_bos: bool) -> int | None:
    """The BOS id to put first when ``eval.add_bos`` (an error when the tokenizer has none)."""
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise calibration.CalibrationDataError("eval.add_bos=true but the tokenizer defines no BOS token; set it "
                                               "to false")
    return tokenizer.bos_token_id
