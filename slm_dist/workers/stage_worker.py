"""A contiguous slice of decoder layers, loaded straight from the safetensors shards.

A plain class: the local backend calls it directly, the Ray backend wraps it in an actor
(``slm_dist.backends.ray``). The model skeleton is built on the meta device and only this stage's
tensors are read, so a stage of a 70B model holds its layers and nothing else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from slm_dist.arch import ArchSpec, get_arch
from slm_dist.checkpoint.folder import hf_config
from slm_dist.checkpoint.index import CheckpointError, CheckpointIndex, open_index
from slm_dist.checkpoint.reader import LazyReader, torch_dtype
from slm_dist.core import similarity
from slm_dist.core.alpha_fit import AlphaFit
from slm_dist.core.correction_fit import BASELINE_KINDS, CorrectionFit, correction_key, fold_kind
from slm_dist.core.merge import apply_correction, merge_window
from slm_dist.core.merge_jobs import corrected_suffixes
from slm_dist.core.types import Window
from slm_dist.workers.window_fits import (
    fit_window_alpha,
    fit_window_correction,
    fit_window_patch,
    fit_window_replaceme,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StatsSpec:
    """What each stage measures on a calibration batch (mirrors the `similarity` config section)."""

    kernel: str = "linear"
    unit: str = "token"
    tokens_per_batch: int = 512
    skip_first_token: bool = True
    seed: int = 0


@dataclass(frozen=True)
class StageSpec:
    """Where a stage's layers come from and how it runs them; picklable, sent to actors."""

    model_dir: str
    start: int                 # first layer held (inclusive)
    stop: int                  # first layer not held (half-open)
    num_layers: int            # layers in the whole model
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    allow_pickle: bool = False
    with_lm_head: bool = True  # the last stage also scores tokens (perplexity)
    # LinearPatch (evaluation only): residual-stream patches h -> h P after some layers, from this file
    # (checkpoint/corrections.py ``save_patches``); ``forward`` applies them, calibration and scoring do not.
    patch_file: str | None = None
    correction_weight: str = "relative"  # merge.correction_weight: how tokens count in a correction's fit
    pool_cap: int | None = None  # merge.pool_cap: a pool screened to this many times the MLP width
    cache_stride: int = 1  # calibration.cache_stride: cached inputs of layers start, start + n, ... only

    def __post_init__(self) -> None:
        if self.cache_stride < 1:
            raise ValueError(f"StageSpec.cache_stride must be >= 1, got {self.cache_stride}")
        if self.pool_cap is not None and self.pool_cap < 2:
            raise ValueError(f"StageSpec.pool_cap must be >= 2 or None, got {self.pool_cap}")

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.num_layers


@dataclass
class StageStats:
    """One stage's statistics for one batch: small, whatever the hidden size."""

    batch_id: int
    rows: list[int]                 # CKA matrix rows: 0 = embedding output, i+1 = output of layer i
    grams: Tensor                   # [len(rows), n, n] float32
    cos_sums: dict[int, float] = field(default_factory=dict)      # layer -> sum of cos(in, out) over token rows
    angular_sums: dict[int, float] = field(default_factory=dict)  # layer -> sum of arccos(cos)/pi
    counts: dict[int, int] = field(default_factory=dict)          # layer -> token rows summed


class StageCacheMissing(RuntimeError):
    """run_candidate found no cached input: the stage was rebuilt (e.g. its actor restarted) after
    the calibration pass that caches them; run that pass again."""


def _get_module(root: nn.Module, path: str) -> nn.Module:
    node = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


class StageWorker:
    def __init__(self, spec: StageSpec, stats: StatsSpec = StatsSpec()):
        if not (0 <= spec.start < spec.stop <= spec.num_layers):
            raise ValueError(f"stage layers [{spec.start}, {spec.stop}) do not fit a model of {spec.num_layers} layers")
        self.spec = spec
        self.stats_spec = stats
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        self.index: CheckpointIndex = open_index(Path(spec.model_dir), allow_pickle=spec.allow_pickle)
        self.arch: ArchSpec = get_arch(self.index.model_type)
        self.reader = LazyReader(self.index)
        self._build()
        # batch_id -> the original input of layers start, start + cache_stride, ... (index
        # (layer_id - start) // cache_stride), kept on the host: a candidate plan reruns from its lowest
        # changed layer (or the nearest kept input below it), not from the stage's start.
        self._cached_inputs: dict[int, list[Tensor]] = {}
        self._reference_final: dict[int, Tensor] = {}  # batch_id -> original final-norm hidden (last stage)
        self._merged_layers: dict[tuple, nn.Module] = {}
        # merge.correction=linear: (window, rule, alpha) -> fitted map T, or None where the identity won
        self._corrections: dict[tuple, Tensor | None] = {}

    # ----------------------------------------------------------------------------------- loading
    def _build(self) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        # Built from the checked config.json the index read (never from the folder by transformers, so
        # no auto_map is followed and no code of the folder runs).
        if self.index.num_layers != self.spec.num_layers:
            raise CheckpointError(f"{self.spec.model_dir}/config.json has num_hidden_layers="
                                  f"{self.index.num_layers}, the stage plan assumed {self.spec.num_layers}")
        # A config loaded on its own has no attention implementation; a bare decoder layer then
        # attends in both directions without any error. Set it explicitly.
        config = hf_config(self.index.config, self.spec.attn_implementation)
        self.config = config
        # Buffers (rotary inv_freq) are materialised for real; parameters stay on meta until loaded.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=self.spec.attn_implementation,
                                                     dtype=self.dtype)
        layers = _get_module(model, self.arch.layers_module)
        self.layer_ids = list(range(self.spec.start, self.spec.stop))
        self.layers = nn.ModuleList([layers[i] for i in self.layer_ids])
        self.rotary = _get_module(model, self.arch.rotary_module).to(self.device)
        self.embed = _get_module(model, self.arch.embed_module) if self.spec.is_first else None
        self.norm = _get_module(model, self.arch.final_norm_module) if self.spec.is_last else None
        self.lm_head = (_get_module(model, self.arch.lm_head_module)
                        if self.spec.is_last and self.spec.with_lm_head else None)
        self._layer_class = type(layers[0])  # new_layer builds scratch layers of it
        del model, layers  # the rest of the skeleton is meta tensors: dropping it frees nothing real but names

        for layer_id, layer in zip(self.layer_ids, self.layers):
            self._load_module(layer, f"{self.arch.layers_module}.{layer_id}")
        self.patches: dict[int, Tensor] = {}
        if self.spec.patch_file is not None:
            from slm_dist.checkpoint.corrections import load_patches

            self.patches = {i: p.to(self.device, self.dtype) for i, p in
                            load_patches(self.spec.patch_file, config.hidden_size).items() if i in self.layer_ids}
        if self.embed is not None:
            self._load_module(self.embed, self.arch.embed_module)
        if self.norm is not None:
            self._load_module(self.norm, self.arch.final_norm_module)
        if self.lm_head is not None:
            tied = getattr(self.config, "tie_word_embeddings", False)
            source = self.arch.lm_head_module
            if f"{source}.weight" not in self.index and tied:
                source = self.arch.embed_module  # tied weights are stored once, under the embedding
            if source == self.arch.embed_module and self.embed is not None:
                self.lm_head.weight = self.embed.weight  # tied and both here: one tensor, as in the HF model
            else:
                self._load_module(self.lm_head, self.arch.lm_head_module, source_prefix=source)
        self.reader.close()  # every weight is in memory now: release the shard files
        for module in self._held_modules():
            module.eval()
            module.requires_grad_(False)
        log.debug("stage [%d, %d) loaded %d tensors from %s", self.spec.start, self.spec.stop,
                  len(self.reader.read_keys), sorted(self.reader.opened_files))

    def _held_modules(self) -> list[nn.Module]:
        return [m for m in (self.embed, *self.layers, self.norm, self.lm_head) if m is not None]

    def _load_module(self, module: nn.Module, prefix: str, source_prefix: str | None = None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        source_prefix = source_prefix or prefix
        for name, _ in list(module.named_parameters()):
            key = f"{source_prefix}.{name}"
            if key not in self.index:
                raise CheckpointError(f"{self.spec.model_dir} lacks tensor {key!r} needed by layers "
                                      f"[{self.spec.start}, {self.spec.stop}); the checkpoint is incomplete")
            source = torch_dtype(self.index.tensors[key].dtype)
            value = torch.empty(self.index.tensors[key].shape, device=self.device,
                                dtype=self.dtype if source.is_floating_point else source)
            self.reader.read_into(key, value)  # straight into the kept tensor: no whole-tensor cast copy
            set_module_tensor_to_device(module, name, self.device, value=value)

    def loaded_keys(self) -> list[str]:
        return list(self.reader.read_keys)

    def held_bytes(self) -> int:
        unique = {p.data_ptr(): p for m in self._held_modules() for p in m.parameters()}  # tied weights once
        return sum(p.numel() * p.element_size() for p in unique.values())

    # ----------------------------------------------------------------------------------- forward
    def _inputs(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        if self.spec.is_first:
            if x.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"the first stage takes token ids, got a {x.dtype} tensor")
            return self.embed(x.long())
        return x.to(self.dtype)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    def context(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, object]]:
        """What every layer of a forward pass over ``h`` [batch, seq, hidden] shares: positions, rotary
        embeddings and the causal masks (``run_layer`` takes it back)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        position_embeddings = self.rotary(h, position_ids)
        kwargs = dict(config=self.config, inputs_embeds=h, attention_mask=None, cache=None, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return position_ids, position_embeddings, masks

    def _layer_type(self, layer_id: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[layer_id] if types else "full_attention"

    def run_layer(self, layer: nn.Module, layer_id: int, h: Tensor, ctx) -> Tensor:
        """``layer`` (one of this stage's, or one built by ``new_layer``) at position ``layer_id``."""
        position_ids, position_embeddings, masks = ctx
        out = layer(h, attention_mask=masks[self._layer_type(layer_id)], position_embeddings=position_embeddings,
                    position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        """Token ids (first stage) or hidden states [batch, seq, hidden] -> this stage's output hidden."""
        h = self._inputs(x)
        ctx = self.context(h)
        for layer_id, layer in zip(self.layer_ids, self.layers):
            h = self.run_layer(layer, layer_id, h, ctx)
            if layer_id in self.patches:
                h = h @ self.patches[layer_id]
        return h

    @torch.inference_mode()
    def calibrate(self, batch_id: int, x: Tensor, cache_inputs: bool = False) -> tuple[Tensor, StageStats]:
        """One calibration batch: the next stage's input plus this stage's Gram statistics."""
        spec = self.stats_spec
        h = self._inputs(x)
        cached: list[Tensor] = []
        if cache_inputs:
            self._cached_inputs[batch_id] = cached
        b, s, _ = h.shape
        token_index = None
        if spec.unit == "token":
            token_index = similarity.sample_token_index(b, s, spec.tokens_per_batch, spec.seed, batch_id,
                                                        skip_first=spec.skip_first_token)
        rows: list[int] = []
        stats = StageStats(batch_id=batch_id, rows=rows, grams=torch.empty(0))
        num_rows = len(self.layer_ids) + self.spec.is_first

        def record(row: int, hidden: Tensor) -> None:
            # Rows and kernel on the stage's device; only the n x n Gram (a few MiB) moves to the
            # host. Copying whole hidden states off a GPU would cost more than the forward pass.
            rep = similarity.layer_representation(hidden, spec.unit, token_index)
            k = similarity.gram(rep, spec.kernel)
            if not rows:
                # One host buffer for every Gram of the batch. Grams kept one by one would each sit
                # between the layers' freed activations and fragment the heap: measured on a
                # SmolLM2 stage, the heap a batch left behind was 1.5x as large.
                stats.grams = torch.empty((num_rows, *k.shape), dtype=torch.float32)
            stats.grams[len(rows)].copy_(k)
            rows.append(row)

        if self.spec.is_first:
            record(0, h)
        ctx = self.context(h)
        for layer_id, layer in zip(self.layer_ids, self.layers):
            h_in = h
            if cache_inputs and (layer_id - self.spec.start) % self.spec.cache_stride == 0:
                cached.append(h_in.detach().to("cpu", copy=True))
            h = self.run_layer(layer, layer_id, h, ctx)
            record(layer_id + 1, h)
            cos_sum, ang_sum, count = similarity.input_output_similarity(h_in, h, skip_first=spec.skip_first_token)
            stats.cos_sums[layer_id], stats.angular_sums[layer_id], stats.counts[layer_id] = cos_sum, ang_sum, count
        if cache_inputs and self.spec.is_last:
            self._reference_final[batch_id] = self.norm(h).detach().to("cpu", copy=True)
        return h, stats

    @torch.inference_mode()
    def token_logprobs(self, x: Tensor, input_ids: Tensor, start: int = 0, greedy: bool = False) -> Tensor:
        """Last stage: log p(input_ids[:, t+1] | prefix), [batch, seq-1] float32, for positions t >= start.

        Positions before ``start`` come back NaN: the vocabulary projection is about a fifth of a
        small model's forward, and a multiple-choice request scores only its last few tokens.
        ``greedy`` adds a last axis, [batch, seq-1, 2]: the log-probability and 1.0 where the token is
        the argmax of the distribution (lm-eval's is_greedy), 0.0 where not.
        """
        if not (self.spec.is_last and self.lm_head is not None):
            raise RuntimeError("token_logprobs runs on the last stage, built with with_lm_head=True")
        h = self.forward(x) if self.layers else self._inputs(x)
        return self._logprobs(h, input_ids, start, greedy)

    def _logprobs(self, h: Tensor, input_ids: Tensor, start: int = 0, greedy: bool = False) -> Tensor:
        width = h.shape[1] - 1
        start = min(max(int(start), 0), width)
        logits = self.lm_head(self.norm(h[:, start:-1])).float()
        logp = torch.log_softmax(logits, dim=-1)
        target = input_ids[:, start + 1:].to(logp.device).long()
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()
        if greedy:
            picked = torch.stack([picked, (logp.argmax(-1) == target).float().cpu()], dim=-1)
        if start == 0:
            return picked
        out = torch.full((h.shape[0], width, *picked.shape[2:]), math.nan, dtype=picked.dtype)
        out[:, start:] = picked
        return out

    # ------------------------------------------------------- the published-code criterion (output)
    def _merged_layer(self, window: Window, rule: str, alpha: float | None = None,
                      matrix: Tensor | None = None, correction: str | None = None) -> nn.Module:
        """The window merged by ``rule``, with ``matrix`` (a correction of kind ``correction``) folded in."""
        key = (window, rule, alpha, correction if matrix is not None else None)
        if key not in self._merged_layers:
            # Window members above this stage live on other stages: read from the checkpoint.
            per_layer, _ = self.window_members(window)
            merged = merge_window(per_layer, rule, self.arch.role, alpha)
            if matrix is not None:
                kind = fold_kind(correction)
                for suffix, part in corrected_suffixes(self.arch, kind).items():
                    if suffix in merged:
                        merged[suffix] = apply_correction(merged[suffix], matrix, kind, part)
            self._merged_layers[key] = self.new_layer(window[0], merged)
        return self._merged_layers[key]

    def new_layer(self, layer_id: int, tensors: dict[str, Tensor]) -> nn.Module:
        """A decoder layer of this model's class at position ``layer_id`` holding ``tensors``, in the
        stage's dtype and device (merged and candidate layers; the stage's own layers stay as loaded)."""
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device

        with init_empty_weights(include_buffers=False):
            module = self._layer_class(self.config, layer_idx=layer_id)
        for name, value in tensors.items():
            set_module_tensor_to_device(module, name, self.device, value=value, dtype=self.dtype)
        return module.eval().requires_grad_(False)

    def window_members(self, window: Window) -> tuple[list[dict[str, Tensor]], Callable[[int], nn.Module]]:
        """The window's source tensors (layers lo..hi, checkpoint dtype, held while one window is fitted)
        and ``module(layer_id)``: this stage's own layer where it holds it, else a layer built from those
        tensors by ``new_layer``, one at a time so at most one copy is alive."""
        lo, hi = window
        reader = LazyReader(self.index)  # a separate reader: `loaded_keys` keeps showing the stage's own slice
        held = dict(zip(self.layer_ids, self.layers))
        suffixes = [name for name, _ in held[lo].named_parameters()]
        source = [{s: reader.get(self.arch.layer_key(i, s)) for s in suffixes} for i in range(lo, hi + 1)]
        reader.close()

        def module(layer_id: int) -> nn.Module:
            return held[layer_id] if layer_id in held else self.new_layer(layer_id, source[layer_id - lo])

        return source, module

    def _fitted_correction(self, window: Window, rule: str, alpha: float | None,
                           correction: str) -> Tensor | None:
        """The window's fitted map (None: its fit kept the plain merge); raises when it was never fitted."""
        fitted = correction_key(window, rule, alpha, correction)
        if fitted not in self._corrections:
            raise StageCacheMissing(f"stage [{self.spec.start}, {self.spec.stop}) has no {correction} correction "
                                    f"fitted for window {list(window)} (rule {rule}, alpha {alpha}): run "
                                    "fit_correction first")
        return self._corrections[fitted]

    def cached_input(self, batch_id: int, layer_id: int | None = None) -> Tensor:
        """The original input of ``layer_id`` (default: this stage's first layer) for a calibration
        batch, on the stage's device."""
        layer_id = self.spec.start if layer_id is None else layer_id
        if batch_id not in self._cached_inputs:
            raise StageCacheMissing(f"stage [{self.spec.start}, {self.spec.stop}) has no cached input for batch "
                                    f"{batch_id}: run calibrate(..., cache_inputs=True) first")
        if not self.spec.start <= layer_id < self.spec.stop:
            raise ValueError(f"layer {layer_id} is not held by stage [{self.spec.start}, {self.spec.stop})")
        kept, rest = divmod(layer_id - self.spec.start, self.spec.cache_stride)
        h = self._cached_inputs[batch_id][kept].to(self.device)
        if rest:  # recomputed from the nearest kept input below: the original layers, as calibrate ran them
            with torch.inference_mode():
                ctx = self.context(h)
                for lid in range(layer_id - rest, layer_id):
                    h = self.run_layer(self.layers[lid - self.spec.start], lid, h, ctx)
        return h

    def fit_alpha(self, window: Window, batch_ids: Sequence[int], grid_points: int = 6,
                  refine_steps: int = 6) -> AlphaFit:
        """Rule ``scaled``: the window's alpha on cached calibration inputs (window_fits.fit_window_alpha)."""
        return fit_window_alpha(self, window, batch_ids, grid_points, refine_steps, self.stats_spec.skip_first_token)

    def fit_correction(self, window: Window, rule: str, alpha: float | None, batch_ids: Sequence[int],
                       kind: str = "linear") -> CorrectionFit:
        """merge.correction=linear|refit: fit the window's correction on cached inputs (window_fits)
        and keep it for ``run_candidate(..., correction=kind)``; returns the fit, map included. The
        ReplaceMe baseline's kinds (``replaceme_lstsq``/``replaceme_cosine``, rule drop) fit its map instead."""
        if kind in BASELINE_KINDS:
            if rule != "drop" or alpha is not None:
                raise ValueError(f"{kind} fits the map of a removed block (rule drop, no alpha), got rule {rule!r}")
            fit = fit_window_replaceme(self, window, batch_ids, kind.removeprefix("replaceme_"))
        else:
            fit = fit_window_correction(self, window, rule, alpha, batch_ids, self.stats_spec.skip_first_token,
                                        kind, self.spec.correction_weight, self.spec.pool_cap)
        self._corrections[fit.key] = fit.matrix  # host memory: moved to the device inside a merged layer only
        return fit

    def fit_patch(self, window: Window, batch_ids: Sequence[int]) -> Tensor:
        """LinearPatch for removing the window's upper layers (window_fits.fit_window_patch)."""
        return fit_window_patch(self, window, batch_ids)

    def set_correction(self, key: tuple, matrix: Tensor | None) -> None:
        """Install a map fitted earlier (the Ray driver re-installs them on a restarted stage)."""
        self._corrections[key] = matrix

    def clear_candidates(self, corrections: bool = False) -> None:
        """Drop the merged layers built for candidate plans (and, with ``corrections``, the fitted maps)."""
        self._merged_layers.clear()
        if corrections:
            self._corrections.clear()

    @torch.inference_mode()
    def run_candidate(self, batch_id: int, x: Tensor | None, windows: Sequence[Window], rule: str,
                      from_layer: int, alphas: Mapping[Window, float] | None = None,
                      input_ids: Tensor | None = None, correction: str | None = None) -> Tensor:
        """Run the candidate model (original layers with `windows` merged) through this stage.

        Layers below ``from_layer`` are unchanged by every window, so their cached original output
        stands in for them: ``x`` is None on the stage holding ``from_layer``, which starts from the
        cached original input of ``from_layer`` (a window near the top reruns a few layers, not all); later stages get the previous stage's candidate output. On the last stage the
        result is the per-sample cosine with the original model's final-norm hidden [batch], or, when
        ``input_ids`` [batch, seq] are given, the candidate's log p(token t+1 | prefix) [batch, seq-1].
        Rule ``scaled`` takes each window's alpha from ``alphas``; ``correction`` ("linear" or "refit")
        applies the corrections of that kind ``fit_correction`` fitted on this stage.
        """
        if x is None:
            first = max(from_layer, self.spec.start)
            h = self.cached_input(batch_id, first)
        else:
            first, h = self.spec.start, self._inputs(x)
        ctx = self.context(h)
        starts = {lo: hi for lo, hi in windows}
        skipped = {i for lo, hi in windows for i in range(lo + 1, hi + 1)}
        for layer_id, layer in zip(self.layer_ids, self.layers):
            if layer_id < first or layer_id in skipped:
                continue
            if layer_id in starts:
                window = (layer_id, starts[layer_id])
                alpha = alphas[window] if rule == "scaled" else None
                matrix = None if correction is None else self._fitted_correction(window, rule, alpha, correction)
                # Drop (or alpha 0) without a map keeps layer lo as it is: no copy to build.
                if matrix is not None or (rule != "drop" and alpha != 0.0):
                    layer = self._merged_layer(window, rule, alpha, matrix, correction)
            h = self.run_layer(layer, layer_id, h, ctx)
        if not self.spec.is_last:
            return h
        if input_ids is not None:
            return self._logprobs(h, input_ids)
        final = self.norm(h).float().flatten(1).cpu()
        if batch_id not in self._reference_final:
            raise StageCacheMissing(f"the last stage has no original final hidden state for batch {batch_id}: "
                                    "run calibrate(..., cache_inputs=True) first")
        ref = self._reference_final[batch_id].float().flatten(1)
        return torch.nn.functional.cosine_similarity(final, ref, dim=1)
