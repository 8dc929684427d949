"""The paper's comparison on SmolLM2-135M: every baseline and SLM variant at 6 and 10 of 30 layers (issue 6).

    python bench/bench_quality.py [--limit 100] [--ppl-windows 16] [--removed 6 --removed 10] \
        [--plans-from runs/bench-plans] [key=value ...]

Runs `slm-dist compare` (one calibration pass shared by every method; each plan merged, written
and evaluated through the stages) on WikiText-2 and PTB perplexity and the seven zero-shot tasks in
../shared/data, then writes the table into the "## Quality (issue 6)" section of bench/RESULTS.md.
Every method sees the same items (the first --limit of each task) and the same perplexity windows
(--ppl-windows evenly spaced windows of --seq-len tokens). Calibration and plan settings are
bench_plans.py's, so ``--plans-from`` that run's folder skips the planning already done there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from compare_common import Summary, add_arguments, calibration_text, log, run

from slm_dist import compare

SECTION = "## Quality (issue 6)"


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


def plan_minutes(result: dict) -> str:
    """', statistics and plans N min', and where the slow plans came from when they were reused."""
    minutes = sum(result.get("seconds", {}).values()) / 60
    if minutes >= 0.5:
        return f", statistics and plans {minutes:.0f} min"
    return (f", statistics and plans {minutes * 60:.0f} s (the published-loop and global-search plans were reused "
            "from an earlier run with the same model, calibration tokens and plan settings)")


def section(result: dict, command: str) -> str:
    settings = result["eval_settings"]
    cal = result["calibration"]
    summary = Summary.of(result)
    items, windows, rows, missing = summary.items, summary.windows, summary.rows, summary.missing
    outputs = [r for r in rows if r["method"] == "slm_output"]
    model_s = sum(r.get("seconds", 0) for r in rows)
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
- One calibration pass for every method: {cal['num_samples']} x {cal['seq_len']} tokens of {calibration_text(cal)}
  (seed {cal['seed']}); CKA, Block Influence, and (one extra layer-by-layer pass) last-token angular distances.
- Layer 0 is kept by every method (SLM protects it; a plan cannot drop it); SLM and LaCo also keep the last layer.
  ShortGPT / angular / drop-last may remove the last layer, as in their papers.
- LaCo-style: fixed windows of 4 from the top with 1 layer between them, merged by RDSC (rule `sum`), no
  similarity check. SLM published-code mode: the authors' loop (final-hidden cosine vs the original model,
  rule `reference`), its threshold searched to remove k ({thresholds or 'not run'}).
- Compute: CPU (2 cores shared with other jobs), float32: {model_s / 60:.0f} min of merging and scoring over the
  {len(rows)} models{plan_minutes(result)}.
{'- Not measured: ' + '; '.join(missing) if missing else ''}
- Command: `{command}`
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "bench-quality", limit=100, long_limit=None, ppl_windows=16)
    parser.add_argument("--plans-from", type=Path,
                        help="a bench_plans run folder (runs/bench-plans) whose plans to start from")
    args = parser.parse_args()
    before = (lambda: seed_plans(args.plans_from, args.run_dir / "compare")) if args.plans_from else None
    return run(args, SECTION, section, compare.METHODS, before)


if __name__ == "__main__":
    sys.exit(main())
