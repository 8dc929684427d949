"""The export engine: plan every output shard from the plan and the source index, check it without
reading weights, then write the pruned checkpoint shard by shard, resumably. Config-free: the merge
stage (``slm_dist/merging.py``) calls it with the backend's shard runner.

Plan, validate, execute:
- `plan_export` reads only headers. It fixes every output shard up front (final name, the output
  keys it holds, and for each the source keys, files, byte offsets and merge rule) and fails on
  the first problem before a byte is written.
- `write_export` runs one job per output shard through a backend's `run_shard_jobs` (threads in
  this process, or Ray tasks), each within its share of the memory budget, and records every
  finished shard's hash (xxh3_128, taken as its bytes are written) in `manifest.json` as it lands. A rerun of the same plan skips shards
  whose manifest entry, size and hash match and redoes the rest; `.partial` files are never taken
  for finished ones. Side files, model card, `config.json` and the index go last, then the final
  manifest: a folder without index and config is visibly unfinished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from slm_dist.arch import ArchSpec, get_arch, prune_config
from slm_dist.checkpoint.corrections import checked_windows, kind_of, matrix_shapes
from slm_dist.checkpoint.folder import SIDE_FILES, side_file_bytes
from slm_dist.checkpoint.index import DTYPE_BYTES, CheckpointIndex, TensorInfo
from slm_dist.checkpoint.lock import FolderLock
from slm_dist.checkpoint.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    PAGE_BYTES,
    FileRecord,
    ShardWriter,
    TensorEntry,
    hash_file,
    partial_name,
    plan_shards,
    safetensors_header,
    shard_name,
    write_index,
    write_json,
    write_manifest,
)
from slm_dist.core.merge_jobs import MergeError, TensorJob, plan_tensor_jobs, pool_rows, refit_rows, single_source
from slm_dist.core.planner import MergePlan, plan_from_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OUTPUT_MARKER = ".slm-dist-output"
MODEL_CARD = "README.md"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "slm-dist-manifest/1"
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024**2
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class ExportError(ValueError):
    """The export cannot proceed; names the tensor, file or folder and the fix."""


@dataclass(frozen=True)
class ShardJob:
    """One output shard: its final name, the tensors it holds, and every source tensor it reads."""

    name: str
    tensors: tuple[TensorJob, ...]     # in file order
    sources: tuple[TensorInfo, ...]    # source tensors read (file, dtype, shape, byte offset)
    nbytes: int                        # tensor data bytes
    file_bytes: int                    # exact size of the finished file (header included)
    page_offset: int | None = None     # where in a page the data start (`copy_page_offset`)

    @property
    def source_files(self) -> tuple[str, ...]:
        return tuple(sorted({info.file for info in self.sources}))

    def to_json(self) -> dict:
        return {"name": self.name, "bytes": self.file_bytes, "source_files": list(self.source_files),
                "tensors": [{"key": t.out_key, "sources": list(t.source_keys), "rule": t.rule,
                             "window": list(t.window) if t.window else None,
                             **({"correction": t.correction} if t.correction else {})} for t in self.tensors]}


@dataclass(frozen=True)
class ExportPlan:
    source: Path
    out_dir: Path
    plan: MergePlan
    shards: tuple[ShardJob, ...]
    config: dict          # the rewritten config.json
    total_bytes: int      # tensor data bytes of the output
    fingerprint: str      # sha256 of the shard plan and the source files' sizes and mtimes

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.out_key: s.name for s in self.shards for t in s.tensors}


@dataclass(frozen=True)
class WorkerSettings:
    """What every shard job of one export shares (small and picklable: it travels to Ray tasks)."""

    source_dir: str
    out_dir: str
    allow_pickle: bool
    memory_bytes: int     # working memory of one job: the budget split over the parallel jobs
    corrections_file: str | None = None  # the plan's linear corrections, read by the jobs that apply one


@dataclass(frozen=True)
class ShardResult:
    """What one shard job did: the file it wrote and what that cost."""

    record: FileRecord
    bytes_read: int
    seconds: float
    peak_rss_bytes: int    # peak resident memory of the process that ran the job, so far
    pid: int


OnDone = Callable[[ShardJob, ShardResult], None]
# run_jobs(jobs, settings, max_parallel, on_done): run every job, call on_done in the caller's thread
# as each finishes, raise the first failure after the jobs already running have finished.
ShardRunner = Callable[[Sequence[ShardJob], WorkerSettings, int, OnDone], None]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    records: tuple[FileRecord, ...]
    shards_written: tuple[str, ...]
    shards_skipped: tuple[str, ...]      # finished by an earlier run, verified by hash
    bytes_read: int                      # source bytes read by the shard jobs of this run
    bytes_written: int                   # shard bytes written by this run
    peak_worker_rss_bytes: int           # highest peak RSS any process reported after a shard job

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "shards_written": list(self.shards_written),
                "shards_skipped": list(self.shards_skipped), "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "peak_worker_rss_bytes": self.peak_worker_rss_bytes}


# ------------------------------------------------------------------------------------ checks
def check_output_dir(source: Path, out_dir: Path) -> None:
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    if out == src or src in out.parents:
        raise ExportError(f"output folder {out_dir} is the model folder {source} or inside it; slm-dist never "
                          "writes into its input. Set merge.output_dir (or run.dir) elsewhere.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output folder {out_dir} exists and is not a folder; choose another merge.output_dir")
    if out.exists() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
        raise ExportError(f"output folder {out_dir} exists, is not empty and was not written by slm-dist; "
                          "choose an empty or new folder")


def check_disk_space(export: ExportPlan) -> None:
    """Fail before writing when the shards still to write (plus 64 MiB for the rest) do not fit."""
    probe = export.out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = 64 * 1024**2
    for shard in export.shards:
        path = export.out_dir / shard.name
        present = path.stat().st_size if path.is_file() else 0
        needed += shard.file_bytes if present != shard.file_bytes else 0
    if free < needed:
        raise ExportError(f"not enough disk space for {export.out_dir}: need {needed / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free. Free space or choose another merge.output_dir.")


# -------------------------------------------------------------------------------------- plan
def plan_export(index: CheckpointIndex, plan: MergePlan, out_dir: Path, max_shard_bytes: int) -> ExportPlan:
    """Every output shard and tensor, validated from headers alone (no weights are read)."""
    arch: ArchSpec = get_arch(index.model_type)
    if plan.num_layers_before != index.num_layers:
        raise ExportError(f"plan is for {plan.num_layers_before} layers but {index.root} has {index.num_layers}; "
                          "the plan belongs to another model: re-run the plan stage")
    check_output_dir(index.root, out_dir)
    corrections = checked_windows(plan, int(index.config["hidden_size"]))  # merge.correction=linear|refit|pool
    kind = kind_of(plan.corrections) if corrections else "linear"
    jobs = plan_tensor_jobs(index.tensors.keys(), plan.windows, index.num_layers, arch, plan.rule,
                            plan.alpha_map, corrections, kind)  # rule "scaled": per-window alphas
    replaced = matrix_shapes(plan.corrections) if corrections and kind in ("refit", "pool") else {}
    for job in jobs:
        _check_job(job, [index.tensors[k] for k in job.source_keys])
        if job.correction in replaced:
            shape = index.tensors[job.source_keys[0]].shape
            try:
                if kind == "pool":
                    pool_rows(job.correction_part, shape, replaced[job.correction])
                else:
                    refit_rows(shape, replaced[job.correction])
            except MergeError as err:
                raise ExportError(f"{plan.corrections}: {job.correction} cannot replace {job.out_key}: {err}; the "
                                  "corrections belong to another model: re-run the plan stage") from None
    config = prune_config(index.config, plan.new_to_old, arch)
    _check_coverage(jobs, index, config, arch)

    size_of = {job.out_key: index.tensors[job.source_keys[0]].nbytes for job in jobs}
    groups = plan_shards(list(size_of.items()), max_shard_bytes)
    by_key = {job.out_key: job for job in jobs}
    shards = []
    for k, group in enumerate(groups):
        tensors = tuple(by_key[key] for key in group)
        sources = tuple(index.tensors[s] for t in tensors for s in t.source_keys)
        entries = [_entry(t, index) for t in tensors]
        nbytes = sum(size_of[key] for key in group)
        page_offset = copy_page_offset(tensors, entries, index)
        header = safetensors_header(entries, {"format": "pt"}, page_offset)
        shards.append(ShardJob(shard_name(k + 1, len(groups)), tensors, sources, nbytes, len(header) + nbytes,
                               page_offset))
    shards_t = tuple(shards)
    return ExportPlan(Path(index.root), Path(out_dir), plan, shards_t, config, sum(size_of.values()),
                      _fingerprint(index, plan, shards_t, config))


def copy_page_offset(tensors: Sequence[TensorJob], entries: Sequence[TensorEntry], index: CheckpointIndex
                     ) -> int | None:
    """Where within a page a shard's data should start so that most of the bytes it copies sit at the
    same offset within a page as in their source files (None: it copies nothing).

    The kernel then copies them page to page: `copy_file_range` ran ~1.4x faster on the test machine
    than between offsets that differ within a page. The tensors of a source shard sit back to back,
    and most tensor sizes are multiples of a page, so one header padding aligns most copies at once.
    """
    bytes_at: dict[int, int] = {}
    start = 0  # the tensor's offset in the shard's data
    for t, entry in zip(tensors, entries):
        source = copied_source(t, index.tensors)
        if source is not None and (source.offset - start) % 8 == 0:
            residue = (source.offset - start) % PAGE_BYTES
            bytes_at[residue] = bytes_at.get(residue, 0) + entry.nbytes
        start += entry.nbytes
    return max(bytes_at, key=lambda r: (bytes_at[r], -r)) if bytes_at else None


def copied_source(t: TensorJob, infos: Mapping[str, TensorInfo]) -> TensorInfo | None:
    """The source tensor whose bytes ``t`` copies unchanged, file to file; None when ``t`` computes (a
    rule mixes window members, or a correction applies) or its source is a pickle (torch loads it)."""
    chosen = single_source(t)
    if chosen is None or t.correction is not None:
        return None
    info = infos[t.source_keys[chosen]]
    return info if info.offset >= 0 else None


def _entry(t: TensorJob, index: CheckpointIndex) -> TensorEntry:
    info = index.tensors[t.source_keys[0]]
    return TensorEntry(t.out_key, info.dtype, info.shape)


def _check_job(job: TensorJob, infos: list[TensorInfo]) -> None:
    first = infos[0]
    if first.dtype not in DTYPE_BYTES:
        raise ExportError(f"{first.key} has dtype {first.dtype!r}, which slm-dist cannot copy; "
                          f"supported: {sorted(DTYPE_BYTES)}")
    for other in infos[1:]:
        if (other.dtype, other.shape) != (first.dtype, first.shape):
            raise ExportError(f"cannot merge {other.key} ({other.dtype}{list(other.shape)}) with {first.key} "
                              f"({first.dtype}{list(first.shape)}) in window {job.window}: shapes and dtypes "
                              "must agree inside a window. Convert the checkpoint to one dtype.")
    arithmetic = job.rule in ("sum", "mean", "scaled") and job.role == "projection"
    if arithmetic and first.dtype not in FLOAT_DTYPES:
        raise ExportError(f"rule {job.rule!r} adds weights, but {first.key} is {first.dtype}; only "
                          f"{list(FLOAT_DTYPES)} can be merged arithmetically (dequantize first or use rule drop)")


def _check_coverage(jobs: Sequence[TensorJob], index: CheckpointIndex, config: dict, arch: ArchSpec) -> None:
    """The output holds every tensor the new config needs, exactly once, and reads every source key once."""
    out_keys = [j.out_key for j in jobs]
    dup = sorted({k for k in out_keys if out_keys.count(k) > 1}) if len(set(out_keys)) != len(out_keys) else []
    if dup:
        raise ExportError(f"output tensor {dup[0]!r} would be written twice; this is a bug in the key plan")
    read = [k for j in jobs for k in j.source_keys]
    unread = sorted(set(index.tensors) - set(read))
    if unread or len(read) != len(set(read)):
        raise ExportError(f"the key plan must read every source tensor exactly once; unread: {unread[:3]}")
    n = int(config["num_hidden_layers"])
    suffixes: dict[int, set[str]] = {}
    for key in out_keys:
        split = arch.split_key(key)
        if split is not None:
            suffixes.setdefault(split[0], set()).add(split[1])
    if sorted(suffixes) != list(range(n)):
        raise ExportError(f"the new config has num_hidden_layers={n} but the output would hold layers "
                          f"{sorted(suffixes)}; the plan and config disagree")
    for layer in range(n):
        missing = [s for s in arch.required_suffixes if s not in suffixes[layer]]
        if missing:
            raise ExportError(f"output layer {layer} would lack {arch.layer_key(layer, missing[0])}; "
                              "the source checkpoint is incomplete")
    needed = [arch.embed_module + ".weight", arch.final_norm_module + ".weight"]
    if not config.get("tie_word_embeddings", False):
        needed.append(arch.lm_head_module + ".weight")
    for key in needed:
        if key not in out_keys:
            raise ExportError(f"the output would lack {key!r}, which a {arch.model_type} model with "
                              f"tie_word_embeddings={config.get('tie_word_embeddings', False)} needs; "
                              f"the source checkpoint {index.root} does not hold it")


def _fingerprint(index: CheckpointIndex, plan: MergePlan, shards: Sequence[ShardJob], config: dict) -> str:
    """Identifies what a shard's bytes depend on, so a rerun trusts only shards written for the same thing.

    Source files enter by size and mtime (re-hashing a 140 GB source on every resume would cost
    more than the merge); a source rewritten in place gets a new mtime and so a fresh output.
    """
    files = {}
    for name in index.files:
        st = (Path(index.root) / name).stat()
        files[name] = [st.st_size, st.st_mtime_ns]
    desc = {"source": str(Path(index.root).resolve()), "source_files": files, "plan": plan.to_json(),
            "config": config, "shards": [s.to_json() for s in shards],
            "sources": [[i.key, i.file, i.dtype, list(i.shape), i.offset] for s in shards for i in s.sources]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


CARD_TAGS = ("pruned", "depth-pruning", "sliding-layer-merging", "slm-dist")
# Licence and use-policy files travel with the weights (Llama's licence requires them on redistribution).
_LICENCE_FILE = re.compile(r"^(licen[cs]e|copying|notice|use_policy)([._-][\w.-]*)?$", re.IGNORECASE)


def licence_files(folder: Path) -> list[str]:
    """Names of the licence, notice and use-policy files at the top of ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and _LICENCE_FILE.match(p.name))


def base_model_name(source: Path, config: Mapping | None = None) -> str:
    """The source as the Hub knows it: its repo id when it is a Hub-cache snapshot (or its config names
    one), else its folder name; never a local path."""
    from slm_dist.checkpoint.hub import looks_like_repo_id, repo_id_of

    repo = repo_id_of(source)
    if repo:
        return repo
    named = str((config or {}).get("_name_or_path") or "")
    if named and not Path(named).is_absolute() and looks_like_repo_id(named):
        return named
    return Path(source).resolve().name


def source_licence(source: Path) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link``) of the source's model card front matter or
    config.json; empty when it states none."""
    from huggingface_hub import ModelCard

    found: dict[str, str] = {}
    readme = Path(source) / MODEL_CARD
    if readme.is_file():
        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
        except (ValueError, OSError) as e:  # a README without valid front matter states no licence
            log.warning("%s: front matter unreadable (%s); no licence carried over from it", readme, e)
            data = {}
        found = {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}
    config_path = Path(source) / CONFIG_NAME
    if "license" not in found and config_path.is_file():
        license_ = json.loads(config_path.read_text()).get("license")
        if isinstance(license_, str) and license_:
            found["license"] = license_
    return found


def card_data(source: Path, config: Mapping | None = None):
    """The Hub metadata of a pruned model of ``source`` (a ``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    return ModelCardData(base_model=base_model_name(source, config), library_name="transformers",
                         pipeline_tag="text-generation", tags=list(CARD_TAGS), **source_licence(source))


def model_card(export: ExportPlan, threshold: float | None, perplexity: Mapping[str, Any] | None = None) -> str:
    """The output's README.md: Hub front matter (``card_data``) and what was done to the source."""
    return card_text(card_data(export.source, export.config), export.plan, threshold, perplexity)


def card_text(data, plan: MergePlan, threshold: float | None, perplexity: Mapping[str, Any] | None = None) -> str:
    """A model card from its metadata and the plan; ``perplexity`` ({before, after, text}, when measured)
    adds the evaluation section."""
    from huggingface_hub import ModelCard

    windows = ", ".join(f"[{lo}..{hi}]" for lo, hi in plan.windows) or "none"
    kind = kind_of(plan.corrections) if plan.corrections else None
    base = data.base_model
    lines = [
        f"# {base} depth-pruned with slm-dist", "",
        f"`{base}` with {plan.num_layers_before - plan.num_layers_after} of its {plan.num_layers_before} decoder "
        f"layers merged away by Sliding Layer Merging (arXiv 2502.19159): each window of consecutive layers is "
        "folded into one layer at the window's bottom position. It loads with "
        "`transformers.AutoModelForCausalLM.from_pretrained` like the base model; no custom code.", "",
        "## Pruning plan", "",
        f"- layers: {plan.num_layers_before} -> {plan.num_layers_after}",
        f"- merged windows (inclusive, original indices): {windows}",
        f"- new layer -> original layer: {plan.new_to_old}",
        f"- merge rule: `{plan.rule}`" + (f" (alpha per window: {list(plan.alphas)})" if plan.alphas else ""),
        f"- correction: `{kind}` (fitted on calibration data, folded into each merged window's MLP output "
        "projection)" if kind else "- correction: none",
        # A `compare` method's plan (planner.LayerPlan) names the method that chose its layers.
        f"- layers chosen by: `{plan.method}` (a `slm-dist compare` method)" if getattr(plan, "method", None)
        else f"- similarity criterion: `{plan.criterion}`",
        f"- threshold: {threshold}", "",
        "The full plan and every file's sha256 are in `manifest.json` (`slm-dist verify` checks them).",
    ]
    if perplexity and (perplexity.get("before") is not None or perplexity.get("after") is not None):
        def fmt(x):
            return "n/a" if x is None else f"{x:.3f}"

        text = perplexity.get("text")
        lines += ["", "## Evaluation", "",
                  "Perplexity on held-out text" + (f" (`{Path(str(text)).name}`)" if text else "") +
                  ", measured by slm-dist:", "",
                  "| model | perplexity |", "|---|---|",
                  f"| {base} ({plan.num_layers_before} layers) | {fmt(perplexity.get('before'))} |",
                  f"| this model ({plan.num_layers_after} layers) | {fmt(perplexity.get('after'))} |"]
    template = "---\n{{ card_data }}\n---\n\n{{ body }}\n"
    return str(ModelCard.from_template(data, template_str=template, body="\n".join(lines)))


def add_evaluation_to_card(out_dir: Path, perplexity: Mapping[str, Any]) -> FileRecord:
    """Rewrite a finished output's README.md with measured perplexity, keeping its metadata, and
    re-record its hash in manifest.json (so `slm-dist verify` still passes)."""
    from huggingface_hub import ModelCard

    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None or "plan" not in manifest:
        raise ExportError(f"{out_dir} has no slm-dist manifest with a plan; it was not written by `slm-dist merge`")
    plan = plan_from_json(manifest["plan"])
    data = ModelCard.load(out_dir / MODEL_CARD, ignore_metadata_errors=True).data
    record = _write_text(out_dir / MODEL_CARD, card_text(data, plan, plan.threshold, perplexity))
    manifest["files"][MODEL_CARD] = record.to_json()
    write_json(out_dir / MANIFEST_NAME, manifest)
    return record


# ------------------------------------------------------------------------------------- write
def write_export(export: ExportPlan, run_jobs: ShardRunner, *, max_parallel: int = 1,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, allow_pickle: bool = False,
                 on_shard: OnDone | None = None) -> ExportResult:
    """Write (or finish) the checkpoint: shards not yet verified, then side files, card, config, index, manifest.

    ``run_jobs`` runs the shard jobs (a backend's ``run_shard_jobs``: threads here, or Ray tasks).

    ``memory_budget_bytes`` is what all parallel jobs together may hold; each gets an equal share.
    """
    if max_parallel < 1:
        raise ExportError(f"merge.max_parallel must be >= 1, got {max_parallel}")
    memory_each = memory_budget_bytes // max_parallel
    if memory_each < 1:
        raise ExportError(f"merge.memory_budget_bytes={memory_budget_bytes} leaves nothing to each of "
                          f"merge.max_parallel={max_parallel} jobs; raise the budget")
    check_output_dir(export.source, export.out_dir)
    export.out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(export.out_dir):
        return _write_export(export, run_jobs, max_parallel, memory_each, allow_pickle, on_shard)


def output_lock(out: Path) -> FolderLock:
    """Held while one merge writes ``out``: two merges into one folder would delete each other's shards."""
    return FolderLock(out, lambda path, pid: ExportError(
        f"another merge is writing {out} (it holds {path}, pid {pid}); wait for it to finish, or give this one "
        "another merge.output_dir"))


def _write_export(export: ExportPlan, run_jobs: ShardRunner, max_parallel: int, memory_each: int,
                  allow_pickle: bool, on_shard: OnDone | None) -> ExportResult:
    out = export.out_dir
    (out / OUTPUT_MARKER).write_text(json.dumps({"source": str(export.source)}) + "\n")

    done = _finished_shards(export)
    _clear_unfinished(export, keep=set(done))
    records = dict(done)
    _write_manifest(export, records.values(), complete=False)
    todo = [s for s in export.shards if s.name not in done]
    if done:
        log.info("resuming %s: %d of %d shards already written and verified", out, len(done), len(export.shards))

    results: list[ShardResult] = []

    def finished(job: ShardJob, result: ShardResult) -> None:
        if (result.record.name, result.record.bytes) != (job.name, job.file_bytes):
            raise ExportError(f"shard job {job.name} reported {result.record.name} with {result.record.bytes} bytes, "
                              f"planned {job.file_bytes}; this is a bug in the shard writer")
        records[job.name] = result.record
        results.append(result)
        _write_manifest(export, records.values(), complete=False)
        if on_shard is not None:
            on_shard(job, result)

    settings = WorkerSettings(str(export.source), str(out), allow_pickle, memory_each, export.plan.corrections)
    # The card's text needs huggingface_hub's card module (half a second of imports): made beside the
    # shard jobs, which wait on the disk, instead of after them.
    with ThreadPoolExecutor(1, thread_name_prefix="model-card") as pool:
        card = pool.submit(model_card, export, export.plan.threshold)
        run_jobs(todo, settings, max_parallel, finished)
        card_md = card.result()

    final = [records[s.name] for s in export.shards]
    final += _copy_side_files(export.source, out)
    final.append(_write_text(out / MODEL_CARD, card_md))
    final.append(write_json(out / CONFIG_NAME, export.config))
    final.append(write_index(out, export.weight_map, export.total_bytes))
    _write_manifest(export, final, complete=True)
    return ExportResult(out, tuple(final), tuple(r.record.name for r in results), tuple(sorted(done)),
                        sum(r.bytes_read for r in results), sum(r.record.bytes for r in results),
                        max((r.peak_rss_bytes for r in results), default=0))


def write_rewritten(index: CheckpointIndex, out_dir: Path, max_shard_bytes: int,
                    rewrite: Callable[[str, "torch.Tensor"], "torch.Tensor"], card: str,
                    manifest_extra: Mapping[str, object]) -> list[FileRecord]:
    """A checkpoint with the same tensors as ``index``, each passed through ``rewrite(key, tensor)``
    (same names, dtypes, shapes and order; one tensor in memory at a time), e.g. healing's merged LoRA.

    Shards follow `plan_shards`; then the side files, the model card, config.json, the index and the
    manifest (in that order, so a folder without an index is visibly unfinished).
    """
    from slm_dist.checkpoint.reader import LazyReader

    check_output_dir(index.root, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OUTPUT_MARKER).write_text(json.dumps({"source": str(index.root), **manifest_extra}) + "\n")
    for stale in out_dir.glob("model-*.safetensors"):
        stale.unlink()   # an earlier write may have had another shard count
    keys = list(index.tensors)
    groups = plan_shards([(k, index.tensors[k].nbytes) for k in keys], max_shard_bytes)
    reader = LazyReader(index)
    records, weight_map = [], {}
    try:
        for n, group in enumerate(groups, start=1):
            name = shard_name(n, len(groups))
            entries = [TensorEntry(k, index.tensors[k].dtype, index.tensors[k].shape) for k in group]
            with ShardWriter(out_dir / name, entries) as writer:
                for key in group:
                    writer.write(key, rewrite(key, reader.get(key)))
                records.append(writer.finish())
            weight_map.update({k: name for k in group})
    finally:
        reader.close()
    records += _copy_side_files(index.root, out_dir)
    records.append(_write_text(out_dir / MODEL_CARD, card))
    records.append(write_json(out_dir / CONFIG_NAME, index.config))
    records.append(write_index(out_dir, weight_map, index.total_bytes))
    write_manifest(out_dir, records, extra={"complete": True, "source": str(index.root), **manifest_extra})
    return records


# ------------------------------------------------------------------------------------ resume
def _read_manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _finished_shards(export: ExportPlan) -> dict[str, FileRecord]:
    """Shards an earlier run of this same export finished: manifest entry, size and hash (the one the entry names) all match."""
    manifest = _read_manifest(export.out_dir)
    if manifest is None or manifest.get("fingerprint") != export.fingerprint:
        return {}
    done = {}
    for shard in export.shards:
        record = FileRecord.from_json(shard.name, manifest["files"].get(shard.name))
        path = export.out_dir / shard.name
        if record is None or not path.is_file():
            continue
        if record.bytes == shard.file_bytes and record.matches(path):  # by the hash the entry names
            done[shard.name] = record
        else:
            log.warning("%s does not match its manifest entry (truncated or changed): writing it again", path)
    return done


def _clear_unfinished(export: ExportPlan, keep: set[str]) -> None:
    """Make the folder visibly unfinished and drop everything that is not a verified shard of this plan.

    Index and config go first (their absence marks the folder unfinished), then temporary files
    and shard files that are stale, unverified or from another plan.
    """
    out = export.out_dir
    for name in (INDEX_NAME, CONFIG_NAME):
        (out / name).unlink(missing_ok=True)
    for path in out.iterdir():
        stale_shard = _SHARD_FILE.match(path.name) and path.name not in keep
        if path.is_file() and (stale_shard or (path.name.startswith(".") and path.name.endswith(".partial"))):
            path.unlink()


def _write_manifest(export: ExportPlan, records, complete: bool) -> FileRecord:
    return write_manifest(export.out_dir, list(records),
                          extra={"format": MANIFEST_FORMAT, "complete": complete, "source": str(export.source),
                                 "fingerprint": export.fingerprint, "plan": export.plan.to_json(),
                                 "shards": [{"name": s.name, "keys": [t.out_key for t in s.tensors]}
                                            for s in export.shards]})


# ---------------------------------------------------------------------------------- side files
def _record(path: Path) -> FileRecord:
    return FileRecord(path.name, hash_file(path), path.stat().st_size)


def _copy_side_files(source: Path, out: Path) -> list[FileRecord]:
    """The tokenizer, generation and licence files, each confined to the source folder (folder.side_file)
    and without auto_map; written to a temporary name, fsynced, renamed."""
    records = []
    for name in (*SIDE_FILES, *licence_files(source)):
        data = side_file_bytes(source, name)
        if data is None:
            continue
        tmp = partial_name(out / name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
        records.append(_record(out / name))
    return records


def _write_text(path: Path, text: str) -> FileRecord:
    tmp = partial_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _record(path)
