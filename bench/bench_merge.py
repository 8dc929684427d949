"""Merge-stage benchmark (issue 4): out-of-core `slm-dist merge` against the naive in-memory path and `cp`.

For each model size: generate a random bf16 Llama checkpoint (several shards, written tensor by
tensor so generation itself stays small), plan a 25% depth cut with the `sum` rule, then in the
same run and on the same warm page cache time, each in its own process under `/usr/bin/time -v`:

- `cp` of the source shards (then `sync`): the I/O ceiling;
- `slm-dist merge` with `cluster.backend: local` (and `ray` when asked): peak RSS of the process,
  and for Ray the peak RSS each merge worker reports;
- the naive path (`from_pretrained`, `merge_state_dict`, `save_pretrained`), then `sync`, since
  our merge fsyncs every shard and the naive path leaves its bytes in the page cache.

It checks the out-of-core output equals the naive output tensor for tensor, prints a Markdown
section, writes it into bench/RESULTS.md under "## Merge (issue 4)", and deletes every generated
checkpoint. Run: `python3 bench/bench_merge.py` (about 10 minutes on 2 cores for 4.2 + 8.5 GB).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from compare_common import write_section

from slm_dist.checkpoint.writer import ShardWriter, TensorEntry, plan_shards, shard_name, write_index
from slm_dist.core.planner import MergePlan

log = logging.getLogger("bench_merge")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SHARD_BYTES = 1024**3
HEADING = "## Merge (issue 4)"
RULES_HEADING = "## Merge at copy speed, every rule (issue 17)"
GB = 1e9


# ----------------------------------------------------------------------------------- model
def layer_bytes() -> int:
    head_dim = HIDDEN // HEADS
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    return 2 * (attn + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)


def layers_for(target_bytes: float) -> int:
    return max(8, math.ceil((target_bytes - 2 * 2 * VOCAB * HIDDEN) / layer_bytes()))


def make_checkpoint(root: Path, num_layers: int, seed: int = 0) -> int:
    """A random bf16 Llama written tensor by tensor in 64 MiB row chunks; returns its tensor bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slm_dist.testing import tiny_tokenizer

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
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


def windows_removing(num_layers: int, remove: int, width: int = 4) -> list[tuple[int, int]]:
    """Windows of `width` layers from layer 2 on, `width` kept layers apart, the last one shortened."""
    windows, lo = [], 2
    while remove > 0:
        hi = lo + min(width - 1, remove)
        if hi > num_layers - 2:
            raise ValueError(f"cannot remove that many layers from {num_layers} with width {width}")
        windows.append((lo, hi))
        remove -= hi - lo
        lo = hi + 1 + width
    return windows


# ------------------------------------------------------------------------------------- runs
def timed(cmd: list[str], cwd: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GNU time) of one command in its own process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=cwd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1))
              for kind in ("User", "System"))
    return {"seconds": seconds, "peak_rss": rss, "cpu_seconds": cpu, "stdout": proc.stdout}


def sync_seconds() -> float:
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def run_cp(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    r = timed(["cp", *files, str(dst)])
    r["sync"] = sync_seconds()
    shutil.rmtree(dst)
    return r


def run_ours(src: Path, run_dir: Path, plan: MergePlan, backend: str) -> dict:
    run_dir.mkdir()
    (run_dir / "plan.json").write_text(json.dumps(plan.to_json()))
    (run_dir / "config.yaml").write_text(json.dumps({
        "model": {"path": str(src)}, "run": {"dir": str(run_dir)},
        "merge": {"rule": plan.rule, "max_shard_bytes": SHARD_BYTES, "max_parallel": 2,
                  "memory_budget_bytes": 512 * 1024**2},
        "cluster": {"backend": backend}}))
    r = timed([sys.executable, "-m", "slm_dist.cli", "-q", "merge", str(run_dir / "config.yaml"), "--json"])
    r["sync"] = sync_seconds()
    r["summary"] = json.loads(r.pop("stdout").strip().splitlines()[-1])
    return r


NAIVE = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from slm_dist.arch import get_arch, prune_config
    from slm_dist.core.merge import merge_state_dict
    src, out, windows = sys.argv[1], sys.argv[2], [tuple(w) for w in json.loads(sys.argv[3])]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, trust_remote_code=False)
    n = model.config.num_hidden_layers
    merged = merge_state_dict(model.state_dict(), windows, n, get_arch("llama"), "sum")
    del model
    keep = [i for i in range(n) if not any(lo < i <= hi for lo, hi in windows)]
    config = AutoConfig.for_model(**prune_config(json.load(open(src + "/config.json")), keep, get_arch("llama")))
    with torch.device("meta"):
        pruned = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    pruned.load_state_dict(merged, assign=True, strict=True)
    pruned.save_pretrained(out, max_shard_size=1024**3)
""")


def run_naive(src: Path, out: Path, plan: MergePlan) -> dict:
    r = timed([sys.executable, "-c", NAIVE, str(src), str(out), json.dumps([list(w) for w in plan.windows])])
    r["sync"] = sync_seconds()
    return r


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two checkpoint folders equal, compared one at a time."""
    from slm_dist.checkpoint.index import open_index
    from slm_dist.checkpoint.reader import RowReader, num_rows

    ia, ib = open_index(a), open_index(b)
    if set(ia.tensors) != set(ib.tensors):
        return False
    with RowReader(a) as ra, RowReader(b) as rb:
        for key, info in ia.tensors.items():
            rows = num_rows(info)
            if not torch.equal(ra.read_rows(info, 0, rows), rb.read_rows(ib.tensors[key], 0, rows)):
                return False
    return True


# ----------------------------------------------------------------------------------- report
def settle(seconds: float) -> None:
    """Flush dirty pages and pause, so every timed command starts from the same page-cache state."""
    sync_seconds()
    time.sleep(seconds)


def rule_plan(plan: MergePlan, rule: str) -> MergePlan:
    """The same windows merged by ``rule`` (scaled: alpha 0.5 each, a fitted-looking value)."""
    alphas = tuple(0.5 for _ in plan.windows) if rule == "scaled" else None
    return MergePlan(plan.num_layers_before, plan.windows, rule, plan.criterion, plan.threshold, alphas)


def bench_size(work: Path, target_gb: float, naive: bool, ray: bool, repeats: int, settle_s: float,
               rules: tuple[str, ...] = ("sum",)) -> dict:
    n = layers_for(target_gb * GB)
    src = work / f"src-{n}"
    log.info("generating a %d-layer bf16 Llama (~%.1f GB) in %s", n, target_gb, src)
    t0 = time.perf_counter()
    total = make_checkpoint(src, n)
    sync_seconds()
    log.info("generated %.2f GB in %.0f s", total / GB, time.perf_counter() - t0)
    plan = MergePlan(n, tuple(windows_removing(n, round(0.25 * n))), "sum", "cka", None)
    row: dict = {"layers": n, "layers_after": plan.num_layers_after, "source_bytes": total,
                 "windows": [list(w) for w in plan.windows], "runs": {}}
    methods = ["cp", "local"] + [f"local:{r}" for r in rules if r != "sum"] + (["ray"] if ray else []) \
        + (["naive"] if naive else [])
    for rep in range(repeats):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]   # rotate: no method always first
        for method in order:
            settle(settle_s)
            log.info("rep %d: %s ...", rep + 1, method)
            if method == "cp":
                r = run_cp(src, work / "cp")
            elif method == "naive":
                r = run_naive(src, work / "naive", plan)
            else:
                backend, _, rule = method.partition(":")
                folder = work / f"run-{method.replace(':', '-')}"
                shutil.rmtree(folder, ignore_errors=True)
                r = run_ours(src, folder, rule_plan(plan, rule or "sum"), backend)
                # Only the naive and ray comparisons read run-local again. Any other output left behind
                # would share the page cache with the next command's source and output: at 8.5 GB on 24 GiB
                # the next command then reads its source from disk (an earlier version of this bench did).
                if rule or not (naive or ray):
                    shutil.rmtree(folder)
            row["runs"].setdefault(method, []).append(r)
            log.info("  %.1f s (+%.1f s sync), peak RSS %.2f GiB", r["seconds"], r["sync"], r["peak_rss"] / 2**30)
            if method == "naive":
                if rep == repeats - 1:
                    log.info("comparing the naive and out-of-core outputs tensor by tensor ...")
                    row["naive_equal"] = same_tensors(work / "run-local/model", work / "naive")
                shutil.rmtree(work / "naive")
            if method == "ray":
                manifests = [json.loads((work / f"run-{m}/model/manifest.json").read_text())["files"]
                             for m in ("local", "ray")] if (work / "run-local/model").exists() else None
                if manifests:
                    row["ray_identical"] = manifests[0] == manifests[1]
                shutil.rmtree(work / "run-ray")
    shutil.rmtree(work / "run-local", ignore_errors=True)
    shutil.rmtree(src)
    return row


def best(runs: list[dict], durable: bool = True) -> dict:
    """The fastest repetition (least disturbed by other load on a shared machine)."""
    return min(runs, key=lambda r: r["seconds"] + (r["sync"] if durable else 0.0))


def markdown(rows: list[dict], machine: str, repeats: int, load: tuple[float, float]) -> str:
    lines = [HEADING, "",
             f"`python3 bench/bench_merge.py` on {machine} (load average {load[0]:.1f} at the start, {load[1]:.1f} at "
             f"the end: other work shared the machine). Random bf16 Llama (hidden {HIDDEN}, intermediate "
             f"{INTERMEDIATE}, GQA {HEADS}/{KV_HEADS}, vocab {VOCAB}) in 1 GiB shards; 25% of its layers merged "
             "with `sum` (windows of 4); output shards capped at 1 GiB; `merge.max_parallel: 2`, "
             "`merge.memory_budget_bytes: 512 MiB`. Every command runs in its own process under `/usr/bin/time -v` "
             "(peak RSS) on a warm page cache, after a `sync` and a pause; each was run "
             f"{repeats} times in rotating order and the fastest is shown. Our merge fsyncs every shard, so "
             "\"durable\" adds the `sync` after each command: the time until the bytes are on disk for every path. "
             "CPU s = user + system time of the process and its children (Ray's daemons included). "
             "Throughput = (bytes read + bytes written) / durable time.", "",
             "| source | path | wall s | durable s | CPU s | peak RSS | read + written | throughput |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['source_bytes'] / GB:.2f} GB, {r['layers']} -> {r['layers_after']} layers"
        for method, name in (("cp", "`cp` of the shards"), ("local", "slm-dist merge, local"),
                             ("ray", "slm-dist merge, ray (driver)"), ("naive", "naive, in memory")):
            if method not in r["runs"]:
                continue
            b = best(r["runs"][method])
            durable = b["seconds"] + b["sync"]
            moved = (2 * r["source_bytes"] if method == "cp" else
                     b["summary"]["bytes_read"] + b["summary"]["bytes_written"] if "summary" in b else None)
            tput = f"{moved / durable / 1e6:.0f} MB/s" if moved else "-"
            moved_s = f"{moved / GB:.2f} GB" if moved else "-"
            lines.append(f"| {size} | {name} | {b['seconds']:.1f} | {durable:.1f} | {b['cpu_seconds']:.1f} | "
                         f"{b['peak_rss'] / 2**30:.2f} GiB | {moved_s} | {tput} |")
    lines += ["", "Against the goals:", ""]
    for r in rows:
        size = f"{r['source_bytes'] / GB:.2f} GB"
        runs = r["runs"]
        cp, loc = best(runs["cp"]), best(runs["local"])
        cp_tput = 2 * r["source_bytes"] / (cp["seconds"] + cp["sync"])
        s = loc["summary"]
        tput = (s["bytes_read"] + s["bytes_written"]) / (loc["seconds"] + loc["sync"])
        worst_local = max(x["peak_rss"] for x in runs["local"])
        lines.append(f"- {size}, local: peak RSS of the whole run {worst_local / 2**30:.2f} GiB at most over "
                     f"{len(runs['local'])} runs (goal < 1.5 GB: {verdict(worst_local < 1.5e9)}); throughput "
                     f"{tput / cp_tput:.2f}x that of `cp` (goal >= 0.5x: {verdict(tput >= 0.5 * cp_tput)}).")
        if "ray" in runs:
            worker = max(x["summary"]["peak_worker_rss_bytes"] for x in runs["ray"])
            driver = max(x["peak_rss"] for x in runs["ray"])
            lines.append(f"- {size}, ray: merge workers' peak RSS {worker / 2**30:.2f} GiB at most (goal < 1.5 GB: "
                         f"{verdict(worker < 1.5e9)}), "
                         f"driver {driver / 2**30:.2f} GiB; output byte-identical to local: "
                         f"{r.get('ray_identical')}.")
        if "naive" in runs:
            nv = best(runs["naive"])
            nv_fast = best(runs["naive"], durable=False)
            faster = loc["seconds"] + loc["sync"] <= nv["seconds"] + nv["sync"]
            lines.append(f"- {size}, naive (goal: local no slower: {verdict(faster)}): durable "
                         f"{nv['seconds'] + nv['sync']:.1f} s vs local "
                         f"{loc['seconds'] + loc['sync']:.1f} s ({(nv['seconds'] + nv['sync']) / (loc['seconds'] + loc['sync']):.2f}x; "
                         f"wall without its sync {nv_fast['seconds']:.1f} s, "
                         f"{nv_fast['seconds'] / (loc['seconds'] + loc['sync']):.2f}x); peak RSS "
                         f"{nv['peak_rss'] / 2**30:.2f} GiB vs {loc['peak_rss'] / 2**30:.2f} GiB; outputs equal "
                         f"tensor for tensor: {r.get('naive_equal')}.")
    lines += ["", "Where the time goes (CPU column): `cp` is one kernel copy per byte. Our merge also reads every "
              "output byte in user space to sha256 it for the manifest (copied tensors still move file to file "
              "with `copy_file_range`, as `cp` does; the hash runs on its own thread, overlapping the copy of the "
              "same bytes), merges the windows in float32, fsyncs every shard, and imports torch before any of "
              "that. The in-memory path loads, merges and saves the whole model at once."]
    return "\n".join(lines) + "\n"


def markdown_rules(rows: list[dict], machine: str, repeats: int, load: tuple[float, float]) -> str:
    """Issue 17's table: each merge rule against `cp` of the same source in the same run, per byte moved.

    Two figures per merge: the whole command (a new Python process: importing torch alone is about 2 s
    here, a fixed cost), and the merge stage itself (``seconds`` in merge.json: planning the shards,
    reading, merging, writing, hashing, fsyncing, the index and manifest)."""
    limits = {"drop": 1.2, "reference": 1.2, "sum": 1.5, "scaled": 1.5, "mean": 1.5}
    lines = [HEADING, "",
             f"`{shlex.join(['python3', *sys.argv])}` on {machine} (load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end). Random bf16 Llama (hidden {HIDDEN}, "
             f"intermediate {INTERMEDIATE}, GQA {HEADS}/{KV_HEADS}, vocab {VOCAB}) in 1 GiB shards; 25% of its layers "
             "merged (windows of 4) by each rule; `merge.max_parallel: 2`, `merge.memory_budget_bytes: 512 MiB`; "
             "per-file hash xxh3_128. Each command in its own process under `/usr/bin/time -v`, warm page cache, "
             f"after a `sync` and a pause; {repeats} runs in rotating order, the fastest shown. Durable = wall + the "
             "`sync` after it (our merge fsyncs; `cp` does not). A merge moves fewer bytes than `cp` of the source "
             "(25% of the layers are not written), so the ratios are per byte moved (read + written): the goal is "
             "'the time of `cp` for the same bytes'. Peak RSS (file-backed pages included) bounds the anonymous "
             "memory from above.", "",
             "| source | path | durable s | per byte vs `cp`: command | merge stage s | per byte vs `cp`: stage | "
             "goal (per byte, memory) | CPU s | peak RSS | read + written |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        size = f"{r['source_bytes'] / GB:.2f} GB, {r['layers']} -> {r['layers_after']} layers"
        cp = best(r["runs"]["cp"])
        cp_s = cp["seconds"] + cp["sync"]
        cp_per_byte = cp_s / (2 * r["source_bytes"])
        lines.append(f"| {size} | `cp` of the shards | {cp_s:.1f} | 1.00x | | | | {cp['cpu_seconds']:.1f} | "
                     f"{cp['peak_rss'] / 2**30:.2f} GiB | {2 * r['source_bytes'] / GB:.2f} GB |")
        for method, runs in r["runs"].items():
            if not method.startswith("local"):
                continue
            rule = method.partition(":")[2] or "sum"
            b = best(runs)
            durable = b["seconds"] + b["sync"]
            worst = max(x["peak_rss"] for x in runs)
            moved = b["summary"]["bytes_read"] + b["summary"]["bytes_written"]
            command, stage = durable / moved / cp_per_byte, b["summary"]["seconds"] / moved / cp_per_byte
            memory_ok = worst < 2**30
            goal = (f"<= {limits[rule]}x: command {verdict(command <= limits[rule] and memory_ok)}, "
                    f"stage {verdict(stage <= limits[rule] and memory_ok)}")
            lines.append(f"| {size} | merge `{rule}` | {durable:.1f} | {command:.2f}x | {b['summary']['seconds']:.1f} | "
                         f"{stage:.2f}x | {goal} | {b['cpu_seconds']:.1f} | {worst / 2**30:.2f} GiB | "
                         f"{moved / GB:.2f} GB |")
    return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[4.2, 8.5])
    parser.add_argument("--naive-up-to-gb", type=float, default=5.0, help="run the naive path up to this size")
    parser.add_argument("--ray-up-to-gb", type=float, default=5.0, help="run the ray backend up to this size")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm-bench-merge"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command; the fastest is reported")
    parser.add_argument("--settle-s", type=float, default=3.0, help="pause after the sync before each command")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                        help="Markdown file whose issue-4 section is replaced")
    parser.add_argument("--rules", nargs="+", default=None, choices=["drop", "reference", "sum", "mean", "scaled"],
                        help="time each rule against cp (issue 17's table, under --heading) instead of issue 4's")
    parser.add_argument("--heading", default=None, help="RESULTS.md section to replace (default: the issue's)")
    parser.add_argument("--json-out", type=Path, default=Path("/tmp/bench_merge.json"), help="raw figures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    need = max(args.sizes_gb) * GB * 3.4 + 2 * GB   # source, local and naive outputs, cp copy
    probe = args.workdir if args.workdir.exists() else args.workdir.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise SystemExit(f"need {need / GB:.0f} GB free under {probe}, have {free / GB:.0f} GB")
    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists: remove it (a previous run's leftovers) first")
    args.workdir.mkdir(parents=True)
    load_start = os.getloadavg()[0]
    rows = []
    try:
        for size in args.sizes_gb:
            rows.append(bench_size(args.workdir, size, size <= args.naive_up_to_gb, size <= args.ray_up_to_gb,
                                   args.repeats, args.settle_s, tuple(args.rules or ("sum",))))
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    machine = f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    global HEADING
    HEADING = args.heading or (RULES_HEADING if args.rules else HEADING)
    render = markdown_rules if args.rules else markdown
    section = render(rows, machine, args.repeats, (load_start, os.getloadavg()[0]))
    args.json_out.write_text(json.dumps(rows, indent=2, default=str))
    if args.results is not None:
        write_section(HEADING, section, args.results)
    sys.stdout.write(section)


if __name__ == "__main__":
    main()
