"""The demo run measured: wall time and peak memory of `slm-dist run`, then held-out perplexity of
the same plan merged with every rule, as ratios to the dense model measured in the same run.

    python bench/bench_demo.py [--run-dir /tmp/bench-demo] [key=value ...]

The windows come from one CKA calibration (the demo's: 6 of 30 layers); each rule is applied to
those same windows, so the figures differ only by the merge rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from slm_dist import context
from slm_dist.backends.local import LocalBackend
from slm_dist.checkpoint.export import plan_export, write_export
from slm_dist.checkpoint.index import open_index
from slm_dist.config import load_config
from slm_dist.core.planner import MergePlan
from slm_dist.workers.merge_worker import run_jobs_in_threads

log = logging.getLogger("bench_demo")
RULES = ("reference", "sum", "mean", "drop")


def timed_run(run_dir: Path, overrides: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the CLI run, measured by /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "slm_dist.cli", "-q", "run", "configs/default.yaml",
           f"run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"slm-dist run failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, peak_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/bench-demo"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shutil.rmtree(args.run_dir, ignore_errors=True)

    wall, peak = timed_run(args.run_dir, args.overrides)
    report = json.loads((args.run_dir / "report.json").read_text())
    print(f"slm-dist run (demo): wall {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB; "
          f"stages {report['seconds']}")

    config = load_config(args.run_dir / "config.resolved.yaml")
    ctx = context.resolve_inputs(config, None, show_progress=False)
    plan = MergePlan.from_json(json.loads((args.run_dir / "plan.json").read_text()))
    index = open_index(ctx.model_dir)
    backend = LocalBackend()
    dense = context.perplexity(ctx, ctx.model_dir, backend)
    rows = [("dense", 30, dense)]
    for rule in RULES:
        out = args.run_dir / f"model-{rule}"
        shutil.rmtree(out, ignore_errors=True)
        write_export(plan_export(index, replace(plan, rule=rule), out, config.merge.max_shard_bytes), run_jobs_in_threads)
        rows.append((rule, plan.num_layers_after, context.perplexity(ctx, out, backend)))
        shutil.rmtree(out)
    print(f"\nwindows {list(plan.windows)} (CKA, threshold {plan.threshold:.4f}); held-out perplexity, "
          f"{config.eval.max_windows} windows x {config.eval.seq_len} tokens")
    print("| rule | layers | perplexity | ratio to dense |\n|---|---|---|---|")
    for name, layers, ppl in rows:
        print(f"| {name} | {layers} | {ppl:.2f} | {ppl / dense:.2f}x |")


if __name__ == "__main__":
    main()
