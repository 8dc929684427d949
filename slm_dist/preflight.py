"""Every check that can fail a command, run before its first forward pass or write.

A 70B run that fails on a missing held-out file after calibration, planning and the merge loses
hours; so every command asks this module first, and gets every problem at once (``plan --dry-run``
prints them all): the model folder (headers, paths confined, every tensor's shape against the config
and the architecture table), the input files (readable, decodable), the output folders (outside the
source model, distinct, writable, with disk space) and the cluster (reachable within seconds).

Each ``*_problems`` function returns messages (empty: all good); `require` raises them as one
`PreflightError` (exit 2 at the CLI).
"""

from __future__ import annotations

import codecs
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from slm_dist.arch import ArchSpec, UnsupportedArchitectureError, get_arch
from slm_dist.checkpoint.folder import load_tokenizer, read_config
from slm_dist.checkpoint.index import CheckpointError, CheckpointIndex, layers_for_ratio, open_index
from slm_dist.checkpoint.verify import verify_model
from slm_dist.config import ClusterSection, ConfigError, SlmConfig
from slm_dist.core.planner import PlanError

if TYPE_CHECKING:  # the data readers import torch: only the checks that read data load them
    from slm_dist.evaluation import EvalSpec

log = logging.getLogger(__name__)

CLUSTER_TIMEOUT_S = 5.0    # a Ray head that does not answer in this time is reported
NUL = bytes(1)
MAX_LISTED = 8             # problems of one kind listed before "... and N more"
DISK_MARGIN_BYTES = 64 * 1024**2
# ValueError covers the data readers' and the export's own errors (CalibrationDataError, EvalDataError,
# ExportError), whose modules import torch: they are imported only by the checks that need them.
_BAD_INPUT = (CheckpointError, UnsupportedArchitectureError, ConfigError, PlanError, FileNotFoundError,
              ValueError)


class PreflightError(ValueError):
    """One or more problems found before any work; one line each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems found before any work:\n  " + "\n  ".join(self.problems))


def require(problems: Iterable[str]) -> None:
    problems = list(problems)
    if problems:
        raise PreflightError(problems)


def _collect(check: Callable[[], object], problems: list[str]):
    try:
        return check()
    except _BAD_INPUT as e:
        problems.append(str(e))
        return None


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more of the same kind"]


# ---------------------------------------------------------------------------------- the model
def model_problems(model_dir: Path, allow_pickle: bool = False) -> tuple[CheckpointIndex | None, list[str]]:
    """(the index, or None when it cannot be read; every problem of the folder)."""
    problems: list[str] = []
    index = _collect(lambda: open_index(Path(model_dir), allow_pickle=allow_pickle), problems)
    if index is None:
        return None, problems
    arch = _collect(lambda: get_arch(index.model_type), problems)
    if arch is None:
        return None, problems
    if index.format == "safetensors":
        problems += [f"{model_dir}: {p}" for p in verify_model(Path(model_dir), check_hashes=False)]
    problems += _capped(shape_problems(index, arch))
    return (index if not problems else None), problems


def tokenizer_problems(model_dir: Path) -> list[str]:
    """The tokenizer loads with transformers' built-in classes (no code from the folder)."""
    problems: list[str] = []
    _collect(lambda: load_tokenizer(Path(model_dir)), problems)
    return problems


def _dims(config: dict) -> dict[str, int | None]:
    def get(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
    kv_heads = get("num_key_value_heads") or heads
    return {"H": hidden, "I": get("intermediate_size"), "V": get("vocab_size"), "D": head_dim,
            "Q": heads * head_dim if heads and head_dim else None,
            "KV": kv_heads * head_dim if kv_heads and head_dim else None}


_DIM_NAMES = {"H": "hidden_size", "I": "intermediate_size", "V": "vocab_size", "D": "head_dim",
              "Q": "num_attention_heads x head_dim", "KV": "num_key_value_heads x head_dim"}
# Shape of each per-layer tensor of a Llama-like layer, in the symbols of `_dims`.
_LAYER_SHAPES = {
    "self_attn.q_proj.weight": ("Q", "H"), "self_attn.q_proj.bias": ("Q",),
    "self_attn.k_proj.weight": ("KV", "H"), "self_attn.k_proj.bias": ("KV",),
    "self_attn.v_proj.weight": ("KV", "H"), "self_attn.v_proj.bias": ("KV",),
    "self_attn.o_proj.weight": ("H", "Q"), "self_attn.o_proj.bias": ("H",),
    "mlp.gate_proj.weight": ("I", "H"), "mlp.gate_proj.bias": ("I",),
    "mlp.up_proj.weight": ("I", "H"), "mlp.up_proj.bias": ("I",),
    "mlp.down_proj.weight": ("H", "I"), "mlp.down_proj.bias": ("H",),
    "input_layernorm.weight": ("H",), "post_attention_layernorm.weight": ("H",),
    "self_attn.q_norm.weight": ("D",), "self_attn.k_norm.weight": ("D",),
}


def shape_problems(index: CheckpointIndex, arch: ArchSpec) -> list[str]:
    """Every tensor whose shape disagrees with config.json, every per-layer tensor the architecture
    table does not know, and every tensor of a dtype the merge cannot compute in."""
    dims = _dims(index.config)
    config_path = index.root / "config.json"
    expected: dict[str, tuple[str, ...]] = {f"{arch.embed_module}.weight": ("V", "H"),
                                            f"{arch.lm_head_module}.weight": ("V", "H"),
                                            f"{arch.final_norm_module}.weight": ("H",)}
    problems = []
    for key, info in index.tensors.items():
        split = arch.split_key(key)
        if split is not None:
            if not 0 <= split[0] < index.num_layers:
                problems.append(f"{index.root / info.file}: {key} is layer {split[0]}, but config.json says "
                                f"num_hidden_layers={index.num_layers}")
                continue
            try:
                arch.role(split[1])
            except UnsupportedArchitectureError as e:
                problems.append(f"{index.root / info.file}: {key}: {e}")
                continue
        symbols = _LAYER_SHAPES.get(split[1]) if split is not None else expected.get(key)
        if info.dtype not in ("F64", "F32", "F16", "BF16"):
            problems.append(f"{index.root / info.file}: {key} has dtype {info.dtype}; slm-dist merges float "
                            "checkpoints only (F32, F16, BF16, F64)")
        if symbols is None or any(dims[s] is None for s in symbols):
            continue
        want = tuple(dims[s] for s in symbols)
        if tuple(info.shape) != want:
            names = ", ".join(f"{_DIM_NAMES[s]}={dims[s]}" for s in dict.fromkeys(symbols))
            problems.append(f"{index.root / info.file}: {key} has shape {list(info.shape)}, but {config_path} gives "
                            f"{list(want)} ({names}); the config and the weights belong to different models")
    return problems


# --------------------------------------------------------------------------------- the inputs
def text_file_problems(path: Path, what: str) -> list[str]:
    """A text input (.txt, .jsonl, anything read as text) exists, is a file and is UTF-8 throughout."""
    path = Path(path)
    if not path.exists():
        return [f"{what}: {path} does not exist"]
    if path.is_dir():
        return []  # a dataset folder (calibration): its reader checks it
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                nul = chunk.find(NUL)
                if nul >= 0:
                    return [f"{what}: {path} is binary (a NUL byte at {done + nul}), not text; give a UTF-8 text file"]
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return [f"{what}: {path} is not UTF-8 text (byte {done + e.start}: {e.reason}); give a UTF-8 "
                            "text file"]
                done += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return [f"{what}: {path} is not UTF-8 text (it ends inside a character: {e.reason})"]
    except OSError as e:
        return [f"{what}: {path} cannot be read ({e.strerror})"]
    return []


def calibration_problems(source: Path, parse: bool = True) -> list[str]:
    """The calibration source decodes (text) and, with ``parse``, reads as records (the dry run skips
    that: the readers import torch)."""
    source = Path(source)
    if source.suffix in (".txt", ".jsonl"):
        problems = text_file_problems(source, "calibration.source")
        if problems or not parse:
            return problems
    problems: list[str] = []
    if parse:
        from slm_dist import calibration

        _collect(lambda: calibration.read_records(source), problems)
    return problems


def eval_input_problems(ppl_files: Sequence[Path], tasks: Sequence[tuple[str, Path]], ppl_join: str = "auto",
                        limit: int | None = None) -> list[str]:
    from slm_dist import evaluation

    problems: list[str] = []
    for path in ppl_files:
        found = text_file_problems(Path(path), "perplexity text")
        problems += found or []
        if not found:
            _collect(lambda p=path: evaluation.read_ppl_text(Path(p), ppl_join), problems)
    for name, path in tasks:
        found = text_file_problems(Path(path), f"task {name}") if Path(path).suffix != ".parquet" else []
        problems += found
        if not found:
            _collect(lambda n=name, p=path: evaluation.read_task(n, Path(p), limit), problems)
    return problems


# -------------------------------------------------------------------------------- the outputs
def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def output_problems(sources: Mapping[str, Path], outputs: Mapping[str, Path]) -> list[str]:
    """Every output folder (setting -> path) outside every source folder, distinct from the others
    (neither equal nor one inside another, but for the listed nestings), and writable."""
    problems = []
    for what, out in outputs.items():
        for src_what, src in sources.items():
            if src is not None and _inside(Path(out), Path(src)):
                problems.append(f"{what}={out} is {'the' if Path(out).resolve() == Path(src).resolve() else 'inside the'}"
                                f" {src_what} {src}; slm-dist never writes into its input. Set {what} to a folder "
                                "outside it.")
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = Path(outputs[a]).resolve(), Path(outputs[b]).resolve()
            if pa == pb:
                problems.append(f"{a} and {b} are the same folder {outputs[a]}; give each its own folder")
            elif pb in pa.parents and b != "run.dir":
                problems.append(f"{a}={outputs[a]} is inside {b}={outputs[b]}; give each its own folder")
            elif pa in pb.parents and a != "run.dir":
                problems.append(f"{b}={outputs[b]} is inside {a}={outputs[a]}; give each its own folder")
    for what, out in outputs.items():
        problems += writable_problems(Path(out), what)
    return problems


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problems(path: Path, what: str) -> list[str]:
    if path.exists() and not path.is_dir():
        return [f"{what}={path} exists and is not a folder; choose another"]
    anchor = nearest_existing(path)
    if not anchor.is_dir():
        return [f"{what}={path} cannot be created: {anchor} is a file, not a folder"]
    if not os.access(anchor, os.W_OK | os.X_OK):
        return [f"{what}={path} is not writable ({anchor} is read-only for this user); choose a writable folder"]
    return []


def disk_problems(out_dir: Path, needed_bytes: int, what: str) -> list[str]:
    """Free space for ``needed_bytes`` more (what the folder already holds counts as written)."""
    present = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors")) if Path(out_dir).is_dir() else 0
    needed = max(0, needed_bytes - present) + DISK_MARGIN_BYTES
    anchor = nearest_existing(out_dir)
    if not anchor.is_dir():
        return []  # writable_problems reports it
    free = shutil.disk_usage(anchor).free
    if free < needed:
        return [f"{what}={out_dir}: not enough disk space: the output needs up to {needed / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free on {anchor}. Free space or choose another {what}."]
    return []


def output_bytes(index: CheckpointIndex, layers_removed: int) -> int:
    """Bytes of the pruned checkpoint with ``layers_removed`` fewer layers (layers are alike in size)."""
    arch = get_arch(index.model_type)
    layer_bytes = sum(t.nbytes for k, t in index.tensors.items() if arch.split_key(k) is not None)
    per_layer = layer_bytes / max(index.num_layers, 1)
    return int(index.total_bytes - per_layer * max(0, layers_removed))


# -------------------------------------------------------------------------------- the cluster
def cluster_problems(cluster: ClusterSection, timeout_s: float = CLUSTER_TIMEOUT_S) -> list[str]:
    """A given Ray address must be a Ray head that answers within ``timeout_s`` (Ray itself retries for
    minutes with only its own log lines; a port that only accepts TCP, like the dashboard's, is not one)."""
    address = cluster.address
    if cluster.backend != "ray" or address in (None, "", "auto", "local"):
        return []
    scheme, _, hostport = address.rpartition("://")
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not sep or not port.isdigit() or not host:
        return [f"cluster.address={address!r} is not HOST:PORT or ray://HOST:PORT (e.g. 10.0.0.1:6379 or "
                "ray://10.0.0.1:10001)"]
    from slm_dist.backends.ray_probe import probe  # grpc and Ray's stubs: only when an address is given

    why = probe(host.strip("[]"), int(port), client=scheme == "ray", timeout_s=timeout_s)
    if why is None:
        return []
    return [f"cluster.address={address!r}: {why}. Check the address (`ray status` on the head node), or unset "
            "it to start a private local Ray."]


# ------------------------------------------------------------------------------- per command
def weights_present(model_dir: Path) -> bool:
    """Whether the folder holds weights (a dry run also works from config.json alone)."""
    root = Path(model_dir)
    if (root / "model.safetensors").exists() or list(root.glob("*.bin")):
        return True
    index = root / "model.safetensors.index.json"
    return index.is_file() and any(root.glob("*.safetensors"))


def config_only_problems(model_dir: Path) -> list[str]:
    problems: list[str] = []
    config = _collect(lambda: read_config(Path(model_dir)), problems)
    if config is not None:
        _collect(lambda: get_arch(config.get("model_type")), problems)
    return problems


def plan_problems(config: SlmConfig) -> list[str]:
    """Plan settings that `run` and `plan` would silently not use. `compare` plans every method its own
    way and reads plan.rerank for its sleb_refit and sleb_pool whatever plan.search says."""
    p, kind = config.plan, config.merge.correction
    if p.rerank > 1 and (p.search != "sleb" or kind == "none"):
        fix = "set plan.search=sleb" if p.search != "sleb" else "set merge.correction (refit or pool)"
        return [f"plan.rerank={p.rerank} ranks SLEB's last-step finalists by their corrected held-out loss, but "
                f"plan.search={p.search} with merge.correction={kind} has none to rank: {fix}, or plan.rerank=1"]
    return []


def run_problems(config: SlmConfig, model_dir: Path, calibration_source: Path | None, heldout: Path | None,
                 stop_after: str | None = None,
                 layers_removed: Callable[[CheckpointIndex], int] | None = None, dry_run: bool = False,
                 compare: bool = False) -> list[str]:
    """`run` / `plan` / `plan --dry-run` / `compare`: all of the above for this config. Inputs given as
    None (the demo's, fetched at run time) are not checked. ``dry_run``: a folder with config.json but
    no weights yet (downloaded first to size a cluster) is checked by its config alone."""
    problems = [] if compare else plan_problems(config)
    if dry_run and not weights_present(model_dir):
        index, found = None, config_only_problems(model_dir)
    else:
        index, found = model_problems(model_dir, config.model.allow_pickle)
    problems += found
    if index is not None and not dry_run:  # a dry run sizes from shapes: no tokenizer, no transformers
        problems += tokenizer_problems(model_dir)
    if dry_run:
        # A dry run often sizes a cluster from a laptop, before the data is there: an input file absent
        # here is noted, not failed (the run checks it again before any work); a bad one still fails.
        for what, path in (("calibration.source", calibration_source), ("eval.heldout", heldout)):
            if path is not None and not Path(path).exists():
                log.warning("%s: %s is not on this machine; `run` checks it before any work", what, path)
        calibration_source = calibration_source if calibration_source and Path(calibration_source).exists() else None
        heldout = heldout if heldout and Path(heldout).exists() else None
    if calibration_source is not None:
        problems += calibration_problems(calibration_source, parse=not dry_run)
    if heldout is not None and config.eval.enabled and stop_after is None:
        problems += text_file_problems(heldout, "eval.heldout")
    outputs = {"run.dir": config.run.dir}
    if stop_after is None:
        outputs["merge.output_dir"] = config.output_dir
        if config.heal.enabled:
            outputs["heal.output_dir"] = config.heal.output_dir or config.run.dir / "healed"
    problems += output_problems({"model folder (model.path)": model_dir}, outputs)
    if stop_after is None and not dry_run and not any("merge.output_dir" in p for p in problems):
        from slm_dist.checkpoint.export import check_output_dir  # torch via the merge rules: not on the dry run

        _collect(lambda: check_output_dir(model_dir, config.output_dir), problems)  # a foreign non-empty folder
    if index is not None and stop_after is None:
        removed = config.plan.target_layers_removed or 0
        if layers_removed is not None:
            removed = _collect(lambda: layers_removed(index), problems) or 0
        problems += disk_problems(config.output_dir, output_bytes(index, removed), "merge.output_dir")
    problems += cluster_problems(config.cluster)
    return problems


def eval_problems(config: SlmConfig, model_dir: Path, spec: EvalSpec) -> list[str]:
    """`eval`: the model and its tokenizer, every perplexity and task file, the cluster."""
    index, problems = model_problems(model_dir, config.model.allow_pickle)
    if index is not None:
        problems += tokenizer_problems(model_dir)
    return (problems + eval_input_problems(spec.ppl_files, spec.tasks, spec.ppl_join, spec.limit)
            + cluster_problems(config.cluster))


def merge_problems(config: SlmConfig, model_dir: Path, num_layers_after: int) -> list[str]:
    """`merge`: the model, the output folder, the disk, the cluster."""
    index, problems = model_problems(model_dir, config.model.allow_pickle)
    problems += output_problems({"model folder (model.path)": model_dir},
                                {"run.dir": config.run.dir, "merge.output_dir": config.output_dir})
    if index is not None:
        removed = index.num_layers - num_layers_after
        problems += disk_problems(config.output_dir, output_bytes(index, removed), "merge.output_dir")
    problems += cluster_problems(config.cluster)
    return problems


def heal_problems(config: SlmConfig, model_dir: Path, data: Path | None, out_dir: Path, work_dir: Path,
                  storage: str) -> list[str]:
    """`heal`: the model to heal, its data, and its three output locations."""
    index, problems = model_problems(model_dir, config.model.allow_pickle)
    if data is not None and Path(data).suffix in (".txt", ".jsonl"):
        problems += text_file_problems(Path(data), "heal.data")
    elif data is not None and not Path(data).exists():
        problems.append(f"heal.data: {data} does not exist")
    sources = {"model to heal (heal.model)": model_dir}
    if config.model.path is not None:
        sources["model folder (model.path)"] = config.model.path
    outputs = {"heal.output_dir": out_dir, "heal work folder (<run.dir>/heal)": work_dir}
    if config.heal.storage_path and "://" not in storage:
        outputs["heal.storage_path"] = Path(storage)
    problems += output_problems(sources, outputs)
    if index is not None:
        problems += disk_problems(out_dir, index.total_bytes, "heal.output_dir")
    problems += cluster_problems(config.cluster)
    return problems


def log_problems(problems: Sequence[str]) -> None:
    for p in problems:
        log.error("%s", p)


def planned_removal(config: SlmConfig):
    """How many layers the config's target removes, from the index (None: a threshold decides, so the
    output is sized as if none went)."""
    p = config.plan
    if p.target_ratio is None:
        return None
    return lambda index: layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)
