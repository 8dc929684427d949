"""`calibration.cache_stride` measured (issue 19): the planning cache of one layer in n against every layer's.

    python bench/bench_cache_stride.py [--samples 512] [--strides 1 5] [--no-write]

Planning by calibration loss (``plan.search: sleb | global``, the output criterion, the fitted corrections)
reruns candidate plans from the lowest changed layer on cached inputs. With ``cache_stride: 1`` each stage
keeps every layer's input for every calibration batch; with n it keeps one layer in n and recomputes the
others from the nearest kept one below, with the original layers, when a trial or a fit reads them.

For each stride, in a fresh child process (so ``ru_maxrss`` is that stride's own peak), one in-process stage
(``cluster.backend: local``, the whole SmolLM2-135M, float32, as bench_baselines runs it) of
``configs/best.yaml`` with ``calibration.num_samples=--samples``:

- calibrates once, keeping the inputs (time; resident memory after);
- runs SLEB's first step: every single-layer removal 1..28 scored by calibration NLL on
  ``plan.score_batches`` batches, as `plan.search: sleb` does (time; the 28 losses);
- fits `refit` on the window SLEB's search picks at k=6 (12-18) over all calibration batches (time; the map).

Against stride 1 in the same run: the losses and the fitted map must be equal (the recompute is exact), the
peak resident memory falls, the trials and the fit cost the recomputed layers. ``slm-dist plan --dry-run``'s
cached-input figure for the same settings is printed beside the measured difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

from compare_common import RESULTS, write_section

log = logging.getLogger("bench_cache_stride")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "best.yaml"
WINDOW = (12, 18)  # SLEB's k=6 window on SmolLM2 (bench/RESULTS.md, issue 19)
TITLE = "## Calibration inputs kept one layer in n (issue 19)"


def config_for(samples: int, stride: int):
    from slm_dist.config import load_config

    batches = samples // 8  # best.yaml's batch size
    return load_config(CONFIG, [f"calibration.num_samples={samples}", f"calibration.cache_stride={stride}",
                                f"plan.score_batches={min(4, batches)}", f"merge.correction_batches={min(32, batches)}",
                                "cluster.backend=local", "cluster.num_stages=1", "run.dir=/tmp/bench-cache-stride"])


def child(samples: int, stride: int) -> dict:
    """One stride's measurements (run in its own process)."""
    import torch

    from slm_dist import context
    from slm_dist.assets import default_cache_dir
    from slm_dist.backends.local import LocalBackend
    from slm_dist.calibration import load_calibration
    from slm_dist.checkpoint.index import open_index
    from slm_dist.core import baselines
    from slm_dist.host_memory import rss_bytes

    torch.set_num_threads(2)
    config = config_for(samples, stride)
    ctx = context.resolve_inputs(config, default_cache_dir(), show_progress=False)
    index = open_index(ctx.model_dir)
    specs = context.stage_specs(config, index, ctx.model_dir)
    c = config.calibration
    ids = load_calibration(ctx.calibration_source, context.load_tokenizer(ctx.model_dir), c.num_samples, c.seq_len,
                           c.seed)
    batches = context.batches(ids, c.batch_size)
    backend = LocalBackend()
    start = time.perf_counter()
    backend.calibrate(specs, context.stats_spec(config), batches, keep_for_output_criterion=True)
    calibrate_s = time.perf_counter() - start
    rss_after_calibrate = rss_bytes()
    n = specs[0].num_layers
    start = time.perf_counter()
    losses = [backend.score_plan(baselines.removal_windows(n, [i]), "drop", None, "nll",
                                 num_batches=config.plan.score_batches) for i in range(1, n - 1)]
    trials_s = time.perf_counter() - start
    start = time.perf_counter()
    fit = backend.fit_corrections([(WINDOW, "drop", None, "refit")], len(batches))[0]
    fit_s = time.perf_counter() - start
    matrix = fit.matrix.double()
    return {"stride": stride, "samples": samples, "batches": len(batches), "calibrate_s": calibrate_s,
            "trials": len(losses), "trials_s": trials_s, "fit_s": fit_s, "losses": losses,
            "fit_loss": fit.loss, "fit_ridge": fit.ridge, "map_sum": float(matrix.sum()),
            "map_abs": float(matrix.abs().sum()),
            "rss_after_calibrate": rss_after_calibrate,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def predicted_cache_bytes(samples: int, stride: int) -> int:
    """`slm-dist plan --dry-run`'s cached calibration inputs for this stage (the same settings, one stage)."""
    from slm_dist import dryrun
    from slm_dist.assets import default_cache_dir, prepare_demo_assets

    config = config_for(samples, stride)
    estimate = dryrun.dry_run(config, prepare_demo_assets(default_cache_dir()).model_dir)
    return sum(s.cached_bytes for s in estimate.stages)


def section(results: list[dict]) -> str:
    base = results[0]
    gib = 2 ** 30
    lines = [TITLE, "",
             f"`python bench/bench_cache_stride.py --samples {base['samples']} --strides "
             f"{' '.join(str(r['stride']) for r in results)}`: `configs/best.yaml` with "
             f"`calibration.num_samples={base['samples']}` ({base['batches']} batches of 8 x 256 tokens), one in-process "
             "stage holding all 30 layers of SmolLM2-135M (float32), each stride in its own process. Trials: SLEB's "
             f"first step ({base['trials']} single-layer removals, NLL on `plan.score_batches` batches); fit: `refit` "
             f"on window {list(WINDOW)} over every batch. Ratios against stride {base['stride']} in the same run.", "",
             "| stride | calibrate s | trials s (x) | fit s (x) | RSS after calibrate GiB | peak RSS GiB | "
             "cache predicted GiB | max loss diff | map equal |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        same_map = r["map_sum"] == base["map_sum"] and r["map_abs"] == base["map_abs"] and r["fit_ridge"] == base["fit_ridge"]
        lines.append(f"| {r['stride']} | {r['calibrate_s']:.1f} | {r['trials_s']:.1f} ({r['trials_s'] / base['trials_s']:.2f}x) "
                     f"| {r['fit_s']:.1f} ({r['fit_s'] / base['fit_s']:.2f}x) | {r['rss_after_calibrate'] / gib:.2f} "
                     f"| {r['peak_rss'] / gib:.2f} | {r['predicted_cache'] / gib:.2f} | {diff:.1e} | "
                     f"{'yes' if same_map else 'NO'} |")
    saved = (base["rss_after_calibrate"] - results[-1]["rss_after_calibrate"]) / gib
    predicted = (base["predicted_cache"] - results[-1]["predicted_cache"]) / gib
    lines += ["", f"Resident memory after calibration, stride {base['stride']} minus stride {results[-1]['stride']}: "
              f"{saved:.2f} GiB measured, {predicted:.2f} GiB predicted by the dry run."]
    return "\n".join(lines) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    if args.child is not None:
        sys.stdout.write(json.dumps(child(args.samples, args.child)) + "\n")
        return 0
    results = []
    for stride in args.strides:
        log.info("stride %d: calibrating %d samples in a child process", stride, args.samples)
        out = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--child", str(stride)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        result["predicted_cache"] = predicted_cache_bytes(args.samples, stride)
        log.info("stride %d: %s", stride, {k: v for k, v in result.items() if k != "losses"})
        results.append(result)
    body = section(results)
    sys.stdout.write(body)
    if not args.no_write:
        write_section(TITLE, body, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
