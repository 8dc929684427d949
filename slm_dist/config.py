"""The one validated, frozen configuration of a run.

YAML files plus dotted ``key=value`` overrides become an ``SlmConfig``; unknown keys are errors that
name their full path. Nothing below the CLI reads argv or environment variables: the CLI resolves
those and passes values in.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Bad configuration: the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Section):
    path: Path | None = Field(None, description="Hugging Face folder with safetensors weights; null = the SmolLM2-135M demo")
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


class SimilaritySection(_Section):
    criterion: Literal["cka", "output"] = Field(
        "cka", description="cka: the paper's CKA sliding window; output: the published code's final-hidden cosine loop")
    kernel: Literal["linear", "rbf"] = "linear"
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

    @model_validator(mode="after")
    def _one_target(self) -> "PlanSection":
        given = [k for k in ("threshold", "target_layers_removed", "target_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of plan.threshold, plan.target_layers_removed, plan.target_ratio "
                             f"(got {given or 'none'})")
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"plan.threshold must be in (0, 1], got {self.threshold}")
        return self


class MergeSection(_Section):
    rule: Literal["reference", "sum", "mean", "drop"] = Field(
        "reference", description="how a window's projections fold into one layer (DESIGN.md, Merge rules)")
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024, description="size cap of one output safetensors shard")
    output_dir: Path | None = Field(None, description="where the pruned checkpoint goes; null = <run.dir>/model")


class EvalSection(_Section):
    enabled: bool = True
    heldout: Path | None = Field(None, description="held-out text for perplexity; null = demo held-out text")
    seq_len: int = Field(256, ge=8)
    max_windows: int = Field(32, ge=1, description="perplexity windows (contiguous, no overlap)")


class ClusterSection(_Section):
    backend: Literal["local", "ray"] = Field("local", description="local: all stages in this process; ray: stage actors")
    address: str | None = Field(None, description="Ray address; null = the job's cluster or a private local one")
    num_stages: int = Field(1, ge=1, description="pipeline stages (contiguous layer slices)")
    device: Literal["cpu", "cuda"] = "cpu"
    gpus_per_stage: float = Field(0.0, ge=0)
    cpus_per_stage: float = Field(1.0, gt=0)
    memory_per_stage_bytes: int | None = Field(None, ge=1, description="memory budget of one stage for the partition")
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    max_inflight: int = Field(2, ge=1, description="calibration batches in flight at once")
    max_restarts: int = Field(3, ge=0)
    checkpoint_every: int = Field(8, ge=1, description="reducer writes stats.parquet every N batches")

    @model_validator(mode="after")
    def _gpu_consistency(self) -> "ClusterSection":
        if self.device == "cuda" and self.backend == "ray" and self.gpus_per_stage <= 0:
            raise ValueError("cluster.device=cuda on the ray backend needs cluster.gpus_per_stage > 0")
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

    @model_validator(mode="after")
    def _cross_checks(self) -> "SlmConfig":
        if self.similarity.criterion == "output" and self.plan.threshold is None:
            raise ValueError("similarity.criterion=output needs plan.threshold: the published loop runs forward "
                             "passes per threshold, so target search is only offered for criterion=cka")
        if self.similarity.unit == "sample" and self.calibration.batch_size < 4:
            raise ValueError(f"similarity.unit=sample needs calibration.batch_size >= 4 (unbiased HSIC), "
                             f"got {self.calibration.batch_size}")
        return self

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


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SlmConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
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
