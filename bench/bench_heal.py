"""Healing measured: SmolLM2-135M pruned by 10 of 30 layers, then a short LoRA healing run
(DeepSpeed ZeRO-2 on Ray Train workers) on the demo calibration text; held-out perplexity of the
dense, pruned and healed models, as ratios to the dense model measured in the same run.

    python bench/bench_heal.py [--run-dir runs/heal-bench] [heal key=value ...]

The pruning run is reused when ``RUN_DIR`` already holds a finished one (its eval.json); the
healing run resumes from its Ray Train checkpoints when interrupted. Both are the real CLI:

    slm-dist run configs/default.yaml run.dir=RUN_DIR plan.target_layers_removed=10
    slm-dist heal RUN_DIR <HEAL_DEFAULTS> [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Short sequences and a small batch: two CPU workers do a few hundred steps in tens of minutes.
HEAL_DEFAULTS = ("cluster.num_workers=2", "heal.max_steps=300", "heal.batch_size=8", "heal.micro_batch_size=4",
                 "heal.cutoff_len=64", "heal.lr=2e-4", "heal.warmup_steps=20", "heal.checkpoint_every=50")


def cli(*args: str) -> float:
    """Run `slm-dist ARGS`; wall seconds."""
    cmd = [sys.executable, "-m", "slm_dist.cli", "-q", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/heal-bench"))
    parser.add_argument("overrides", nargs="*", help="heal.* / cluster.* key=value for the healing run")
    args = parser.parse_args()
    run_dir = args.run_dir

    if not (run_dir / "eval.json").is_file():
        wall = cli("run", "configs/default.yaml", f"run.dir={run_dir}", "plan.target_layers_removed=10")
        print(f"slm-dist run (prune 10 of 30 layers): {wall:.0f} s")
    evaluation = json.loads((run_dir / "eval.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    heal_args = [*HEAL_DEFAULTS, *args.overrides]
    wall = cli("heal", str(run_dir), *heal_args)
    summary = json.loads((run_dir / "heal" / "heal.json").read_text())

    dense, pruned, healed = evaluation["perplexity_before"], summary["perplexity_before_heal"], \
        summary["perplexity_healed"]
    history = summary["history"]
    print(f"slm-dist heal {run_dir} {' '.join(heal_args)}")
    print(f"  {summary['total_steps']} steps on {summary['num_examples']} {summary['kind']} examples, "
          f"wall {wall:.0f} s "
          f"(restarts at steps {summary['starts']}); train loss {history[0]['loss']:.3f} (step 1) -> "
          f"{sum(h['loss'] for h in history[-10:]) / len(history[-10:]):.3f} (mean of the last 10 steps)")
    print(f"\nheld-out perplexity ({Path(summary['perplexity_text']).name}, same windows for every model)")
    print("| model | layers | perplexity | ratio to dense |\n|---|---:|---:|---:|")
    before, after = report["layers_before"], report["layers_after"]
    for name, layers, ppl in (("dense", before, dense), ("pruned", after, pruned), ("pruned + healed", after, healed)):
        print(f"| {name} | {layers} | {ppl:.2f} | {ppl / dense:.2f}x |")


if __name__ == "__main__":
    main()
