"""slm-dist's best plans against every baseline on SmolLM2-135M, at 6 and 10 of 30 layers (issue 8).

    python bench/bench_plans.py [--run-dir runs/bench-plans] [--limit 500] [--long-limit 200] \
        [--removed 6 --removed 10] [--methods a,b,...] [key=value ...]

Runs `slm_dist.compare` (one calibration pass shared by every method; each plan merged, written and
evaluated through the stages) with slm-dist's global search configured as below, on WikiText-2 and
PTB perplexity and the seven zero-shot tasks in ../shared/data, then writes the table into the
"## Plans that keep the model (issue 8)" section of bench/RESULTS.md. Every method sees the same
items and windows. Rerunning with the same settings reuses the plans and the models already
measured (<run-dir>/compare/compare.json), so an interrupted run resumes where it stopped.

slm-dist's plan (methods ``slm_global_drop`` / ``slm_global_scaled`` / ``slm_global_linear`` /
``slm_global_refit``, the last two with ``merge.correction=linear`` / ``refit``): ``plan.search=global``,
``plan.cost=measured`` (each layer's own calibration-loss damage), ``plan.candidates=12`` plans
(every cost's best plan, then every cost's best single block, then second bests) ranked by
calibration NLL, then ``plan.local_search=32`` more plans one swap from the best. HellaSwag and BoolQ items are long (4 x ~90 and 2 x ~180 tokens per item), so
they get ``--long-limit`` items: the first N, written to <run-dir>/data (same items for every method).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compare_common import PLAN_SETTINGS, Summary, add_arguments, rivals, run

from slm_dist import compare

METHODS = ("shortgpt", "angular", "laco", "last_layers", "slm_output", "slm_cka_reference", "slm_global_drop",
           "slm_global_scaled", "slm_global_linear", "slm_global_refit")
OURS = ("slm_global_drop", "slm_global_scaled", "slm_global_linear", "slm_global_refit")
BASELINES = ("shortgpt", "angular", "laco", "last_layers", "slm_output")
SECTION = "## Plans that keep the model (issue 8)"


def verdict(result: dict) -> list[str]:
    """Per layer count: does the best slm-dist row beat every baseline on each measure? Said plainly."""
    ppl_files = list(result["eval_settings"]["ppl_windows"])
    lines = []
    for k, ours, theirs in rivals(result, OURS, BASELINES):
        if not ours or not theirs:
            lines.append(f"- k={k}: not measured yet ({len(ours)} slm-dist rows, {len(theirs)} baseline rows)")
            continue
        unmeasured = [m for m in BASELINES if m in result["methods"] and m not in {r["method"] for r in theirs}]
        if unmeasured:
            lines.append(f"- k={k}: against the baselines measured so far; not yet: {', '.join(unmeasured)}")
        measures = [(f"PPL {compare._short(f)}", lambda r, f=f: -r["eval"]["ppl"][f]) for f in ppl_files]
        measures.append(("average accuracy", lambda r: r["eval"]["average"]))
        for name, score in measures:
            best = max(ours, key=score)
            rival = max(theirs, key=score)
            value = (lambda r: -score(r)) if name.startswith("PPL") else (lambda r: 100 * score(r))
            if score(best) > score(rival):
                said = "**beats every baseline**"
            elif score(best) == score(rival):
                same = removed_layers(best) == removed_layers(rival)
                said = "**ties the best baseline, does NOT beat it**" + (" (the same layers removed)" if same else "")
            else:
                said = "**does NOT beat every baseline**"
            lines.append(f"- k={k}, {name}: best slm-dist ({compare.LABELS[best['method']]}) "
                         f"{value(best):.2f} vs best baseline ({compare.LABELS[rival['method']]}) {value(rival):.2f}: "
                         + said)
    return lines


def removed_layers(row: dict) -> set[int]:
    return {layer for lo, hi in row["windows"] for layer in range(lo + 1, hi + 1)}


def plan_notes(run_dir: Path, result: dict) -> list[str]:
    """What slm-dist's search chose and why: candidates, local search, alphas (from the plan.json files)."""
    lines = []
    for k in result["layers_removed"]:
        for method in OURS:
            path = run_dir / "compare" / f"{method}-{k}" / "plan.json"
            if not path.is_file():
                continue
            plan = json.loads(path.read_text())
            g = plan["details"].get("global", {})
            first = g.get("candidates", [{}])[0]
            note = (f"- {method}, k={k}: windows {plan['windows']} (calibration NLL {g.get('loss', float('nan')):.4f}; "
                    f"best of {len(g.get('candidates', []))} candidates: {first.get('windows')} from "
                    f"`{first.get('proposed_by')}`, then {len(g.get('local_search', []))} local-search plans)")
            if plan.get("alphas") is not None:
                note += f"; alphas {[round(a, 4) for a in plan['alphas']]}"
            fits = plan["details"].get("corrections")
            if fits:
                note += f"; {fits[0].get('kind', 'linear')} corrections: held-out error " + ", ".join(
                    f"{f['window']} {f['loss']:.3f}" + ("" if f["ridge"] is not None else " (plain merge kept)")
                    for f in fits) + " of the plain merge's"
            lines.append(note)
    return lines


def fewer_long(result: dict) -> bool:
    counts = result["eval_settings"]["items"]
    return any(counts.get(t, 0) < max(counts.values()) for t in ("hellaswag", "boolq"))


def section(result: dict, command: str, run_dir: Path) -> str:
    cal = result["calibration"]
    summary = Summary.of(result)
    items, windows, rows = summary.items, summary.windows, summary.rows
    dense = next((r for r in rows if r["method"] == "dense"), None)
    dense_note = "" if dense is None else (
        "Dense: " + ", ".join(f"PPL {compare._short(f)} {v:.2f}" for f, v in dense["eval"]["ppl"].items())
        + (f", average accuracy {100 * dense['eval']['average']:.1f}%" if dense["eval"]["average"] else ""))
    return "\n".join([
        SECTION, "",
        "SmolLM2-135M (30 layers) pruned by 6 (20%) and 10 (33%) layers. Perplexity: lower is better. Tasks:",
        "accuracy in % (acc for BoolQ, PIQA, WinoGrande, ARC-Easy; acc_norm for HellaSwag, ARC-Challenge,",
        "OpenBookQA); Avg = their plain mean. " + dense_note, "",
        compare.format_table(result), "",
        "Verdict (best slm-dist row against the best baseline row, per measure; baselines: published SLM loop,",
        "ShortGPT, angular block, LaCo-style, drop-last):", "",
        *verdict(result), "",
        "What slm-dist's global search chose (`<run-dir>/compare/<method>-<k>/plan.json` has every candidate):", "",
        *plan_notes(run_dir, result), "",
        f"- Items (the same for every method): {items} (the first N of each file"
        + ("; HellaSwag and BoolQ fewer because their items are 2-4x longer" if fewer_long(result) else "")
        + "); perplexity on " + windows + ".",
        f"- One calibration pass for every method: {cal['num_samples']} x {cal['seq_len']} tokens of the demo "
        f"Wikipedia text (seed {cal['seed']}); the global search ranks its plans on the same samples.",
        "- slm-dist settings: `" + " ".join(PLAN_SETTINGS) + "` (plan.search=global is set by the method).",
        *summary.closing(command)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "bench-plans", limit=500, long_limit=200, ppl_windows=32)
    args = parser.parse_args()
    return run(args, SECTION, lambda result, command: section(result, command, args.run_dir), METHODS)


if __name__ == "__main__":
    sys.exit(main())
