"""The paper's comparison on SmolLM2-135M: every baseline and SLM variant at 6 and 10 of 30 layers.

    python bench/bench_quality.py [--limit 100] [--ppl-windows 16] [--removed 6 --removed 10] [key=value ...]

Runs `slm-dist compare` (one calibration pass shared by every method; each plan merged, written
and evaluated through the stages) on WikiText-2 and PTB perplexity and the seven zero-shot tasks in
../shared/data, then writes the table into the "## Quality (issue 6)" section of bench/RESULTS.md.
Every method sees the same items (the first --limit of each task) and the same perplexity windows
(--ppl-windows evenly spaced windows of --seq-len tokens). Rerunning with the same settings reuses
the models already measured (<run-dir>/compare/compare.json), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

from slm_dist import compare, evaluation
from slm_dist.assets import default_cache_dir, prepare_demo_assets
from slm_dist.config import load_config

log = logging.getLogger("bench_quality")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PPL = ("wikitext-2-raw/wiki.test.hf_rows.jsonl", "ptb/ptb.test.txt")
TASKS = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl",
         "arc_challenge": "arc/ARC-Challenge-Test.jsonl", "openbookqa": "openbookqa/test.jsonl",
         "winogrande": "winogrande/dev.jsonl", "hellaswag": "hellaswag/hellaswag_val_full.txt",
         "boolq": "boolq/val.jsonl"}
SECTION = "## Quality (issue 6)"
PLAN_SETTINGS = ("plan.cost=measured", "plan.candidates=8", "plan.local_search=16", "plan.refine_metric=nll")


def seed_plans(source: Path, compare_dir: Path) -> None:
    """Start from another compare run's plans and measured scores (bench_plans' run folder).

    compare keeps a stored plan only when the model, calibration tokens and plan settings match
    (its fingerprint), and never reuses a result row measured with other evaluation settings, so
    this saves the planning (the published loop's threshold search above all) and nothing else.
    """
    compare_dir.mkdir(parents=True, exist_ok=True)
    plans = json.loads((Path(source) / "compare" / "compare.json").read_text())
    mine = compare_dir / "compare.json"
    current = json.loads(mine.read_text()) if mine.is_file() else {}
    if current.get("plans_fingerprint") != plans.get("plans_fingerprint"):
        current = {"plans_fingerprint": plans.get("plans_fingerprint"), "plans": {}, "rows": []}
    current["plans"] = {**plans.get("plans", {}), **current.get("plans", {})}
    mine.write_text(json.dumps(current, indent=1))
    for name in ("output_scores.json", "plan_losses.json"):
        if (Path(source) / "compare" / name).is_file() and not (compare_dir / name).is_file():
            shutil.copy(Path(source) / "compare" / name, compare_dir / name)
    log.info("seeded %s with %d plans from %s", compare_dir, len(plans.get("plans", {})), source)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    path.write_text(text)


def section(result: dict, command: str) -> str:
    settings = result["eval_settings"]
    cal = result["calibration"]
    items = ", ".join(f"{t} {n}" for t, n in settings["items"].items())
    windows = ", ".join(f"{Path(f).parent.name} {n} x {settings['seq_len']} tokens"
                        for f, n in settings["ppl_windows"].items())
    rows = [r for r in result["rows"] if "eval" in r]
    outputs = [r for r in rows if r["method"] == "slm_output"]
    model_s = sum(r.get("seconds", 0) for r in rows)
    missing = [f"{r['label']} (k={r['target_removed']})" for r in result["rows"] if "error" in r]
    thresholds = "; ".join(f"k={r['target_removed']}: T={r['threshold']:.4f} removes {r['layers_removed']}"
                           for r in outputs)
    return f"""{SECTION}

SmolLM2-135M (30 layers), pruned by 6 (20%) and 10 (35%) layers with every method; dense model first.
Perplexity: lower is better. Tasks: accuracy in %, the metric each paper reports (acc for BoolQ,
PIQA, WinoGrande, ARC-Easy; acc_norm for HellaSwag, ARC-Challenge, OpenBookQA); Avg = their plain mean.

{compare.format_table(result)}

- Samples (the same for every method): the first {settings['limit']} items of each task ({items});
  perplexity on {windows} (windows evenly spaced over the whole test text; BOS: {settings['bos']}).
  With {settings['limit']} items an accuracy has a standard error of about
  {100 * (0.25 / settings['limit']) ** 0.5:.0f} points: read task columns as trends, perplexity as the sharper signal.
- One calibration pass for every method: {cal['num_samples']} x {cal['seq_len']} tokens of the demo Wikipedia text
  (seed {cal['seed']}); CKA, Block Influence, and (one extra layer-by-layer pass) last-token angular distances.
- Layer 0 is kept by every method (SLM protects it; a plan cannot drop it); SLM and LaCo also keep the last layer.
  ShortGPT / angular / drop-last may remove the last layer, as in their papers.
- LaCo-style: fixed windows of 4 from the top with 1 layer between them, merged by RDSC (rule `sum`), no
  similarity check. SLM published-code mode: the authors' loop (final-hidden cosine vs the original model,
  rule `reference`), its threshold searched to remove k ({thresholds or 'not run'}).
- Compute: CPU (2 cores shared with other jobs), float32: {model_s / 60:.0f} min of merging and scoring over the
  {len(rows)} models{', statistics and plans ' + str(round(sum(result.get('seconds', {}).values()) / 60)) + ' min' if result.get('seconds') else ''}.
{'- Not measured: ' + '; '.join(missing) if missing else ''}
- Command: `{command}`
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench-quality")
    parser.add_argument("--limit", type=int, default=100, help="first N items of each task")
    parser.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows per text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--removed", type=int, action="append", help="layers to remove (default: 6 and 10)")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(compare.METHODS))
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating RESULTS.md")
    parser.add_argument("--render-only", action="store_true",
                        help="write the section from <run-dir>/compare/compare.json as it stands (no compute)")
    parser.add_argument("--plans-from", type=Path,
                        help="a bench_plans run folder (runs/bench-plans) whose plans to start from")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not DATA.is_dir():
        log.warning("skipped: the evaluation data folder %s is absent (see ../shared/data/SOURCES.md)", DATA)
        return 0

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    if args.render_only:
        result = json.loads((args.run_dir / "compare" / "compare.json").read_text())
        body = section(result, command.replace(" --render-only", ""))
        sys.stdout.write(body) if args.no_write else write_section(REPO / "bench" / "RESULTS.md", body)
        return 0
    demo = prepare_demo_assets(default_cache_dir())
    if args.plans_from:
        seed_plans(args.plans_from, args.run_dir / "compare")
    # The calibration and plan settings of bench/bench_plans.py, so the two tables share their plans.
    config = load_config(None, [
        f"model.path={demo.model_dir}", f"calibration.source={demo.calibration_text}", f"run.dir={args.run_dir}",
        "calibration.num_samples=32", "calibration.seq_len=256", "calibration.batch_size=8",
        "plan.target_layers_removed=6", *PLAN_SETTINGS, "merge.max_shard_bytes=100000000", "cluster.num_stages=1",
        f"eval.seq_len={args.seq_len}", f"eval.max_windows={args.ppl_windows}", "eval.batch_tokens=4096",
        *args.overrides])
    spec = evaluation.EvalSpec.from_config(config.eval, [DATA / p for p in PPL],
                                           {name: DATA / rel for name, rel in TASKS.items()}, args.limit)
    methods = args.methods.split(",") if args.methods else compare.METHODS
    result = compare.compare(config, args.removed or [6, 10], spec, methods, show_progress=False)
    body = section(result, command)
    (args.run_dir / "results.json").write_text(json.dumps(result, indent=1))
    if args.no_write:
        sys.stdout.write(body)
    else:
        write_section(REPO / "bench" / "RESULTS.md", body)
        log.info("wrote the %r section of %s", SECTION, REPO / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
