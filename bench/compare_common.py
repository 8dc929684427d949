"""What bench_quality.py (issue 6) and bench_plans.py (issue 8) share: the data, the settings, the run.

Both run `slm_dist.compare` on SmolLM2-135M with the same calibration and plan settings (so one
run's plans can seed the other's), evaluate on ../shared/data, and write their own section of
bench/RESULTS.md. Rerunning with the same settings reuses the plans and the models already measured
(<run-dir>/compare/compare.json), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from slm_dist import compare, evaluation
from slm_dist.assets import default_cache_dir, prepare_demo_assets
from slm_dist.config import load_config

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
DATA = REPO.parent / "shared" / "data"
PPL = ("wikitext-2-raw/wiki.test.hf_rows.jsonl", "ptb/ptb.test.txt")
TASKS = {"piqa": "piqa/valid.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl",
         "arc_challenge": "arc/ARC-Challenge-Test.jsonl", "openbookqa": "openbookqa/test.jsonl",
         "winogrande": "winogrande/dev.jsonl", "hellaswag": "hellaswag/hellaswag_val_full.txt",
         "boolq": "boolq/val.jsonl"}
LONG_TASKS = {"hellaswag": 6, "boolq": 1}  # tasks with 2-4x longer items: lines per item in the file
PLAN_SETTINGS = ("plan.cost=measured", "plan.candidates=12", "plan.local_search=32", "plan.refine_metric=nll")
CALIBRATION = ("calibration.num_samples=32", "calibration.seq_len=256", "calibration.batch_size=8")
LAMBADA: Path | None = None  # set by a bench that reports LAMBADA (its first --limit texts)

Section = Callable[[dict, str], str]  # (compare result, command line) -> the Markdown section


def add_arguments(parser: argparse.ArgumentParser, run_dir: str, limit: int, long_limit: int | None,
                  ppl_windows: int) -> None:
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / run_dir)
    parser.add_argument("--limit", type=int, default=limit, help="first N items of each task")
    parser.add_argument("--long-limit", type=int, default=long_limit,
                        help="first N items of HellaSwag and BoolQ (default: --limit)")
    parser.add_argument("--ppl-windows", type=int, default=ppl_windows, help="perplexity windows per text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--removed", type=int, action="append", help="layers to remove (default: 6 and 10)")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(compare.METHODS))
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating RESULTS.md")
    parser.add_argument("--render-only", action="store_true",
                        help="write the section from <run-dir>/compare/compare.json as it stands (no compute)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")


def first_items(source: Path, out: Path, items: int, lines_per_item: int) -> Path:
    """The first ``items`` items of a task file, as a file of its own (the same items for every method)."""
    lines = source.read_text(encoding="utf-8").split("\n")  # as the readers split (not str.splitlines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[:items * lines_per_item]) + "\n", encoding="utf-8")
    return out


def task_files(args) -> dict[str, Path]:
    """Every task's file; HellaSwag and BoolQ cut to --long-limit items when that is below --limit."""
    tasks = {}
    for name, rel in TASKS.items():
        path = DATA / rel
        if name in LONG_TASKS and args.long_limit is not None and args.long_limit < args.limit:
            path = first_items(path, args.run_dir / "data" / f"{name}-first{args.long_limit}{path.suffix}",
                               args.long_limit, LONG_TASKS[name])
        tasks[name] = path
    return tasks


@dataclass(frozen=True)
class Summary:
    """What both sections say of a compare result: items, windows, measured rows, failures."""

    items: str          # "piqa 300, arc_easy 300, ..."
    windows: str        # "wikitext-2-raw 16 x 512 tokens, ..."
    rows: list[dict]    # the rows that were evaluated
    missing: list[str]  # "label (k=K)" of the rows that failed
    pending: list[str]  # "method (k=K)" of the rows the run has not reached (an interrupted run)

    @classmethod
    def of(cls, result: dict) -> "Summary":
        settings = result["eval_settings"]
        reached = {(r["method"], r["target_removed"]) for r in result["rows"]}
        return cls(", ".join(f"{t} {n}" for t, n in settings["items"].items()),
                   ", ".join(f"{Path(f).parent.name} {n} x {settings['seq_len']} tokens"
                             for f, n in settings["ppl_windows"].items()),
                   [r for r in result["rows"] if "eval" in r],
                   [f"{r['label']} (k={r['target_removed']})" for r in result["rows"] if "error" in r],
                   [f"{m} (k={k})" for k in result["layers_removed"] for m in result["methods"]
                    if (m, k) not in reached])


    def closing(self, command: str) -> list[str]:
        """The section's last lines: rows that failed, rows not reached, the command."""
        return [*([f"- Not measured: {'; '.join(self.missing)}"] if self.missing else []),
                *([f"- Not reached (the run was stopped; rerunning the command resumes it): {', '.join(self.pending)}"]
                  if self.pending else []),
                f"- Command: `{command}`", ""]


def rivals(result: dict, ours: tuple[str, ...], baselines: tuple[str, ...]) -> Iterator[tuple[int, list, list]]:
    """Per layer count: (k, slm-dist's evaluated rows, the baselines' evaluated rows), for a verdict."""
    rows = [r for r in result["rows"] if "eval" in r]
    for k in result["layers_removed"]:
        yield (k, [r for r in rows if r["method"] in ours and r["target_removed"] == k],
               [r for r in rows if r["method"] in baselines and r["target_removed"] == k])


def gathered(result: dict, methods: list[str], removed: list[int]) -> dict:
    """The result as one run over ``methods`` at ``removed`` would report it, from every row compare.json
    holds for its settings (those of the last run and those kept from earlier runs over other methods)."""
    pool = {}
    for row in result.get("rows", []) + result.get("other_rows", []):
        pool.setdefault((row["method"], row["target_removed"]), row)
    rows = [pool[m, k] for m, k in [("dense", 0)] + [(m, k) for k in removed for m in methods] if (m, k) in pool]
    return {**result, "rows": rows, "methods": list(methods), "layers_removed": list(removed)}


# In a section, everything from this line on is written by hand (readings, caveats): a rerun keeps it.
HAND_NOTES = "<!-- written by hand below: bench reruns keep it -->"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed ``title`` in RESULTS.md, leaving other sections alone
    and keeping the section's hand-written part (from ``HAND_NOTES`` on)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + len(title))
        old = text[start:end] if end >= 0 else text[start:]
        notes = old[old.find(HAND_NOTES):].rstrip("\n") if HAND_NOTES in old else ""
        text = (text[:start] + body.rstrip("\n") + "\n" + ("\n" + notes + "\n" if notes else "")
                + (text[end:] if end >= 0 else ""))
    path.write_text(text)


def run(args, title: str, section: Section, methods: tuple[str, ...],
        before: Callable[[], None] | None = None) -> int:
    """The benchmark: compare every method, then write (or print) the section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not DATA.is_dir():
        log.warning("skipped: the evaluation data folder %s is absent (see ../shared/data/SOURCES.md)", DATA)
        return 0
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    if args.render_only:
        result = json.loads((args.run_dir / "compare" / "compare.json").read_text())
        result = gathered(result, args.methods.split(",") if args.methods else methods, args.removed or [6, 10])
        body = section(result, command.replace(" --render-only", ""))
    else:
        demo = prepare_demo_assets(default_cache_dir())
        if before is not None:
            before()
        config = load_config(None, [
            f"model.path={demo.model_dir}", f"calibration.source={demo.calibration_text}", f"run.dir={args.run_dir}",
            *CALIBRATION, "plan.target_layers_removed=6", *PLAN_SETTINGS, "merge.max_shard_bytes=100000000",
            "cluster.num_stages=1", f"eval.seq_len={args.seq_len}", f"eval.max_windows={args.ppl_windows}",
            "eval.batch_tokens=4096", *args.overrides])
        spec = evaluation.EvalSpec.from_config(config.eval, [DATA / p for p in PPL], task_files(args), args.limit)
        if LAMBADA is not None:
            from dataclasses import replace

            spec = replace(spec, lambada=LAMBADA)
        chosen = args.methods.split(",") if args.methods else methods
        result = compare.compare(config, args.removed or [6, 10], spec, chosen, show_progress=False)
        body = section(result, command)
    if args.no_write:
        sys.stdout.write(body)
    else:
        write_section(title, body)
        log.info("wrote the %r section of %s", title, RESULTS)
    return 0


def calibration_text(cal: dict) -> str:
    """What compare.json's calibration section says was sampled: the demo text unless calibration.source was set."""
    return "the demo Wikipedia text" if cal.get("source") is None else f"`{cal['source']}`"
