"""Correction families on held-out calibration batches (issue 8): which fit closes more of the gap?

SmolLM2-135M from the demo cache, one window removed (default 12-18, the 6-layer plan of the global
search), merged by ``drop``. One calibration pass of ``--samples`` sequences; the last
``--held-out`` batches are never fitted on. For ``merge.correction`` none / linear / refit, each
fitted on the first N batches (``--fit-batches``), the script measures next-token NLL on the
held-out batches (the stage pipeline run from the window upward, as the global search does) and
prints, against the dense model and the plain merge measured in the same run, the share of the
plain merge's excess NLL each correction removes.

Run: ``python bench/bench_corrections.py`` (about 5 minutes on 2 cores); prints a Markdown section
and writes it into bench/RESULTS.md under "## Correction families (issue 8)".
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import torch
from compare_common import write_section

from slm_dist import context, pipeline
from slm_dist.backends.local import LocalBackend
from slm_dist.checkpoint.index import open_index
from slm_dist.config import load_config

SECTION = "## Correction families (issue 8)"
log = logging.getLogger("bench")


def held_out_nll(backend: LocalBackend, held: list[int], window, correction: str | None) -> float:
    """NLL on the held-out batches only: score_plan runs over the backend's batch list."""
    every = backend._batch_ids
    backend._batch_ids = held
    try:
        return backend.score_plan([window] if window else [], "drop", None, "nll", correction=correction)
    finally:
        backend._batch_ids = every


def measure(args) -> dict:
    window = tuple(args.window)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [f"calibration.num_samples={args.samples}", "calibration.seq_len=256",
                                    "calibration.batch_size=8", "cluster.backend=local", "cluster.num_stages=1",
                                    "merge.rule=drop", "merge.correction=linear", "plan.search=global",
                                    "plan.target_layers_removed=6", f"run.dir={tmp}"])
        ctx = context.resolve_inputs(config, None, False)
        backend = LocalBackend()
        start = time.perf_counter()
        pipeline.calibrate(ctx, open_index(ctx.model_dir), backend)
        log.info("calibration: %d batches in %.0f s", len(backend._batch_ids), time.perf_counter() - start)
        batches = list(backend._batch_ids)
        if len(batches) < args.held_out + max(args.fit_batches):
            sys.exit(f"--samples {args.samples} gives {len(batches)} batches of 8; need --held-out {args.held_out} "
                     f"+ {max(args.fit_batches)} to fit on")
        held, stage = batches[-args.held_out:], backend.stages[0]
        out = {"dense": held_out_nll(backend, held, None, None), "plain": held_out_nll(backend, held, window, None),
               "fits": []}
        for n in args.fit_batches:
            for kind in ("linear", "refit"):
                stage.clear_candidates(corrections=True)
                start = time.perf_counter()
                fit = stage.fit_correction(window, "drop", None, batches[:n], kind)
                seconds = time.perf_counter() - start
                nll = held_out_nll(backend, held, window, kind)
                log.info("%s on %d batches: cv %.3f, held-out NLL %.4f (%.1f s fit)", kind, n, fit.loss, nll, seconds)
                out["fits"].append({"kind": kind, "batches": n, "cv": fit.loss, "ridge": fit.ridge, "nll": nll,
                                    "seconds": seconds})
        out.update(window=list(window), samples=args.samples, held_out=args.held_out)
        return out


def render(r: dict, command: str) -> str:
    gap = r["plain"] - r["dense"]
    lines = [SECTION, "",
             f"SmolLM2-135M, window {r['window'][0]}-{r['window'][1]} removed (merged by `drop`). One calibration pass of "
             f"{r['samples']} x 256 tokens in batches of 8; the last {r['held_out']} batches are held out and never "
             "fitted on. Next-token NLL on them (lower is better); \"gap closed\" is the share of the plain merge's "
             "excess NLL over the dense model that the correction removes, both measured in this run.", "",
             f"Dense {r['dense']:.4f}; plain merge {r['plain']:.4f}.", "",
             "| correction | fitted on (batches) | cross-validated error vs plain merge | ridge | held-out NLL | gap closed | fit time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for f in r["fits"]:
        closed = (r["plain"] - f["nll"]) / gap if gap > 0 else float("nan")
        lines.append(f"| {f['kind']} | {f['batches']} | {f['cv']:.3f} | {f['ridge']} | {f['nll']:.4f} | {closed:.1%} | "
                     f"{f['seconds']:.1f} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, nargs=2, default=(12, 18))
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--fit-batches", type=int, nargs="+", default=(4, 16))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    section = render(measure(args), " ".join(["python bench/bench_corrections.py", *sys.argv[1:]]))
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
        log.info("wrote the %r section of bench/RESULTS.md", SECTION)


if __name__ == "__main__":
    main()
