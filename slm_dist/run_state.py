"""What a run folder already holds, and which stages a rerun must do.

``state.json`` records, per stage, the hash of everything the stage's artifacts depend on (its
*stage key*: the config values that matter to it, the source checkpoint's index, the input files'
contents, and the key of the stage before), and a size + sha256 of each artifact as written. On a
rerun a stage is done when its key still matches and its artifacts are still there and intact;
the first stage that is not done and every stage after it run again. So:

- a rerun of a finished run does nothing (and writes nothing);
- a rerun after a crash or kill resumes at the stage that was interrupted;
- a new ``plan.threshold`` changes the plan key but not the calibration key: the cached
  statistics are reused without a forward pass;
- ``--force`` ignores the recorded state and starts over.

The run key (a hash of the whole resolved config and the source index) names the run in logs,
reports and ``state.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from slm_dist.checkpoint.index import CheckpointIndex
from slm_dist.checkpoint.lock import LOCK_NAME, FolderLock
from slm_dist.checkpoint.writer import MANIFEST_NAME, sha256_file, write_json
from slm_dist.config import SlmConfig
from slm_dist.core.planner import LayerPlan, MergePlan, PlanError, plan_from_json

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
STATE_FORMAT = 1
STAGES = ("calibrate", "plan", "merge", "eval", "report")
ARTIFACTS = {
    "calibrate": ("calibration.parquet", "stats.parquet", "similarity.json"),
    "plan": ("plan.json",),
    "merge": ("merge.json",),  # + the output checkpoint folder, checked through its manifest
    "eval": ("eval.json",),
    "report": ("report.json", "report.md", "similarity.png", "block_influence.png"),
}
# Files up to this size are fingerprinted by content; bigger ones (and folders) by size and mtime.
CONTENT_HASH_MAX_BYTES = 256 * 1024**2
# Config keys that change how a stage runs, never what it writes.
_NO_EFFECT = {"merge": ("max_parallel", "memory_budget_bytes")}
MERGE_SETTINGS_OF_THE_PLAN = ("rule", "alpha_batches", "correction", "correction_batches", "correction_weight")


class RunStateError(RuntimeError):
    """state.json is unreadable or another run holds the folder; says which and what to do."""


# ------------------------------------------------------------------------------ fingerprints
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def index_fingerprint(index: CheckpointIndex) -> str:
    """The source checkpoint as its headers describe it: config.json, every tensor's place and shape,
    every file's size. Read from headers only, so it costs milliseconds even for 140 GB."""
    tensors = sorted((k, t.file, t.dtype, list(t.shape), t.nbytes) for k, t in index.tensors.items())
    sizes = {f: (Path(index.root) / f).stat().st_size for f in index.files}
    return _digest({"config": index.config, "tensors": tensors, "files": sizes, "format": index.format})


def path_fingerprint(path: Path | None) -> str | None:
    """Content hash of a small input file; size + mtime of big files and of every file in a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        st = path.stat()
        if st.st_size <= CONTENT_HASH_MAX_BYTES:
            return "sha256:" + sha256_file(path)
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return "tree:" + _digest(listing)
    return "missing"


def _with_file_fingerprints(value: Any) -> Any:
    """Every string in ``value`` that names an existing file or folder gains its fingerprint."""
    if isinstance(value, dict):
        return {k: _with_file_fingerprints(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_file_fingerprints(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        return {"path": value, "fingerprint": path_fingerprint(Path(value))}
    return value


@dataclass(frozen=True)
class RunInputs:
    """The resolved inputs of a run (demo paths filled in, dtype resolved)."""

    model_dir: Path
    calibration_source: Path
    heldout_text: Path | None
    output_dir: Path
    device: str
    dtype: str


def _section(config: SlmConfig, name: str, drop: Iterable[str] = ()) -> dict:
    dumped = getattr(config, name).model_dump(mode="json")
    for key in (*drop, *_NO_EFFECT.get(name, ())):
        dumped.pop(key, None)
    return dumped


def stage_keys(config: SlmConfig, inputs: RunInputs, index_fp: str) -> dict[str, str]:
    """Per stage, the hash of everything its artifacts depend on (chained: each includes the one before)."""
    calibrate = _digest({
        "index": index_fp,
        "model": _section(config, "model", drop=("path", "allow_pickle", "dtype")),
        "device": inputs.device, "dtype": inputs.dtype,
        "calibration": _section(config, "calibration", drop=("source",)),
        "calibration_source": path_fingerprint(inputs.calibration_source),
        "similarity": _section(config, "similarity", drop=("criterion",)),
    })
    # plan.json names the rule, and the planner fits what the merge settings ask for (alphas, corrections)
    planned = {k: getattr(config.merge, k) for k in MERGE_SETTINGS_OF_THE_PLAN}
    if config.merge.pool_cap is not None:  # only when set, so that runs made before it keep their plans
        planned["pool_cap"] = config.merge.pool_cap
    plan = _digest({"calibrate": calibrate, "plan": _section(config, "plan"),
                    "criterion": config.similarity.criterion, **planned})
    merge = _digest({"plan": plan, "merge": _section(config, "merge", drop=("output_dir",)),
                     "output_dir": str(Path(inputs.output_dir).resolve())})
    # The eval stage also heals the pruned model when heal.enabled (its results join eval.json).
    # Only its inputs are fingerprinted: its output folders change as it writes them.
    heal = dict(config.model_dump(mode="json").get("heal") or {})
    for key in ("model", "data"):
        if key in heal:
            heal[key] = _with_file_fingerprints(heal[key])
    eval_ = _digest({"merge": merge, "eval": _with_file_fingerprints(_section(config, "eval", drop=("heldout",))),
                     "heldout": path_fingerprint(inputs.heldout_text), "heal": heal})
    report = _digest({"eval": eval_})
    return {"calibrate": calibrate, "plan": plan, "merge": merge, "eval": eval_, "report": report}


def run_key(config: SlmConfig, index_fp: str) -> str:
    """The run's name: the whole resolved config and the source index."""
    return _digest({"config": config.model_dump(mode="json"), "index": index_fp})


# ------------------------------------------------------------------------------ artifacts
def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def checkpoint_record(folder: Path) -> dict | None:
    """A finished output folder: its manifest's hash and every listed file's size (no re-hashing of
    the weights: a 140 GB check must stay cheap). None when the folder is not finished."""
    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return {"manifest_sha256": sha256_file(manifest), "files": {n: e["bytes"] for n, e in files.items()}}


def checkpoint_intact(folder: Path, record: Mapping) -> bool:
    current = checkpoint_record(folder)
    if current is None or current["manifest_sha256"] != record.get("manifest_sha256"):
        return False
    return all((Path(folder) / n).is_file() and (Path(folder) / n).stat().st_size == size
               for n, size in current["files"].items())


# ------------------------------------------------------------------------------ state
class RunState:
    """``<run>/state.json``: per stage, its key, when it finished, how long it took, its artifacts."""

    def __init__(self, run_dir: Path, keys: Mapping[str, str], key: str, inputs: RunInputs, data: dict):
        self.run_dir = Path(run_dir)
        self.keys = dict(keys)
        self.run_key = key
        self.inputs = inputs
        self.data = data
        self._lock = FolderLock(run_dir, lambda path, pid: RunStateError(
            f"another slm-dist process is running in {run_dir} (pid {pid} holds {LOCK_NAME}); wait for it to "
            "finish or use another run.dir"))

    @classmethod
    def open(cls, run_dir: Path, keys: Mapping[str, str], key: str, inputs: RunInputs,
             force: bool = False) -> "RunState":
        """The folder's recorded state (empty with ``force`` or when there is none)."""
        path = Path(run_dir) / STATE_NAME
        data: dict = {"stages": {}}
        if path.is_file() and not force:
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RunStateError(f"{path} is not valid JSON ({e}); delete it or rerun with --force") from None
            if data.get("format") != STATE_FORMAT or not isinstance(data.get("stages"), dict):
                log.warning("%s has an unknown format; starting the run over", path)
                data = {"stages": {}}
        return cls(run_dir, keys, key, inputs, data)

    # ------------------------------------------------------------------ queries
    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def is_done(self, name: str) -> bool:
        """Recorded as complete for the same key, with every artifact still as it was written."""
        entry = self.stage(name)
        if not entry or entry.get("key") != self.keys[name]:
            return False
        for fname, rec in entry.get("artifacts", {}).items():
            path = self.run_dir / fname
            if not path.is_file() or path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
                log.info("stage %s: %s changed or vanished since it was written; redoing the stage", name, fname)
                return False
        checkpoint = entry.get("checkpoint")
        if checkpoint is not None and not checkpoint_intact(Path(checkpoint["dir"]), checkpoint):
            log.info("stage %s: the checkpoint in %s is incomplete or changed; redoing the stage", name,
                     checkpoint["dir"])
            return False
        return True

    def stages_to_run(self, criterion: str = "cka", stop_after: str | None = None) -> tuple[str, ...]:
        """The first stage that is not done and every stage after it (up to ``stop_after``).

        With ``criterion=output`` a new plan needs the calibration forward pass again: the published
        loop scores candidates on cached hidden states that only a calibration pass produces.
        """
        order = STAGES if stop_after is None else STAGES[:STAGES.index(stop_after) + 1]
        for k, name in enumerate(order):
            if not self.is_done(name):
                todo = order[k:]
                if criterion == "output" and "plan" in todo and "calibrate" not in todo:
                    todo = ("calibrate", *todo)
                return todo
        return ()

    @property
    def seconds(self) -> dict[str, float]:
        return {name: e["seconds"] for name, e in self.data["stages"].items() if "seconds" in e}

    # ------------------------------------------------------------------ updates
    def start(self, name: str) -> None:
        """Forget a stage before redoing it, so a crash midway never leaves it looking finished."""
        if self.data["stages"].pop(name, None) is not None:
            self._save()

    def mark_done(self, name: str, seconds: float, info: Mapping | None = None,
                  checkpoint_dir: Path | None = None) -> None:
        """Record a finished stage: its key, time, and a fingerprint of each artifact it wrote."""
        entry: dict[str, Any] = {"key": self.keys[name], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "seconds": round(seconds, 3), "artifacts": {}}
        for fname in ARTIFACTS[name]:
            path = self.run_dir / fname
            if path.is_file():
                entry["artifacts"][fname] = file_record(path)
        if checkpoint_dir is not None:
            record = checkpoint_record(checkpoint_dir)
            if record is None:
                raise RunStateError(f"stage {name}: {checkpoint_dir} has no readable {MANIFEST_NAME}; the merge did "
                                    "not finish")
            entry["checkpoint"] = {"dir": str(Path(checkpoint_dir).resolve()), **record}
        if info:
            entry["info"] = dict(info)
        self.data["stages"][name] = entry
        self._save()

    def rerecord_checkpoint(self, name: str, checkpoint_dir: Path) -> None:
        """A later stage changed stage ``name``'s finished output on purpose (eval writes the measured
        perplexity into the model card and re-records its hash): record the folder as it is now, so a
        rerun still finds that stage done."""
        entry, record = self.stage(name), checkpoint_record(checkpoint_dir)
        if entry is None or record is None or "checkpoint" not in entry:
            raise RunStateError(f"stage {name} recorded no checkpoint {checkpoint_dir} to re-record; this is a bug")
        entry["checkpoint"].update(record)
        self._save()

    def _save(self) -> None:
        inputs = self.inputs
        self.data.update({
            "format": STATE_FORMAT, "run_key": self.run_key,
            "inputs": {"model_dir": str(Path(inputs.model_dir).resolve()),
                       "calibration_source": str(inputs.calibration_source),
                       "heldout_text": str(inputs.heldout_text) if inputs.heldout_text else None,
                       "output_dir": str(Path(inputs.output_dir).resolve()),
                       "device": inputs.device, "dtype": inputs.dtype},
            "stages": {n: self.data["stages"][n] for n in STAGES if n in self.data["stages"]},
        })
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / STATE_NAME, self.data)

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Hold the folder for this process: a scheduler that starts a second run of it gets an error."""
        self._lock.acquire()

    def unlock(self) -> None:
        self._lock.release()


def load_state(run_dir: Path) -> dict:
    """The raw state.json of a run folder ({} when there is none), for reports."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def load_plan(run_dir: Path) -> MergePlan | LayerPlan:
    """The `MergePlan` a run's plan stage wrote to ``<run_dir>/plan.json``, re-validated; in a `slm-dist compare`
    method's folder, the baseline's `LayerPlan` (it names its method)."""
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        raise PlanError(f"{path} does not exist: run `slm-dist run` (or its plan stage) first, or set run.dir to a "
                        "run folder that has a plan.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON ({e}); regenerate it") from None
    return plan_from_json(data)
