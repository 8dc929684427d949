"""Healing after pruning: LoRA recovery training with DeepSpeed, run by Ray Train.

The paper recovers a pruned model with LoRA (r=8, alpha=16, dropout 0.05 on all seven projections,
2 epochs, lr 1e-4, batch 64, cutoff 256); `HealSection`'s defaults are that recipe. The story:

1. the driver tokenizes the data once (instruction/response pairs: loss on the response only;
   plain text: cut into ``cutoff_len`` windows) into ``examples.parquet`` beside the Ray Train
   checkpoints (the storage every worker reads), and builds the DeepSpeed config as a plain dict;
2. Ray Train's `TorchTrainer` starts ``cluster.num_workers`` workers (gloo on CPU, NCCL on GPUs);
   each reads the examples file and runs `train_worker`: base model + peft LoRA,
   `deepspeed.initialize`, a fixed, seeded batch order, the loss and learning rate reported to Ray
   Train every step (the driver draws them as a progress bar), and every ``checkpoint_every``
   steps a checkpoint (DeepSpeed engine state without the frozen base weights, the adapter in
   peft format, the loss history). A rerun with the same storage picks up the latest checkpoint
   and continues the same schedule (the batch order and dropout seeds depend on the step only);
3. the driver merges ``W + (alpha / r) * B @ A`` into the base weights tensor by tensor (one
   tensor in memory at a time, never the whole model) and writes a normal sharded checkpoint
   with the project's writer (index, config, tokenizer files, manifest), plus the adapter alone.

DeepSpeed runs on CPU here (its CPU accelerator over gloo, `torch.optim.AdamW` as the client
optimizer since no DeepSpeed ops are compiled); the same code runs on GPUs with NCCL and bf16.
The Ray parts live in `backends/train.py` (the workers' session, the trainer run); everything here is
plain code.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from slm_dist import context, extras, preflight, progress
from slm_dist.backends import train
from slm_dist.backends.base import Backend
from slm_dist.calibration import read_texts
from slm_dist.checkpoint.export import check_output_dir, write_rewritten
from slm_dist.checkpoint.index import open_index
from slm_dist.checkpoint.reader import read_safetensors
from slm_dist.checkpoint.verify import verify_model
from slm_dist.checkpoint.writer import write_json, write_safetensors
from slm_dist.config import HealSection, SlmConfig, compute_dtype

log = logging.getLogger(__name__)

IGNORE_INDEX = -100          # label of tokens that do not count in the loss (prompt, padding)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
ENGINE_TAG = "engine"
HISTORY_NAME = "history.json"
SUMMARY_NAME = "heal.json"
EXAMPLES_NAME = "examples.parquet"   # the tokenized data, beside the Ray Train checkpoints

# Alpaca's prompt (the data the paper heals on); the response follows "### Response:\n".
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


class HealError(ValueError):
    """Healing cannot run as configured; says what was wrong, the values seen and the fix."""


# ======================================================================== recipe (pure)
def grad_accumulation_steps(batch_size: int, micro_batch_size: int, num_workers: int) -> int:
    """Micro-batches each worker runs per optimizer step so that all workers together see ``batch_size``."""
    per_step = micro_batch_size * num_workers
    if batch_size % per_step:
        raise HealError(f"heal.batch_size={batch_size} is not a multiple of heal.micro_batch_size x "
                        f"cluster.num_workers = {micro_batch_size} x {num_workers} = {per_step}; make it one "
                        f"(e.g. heal.batch_size={max(per_step, batch_size // per_step * per_step)})")
    return batch_size // per_step


def deepspeed_config(heal: HealSection, num_workers: int, device: str) -> dict:
    """The DeepSpeed config, built from ours alone (nothing is read from files or the environment)."""
    gas = grad_accumulation_steps(heal.batch_size, heal.micro_batch_size, num_workers)
    zero: dict[str, Any] = {"stage": heal.zero_stage}
    if heal.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=device == "cuda")
    if heal.offload:
        if heal.zero_stage == 0:
            raise HealError("heal.offload=true needs heal.zero_stage >= 1 (ZeRO partitions what it offloads); "
                            "set heal.zero_stage=2, or 3 to offload the parameters too")
        pin = device == "cuda"
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if heal.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config: dict[str, Any] = {
        "train_batch_size": heal.batch_size,
        "train_micro_batch_size_per_gpu": heal.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,   # we log; DeepSpeed's own step lines would flood the workers' logs
        "wall_clock_breakdown": False,
    }
    if device == "cuda":
        # Weights stay bf16; DeepSpeed keeps fp32 master copies of the (few) trainable LoRA weights.
        config["bf16"] = {"enabled": True}
    if heal.optimizer == "deepspeed":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": heal.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": heal.weight_decay}}
    else:
        # A torch optimizer passed to deepspeed.initialize ("client optimizer"): runs without compiled ops.
        config["zero_allow_untested_optimizer"] = True
        if heal.offload:
            config["zero_force_ds_cpu_optimizer"] = False
    return config


def lora_settings(heal: HealSection) -> dict:
    """Keyword arguments of `peft.LoraConfig` (a plain dict, so it travels to workers as is)."""
    return {"r": heal.lora_r, "lora_alpha": heal.lora_alpha, "lora_dropout": heal.lora_dropout,
            "target_modules": list(heal.target_modules), "bias": "none", "task_type": "CAUSAL_LM"}


def lora_scale(r: int, alpha: float) -> float:
    """peft's scaling of B @ A (plain LoRA, not rsLoRA)."""
    return alpha / r


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one pass (the ragged tail is dropped: every step sees exactly ``batch_size``)."""
    if num_examples < batch_size:
        raise HealError(f"the healing data has {num_examples} examples, fewer than heal.batch_size={batch_size}; "
                        "give more data or a smaller heal.batch_size")
    return num_examples // batch_size


def total_steps(num_examples: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: ``max_steps`` when set (as in Hugging Face's Trainer), else the epochs'."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    return max_steps if max_steps is not None else epochs * per_epoch


def learning_rate(step: int, total: int, warmup_steps: int, peak_lr: float) -> float:
    """The learning rate of 0-based optimizer step ``step``: transformers' `get_linear_schedule_with_warmup`
    (the Trainer's default, which the paper's recipe ran): ``peak * step / warmup`` while ``step <
    warmup`` (so the first step has lr 0), then linear decay from ``peak`` at step ``warmup`` towards 0.

    One deviation: ``warmup_steps`` is capped at ``total`` (a short run still climbs the whole
    ramp; the Trainer would stay near 0). A function of the step alone, so a resumed run continues
    the same schedule.
    """
    warmup = min(warmup_steps, total)
    if step < warmup:
        return peak_lr * step / warmup
    return peak_lr * max(0.0, (total - step) / max(1, total - warmup))


def micro_batches(num_examples: int, batch_size: int, micro_batch_size: int, num_workers: int, rank: int,
                  step: int, seed: int) -> list[list[int]]:
    """Example indices of worker ``rank``'s micro-batches at optimizer step ``step`` (0-based).

    Each epoch is a seeded permutation; step k of an epoch takes its k-th block of ``batch_size``
    examples, split evenly over the workers, then into micro-batches. It depends on the step and
    seed only: a resumed worker continues exactly where the killed one stopped.
    """
    gas = grad_accumulation_steps(batch_size, micro_batch_size, num_workers)
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_worker = batch_size // num_workers
    mine = order[k * batch_size + rank * per_worker: k * batch_size + (rank + 1) * per_worker].tolist()
    return [mine[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(gas)]


def dropout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The RNG seed of one micro-batch: dropout masks repeat exactly after a resume."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + micro) % (2**63 - 1)


# =========================================================================== data
@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]   # [seq]
    labels: tuple[int, ...]      # [seq], IGNORE_INDEX where the token does not count in the loss


def alpaca_prompt(instruction: str, context: str = "") -> str:
    return (ALPACA_PROMPT.format(instruction=instruction, input=context) if context.strip()
            else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))


def instruction_example(prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int | None,
                        cutoff_len: int) -> Example:
    """Prompt then response (+ EOS), cut to ``cutoff_len``; only response tokens (and EOS) are labeled."""
    ids = list(prompt_ids) + list(response_ids) + ([eos_id] if eos_id is not None else [])
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return Example(tuple(ids[:cutoff_len]), tuple(labels[:cutoff_len]))


def text_examples(stream: Sequence[int], cutoff_len: int) -> list[Example]:
    """Plain text: consecutive ``cutoff_len`` windows of the token stream, every token labeled."""
    windows = [tuple(stream[i:i + cutoff_len]) for i in range(0, len(stream) - cutoff_len + 1, cutoff_len)]
    return [Example(w, w) for w in windows]


def read_records(path: Path) -> tuple[str, list]:
    """("instruction", [(prompt, response)]) or ("text", [document]) from a .jsonl or .txt file.

    A .jsonl line is an instruction pair when it has ``instruction`` and ``output`` (Alpaca; an
    optional ``input`` is the context) or ``prompt`` and ``response``; else its ``text`` is a document.
    """
    path = Path(path)
    if not path.is_file():
        raise HealError(f"heal.data {path} does not exist; give a .jsonl of instruction/output pairs or text")
    if path.suffix != ".jsonl":
        return "text", read_texts(path)
    pairs, texts = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise HealError(f"{path} line {n} is not JSON ({e.msg}); each line must be one object") from None
        if not isinstance(row, dict):
            raise HealError(f"{path} line {n} is a {type(row).__name__}, not an object")
        if "instruction" in row and "output" in row:
            pairs.append((alpaca_prompt(str(row["instruction"]), str(row.get("input") or "")), str(row["output"])))
        elif "prompt" in row and "response" in row:
            pairs.append((str(row["prompt"]), str(row["response"])))
        elif "text" in row:
            texts.append(str(row["text"]))
        else:
            raise HealError(f"{path} line {n} has keys {sorted(row)}; expected instruction+output "
                            "(Alpaca, optional input), prompt+response, or text")
    if pairs and texts:
        raise HealError(f"{path} mixes {len(pairs)} instruction lines with {len(texts)} text lines; use one kind")
    if pairs:
        return "instruction", pairs
    if not any(t.strip() for t in texts):
        raise HealError(f"{path} holds no text")
    return "text", [t for t in texts if t.strip()]


def prepare_examples(path: Path, tokenizer, cutoff_len: int) -> tuple[str, list[Example]]:
    """Tokenize the healing data once (on the driver): (kind, examples)."""
    kind, records = read_records(path)
    eos = tokenizer.eos_token_id
    if kind == "instruction":
        prompts = tokenizer([p for p, _ in records], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r for _, r in records], add_special_tokens=False)["input_ids"]
        examples = [instruction_example(p, r, eos, cutoff_len) for p, r in zip(prompts, responses)]
        # A prompt longer than the cutoff leaves nothing to learn from: drop it, say how many.
        kept = [e for e in examples if any(t != IGNORE_INDEX for t in e.labels)]
        if len(kept) < len(examples):
            log.warning("heal: %d of %d examples have no response token within cutoff_len=%d and are skipped",
                        len(examples) - len(kept), len(examples), cutoff_len)
        return kind, kept
    encoded = tokenizer(records, add_special_tokens=False)["input_ids"]
    stream: list[int] = list(encoded[0])
    for ids in encoded[1:]:
        if eos is not None:
            stream.append(eos)
        stream.extend(ids)
    examples = text_examples(stream, cutoff_len)
    if not examples:
        raise HealError(f"heal.data {path} has {len(stream)} tokens, fewer than heal.cutoff_len={cutoff_len}")
    return kind, examples


def _filesystem(uri: str):
    """(pyarrow filesystem, path) of a local path or a URI Ray Train storage accepts (s3://, gs://, ...)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))


def write_examples(uri: str, examples: Sequence[Example]) -> None:
    """The tokenized examples as one parquet file (input_ids, labels: int32 lists), written under a
    temporary name and moved into place. The workers read it from there: the data never travels
    inside the trainer's config (every worker, every restart, would unpickle all of it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, path = _filesystem(uri)
    parent, _, name = path.rpartition("/")
    filesystem.create_dir(parent, recursive=True)
    tokens = pa.list_(pa.int32())
    table = pa.table({"input_ids": pa.array([list(e.input_ids) for e in examples], tokens),
                      "labels": pa.array([list(e.labels) for e in examples], tokens)})
    tmp = f"{parent}/.{name}.partial"
    pq.write_table(table, tmp, filesystem=filesystem)
    filesystem.move(tmp, path)


def read_examples(uri: str) -> list[Example]:
    """What `write_examples` wrote."""
    import pyarrow.parquet as pq

    filesystem, path = _filesystem(uri)
    table = pq.read_table(path, filesystem=filesystem)
    return [Example(tuple(ids), tuple(labels))
            for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, each [batch, seq]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ========================================================================== merge
def merge_lora_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``W + scale * B @ A`` computed in float32, returned in W's dtype.

    weight: [out, in]; lora_a: [r, in]; lora_b: [out, r].
    """
    if lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0] or lora_a.shape[0] != lora_b.shape[1]:
        raise HealError(f"LoRA shapes A{list(lora_a.shape)} B{list(lora_b.shape)} do not fit weight "
                        f"{list(weight.shape)} (need A [r, in], B [out, r]); the adapter belongs to another model")
    delta = lora_b.float() @ lora_a.float()
    return (weight.float() + scale * delta).to(weight.dtype)


def lora_pairs(adapter_state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Base weight key -> (A, B) from a peft adapter state dict.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` belongs to
    ``model.layers.0.self_attn.q_proj.weight``.
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in adapter_state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key[:-len(suffix)]
                module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
                pairs.setdefault(module + ".weight", {})[part] = t
                break
        else:
            raise HealError(f"adapter tensor {key!r} is not a LoRA A/B weight; only plain LoRA on linear "
                            "layers (bias='none') can be merged")
    incomplete = sorted(k for k, v in pairs.items() if len(v) != 2)
    if incomplete:
        raise HealError(f"adapter has only one of lora_A/lora_B for {incomplete}; the adapter file is damaged")
    return {k: (v["lora_A"], v["lora_B"]) for k, v in pairs.items()}


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], float, dict]:
    """(pairs, scale, adapter config) of a peft adapter folder."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise HealError(f"{adapter_dir} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise HealError(f"{adapter_dir}: rsLoRA, DoRA and per-module rank/alpha patterns are not supported by the "
                        "merge; use plain LoRA with one r and lora_alpha")
    return lora_pairs(read_safetensors(weights)), lora_scale(cfg["r"], cfg["lora_alpha"]), cfg


def write_merged(model_dir: Path, adapter_dir: Path, out_dir: Path, max_shard_bytes: int,
                 provenance: Mapping[str, Any] | None = None) -> list:
    """Write base + LoRA delta as a sharded checkpoint (``export.write_rewritten``: one tensor in
    memory at a time, names, dtypes, shapes and order kept)."""
    model_dir = Path(model_dir)
    index = open_index(model_dir)
    pairs, scale, adapter_cfg = read_adapter(adapter_dir)
    missing = sorted(set(pairs) - set(index.tensors))
    if missing:
        raise HealError(f"the adapter adapts {missing[:3]}{'...' if len(missing) > 3 else ''} which "
                        f"{model_dir} does not hold; heal and merge against the same checkpoint")

    def merged(key: str, t: Tensor) -> Tensor:
        return merge_lora_weight(t, *pairs[key], scale) if key in pairs else t

    card = (f"# Healed with slm-dist\n\n- base: `{model_dir}`\n- adapter: `{adapter_dir}` (LoRA r={adapter_cfg['r']}, "
            f"alpha={adapter_cfg['lora_alpha']}, modules {adapter_cfg.get('target_modules')})\n- merged: "
            f"W + (alpha / r) B A on {len(pairs)} weights\n")
    return write_rewritten(index, Path(out_dir), max_shard_bytes, merged, card,
                           {"source": str(model_dir), "adapter": str(adapter_dir), "heal": dict(provenance or {})})


# ========================================================================= worker
class TrainSession(Protocol):
    """What `train_worker` needs from its launcher: its place and a checkpoint store."""

    rank: int
    world_size: int

    def latest_checkpoint(self) -> Any:
        """Context manager giving the folder of the latest checkpoint, or None."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Record metrics (and a checkpoint folder, which every worker passes at the same steps)."""


class FolderSession:
    """`TrainSession` for one process without Ray (debugging, tests): checkpoints are copied to
    ``root/step_XXXXXXXX``; the caller sets up torch.distributed (one rank)."""

    def __init__(self, root: Path):
        self.root, self.rank, self.world_size = Path(root), 0, 1
        self.metrics: list[dict] = []

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.root.glob("step_*")) if self.root.is_dir() else []
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / f"step_{metrics['step']:08d}")


def _lora_state(peft_model, zero_stage: int) -> dict[str, Tensor]:
    """The adapter's full tensors on every rank (gathered from the ZeRO-3 partitions when needed)."""
    from peft import get_peft_model_state_dict

    if zero_stage == 3:
        import deepspeed

        params = [p for p in peft_model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def _save_checkpoint(folder: Path, engine, peft_model, loop: dict, step: int, history: list[dict], starts: list[int],
                     rank: int) -> None:
    engine.save_checkpoint(str(folder / "engine"), tag=ENGINE_TAG, client_state={"step": step},
                           exclude_frozen_parameters=True)
    state = _lora_state(peft_model, loop["zero_stage"])   # collective under ZeRO-3: every rank takes part
    if rank == 0:
        adapter = folder / "adapter"
        adapter.mkdir()
        write_safetensors(adapter / ADAPTER_WEIGHTS, state, metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(str(adapter))
        (folder / HISTORY_NAME).write_text(json.dumps({"step": step, "total_steps": loop["total_steps"],
                                                       "starts": starts, "history": history}) + "\n")


def train_worker(loop: dict, session: TrainSession | None = None) -> None:
    """One training worker (Ray Train's per-worker function). ``loop`` is plain data built by `fit`."""
    import deepspeed
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    from slm_dist.checkpoint.folder import load_causal_lm

    if session is None:
        session = train.RaySession()
    rank, world = session.rank, session.world_size
    torch.manual_seed(loop["seed"])
    # Ray Train (or the caller) already made the process group; DeepSpeed adopts it.
    deepspeed.init_distributed(dist_backend=loop["dist_backend"], verbose=False)
    ds_config = loop["deepspeed"]
    dtype = getattr(torch, loop["dtype"])
    keep_alive = None
    if loop["zero_stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained partitions while it lives
    model = load_causal_lm(loop["model_dir"], dtype=dtype, attn_implementation=loop["attn_implementation"])
    model.config.use_cache = False
    if loop["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(**loop["lora"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=loop["lr"], betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=loop["weight_decay"])
    engine, optimizer, _, _ = deepspeed.initialize(model=peft_model, model_parameters=params, optimizer=optimizer,
                                                   config=ds_config)
    engine.train()

    step, history, starts = 0, [], []
    with session.latest_checkpoint() as folder:
        if folder is not None:
            _, client = engine.load_checkpoint(str(folder / "engine"), tag=ENGINE_TAG, load_module_strict=False)
            step = int(client["step"])
            saved = json.loads((folder / HISTORY_NAME).read_text())
            history, starts = saved["history"], saved["starts"]
            if rank == 0:
                log.info("heal: resumed at step %d of %d from %s", step, loop["total_steps"], folder)

    starts.append(step)   # where each (re)start of the run began: [0] for one uninterrupted run
    examples = read_examples(loop["examples_uri"])
    if len(examples) != loop["num_examples"]:
        raise HealError(f"{loop['examples_uri']} holds {len(examples)} examples, the driver wrote "
                        f"{loop['num_examples']}: another heal run on the same heal.storage_path replaced it")
    total, device = loop["total_steps"], engine.device
    while step < total:
        lr = learning_rate(step, total, loop["warmup_steps"], loop["lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        losses = []
        for m, indices in enumerate(micro_batches(len(examples), loop["batch_size"], loop["micro_batch_size"], world,
                                                  rank, step, loop["seed"])):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], loop["pad_id"]).items()}
            torch.manual_seed(dropout_seed(loop["seed"], step, rank, m))
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        mean = torch.stack(losses).mean().to(device)
        dist.all_reduce(mean)
        step += 1
        history.append({"step": step, "loss": mean.item() / world, "lr": lr,
                        "seconds": round(time.perf_counter() - started, 3)})
        metrics = {**history[-1], "total_steps": total}
        if step % loop["checkpoint_every"] == 0 or step == total:
            with tempfile.TemporaryDirectory(prefix="slm-heal-") as tmp:
                _save_checkpoint(Path(tmp), engine, peft_model, loop, step, history, starts, rank)
                session.report({**metrics, "checkpoint": True}, Path(tmp))
            if rank == 0:
                log.info("heal: step %d/%d loss %.4f (checkpoint)", step, total, history[-1]["loss"])
        else:
            session.report({**metrics, "checkpoint": False}, None)   # every step: metrics, progress


# ========================================================================= driver
@dataclass
class HealResult:
    output_dir: Path          # merged checkpoint
    adapter_dir: Path         # the LoRA adapter on its own (peft format)
    kind: str                 # "instruction" | "text"
    num_examples: int
    total_steps: int
    history: list[dict] = field(default_factory=list)   # per optimizer step: step, loss, lr, seconds
    starts: list[int] = field(default_factory=list)     # the step each (re)start began at
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"output_dir": str(self.output_dir), "adapter_dir": str(self.adapter_dir), "kind": self.kind,
                "num_examples": self.num_examples, "total_steps": self.total_steps, "starts": self.starts,
                "seconds": self.seconds,
                "first_loss": self.history[0]["loss"] if self.history else None,
                "last_loss": self.history[-1]["loss"] if self.history else None, "history": self.history}


def heal_dirs(config: SlmConfig) -> tuple[Path, Path, str]:
    """(merged output folder, heal work folder, Ray Train storage path)."""
    work = config.run.dir / "heal"
    out = config.heal.output_dir or config.run.dir / "healed"
    storage = config.heal.storage_path or str(work.resolve())
    return out, work, storage


def resolve_device(requested: str, cluster_gpus: float, num_workers: int) -> str:
    """cpu/cuda for the training workers; ``auto`` means cuda when the cluster has a GPU for each worker."""
    if requested == "auto":
        return "cuda" if cluster_gpus >= num_workers else "cpu"
    if requested == "cuda" and cluster_gpus < num_workers:
        raise HealError(f"cluster.device=cuda with cluster.num_workers={num_workers} but the Ray cluster has "
                        f"{cluster_gpus:g} GPUs; lower cluster.num_workers or use cluster.device=cpu")
    return requested


def keep_adapter(checkpoint, work: Path) -> tuple[Path, dict]:
    """Copy the final checkpoint's adapter to ``work/adapter`` (atomically); returns it and the run state."""
    adapter_dir, tmp = work / "adapter", work / ".adapter.partial"
    with checkpoint.as_directory() as folder:   # local storage: the folder itself; remote: a download
        state = json.loads((Path(folder) / HISTORY_NAME).read_text())
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(folder) / "adapter", tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    return adapter_dir, state


def build_loop(config: SlmConfig, model_dir: Path, examples_uri: str, num_examples: int, pad_id: int, device: str,
               steps: int) -> dict:
    """What every training worker gets: settings and the examples file's location (not the data)."""
    h = config.heal
    dtype = compute_dtype(config, device)
    return {"model_dir": str(Path(model_dir).resolve()), "dtype": dtype,
            "attn_implementation": config.model.attn_implementation, "lora": lora_settings(h),
            "deepspeed": deepspeed_config(h, config.cluster.num_workers, device), "zero_stage": h.zero_stage,
            "dist_backend": "nccl" if device == "cuda" else "gloo", "examples_uri": examples_uri,
            "num_examples": num_examples, "pad_id": pad_id,
            "batch_size": h.batch_size, "micro_batch_size": h.micro_batch_size, "lr": h.lr,
            "warmup_steps": h.warmup_steps, "weight_decay": h.weight_decay, "total_steps": steps,
            "checkpoint_every": h.checkpoint_every, "gradient_checkpointing": h.gradient_checkpointing,
            "seed": h.seed}


def heal(config: SlmConfig, model_dir: Path | None = None, data: Path | None = None, ray_address: str | None = None,
         show_progress: bool = False) -> HealResult:
    """LoRA-heal ``model_dir`` (default: the run's pruned checkpoint) on ``data``; merge and save."""
    extras.require("heal", "slm-dist heal")
    started = time.perf_counter()
    h = config.heal
    model_dir = Path(model_dir or h.model or config.output_dir)
    data = data or h.data or config.calibration.source
    if data is None:
        raise HealError("no healing data: set heal.data (a .jsonl of instruction/output pairs or text, or .txt)")
    out_dir, work, storage = heal_dirs(config)
    index = open_index(model_dir, allow_pickle=False)
    check_output_dir(model_dir, out_dir)
    grad_accumulation_steps(h.batch_size, h.micro_batch_size, config.cluster.num_workers)

    tokenizer = context.load_tokenizer(model_dir)
    kind, examples = prepare_examples(Path(data), tokenizer, h.cutoff_len)
    steps = total_steps(len(examples), h.batch_size, h.epochs, h.max_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log.info("heal: %s (%d layers) on %d %s examples from %s: %d steps of %d, %d workers, ZeRO-%d",
             model_dir, index.num_layers, len(examples), kind, data, steps, h.batch_size,
             config.cluster.num_workers, h.zero_stage)
    work.mkdir(parents=True, exist_ok=True)
    examples_uri = f"{storage.rstrip('/')}/{EXAMPLES_NAME}"
    write_examples(examples_uri, examples)

    bar = progress.bar(show_progress, steps, "heal", "step")
    shown = [0]

    def on_report(metrics: dict) -> None:   # rank 0's per-step metrics, on the driver
        bar.update(metrics["step"] - shown[0])
        shown[0] = metrics["step"]
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    with train.train_cluster(ray_address or config.cluster.address,
                             num_cpus=math.ceil(config.cluster.num_workers * h.cpus_per_worker)) as gpus:
        device = resolve_device(config.cluster.device, gpus, config.cluster.num_workers)
        loop = build_loop(config, model_dir, examples_uri, len(examples), pad_id, device, steps)
        try:
            checkpoint = train.fit(train_worker, loop, config.cluster.num_workers, device, h.cpus_per_worker, storage,
                                   h.keep_checkpoints, max_failures=config.cluster.max_restarts, on_report=on_report)
        finally:
            bar.close()
        if checkpoint is None:
            raise HealError(f"Ray Train finished without a checkpoint under {storage}/train; see the worker logs")
        adapter_dir, state = keep_adapter(checkpoint, work)

    if state["step"] != steps:
        raise HealError(f"the last checkpoint is at step {state['step']}, this run needs {steps} steps: an earlier "
                        f"run with other settings left it; delete {storage}/train to start over")
    write_merged(model_dir, adapter_dir, out_dir, config.merge.max_shard_bytes,
                 provenance={"data": str(data), "kind": kind, "steps": steps, "lora": lora_settings(h)})
    problems = verify_model(out_dir)
    if problems:
        raise RuntimeError(f"the healed checkpoint {out_dir} failed verification: {problems}")
    result = HealResult(out_dir, adapter_dir, kind, len(examples), steps, state["history"], state["starts"],
                        round(time.perf_counter() - started, 3))
    write_json(work / SUMMARY_NAME, result.to_json())
    return result


def run_heal(config: SlmConfig, cache_dir: Path | None = None, ray_address: str | None = None,
             show_progress: bool = True) -> dict:
    """`slm-dist heal`: heal the run's pruned checkpoint, then held-out perplexity before and after.

    Returns the summary also written to ``<run.dir>/heal/heal.json``.
    """
    extras.require("heal", "slm-dist heal")  # before the demo assets are fetched
    ctx = context.resolve_inputs(config, cache_dir, show_progress)
    model_dir = Path(config.heal.model or config.output_dir)
    out_dir, work_dir, storage = heal_dirs(config)
    preflight.require(preflight.heal_problems(config, model_dir, config.heal.data or ctx.calibration_source, out_dir,
                                              work_dir, storage))
    result = heal(config, model_dir, config.heal.data or ctx.calibration_source, ray_address, show_progress)
    backend = context.make_backend(config)
    try:
        before = context.perplexity(ctx, model_dir, backend)
        after = context.perplexity(ctx, result.output_dir, backend)
    finally:
        backend.close()
    summary = {**result.to_json(), "model": str(model_dir), "perplexity_before_heal": before,
               "perplexity_healed": after, "perplexity_text": str(ctx.heldout_text) if ctx.heldout_text else None}
    write_json(heal_dirs(config)[1] / SUMMARY_NAME, summary)
    return summary


def heal_stage(ctx: context.RunContext, pruned_dir: Path, backend: Backend | None = None) -> dict:
    """`slm-dist run` with heal.enabled: heal the pruned checkpoint, then its held-out perplexity.

    ``backend`` is closed first: on Ray its stage actors hold the CPUs/GPUs the training workers
    need (it reconnects on its next use). Returns the fields the run adds to eval.json.
    """
    if backend is not None:
        backend.close()
    result = heal(ctx.config, model_dir=pruned_dir, data=ctx.config.heal.data or ctx.calibration_source,
                  show_progress=ctx.show_progress)
    backend = backend or context.make_backend(ctx.config)
    try:
        ppl = context.perplexity(ctx, result.output_dir, backend)
    finally:
        backend.close()
    return {"perplexity_healed": ppl, "healed_output": str(result.output_dir), "heal_adapter": str(result.adapter_dir),
            "heal_steps": result.total_steps, "heal_loss_first": result.history[0]["loss"] if result.history else None,
            "heal_loss_last": result.history[-1]["loss"] if result.history else None, "heal_starts": result.starts}
