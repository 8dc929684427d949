"""A stage's own costs (issue 3), on SmolLM2-135M, in one process: statistics time and load memory.

    python bench/bench_statistics.py [--threads 1] [--repeats 4] [--batch 4x256 --batch 8x256]

Memory: the process first builds a stage of a 2-layer hidden-32 model (so torch, transformers and
the model code are imported and warm), then the SmolLM2 stage; its peak RSS growth over the RSS
before, divided by the bytes of the weights the stage holds, is the load overhead (no Ray here:
bench_calibration.py measures the actors).

A `StageWorker` holding all 30 layers runs `forward` and then `calibrate` (the same forward plus,
per layer, the token-unit Gram of 512 sampled rows and the Block Influence / angular cosines) on the
same batch, alternately, ``--repeats`` times; the best of each is kept and their difference is the
cost of the statistics, printed as a share of the forward. This is the figure behind the goal
"statistics at most 10% of forward time"; bench_calibration.py measures the whole Ray pipeline.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from slm_dist.assets import default_cache_dir, prepare_demo_assets
from slm_dist.testing import make_tiny_model
from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec

log = logging.getLogger("bench_statistics")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other jobs)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="sampled token rows per batch (the Gram is m x m)")
    parser.add_argument("--batch", action="append", help="BATCHxSEQ (default: 4x256 and 8x256)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    demo = prepare_demo_assets(default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(Path(tmp) / "tiny", num_layers=2, hidden=32)
        StageWorker(StageSpec(str(Path(tmp) / "tiny"), 0, 2, 2)).forward(torch.randint(0, 20, (1, 8)))
    before = memory_mib()
    stage = StageWorker(StageSpec(str(demo.model_dir), 0, 30, 30), StatsSpec(tokens_per_batch=args.tokens))
    held = stage.held_bytes() / 2**20
    growth = memory_mib()["VmHWM"] - before["VmRSS"]
    print(f"Load: {held:.0f} MiB of weights held (float32 from a bf16 checkpoint); peak RSS grew {growth:.0f} MiB "
          f"while loading: {growth / held:.2f}x the weights held.\n")
    print("| batch x seq | forward s | forward + statistics s | statistics / forward |")
    print("|---|---|---|---|")
    for shape in args.batch or ["4x256", "8x256"]:
        b, s = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, stage.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
        stage.forward(ids), stage.calibrate(0, ids)  # warm-up
        forward = calibrate = float("inf")
        for r in range(args.repeats):  # alternate, so both see the same machine
            forward = min(forward, seconds(lambda: stage.forward(ids)))
            calibrate = min(calibrate, seconds(lambda: stage.calibrate(r, ids)))
        print(f"| {b} x {s} | {forward:.3f} | {calibrate:.3f} | {(calibrate - forward) / forward:.1%} |")


if __name__ == "__main__":
    main()
