"""Calibration benchmark (issue 3): the Ray stage pipeline against one process running the HF model.

For each model (SmolLM2-135M from the demo cache, and a wider random Llama, hidden 2048), on the same
calibration batches and in the same run:

- baseline: one process loads the full HF model (float32) and, per batch, runs it with
  ``output_hidden_states=True`` and computes the same statistics (token-unit Grams of every layer,
  unbiased HSIC of all pairs, float64 sums) - what a user would write without slm-dist;
- the Ray pipeline (``RayBackend.calibrate``) with 1 and 2 stages on a private local Ray instance,
  the stages splitting this machine's cores;
- in one process, a ``StageWorker`` holding every layer: ``forward`` against ``calibrate`` on the same
  batch gives the time the statistics add to the forward pass; the reducer's HSIC per batch is timed too.

Throughput: all calibration tokens over the wall time of the whole calibration (pipeline fill and
drain included; actor start and weight loading left out on the Ray side, model loading on the
baseline's); the three are run in interleaved rounds and each figure is the best of ``--repeats``.
Memory: each stage actor's peak RSS against the bytes of the layers it holds, after subtracting the
fixed runtime of a stage process (measured in the same run as the peak RSS of a stage holding a
2-layer hidden-32 model); the driver's RSS is sampled every 20 ms during calibration. Models are
built in child processes so the driver never holds weights.

Run: ``python3 bench/bench_calibration.py`` (a few minutes on 2 cores); it prints a Markdown section
and writes it into bench/RESULTS.md under "## Calibration (issue 3)".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from slm_dist import host_memory

HEADING = "## Calibration (issue 3)"
SWEEP_FRACTIONS = (1 / 3, 2 / 3, 1.0)  # layer counts of the memory sweep, as fractions of the model's
log = logging.getLogger("bench_calibration")


# ---------------------------------------------------------------------------------------- models
def wide_model(root: Path, hidden: int, layers: int) -> Path:
    from slm_dist.testing import make_tiny_model

    out = root / f"wide-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        make_tiny_model(out, num_layers=layers, hidden=hidden, max_shard_size="512MB",
                        num_attention_heads=16, num_key_value_heads=4, intermediate_size=int(hidden * 2.75))
    return out


def first_layers_model(src: Path, root: Path, layers: int) -> Path:
    """``src`` cut to its first ``layers`` decoder layers (embedding, final norm and head kept): a model
    whose one stage holds fewer layers of the same shape, for the memory-per-layer sweep."""
    from safetensors.torch import load_file, save_file

    from slm_dist.arch import get_arch, prune_config
    from slm_dist.checkpoint.index import open_index

    out = root / f"{src.name}-first{layers}"
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    index = open_index(src)
    arch = get_arch(index.model_type)
    keep = {}
    for file in sorted({info.file for info in index.tensors.values()}):
        for key, value in load_file(src / file).items():
            split = arch.split_key(key)
            if split is None or split[0] < layers:
                keep[key] = value
    config = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(prune_config(config, list(range(layers)), arch), indent=2))
    save_file(keep, out / "model.safetensors", metadata={"format": "pt"})
    return out


def calibration_ids(model_dir: Path, text: Path | None, samples: int, seq_len: int) -> torch.Tensor:
    if text is None:  # the random model's vocabulary is tiny and meaningless: random ids do as well
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        return torch.randint(3, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    from slm_dist import calibration
    from slm_dist.context import load_tokenizer

    return calibration.load_calibration(text, load_tokenizer(model_dir), samples, seq_len, seed=0)


def batches_of(ids: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    return [(i // batch_size, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]




# ------------------------------------------------------------------------ child: one-process jobs
def child_baseline(args) -> dict:
    """The HF model in one process: forward with output_hidden_states, then the same statistics."""
    from transformers import AutoModelForCausalLM

    from slm_dist.core import similarity
    from slm_dist.testing import hf_layer_outputs

    ids = torch.load(args.ids)
    batches = batches_of(ids, args.batch_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=False).eval()
    n = model.config.num_hidden_layers
    best = 0.0
    for _ in range(args.repeats):
        acc = similarity.HsicAccumulator(n + 1)
        start = time.perf_counter()
        for batch_id, x in batches:
            reps = hf_layer_outputs(model, x)  # the last layer's output before the final norm
            b, s = x.shape
            index = similarity.sample_token_index(b, s, args.tokens, 0, batch_id, skip_first=True)
            grams = torch.stack([similarity.gram(similarity.layer_representation(r, "token", index), "linear")
                                 for r in reps])
            acc.add(batch_id, similarity.hsic_matrix(grams))
        best = max(best, ids.numel() / (time.perf_counter() - start))
    return {"tokens_per_s": best, "cka": acc.cka().tolist()}


def child_stats_cost(args) -> dict:
    """One StageWorker holding every layer: forward alone vs forward + statistics, per batch."""
    from slm_dist.core import similarity
    from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec

    ids = torch.load(args.ids)
    batches = batches_of(ids, args.batch_size)
    n = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    worker = StageWorker(StageSpec(args.model, 0, n, n), StatsSpec(tokens_per_batch=args.tokens))
    forward, calibrate, reduce = [], [], []
    for _ in range(args.repeats):
        for batch_id, x in batches:
            t = time.perf_counter()
            worker.forward(x)
            forward.append(time.perf_counter() - t)
            t = time.perf_counter()
            _, stats = worker.calibrate(batch_id, x)
            calibrate.append(time.perf_counter() - t)
            t = time.perf_counter()
            similarity.hsic_matrix(stats.grams.double())
            reduce.append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"forward_s": med(forward), "calibrate_s": med(calibrate), "reduce_s": med(reduce),
            "held_bytes": worker.held_bytes()}


# --------------------------------------------------------------------------- driver: Ray pipeline
class RssSampler:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.before = self.peak = host_memory.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, host_memory.rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, host_memory.rss_bytes())


class RayPipeline:
    """A RayBackend with its stages started and loaded, timed one whole calibration at a time."""

    def __init__(self, model: Path, num_stages: int, args):
        from slm_dist.backends.ray import RayBackend
        from slm_dist.checkpoint.index import open_index
        from slm_dist.config import load_config
        from slm_dist.context import stage_specs
        from slm_dist.workers.stage_worker import StatsSpec

        cores = os.cpu_count() or 1
        cfg = load_config(None, [f"model.path={model}", "cluster.backend=ray", f"cluster.num_stages={num_stages}",
                                 f"cluster.cpus_per_stage={max(1, cores // num_stages)}",
                                 f"cluster.max_inflight={args.max_inflight}", "model.dtype=float32"])
        self.specs = stage_specs(cfg, open_index(model), model)
        self.stats = StatsSpec(tokens_per_batch=args.tokens)
        self.backend = RayBackend(cfg.cluster)
        self.best, self.driver_delta, self.cka = 0.0, 0, None

    def measure(self, batches) -> None:
        if not self.backend.stage_handles():  # start the actors and load the layers, untimed
            self.backend.calibrate(self.specs, self.stats, batches[:1])
        with RssSampler() as rss:
            start = time.perf_counter()
            reducer = self.backend.calibrate(self.specs, self.stats, batches)
            elapsed = time.perf_counter() - start
        self.best = max(self.best, sum(ids.numel() for _, ids in batches) / elapsed)
        self.driver_delta = max(self.driver_delta, rss.peak - rss.before)
        self.cka = reducer.cka()

    def finish(self) -> dict:
        try:
            reports = self.backend.stage_reports()
        finally:
            self.backend.close()
        return {"tokens_per_s": self.best, "cka": self.cka.tolist(), "driver_peak_delta": self.driver_delta,
                "stages": [{k: r[k] for k in ("start", "stop", "held_bytes", "peak_rss_bytes", "shared_rss_bytes",
                                              "baseline_rss_bytes")}
                           for r in reports]}


def stage_runtime_overhead(root: Path, args) -> int:
    """Peak RSS of a stage actor whose weights are negligible: the fixed cost of a stage process."""
    from slm_dist.testing import make_tiny_model

    model = root / "overhead-h32-l2"
    if not (model / "config.json").exists():
        make_tiny_model(model, num_layers=2, hidden=32)
    ids = torch.randint(3, 60, (args.batch_size * 2, args.seq_len), generator=torch.Generator().manual_seed(0))
    pipeline = RayPipeline(model, 1, args)
    pipeline.measure(batches_of(ids, args.batch_size))
    stage = pipeline.finish()["stages"][0]
    return stage["peak_rss_bytes"] - stage["shared_rss_bytes"]


def memory_sweep(model_dir: Path, num_layers: int, batches, args) -> list[dict]:
    """One 1-stage pipeline per layer count (the model cut to its first L layers, in a child
    process), each loaded and run over every batch: its held bytes and private peak."""
    points = []
    for layers in sorted({max(1, round(num_layers * f)) for f in SWEEP_FRACTIONS}):
        cut = model_dir
        if layers < num_layers:
            made = subprocess.run([sys.executable, __file__, "--child", "first-layers", "--model", str(model_dir),
                                   "--layers", str(layers), "--workdir", str(args.workdir)],
                                  capture_output=True, text=True, check=True)
            cut = Path(json.loads(made.stdout.strip().splitlines()[-1])["path"])
        pipeline = RayPipeline(cut, 1, args)
        pipeline.measure(batches)
        stage = pipeline.finish()["stages"][0]
        points.append({"layers": layers, "held_bytes": stage["held_bytes"],
                       "private_peak_bytes": stage["peak_rss_bytes"] - stage["shared_rss_bytes"]})
    return points


def fit_line(points: list[dict]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of private peak against held bytes."""
    xs = [p["held_bytes"] for p in points]
    ys = [p["private_peak_bytes"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def run_child(mode: str, model: Path, ids_path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--ids", str(ids_path),
           "--batch-size", str(args.batch_size), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- report
def section(rows: list[dict], overhead: int, load: tuple[float, float], args) -> str:
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [HEADING, "",
             f"`python3 bench/bench_calibration.py` on {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
             f"no GPU; {args.samples} samples (wide model: {args.wide_samples}) x {args.seq_len} tokens, batches of "
             f"{args.batch_size}, token unit "
             f"with {args.tokens} sampled tokens per batch, float32; best of {args.repeats} interleaved rounds. "
             f"Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end: above "
             f"{os.cpu_count()} means other jobs shared the cores, and single figures are then noisy.", "",
             "| model | params | single process tokens/s | Ray 1 stage tokens/s (ratio) "
             "| Ray 2 stages tokens/s (ratio) "
             "| statistics / forward | reducer HSIC / forward | max abs CKA diff Ray vs single |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r["baseline"]["tokens_per_s"]
        one, two = r["ray1"]["tokens_per_s"], r["ray2"]["tokens_per_s"]
        st = r["stats"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.0f} M | {base:.0f} | {one:.0f} ({one / base:.2f}x) | "
            f"{two:.0f} ({two / base:.2f}x) | {(st['calibrate_s'] - st['forward_s']) / st['forward_s']:.1%} | "
            f"{st['reduce_s'] / st['forward_s']:.1%} | {r['cka_diff']:.1e} |")
    lines += ["", "Stage memory: peak RSS of each stage actor, and inside it the pages of Ray's shared object store "
              "the actor had mapped (RssShmem at the end: hidden states and statistics passing through the store, "
              "which scale with batch x sequence x hidden and `cluster.max_inflight`, not with the weights). "
              "Private peak = peak - store pages. Fixed runtime of a stage process, measured the same way on a "
              f"stage holding a 2-layer hidden-32 model: {mib(overhead)}.", "",
              "| model | stages | stage layers | held weights | peak RSS | object-store pages | "
              "(private peak - runtime) / held |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        for key, label in (("ray1", 1), ("ray2", 2)):
            for s in r[key]["stages"]:
                private = s["peak_rss_bytes"] - s["shared_rss_bytes"]
                ratio = (private - overhead) / s["held_bytes"]
                lines.append(f"| {r['name']} | {label} | [{s['start']}, {s['stop']}) | {mib(s['held_bytes'])} | "
                             f"{mib(s['peak_rss_bytes'])} | {mib(s['shared_rss_bytes'])} | {ratio:.2f}x |")
    lines += ["", "Memory per byte held: the same model cut to its first L layers, one 1-stage pipeline per L "
              "(load, then every calibration batch), private peak against held bytes. The slope is what each "
              "byte of weights costs; the intercept is what a stage costs whatever it holds: the runtime above "
              "plus one layer's activations and the heap they leave at this batch shape (batch x seq x hidden).",
              "", "| model | layers held | held weights | private peak |", "|---|---|---|---|"]
    for r in rows:
        for pt in r["sweep"]:
            lines.append(f"| {r['name']} | {pt['layers']} | {mib(pt['held_bytes'])} | {mib(pt['private_peak_bytes'])} |")
    lines += [""]
    for r in rows:
        slope, intercept = fit_line(r["sweep"])
        lines.append(f"- {r['name']}: private peak = {slope:.2f} x held + {mib(intercept)} (least squares over "
                     f"{len(r['sweep'])} layer counts)")
    lines += ["", "Driver memory during calibration (peak RSS minus RSS before the call; the driver holds batch "
              "ids, object references and the final float64 sums, never weights or activations):", "",
              "| model | held weights (all stages) | driver peak growth, 1 stage | driver peak growth, 2 stages |",
              "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {mib(sum(s['held_bytes'] for s in r['ray1']['stages']))} | "
                     f"{mib(r['ray1']['driver_peak_delta'])} | {mib(r['ray2']['driver_peak_delta'])} |")
    lines += ["", "Goals (issue 3): pipeline >= 0.9x the single process on one machine; statistics <= 10% of forward "
              "time; stage private peak <= 1.3x held weights plus a fixed overhead (the sweep's slope and intercept); "
              "driver memory independent of model size.", ""]
    return "\n".join(lines)


def update_results(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(HEADING) + r"\n.*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda m: text.rstrip("\n"), old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new if new.endswith("\n") else new + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["baseline", "stats", "make-wide", "first-layers"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["smollm2", "wide"], choices=["smollm2", "wide"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512,
                        help="sampled tokens per batch (similarity.tokens_per_batch)")
    parser.add_argument("--wide-hidden", type=int, default=2048)
    parser.add_argument("--wide-layers", type=int, default=6)
    parser.add_argument("--wide-samples", type=int, default=16, help="calibration samples for the wide model")
    parser.add_argument("--max-inflight", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slm-bench-calibration"))
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()

    if args.child:
        torch.set_num_threads(os.cpu_count() or 1)
        if args.child == "make-wide":
            result = {"path": str(wide_model(args.workdir, args.wide_hidden, args.wide_layers))}
        elif args.child == "first-layers":
            result = {"path": str(first_layers_model(args.model, args.workdir, args.layers))}
        else:
            result = child_baseline(args) if args.child == "baseline" else child_stats_cost(args)
        print(json.dumps(result))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the private cluster and this driver agree
    import ray

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = []
    for name in args.models:
        if name == "smollm2":
            from slm_dist import assets

            cache = assets.default_cache_dir()
            if not (cache / assets.MODEL_DIRNAME / assets.MARKER_NAME).exists():
                log.warning("SmolLM2 is not cached under %s; skipping it", cache)
                continue
            demo = assets.prepare_demo_assets(cache)
            models.append(("SmolLM2-135M", demo.model_dir, demo.calibration_text, args.samples))
        else:
            # Built in a child process: the driver never holds weights, so its memory figures stay clean.
            made = subprocess.run([sys.executable, __file__, "--child", "make-wide", "--workdir", str(args.workdir),
                                   "--wide-hidden", str(args.wide_hidden), "--wide-layers", str(args.wide_layers)],
                                  capture_output=True, text=True, check=True)
            models.append((f"random Llama h{args.wide_hidden} x{args.wide_layers}",
                           Path(json.loads(made.stdout.strip().splitlines()[-1])["path"]), None, args.wide_samples))

    # Logical CPUs: the 1-stage and 2-stage pipelines each reserve every core, idle while the other runs.
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    rows = []
    load_start = os.getloadavg()[0]
    try:
        overhead = stage_runtime_overhead(args.workdir, args)
        for name, model_dir, text, samples in models:
            ids = calibration_ids(model_dir, text, samples, args.seq_len)
            ids_path = args.workdir / "ids.pt"
            torch.save(ids, ids_path)
            batches = batches_of(ids, args.batch_size)
            log.info("%s: statistics cost", name)
            stats = run_child("stats", model_dir, ids_path, args)
            # Interleaved rounds (baseline, 1 stage, 2 stages), best of each: load from other jobs on a
            # shared machine then hits all three alike instead of whichever ran during a busy spell.
            pipelines = {k: RayPipeline(model_dir, k, args) for k in (1, 2)}
            baseline = {"tokens_per_s": 0.0}
            for round_ in range(args.repeats):
                log.info("%s: round %d: baseline, ray 1 stage, ray 2 stages", name, round_ + 1)
                once = run_child("baseline", model_dir, ids_path, argparse.Namespace(**{**vars(args), "repeats": 1}))
                if once["tokens_per_s"] > baseline["tokens_per_s"]:
                    baseline = once
                for pipeline in pipelines.values():
                    pipeline.measure(batches)
            ray1, ray2 = pipelines[1].finish(), pipelines[2].finish()
            log.info("%s: memory sweep over layer counts", name)
            num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
            sweep = memory_sweep(model_dir, num_layers, batches, args)
            cka_diff = max(float((torch.tensor(r["cka"]) - torch.tensor(baseline["cka"])).abs().max())
                           for r in (ray1, ray2))
            from slm_dist.checkpoint.index import layer_params, open_index

            rows.append({"name": name, "params": layer_params(open_index(model_dir))[0], "baseline": baseline,
                         "stats": stats, "ray1": ray1, "ray2": ray2, "sweep": sweep, "cka_diff": cka_diff})
    finally:
        ray.shutdown()
    text = section(rows, overhead, (load_start, os.getloadavg()[0]), args)
    print(text)
    if not args.no_write:
        update_results(args.results, text)
        log.info("wrote the %r section of %s", HEADING, args.results)


if __name__ == "__main__":
    main()
