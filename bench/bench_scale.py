"""Too big for one stage (issue 17): a random Llama run through the whole job on a 2-node local Ray
cluster, and `plan --dry-run` held to what it measured.

Writes a random bf16 Llama shard by shard (Llama-3.2-3B geometry by default: hidden 3072,
intermediate 8192, 28 layers, 24/8 heads, vocabulary 128256, ~5 GB shards), starts a local
cluster of a head and one worker node with `cluster/local_cluster.sh` (its own folder and ports,
stopped by process group at the end), and submits the whole job (`launch.py`: calibrate, plan,
merge, verify, eval) with `ray job submit`: 4 stages, float32 on CPU, `cluster.memory_per_stage_bytes`
below half the model's float32 size, so no stage (and no node) could hold the model. Twice: the
default plan, and `plan.search=global merge.correction=refit`.

While a job runs, every process of the cluster's process groups is sampled (`/proc/PID/smaps_rollup`,
private = Private_Clean + Private_Dirty, every 0.5 s): stage actors (matched to their stage by the
pid the driver logs for each), the job's driver, merge tasks. Stage times come from the run's
state.json. Each figure is printed against `plan --dry-run --json` on the same config, once with the
dry run's default throughputs and once with `--assume stage_tokens_per_s=<measured in the first
run's calibration>`. The table goes into bench/RESULTS.md under HEADING.

    python bench/bench_scale.py                        # 3B geometry (~6.4 GB bf16, 12.8 GB in float32)
    python bench/bench_scale.py --preset 1b            # a smaller model, same script, every stage < half

Not run by pytest (tests/test_job_submit.py runs the tiny version of the job).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slm_dist.checkpoint.writer import ShardWriter, TensorEntry, plan_shards, shard_name, write_index  # noqa: E402

log = logging.getLogger("bench_scale")
HEADING = "## Too big for one stage: predicted vs measured (issue 17)"
GiB = 2**30
PRESETS = {
    "3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256),  # Llama-3.2-3B
    "1b": dict(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=4, vocab=64000),
    "refit-small": dict(hidden=1024, intermediate=2048, layers=16, heads=16, kv_heads=4, vocab=32000),
    "smoke": dict(hidden=256, intermediate=512, layers=8, heads=4, kv_heads=2, vocab=1000),  # the script's own check
}
SHARD_BYTES = 5 * 10**9


# ----------------------------------------------------------------------------------- model
def make_checkpoint(root: Path, g: dict, seed: int = 0) -> int:
    """A random bf16 Llama written tensor by tensor in 64 MiB row chunks (never the whole model in memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slm_dist.testing import tiny_tokenizer

    config = LlamaConfig(hidden_size=g["hidden"], intermediate_size=g["intermediate"], num_hidden_layers=g["layers"],
                         num_attention_heads=g["heads"], num_key_value_heads=g["kv_heads"], vocab_size=g["vocab"],
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
                         max_position_embeddings=4096)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    root.mkdir(parents=True)
    sizes = [(k, math.prod(s) * 2) for k, s in shapes.items()]
    groups = plan_shards(sizes, SHARD_BYTES)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups):
        name = shard_name(i + 1, len(groups))
        with ShardWriter(root / name, [TensorEntry(k, "BF16", shapes[k]) for k in group]) as writer:
            for key in group:
                shape = shapes[key]
                step = max(1, (64 * 1024**2) // (4 * math.prod(shape[1:])))
                for a in range(0, shape[0], step):
                    rows = torch.randn((min(step, shape[0] - a), *shape[1:]), generator=gen)
                    rows = 1.0 + 0.1 * rows if "norm" in key else 0.02 * rows
                    writer.write(key, rows.bfloat16())
                weight_map[key] = name
            writer.finish()
    write_index(root, weight_map, sum(b for _, b in sizes))
    config.save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return sum(b for _, b in sizes)


# ----------------------------------------------------------------------------------- cluster
class Cluster:
    """cluster/local_cluster.sh in a folder of its own: a head and ``workers`` worker nodes."""

    def __init__(self, folder: Path, workers: int, cpus_per_node: int):
        self.folder = folder
        self.env = {**os.environ, "SLM_CLUSTER_DIR": str(folder), "CPUS_PER_NODE": str(cpus_per_node),
                    "RAY_AUTH_MODE": "disabled", "OBJECT_STORE_MB": "768"}
        self.env.pop("RAY_ADDRESS", None)
        self.workers = workers

    def __enter__(self) -> Cluster:
        subprocess.run(["bash", str(REPO / "cluster/local_cluster.sh"), "start", str(self.workers)], env=self.env,
                       check=True, cwd=REPO)
        self.url = f"http://127.0.0.1:{(self.folder / 'dashboard_port').read_text().strip()}"
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["bash", str(REPO / "cluster/local_cluster.sh"), "stop"], env=self.env, cwd=REPO)

    def pgids(self) -> set[int]:
        return {int(p.read_text()) for p in self.folder.glob("*.pgid")}


def private_bytes(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(m) * 1024 for m in re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", text, re.M))


class Sampler(threading.Thread):
    """Peak private memory of every process in the cluster's process groups, with its title."""

    def __init__(self, pgids: set[int], period_s: float = 0.5):
        super().__init__(daemon=True)
        self.leaders, self.period_s = pgids, period_s  # each node's `ray start` (its pid is its group id)
        self.peak: dict[int, int] = {}
        self.titles: dict[int, set[str]] = {}
        self.stop = threading.Event()

    def cluster_pids(self) -> set[int]:
        """The nodes' processes and all their descendants (Ray's workers leave the nodes' process groups)."""
        parent = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                    parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found, frontier = set(self.leaders), set(self.leaders)
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
            found |= frontier
        return found

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self.cluster_pids():
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                kind = ("stage" if "StageActor" in title else "driver" if "launch.py" in title
                        else "merge" if "_write_shard" in title else None)
                if kind is None:
                    continue
                self.titles.setdefault(pid, set()).add(kind)
                self.peak[pid] = max(self.peak.get(pid, 0), private_bytes(pid))
            self.stop.wait(self.period_s)

    def peak_of(self, kind: str) -> int:
        return max((b for pid, b in self.peak.items() if kind in self.titles.get(pid, ())), default=0)


# ----------------------------------------------------------------------------------- runs
def write_inputs(work: Path) -> Path:
    from slm_dist.testing import tiny_text

    text = work / "text.txt"
    text.write_text(tiny_text(60000))
    return text


def overrides(args, model: Path, text: Path, run_dir: Path, memory: int, extra: list[str]) -> list[str]:
    return [f"model.path={model}", "model.dtype=float32", f"run.dir={run_dir}", f"calibration.source={text}",
            f"calibration.num_samples={args.samples}", f"calibration.seq_len={args.seq_len}",
            "calibration.batch_size=1", "similarity.unit=token", f"similarity.tokens_per_batch={args.seq_len}",
            f"plan.target_layers_removed={args.remove}", "merge.rule=reference", f"merge.max_shard_bytes={SHARD_BYTES}",
            "merge.max_parallel=2", f"eval.heldout={text}", f"eval.seq_len={args.seq_len}",
            f"eval.max_windows={args.eval_windows}", "cluster.backend=ray", "cluster.num_stages=4",
            "cluster.device=cpu", "cluster.cpus_per_stage=1", "cluster.max_inflight=1",
            f"cluster.memory_per_stage_bytes={memory}", *extra]


def run_dir_of(items: list[str]) -> Path:
    """The run.dir of an ``overrides`` list."""
    return Path(next(i for i in items if i.startswith("run.dir=")).split("=", 1)[1])


def dry_run(items: list[str], assume: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "slm_dist", "--quiet", "plan", "--dry-run", "--json", "configs/tiny.yaml", *items]
    for a in assume:
        cmd += ["--assume", a]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if not out.stdout.strip():
        raise RuntimeError(f"dry run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def submit(cluster: Cluster, items: list[str], log_path: Path) -> tuple[float, Sampler, str]:
    sampler = Sampler(cluster.pgids())
    sampler.start()
    start = time.perf_counter()
    cmd = ["ray", "job", "submit", "--address", cluster.url, "--working-dir", str(REPO), "--",
           "python", "launch.py", "configs/tiny.yaml", *items]
    with open(log_path, "w") as f:
        code = subprocess.run(cmd, env=cluster.env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    output = log_path.read_text()
    if code != 0 or "succeeded" not in output:
        raise RuntimeError(f"the job failed ({code}); see {log_path}:\n{output[-3000:]}")
    return seconds, sampler, output


def stage_pids(output: str) -> list[list[int]]:
    """Every 'stages:' line the driver logged: the pid of stage k, per backend the job started."""
    return [[int(p) for p in re.findall(r"pid (\d+)", line)] for line in output.splitlines() if "slm_dist.backends.ray: stages: [" in line]


def measure(cluster: Cluster, args, name: str, items: list[str], work: Path) -> dict:
    run_dir = run_dir_of(items)
    seconds, sampler, output = submit(cluster, items, work / f"{name}.log")
    generations = stage_pids(output)
    first = generations[0]  # calibration's stages hold the dense model the dry run describes
    per_stage = [max(sampler.peak.get(gen[k], 0) for gen in generations if len(gen) == len(first))
                 for k in range(len(first))]
    # From the driver's log: the calibration stage's start, its stages up (the pid line), its end.
    stamps = {}
    for line in output.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO (.*)", line)
        if m:
            at = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            for key, needle in (("begin", "stage calibrate ..."), ("up", "slm_dist.backends.ray: stages: ["),
                                ("end", "stage calibrate done")):
                if needle in m.group(2) and key not in stamps:
                    stamps[key] = at
    state = json.loads((run_dir / "state.json").read_text())
    times = {k: v.get("seconds") for k, v in state["stages"].items()}
    return {"start_seconds": stamps["up"] - stamps["begin"], "batch_seconds": stamps["end"] - stamps["up"],
            "job_seconds": seconds, "stage_private_peak": per_stage, "calibration_stage_peak":
            [sampler.peak.get(p, 0) for p in first], "driver_peak": sampler.peak_of("driver"),
            "merge_peak": sampler.peak_of("merge"), "times": times, "generations": len(generations)}


# ----------------------------------------------------------------------------------- report
def table(name: str, predicted: dict, calibrated: dict, measured: dict, memory: int) -> list[str]:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    lines = [f"**{name}**", "",
             "| stage | layers | weights (predicted) | fits a window of the plan | predicted peak | measured private "
             "peak | off | <= memory_per_stage |", "|---|---|---:|---|---:|---:|---:|---|"]
    for k, (st, peak) in enumerate(zip(predicted["stages"], measured["stage_private_peak"])):
        # A refit's statistics live on the stage holding its window's first layer: the dry run counts them on
        # every stage (the plan is not known before the run); a stage that fitted none is held to the rest.
        fitting = any(st["start"] <= lo < st["stop"] for lo, _ in measured["windows"])
        fit = st.get("fit_bytes", 0)
        expected = st["total_bytes"] if fitting or not fit else st["total_bytes"] - fit
        shown = g(expected) if not fit else (f"{g(expected)} (with the fit {g(st['total_bytes'])})" if not fitting
                                             else g(expected))
        off = peak / expected - 1
        lines.append(f"| {k} | [{st['start']},{st['stop']}) | {g(st['weight_bytes'])} | "
                     f"{('yes' if fitting else 'no') if fit else '-'} | {shown} | {g(peak)} | {off:+.0%} | "
                     f"{'yes' if peak <= memory else 'NO'} |")
    t = measured["times"]
    lines += ["", "| time | predicted (default figures) | predicted (measured tokens/s) | measured |",
              "|---|---:|---:|---:|"]
    for stage in ("calibrate", "plan", "merge", "eval"):
        lines.append(f"| {stage} | {predicted['seconds'].get(stage, 0):.1f} s | "
                     f"{calibrated['seconds'].get(stage, 0):.1f} s | {t.get(stage) or 0:.1f} s |")
    lines += ["", f"Driver peak private memory {g(measured['driver_peak'])}; merge tasks' peak "
                  f"{g(measured['merge_peak'])}; the whole job {measured['job_seconds']:.0f} s.", ""]
    return lines


def update_results(path: Path, section: str, heading: str) -> None:
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda m: section.rstrip("\n") + "\n", text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def copy_rate(model: Path, work: Path) -> float:
    """Bytes/s of copying the model's largest shard into the work folder, fsynced: what one merge task's
    write can reach on this disk (the source is in the page cache, as the merge's sources are)."""
    shard = max(model.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    target = work / "copy-probe"
    start = time.perf_counter()
    with open(shard, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 64 * 1024**2)
        dst.flush()
        os.fsync(dst.fileno())
    seconds = time.perf_counter() - start
    target.unlink()
    return shard.stat().st_size / seconds


def variants_of(args) -> dict[str, list[str]]:
    variants = {"default plan": [], "plan.search=global merge.correction=refit":
                ["plan.search=global", "merge.rule=scaled", "merge.correction=refit", "plan.candidates=1",
                 "plan.local_search=0", "merge.correction_batches=4"]}
    return {k: v for k, v in variants.items() if args.variant == "both" or ("refit" in k) == (args.variant == "refit")}


def measured_figures(first: dict, stages: list[dict], disk: float, args) -> list[str]:
    """The --assume list of the second prediction: what this machine measured, as a user would.

    stage_tokens_per_s is the widest stage's rate. With one batch in flight (cluster.max_inflight=1, as
    here) every batch crosses every stage alone, so the calibration's batch time is the batches times
    all the layers: tokens/s of the widest stage = tokens x layers / (widest x seconds)."""
    layers = [st["stop"] - st["start"] for st in stages]
    tokens_per_s = args.tokens_per_s or (args.samples * args.seq_len * sum(layers)
                                         / (max(layers) * first["batch_seconds"]))
    return [f"stage_tokens_per_s={tokens_per_s:.3g}", f"stage_start_s={first['start_seconds']:.3g}",
            f"write_bytes_per_s={disk:.3g}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm-bench-scale"))
    parser.add_argument("--samples", type=int, default=8, help="calibration samples (batch size 1)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--remove", type=int, default=2, help="plan.target_layers_removed")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--memory-per-stage", type=int, default=None,
                        help="cluster.memory_per_stage_bytes (default 0.49 x the float32 model; smoke runs need more)")
    parser.add_argument("--variant", choices=["default", "refit", "both"], default="both")
    parser.add_argument("--tokens-per-s", type=float, default=None,
                        help="measured stage tokens/s for the second prediction (default: this run's first calibration)")
    parser.add_argument("--reuse-model", type=Path, default=None, help="move this earlier run's model folder in")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (model, runs, logs)")
    parser.add_argument("--predict-only", action="store_true",
                        help="no job: predict again, with today's dryrun.py, the measurements a kept --workdir holds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    geometry = PRESETS[args.preset]
    work = args.workdir
    if args.predict_only:
        if not (work / "bench_scale.json").is_file():
            raise SystemExit(f"{work / 'bench_scale.json'} does not exist: --predict-only needs a run kept with --keep")
    elif work.exists():
        raise SystemExit(f"{work} exists: remove it first")
    else:
        work.mkdir(parents=True)
    try:
        if args.predict_only:
            stored = json.loads((work / "model" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        elif args.reuse_model:
            shutil.move(str(args.reuse_model), str(work / "model"))
            stored = json.loads((work / "model" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            log.info("writing a random bf16 Llama (%s) shard by shard ...", geometry)
            t0 = time.perf_counter()
            stored = make_checkpoint(work / "model", geometry)
            log.info("%.2f GB in %.0f s", stored / 1e9, time.perf_counter() - t0)
        compute = 2 * stored  # float32
        memory = args.memory_per_stage or int(0.49 * compute)
        log.info("float32 compute size %.2f GiB, memory_per_stage_bytes %.2f GiB", compute / GiB, memory / GiB)
        text = work / "text.txt" if args.predict_only else write_inputs(work)
        items_of = {name: overrides(args, work / "model", text, work / f"run-{k}", memory, extra)
                    for k, (name, extra) in enumerate(variants_of(args).items())}
        refused, measured_rows = {}, {}
        if args.predict_only:
            saved = json.loads((work / "bench_scale.json").read_text())
            disk, measured_rows = saved["disk_bytes_per_s"], {n: row["measured"] for n, row in saved["rows"].items()}
            refused = saved.get("refused", {})
        else:
            disk = copy_rate(work / "model", work)
            log.info("copying a shard with fsync: %.0f MB/s", disk / 1e6)
            with Cluster(work / "cluster", workers=1, cpus_per_node=2) as cluster:
                for name, items in items_of.items():
                    predicted = dry_run(items)
                    if not predicted["fits"]:
                        log.warning("the dry run refuses %s: %s", name, predicted["refusal"])
                        refused[name] = predicted["refusal"]
                        continue
                    log.info("%s: submitting ...", name)
                    measured_rows[name] = measure(cluster, args, name, items, work)
                    log.info("%s: %s", name, json.dumps(measured_rows[name]))
        for name, measured in measured_rows.items():   # the windows the plan chose (which stages fitted)
            run_dir = run_dir_of(items_of[name])
            measured.setdefault("windows", json.loads((run_dir / "plan.json").read_text())["windows"])
        first = next(iter(measured_rows))   # the first run's calibration, as a user would measure it
        assume = measured_figures(measured_rows[first], dry_run(items_of[first])["stages"], disk, args)
        rows = {name: (dry_run(items_of[name]), dry_run(items_of[name], assume), measured)
                for name, measured in measured_rows.items()}
        (work / "bench_scale.json").write_text(json.dumps(
            {"disk_bytes_per_s": disk, "refused": refused, "assume": assume,
             "rows": {n: {"predicted": p, "calibrated": c, "measured": m} for n, (p, c, m) in rows.items()}},
            indent=1, default=str))
        lines = [f"{HEADING}, preset {args.preset}", "", f"`python bench/bench_scale.py {' '.join(sys.argv[1:])}`: random Llama, "
                 f"hidden {geometry['hidden']}, intermediate {geometry['intermediate']}, {geometry['layers']} layers, "
                 f"{geometry['heads']}/{geometry['kv_heads']} heads, vocabulary {geometry['vocab']}: "
                 f"{stored / 1e9:.2f} GB in bf16, {compute / GiB:.2f} GiB in float32; 4 stages on a head + 1 worker "
                 f"node (2 CPUs each) started by cluster/local_cluster.sh, `ray job submit`; "
                 f"cluster.memory_per_stage_bytes = {memory / GiB:.2f} GiB (0.49 x the float32 model); "
                 f"{args.samples} calibration samples x {args.seq_len} tokens; {os.cpu_count()} CPU cores. "
                 f"The second prediction column is `plan --dry-run` given this machine's measured figures "
                 f"(`--assume {' '.join(assume)}`): the first run's calibration tokens/s per stage and its stage "
                 f"start (from the driver's log), and the copy rate of the largest shard, fsynced.", ""]
        for name, (predicted, calibrated, measured) in rows.items():
            lines += table(name, predicted, calibrated, measured, memory)
        for name, why in refused.items():
            lines += [f"**{name}**: refused by the dry run at this memory_per_stage_bytes: {why}", ""]
        section = "\n".join(lines) + "\n"
        update_results(args.results, section, f"{HEADING}, preset {args.preset}")
        sys.stdout.write(section)
    finally:
        if not (args.keep or args.predict_only):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
