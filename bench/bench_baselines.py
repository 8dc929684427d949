"""slm-dist's best plan against the training-free baselines of today on SmolLM2-135M, at 6 and 10 of 30
layers (issue 19): SLEB, ReplaceMe (least squares and cosine), and the ones issue 8 already compares.

    python bench/bench_baselines.py [--run-dir runs/bench-baselines] [--limit 200] [--no-tasks] \
        [--removed 6 --removed 10] [--methods a,b,...] [key=value ...]

Runs `slm_dist.compare` exactly as bench_plans.py does (one calibration pass of 32 x 256 tokens of the demo
Wikipedia text shared by every method; each plan merged, written and evaluated through the stages) and
writes the table into the "## Training-free baselines (issue 19)" section of bench/RESULTS.md, with a
standard error for every accuracy (sqrt(p (1 - p) / (n - 1)) over the n items) and for the 7-task
average (sqrt(sum se^2) / 7). ``--no-tasks`` measures perplexity only (cheap: a minute per model).
"""

from __future__ import annotations

import argparse
import math
import sys

from compare_common import PLAN_SETTINGS, Summary, add_arguments, calibration_text, rivals, run

from slm_dist import compare

METHODS = ("shortgpt", "angular", "sleb", "replaceme_lstsq", "replaceme_cosine", "slm_global_scaled",
           "slm_global_refit")
OURS = ("slm_global_drop", "slm_global_scaled", "slm_global_linear", "slm_global_refit", "angular_refit", "angular_pool",
        "sleb_refit", "sleb_pool")
BASELINES = ("shortgpt", "angular", "laco", "last_layers", "slm_output", "sleb", "replaceme_lstsq",
             "replaceme_cosine", "linearpatch_sleb", "linearpatch_angular")
SECTION = "## Training-free baselines (issue 19)"
AVERAGED = ("piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag", "boolq")


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else math.nan


def average_stderr(row: dict, settings: dict) -> float | None:
    """The SE of the plain mean over the tasks that make the average (not LAMBADA)."""
    metric, items = settings["metric"], settings["items"]
    ses = [stderr(row["eval"]["tasks"][t][metric[t]], items[t]) for t in metric if t in AVERAGED]
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None


def table(result: dict) -> str:
    """compare's table, each accuracy with its standard error, a column of ratios to dense."""
    settings = result["eval_settings"]
    ppl_files = list(settings["ppl_windows"])
    tasks = list(settings["metric"])
    metric, items = settings["metric"], settings["items"]
    head = ["Method", "Removed", "Plan", *(f"PPL {compare._short(f)}" for f in ppl_files),
            *(f"x dense {compare._short(f)}" for f in ppl_files[:1]),
            *(f"{t} ({metric[t]})" for t in tasks), *(["Avg ± SE"] if tasks else []),
            *(["LAMBADA (acc) ± SE"] if "lambada_items" in settings else [])]
    rows = [r for r in result["rows"] if "eval" in r]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ev = row["eval"]
        cells = [compare.LABELS[row["method"]], str(row["layers_removed"]),
                 compare.describe_plan(row["windows"], row["rule"]) + compare.correction_label(row["key"]),
                 *(compare._fmt(ev["ppl"].get(f)) for f in ppl_files)]
        if dense is not None:
            cells += [f"{ev['ppl'][f] / dense['eval']['ppl'][f]:.2f}x" for f in ppl_files[:1]]
        for t in tasks:
            p = ev["tasks"].get(t, {}).get(metric[t])
            cells.append("n/a" if p is None else f"{100 * p:.1f} ± {100 * stderr(p, items[t]):.1f}")
        if tasks:
            se = average_stderr(row, settings)
            cells.append("n/a" if ev["average"] is None else f"{100 * ev['average']:.1f} ± {100 * se:.1f}")
        if "lambada_items" in settings:
            p = ev.get("lambada", {}).get("acc")
            cells.append("n/a" if p is None else f"{100 * p:.1f} ± {100 * stderr(p, settings['lambada_items']):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict) -> list[str]:
    """Per layer count and measure: the best slm-dist row against the best baseline row; 'beats' only
    beyond one standard error for accuracies (perplexity: lower is better, said as measured)."""
    ppl_files = list(result["eval_settings"]["ppl_windows"])
    lines = []
    for k, ours, theirs in rivals(result, OURS, BASELINES):
        if not ours or not theirs:
            continue
        for f in ppl_files:
            best = min(ours, key=lambda r: r["eval"]["ppl"][f])
            rival = min(theirs, key=lambda r: r["eval"]["ppl"][f])
            a, b = best["eval"]["ppl"][f], rival["eval"]["ppl"][f]
            said = "**beats every baseline in this table**" if a < b else "**does NOT beat every baseline**"
            lines.append(f"- k={k}, PPL {compare._short(f)}: best slm-dist ({compare.LABELS[best['method']]}) "
                         f"{a:.2f} vs best baseline ({compare.LABELS[rival['method']]}) {b:.2f}: {said}")
        if result["eval_settings"]["metric"]:
            best = max(ours, key=lambda r: r["eval"]["average"])
            rival = max(theirs, key=lambda r: r["eval"]["average"])
            a, b = best["eval"]["average"], rival["eval"]["average"]
            se = math.hypot(average_stderr(best, result["eval_settings"]), average_stderr(rival, result["eval_settings"]))
            said = ("**beats every baseline**" if a - b > se else "**is beaten by more than one SE**" if b - a > se
                    else "ties (within one SE)")
            lines.append(f"- k={k}, average accuracy: best slm-dist ({compare.LABELS[best['method']]}) {100 * a:.1f} "
                         f"vs best baseline ({compare.LABELS[rival['method']]}) {100 * b:.1f} (SE of the "
                         f"difference {100 * se:.1f}): {said}")
        n = result["eval_settings"].get("lambada_items")
        if n:
            best = max(ours, key=lambda r: r["eval"]["lambada"]["acc"])
            rival = max(theirs, key=lambda r: r["eval"]["lambada"]["acc"])
            a, b = best["eval"]["lambada"]["acc"], rival["eval"]["lambada"]["acc"]
            se = math.hypot(stderr(a, n), stderr(b, n))
            said = ("**beats every baseline**" if a - b > se else "**is beaten by more than one SE**" if b - a > se
                    else "ties (within one SE)")
            lines.append(f"- k={k}, LAMBADA: best slm-dist ({compare.LABELS[best['method']]}) {100 * a:.1f} vs best "
                         f"baseline ({compare.LABELS[rival['method']]}) {100 * b:.1f} (SE {100 * se:.1f}): {said}")
    return lines


def section(result: dict, command: str) -> str:
    cal = result["calibration"]
    summary = Summary.of(result)
    return "\n".join([
        SECTION, "",
        "SmolLM2-135M (30 layers) pruned by 6 (20%) and 10 (33%) layers. Perplexity: lower is better; "
        "\"x dense\" is the ratio to the dense model measured in the same run. Accuracies in % ± one standard "
        "error (sqrt(p(1-p)/(n-1)); the average's SE is sqrt(sum se^2)/7).", "",
        table(result), "",
        *verdict(result), "",
        f"- Items: {summary.items or 'none (perplexity only)'}; perplexity on {summary.windows}.",
        f"- One calibration pass for every method: {cal['num_samples']} x {cal['seq_len']} tokens of "
        f"{calibration_text(cal)} (seed {cal['seed']}): SLEB's trials, ReplaceMe's fits and slm-dist's search all use it"
        + (f" (SLEB's trials and the search's measured plans score on its first {cal['score_batches']} batches: "
           "`plan.score_batches`)." if cal.get("score_batches") else "."),
        "- slm-dist global-search rows (slm_global_*): `" + " ".join(PLAN_SETTINGS) + "`; angular_refit searches nothing.",
        *summary.closing(command)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "bench-baselines", limit=200, long_limit=None, ppl_windows=32)
    parser.add_argument("--no-tasks", action="store_true", help="perplexity only")
    parser.add_argument("--lambada", action="store_true", help="also LAMBADA last-word accuracy (first --limit texts)")
    args = parser.parse_args()
    import compare_common

    if args.no_tasks:
        compare_common.TASKS = {}
    if args.lambada:
        compare_common.LAMBADA = compare_common.DATA / "lambada" / "lambada_test.jsonl"
    return run(args, SECTION, section, METHODS)


if __name__ == "__main__":
    sys.exit(main())
