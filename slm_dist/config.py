"""The one validated, frozen configuration of a run.

YAML files plus dotted ``key=value`` overrides become an ``SlmConfig``; unknown keys are errors that
name their full path. Nothing below the CLI reads argv or environment variables: the CLI resolves
those and passes values in.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# `slm-dist compare` methods (compare.py says what each one is).
SLM_RULES = ("reference", "sum", "mean", "drop")
GLOBAL_RULES = ("drop", "scaled")
# slm_global_<method suffix> -> (merge.rule, merge.correction)
GLOBAL_METHODS = {**{f"slm_global_{r}": (r, "none") for r in GLOBAL_RULES},
                  **{f"slm_global_{c}": ("scaled", c) for c in ("linear", "refit")}}
# Baselines that run forward passes on the stages' cached calibration inputs (issue 19).
STAGED_BASELINES = ("sleb", "replaceme_lstsq", "replaceme_cosine", "linearpatch_sleb", "linearpatch_angular",
                    "angular_refit", "sleb_refit", "angular_pool", "sleb_pool")
COMPARE_METHODS: tuple[str, ...] = ("shortgpt", "angular", "laco", "last_layers",
                                    *(f"slm_cka_{r}" for r in SLM_RULES), "slm_output", *GLOBAL_METHODS,
                                    *STAGED_BASELINES)


class ConfigError(ValueError):
    """Bad configuration: the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Section):
    path: Path | None = Field(None, description="Hugging Face folder with safetensors weights, or a Hub repo id (org/name, fetched into the Hub cache); null = the SmolLM2-135M demo")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the stages; auto = bfloat16 on CUDA, float32 on CPU")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="set explicitly: a layer built from a bare config otherwise attends both ways")
    allow_pickle: bool = Field(False, description="allow reading .bin (pickle) checkpoints; off by default")
    trust_remote_code: bool = Field(False, description="remote code is never run; true is refused")

    @model_validator(mode="after")
    def _no_remote_code(self) -> "ModelSection":
        if self.trust_remote_code:
            raise ValueError("model.trust_remote_code=true is not supported: slm-dist only merges architectures "
                             "it knows as data (see `slm-dist inspect`); set it to false")
        return self


class RunSection(_Section):
    dir: Path = Field(Path("runs/demo"), description="run folder: every stage's artifact goes here")
    cache_dir: Path | None = Field(None, description="where demo assets are cached; null = ~/.cache/slm-dist")


class CalibrationSection(_Section):
    source: Path | None = Field(None, description=".txt/.jsonl/.parquet (text or input_ids) or a `datasets` folder; null = demo text")
    num_samples: int = Field(64, ge=1, description="calibration sequences")
    seq_len: int = Field(256, ge=8, description="tokens per sequence")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch (one HSIC term per batch)")
    seed: int = Field(0, description="seed for sample choice and token sub-sampling")
    cache_stride: int = Field(1, ge=1, description="when planning reruns layers on calibration inputs (SLEB "
                              "trials, measured plans, alphas, corrections), each stage keeps every batch's input "
                              "of its first layer and of every n-th layer after it, and recomputes the others from "
                              "the nearest kept one below (exact: the original layers). 1 keeps every layer's "
                              "(fastest); n divides that host memory by about n, for more calibration samples, "
                              "at the cost of up to n-1 extra layer forwards per read")

    @property
    def num_batches(self) -> int:
        """Calibration batches: num_samples in batches of batch_size, the last one possibly short."""
        return math.ceil(self.num_samples / self.batch_size)


class SimilaritySection(_Section):
    criterion: Literal["cka", "output"] = Field(
        "cka", description="cka: the paper's CKA sliding window; output: the published code's final-hidden cosine loop")
    kernel: Literal["linear", "rbf"] = Field("linear", description="linear: K = X X^T; rbf: Gaussian kernel, bandwidth by the median heuristic per batch")
    unit: Literal["sample", "token"] = Field("token", description="sample: one flattened vector per sequence; token: sampled token rows")
    tokens_per_batch: int = Field(512, ge=4, description="token rows sampled per batch in token unit (Gram is m x m)")
    skip_first_token: bool = Field(True, description="leave position 0 out (its massive activations swamp linear CKA)")


class PlanSection(_Section):
    threshold: float | None = Field(None, description="similarity threshold T in (0, 1]")
    target_layers_removed: int | None = Field(None, ge=0, description="search T to remove exactly this many layers")
    target_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of parameters to remove (nearest layer count)")
    protect_first: int = Field(1, ge=0, description="layers at the bottom that never merge")
    protect_last: int = Field(1, ge=0, description="layers at the top that never merge")
    max_window: int | None = Field(None, ge=2, description="most layers in one window")
    search: Literal["sliding", "global", "sleb"] = Field(
        "sliding", description="sliding: the paper's top-down window rule (threshold or target); global: the "
                               "least-cost disjoint windows anywhere removing exactly the target (exact DP); "
                               "sleb: layers removed one at a time, each the one whose removal from the model "
                               "pruned so far scores best (SLEB's greedy, one forward pass per trial), then "
                               "merged by merge.rule and merge.correction")
    cost: Literal["cka_drop", "cka_window", "block_influence", "angular", "measured"] = Field(
        "cka_drop", description="search=global: window cost (core/global_planner.py): from the statistics, or "
                                "measured = each layer's own calibration-loss damage (one forward pass per layer); "
                                "with candidates > 1 every cost proposes plans, this one first")
    candidates: int = Field(1, ge=1, description="search=global: plans the output-verified refinement ranks by "
                                                 "forward passes on the calibration samples (every cost's best "
                                                 "plan, then every cost's best single block, then second bests); "
                                                 "1 = no refinement")
    local_search: int = Field(0, ge=0, description="search=global: after ranking, measure up to this many plans "
                                                    "one swap from the best (a removed layer kept, a kept one "
                                                    "removed; cheapest predicted first), moving to any better "
                                                    "one; 0 = off")
    score_batches: int | None = Field(None, ge=1, description="calibration batches each measured plan is scored on "
                                                              "(the global search's candidates and local search, "
                                                              "search=sleb's trials); null = all. Fewer is "
                                                              "faster and noisier; fits keep their own batch counts")
    rerank: int = Field(1, ge=1, description="search=sleb with a merge.correction (and compare's sleb_refit and "
                                             "sleb_pool): SLEB's last step keeps this many of its best trial "
                                             "removals (by the plain removal's loss), fits the correction to each, "
                                             "and takes the one whose corrected model has the lowest NLL on the "
                                             "calibration batches the fits did not see (those after "
                                             "merge.correction_batches); 1 = SLEB's own choice. Each finalist "
                                             "costs its windows' fits; their maps are held together")
    refine_metric: Literal["nll", "cosine"] = Field(
        "nll", description="how the refinement ranks plans: calibration next-token NLL, or the published "
                           "final-hidden cosine to the original model")

    @model_validator(mode="after")
    def _one_target(self) -> "PlanSection":
        given = [k for k in ("threshold", "target_layers_removed", "target_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of plan.threshold, plan.target_layers_removed, plan.target_ratio "
                             f"(got {given or 'none'})")
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"plan.threshold must be in (0, 1], got {self.threshold}")
        if self.search != "sliding" and self.threshold is not None:
            raise ValueError(f"plan.search={self.search} removes a number of layers: set plan.target_layers_removed "
                             "or plan.target_ratio instead of plan.threshold")
        if self.search == "sleb" and self.max_window is not None:
            raise ValueError("plan.max_window bounds the sliding and global searches' windows; SLEB removes single "
                             "layers, whose runs form windows of any length: unset plan.max_window or pick another "
                             "plan.search")
        return self


class MergeSection(_Section):
    rule: Literal["reference", "sum", "mean", "drop", "scaled"] = Field(
        "reference", description="how a window's projections fold into one layer (DESIGN.md, Merge rules); "
                                 "scaled: theta_lo + alpha * sum(theta_k - theta_lo), alpha fitted per window")
    alpha_batches: int = Field(2, ge=1, description="rule scaled: calibration batches each window's alpha is "
                                                    "fitted on (the window's stage runs only that window)")
    correction: Literal["none", "linear", "refit", "pool"] = Field(
        "none", description="after the rule, fit each merged window's MLP output projection on the calibration "
                            "samples (ridge towards the plain merge, cross-validated over batches) so its layer adds "
                            "what the whole window added (core/correction_fit.py). linear: one hidden x hidden map on "
                            "the projection's output (256 MiB float32 per window at hidden 8192); refit: the "
                            "projection itself, from its intermediate-size input (fits better; its statistics are "
                            "intermediate^2 float64 on the window's stage, 6.6 GiB per copy at intermediate 28672: "
                            "see `slm-dist plan --dry-run`); pool: refit after choosing the merged layer's MLP "
                            "neurons among all the window's layers (core/neuron_pool.py; its statistics are (window "
                            "layers x intermediate)^2: small models only). The global search holds one plan's corrections at a "
                            "time, on their stages and on the Ray driver")
    pool_cap: int | None = Field(
        None, ge=2, description="correction pool (and compare's *_pool methods): screen the pool to this many times "
                                "the MLP width before the joint choice: the merged layer's own neurons, then each other "
                                "layer's best share, chosen within that layer alone (width^2 statistics each). The "
                                "choice then holds (pool_cap x intermediate)^2 instead of (window layers x "
                                "intermediate)^2 (see `slm-dist plan --dry-run`). null: the whole pool. On SmolLM2 "
                                "(6 of 30 layers) 3 kept most of the gain (bench/RESULTS.md)")
    correction_batches: int = Field(8, ge=2, description="correction linear|refit|pool: calibration batches each window's "
                                                         "correction is fitted and cross-validated on (up to 4 folds)")
    correction_weight: Literal["relative", "none"] = Field(
        "relative", description="correction linear|refit|pool: how each token counts in the least squares. relative: "
                                "its error relative to the norm of the window's output there (what the next RMSNorm "
                                "sees), so a massive-activation token counts as one token, not as 10^5; none: plain "
                                "squared error. On SmolLM2 (10 of 30 layers, block 9-18) relative took WikiText-2 "
                                "perplexity from 226.5 (no usable fit) to 134.5 (bench/RESULTS.md)")
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024, description="size cap of one output safetensors shard")
    output_dir: Path | None = Field(None, description="where the pruned checkpoint goes; null = <run.dir>/model")
    max_parallel: int = Field(2, ge=1, description="output shards written at once (threads locally, Ray tasks on ray)")
    memory_budget_bytes: int = Field(
        512 * 1024**2, ge=8 * 1024**2,
        description="working memory all parallel merge jobs together may hold; each job reads and merges in row "
                    "chunks sized to its share, whatever the shard or model size")


class EvalSection(_Section):
    enabled: bool = Field(True, description="measure the source and pruned models after the merge")
    heldout: Path | None = Field(None, description="held-out text for perplexity; null = demo held-out text")
    seq_len: int = Field(256, ge=8, description="tokens per perplexity window")
    max_windows: int | None = Field(32, ge=1, description="perplexity windows (contiguous, no overlap); null = all")
    ppl_files: tuple[Path, ...] = Field((), description="extra perplexity texts (.jsonl rows joined by blank lines "
                                        "as for WikiText-2; .txt lines stripped and joined by spaces as for PTB)")
    tasks: dict[str, Path] = Field({}, description="zero-shot tasks NAME: FILE (piqa, arc_easy, arc_challenge, "
                                   "openbookqa, winogrande, hellaswag, boolq)")
    limit: int | None = Field(None, ge=1, description="score the first N items of each task; null = all")
    add_bos: bool = Field(False, description="prepend the BOS token to every perplexity window and task context")
    batch_tokens: int = Field(4096, ge=64, description="padded tokens per scoring batch (caps logits memory)")
    max_length: int = Field(2048, ge=8, description="task requests longer than this are cut from the left")


class ClusterSection(_Section):
    backend: Literal["local", "ray"] = Field("local", description="local: all stages in this process; ray: stage actors")
    address: str | None = Field(None, description="Ray address; null = the job's cluster or a private local one")
    num_stages: int = Field(1, ge=1, description="pipeline stages (contiguous layer slices)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the stages get GPUs (ray: gpus_per_stage > 0; local: a visible GPU), else cpu")
    gpus_per_stage: float = Field(0.0, ge=0, description="GPUs reserved per stage actor (fractions share a GPU)")
    cpus_per_stage: float = Field(1.0, gt=0, description="CPUs reserved per stage actor; also its torch threads")
    memory_per_stage_bytes: int | None = Field(None, ge=1, description="memory budget of one stage for the partition")
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the stage bundles (STRICT_SPREAD: one stage per node)")
    max_inflight: int = Field(2, ge=1, description="calibration batches in flight at once")
    max_restarts: int = Field(3, ge=0, description="times a crashed stage actor is restarted (its batches are resent)")
    checkpoint_every: int = Field(8, ge=1, description="reducer writes stats.parquet every N batches")
    num_workers: int = Field(1, ge=1, description="Ray Train workers for `heal` (one per GPU with device=cuda, "
                             "else one CPU process each)")
    placement_timeout_s: float = Field(300.0, gt=0, description="how long to wait for the cluster to place the stage bundles")
    autoscaling: bool = Field(False, description="the Ray cluster adds nodes on demand: stage bundles its current nodes "
                              "can never hold wait placement_timeout_s for new nodes instead of failing at once")

    @model_validator(mode="after")
    def _gpu_consistency(self) -> "ClusterSection":
        if self.device == "cuda" and self.backend == "ray" and self.gpus_per_stage <= 0:
            raise ValueError("cluster.device=cuda on the ray backend needs cluster.gpus_per_stage > 0")
        return self


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HealSection(_Section):
    """LoRA recovery training of the pruned model (issue 7); the defaults are the paper's recipe."""

    enabled: bool = Field(False, description="`slm-dist run` heals the pruned checkpoint after merge and eval")
    model: Path | None = Field(None, description="checkpoint to heal; null = the run's pruned checkpoint")
    data: Path | None = Field(None, description=".jsonl of instruction/output pairs or of 'text', or .txt; "
                              "null = calibration.source")
    output_dir: Path | None = Field(None, description="merged healed checkpoint; null = <run.dir>/healed")
    storage_path: str | None = Field(None, description="Ray Train checkpoints (shared storage or s3:// on multi-node "
                                     "clusters); null = <run.dir>/heal")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale is lora_alpha / lora_r")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(LORA_TARGETS, min_length=1, description="projection names given LoRA")
    epochs: int = Field(2, ge=1, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps of the run, instead of epochs "
                                  "(null = epochs decide)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (linear warmup, then linear decay to 0)")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps (capped at the run's total)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1, description="examples per optimizer step, over all workers")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass on one worker")
    cutoff_len: int = Field(256, ge=8, description="tokens per example (longer ones are cut)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload: bool = Field(False, description="ZeRO optimizer states (and parameters at stage 3) in CPU memory")
    optimizer: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: torch.optim.AdamW (runs everywhere); deepspeed: DeepSpeed's fused/CPU Adam "
        "(needs its compiled ops; faster with offload)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (big models)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between Ray Train checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker")
    seed: int = Field(0, description="data order and dropout seed")

    @model_validator(mode="after")
    def _batch_split(self) -> "HealSection":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"heal.batch_size={self.batch_size} is not a multiple of heal.micro_batch_size="
                             f"{self.micro_batch_size}; pick sizes that divide")
        return self


class SlmConfig(_Section):
    model: ModelSection = ModelSection()
    run: RunSection = RunSection()
    calibration: CalibrationSection = CalibrationSection()
    similarity: SimilaritySection = SimilaritySection()
    plan: PlanSection = PlanSection(target_layers_removed=6)
    merge: MergeSection = MergeSection()
    eval: EvalSection = EvalSection()
    cluster: ClusterSection = ClusterSection()
    heal: HealSection = HealSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> "SlmConfig":
        if self.similarity.criterion == "output" and self.merge.rule == "scaled":
            raise ValueError("merge.rule=scaled fits alphas for finished windows; the published output loop "
                             "scores windows as it grows them: use similarity.criterion=cka or another rule")
        if self.similarity.criterion == "output" and self.merge.correction != "none":
            raise ValueError(f"merge.correction={self.merge.correction} fits finished windows; the published output loop scores "
                             "windows as it grows them: use similarity.criterion=cka or merge.correction=none")
        if self.similarity.criterion == "output" and self.plan.search != "sliding":
            raise ValueError(f"plan.search={self.plan.search} plans from calibration statistics or forward passes; "
                             "the published output loop is its own search: use similarity.criterion=cka or "
                             "plan.search=sliding")
        if self.similarity.criterion == "output" and self.plan.threshold is None:
            raise ValueError("similarity.criterion=output needs plan.threshold: the published loop runs forward "
                             "passes per threshold, so target search is only offered for criterion=cka")
        batches = self.calibration.num_batches
        if self.plan.score_batches is not None and self.plan.score_batches > batches:
            raise ValueError(f"plan.score_batches={self.plan.score_batches} but calibration has only {batches} "
                             f"batches (num_samples={self.calibration.num_samples}, batch_size="
                             f"{self.calibration.batch_size}): lower it, or null to score on all")
        if self.plan.rerank > 1:
            self._check_rerank(batches)
        if self.similarity.unit == "sample" and self.calibration.batch_size < 4:
            raise ValueError(f"similarity.unit=sample needs calibration.batch_size >= 4 (unbiased HSIC), "
                             f"got {self.calibration.batch_size}")
        return self

    def _check_rerank(self, batches: int) -> None:
        """What plan.rerank needs whoever reads it (`run` with search=sleb, or `compare`'s sleb_refit and
        sleb_pool); that `run` has a SLEB search with a correction to re-rank is preflight.plan_problems'."""
        p, m = self.plan, self.merge
        if p.refine_metric != "nll":
            raise ValueError(f"plan.rerank={p.rerank} ranks by held-out calibration NLL; set plan.refine_metric=nll")
        if batches <= m.correction_batches:
            raise ValueError(
                f"plan.rerank={p.rerank} scores SLEB's finalists on calibration batches their fits did not see, "
                f"but merge.correction_batches={m.correction_batches} takes all {batches} (num_samples="
                f"{self.calibration.num_samples}, batch_size={self.calibration.batch_size}): raise "
                f"calibration.num_samples to at least {(m.correction_batches + 1) * self.calibration.batch_size} "
                "(more held-out batches rank more surely) or lower merge.correction_batches")

    @property
    def output_dir(self) -> Path:
        return self.merge.output_dir or (self.run.dir / "model")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``plan.threshold=0.9`` -> (["plan", "threshold"], 0.9); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. plan.threshold=0.9)")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _explain(err: ValidationError) -> str:
    known = _known_keys(SlmConfig)
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(where, known, n=1)
            lines.append(f"{where}: unknown key" + (f" (did you mean {hint[0]}?)" if hint else ""))
        else:
            lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(tree: dict) -> SlmConfig:
    try:
        return SlmConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _read_yaml(path: Path) -> Any:
    """A config file's YAML, with every way it can be unreadable said in one line."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file (e.g. configs/tiny.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                          "UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({where.strip() or 'somewhere'}: {problem}); "
                          "fix the syntax there") from None
    if loaded is None:
        # An empty file is not the demo: the demo is `slm-dist run` with no config at all.
        raise ConfigError(f"config file {path} is empty; give its settings (see configs/tiny.yaml), or run the "
                          "demo with `slm-dist run` and no config file")
    return loaded


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SlmConfig:
    tree: dict = {}
    if path is not None:
        loaded = _read_yaml(Path(path))
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        if key[0] == "plan" and key[-1] in ("threshold", "target_layers_removed", "target_ratio") \
                and isinstance(tree.get("plan", {}), dict):
            # The three plan targets are alternatives: setting one on the command line replaces the file's.
            for other in ("threshold", "target_layers_removed", "target_ratio"):
                tree.setdefault("plan", {}).pop(other, None)
        _set_path(tree, key, value)
    return build_config(tree)


def to_yaml(config: SlmConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def needs_cached_inputs(config: SlmConfig) -> bool:
    """Stages keep their calibration inputs when planning runs candidates, fits alphas or fits
    corrections on them (host memory: every batch's input to every stage)."""
    p = config.plan
    return (config.similarity.criterion == "output" or config.merge.rule == "scaled"
            or config.merge.correction != "none"
            or p.search == "sleb"
            or (p.search == "global" and (p.candidates > 1 or p.local_search > 0 or p.cost == "measured")))


def resolve_device(config: SlmConfig, cuda_available: Callable[[], bool]) -> str:
    """``cluster.device`` with ``auto`` resolved: Ray stages see the GPUs their bundle reserves, not
    the driver's; local stages what this process sees (``cuda_available``, asked only then)."""
    cluster = config.cluster
    if cluster.device != "auto":
        return cluster.device
    if cluster.backend == "ray":
        return "cuda" if cluster.gpus_per_stage > 0 else "cpu"
    return "cuda" if cuda_available() else "cpu"


def compute_dtype(config: SlmConfig, device: str) -> str:
    """``model.dtype`` with ``auto`` resolved: bf16 on GPUs (native, half the memory), float32 on CPUs
    (bf16 matmuls are slow on most of them)."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if device == "cuda" else "float32"
